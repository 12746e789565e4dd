//! Writing a network as a checkpoint transformers and upstream autocontrastive-gen load:
//! `config.json` (the source config with `lm_head_layer_indices` and `torch_dtype` set),
//! `model.safetensors` under transformers' names (a tied LM head is not written), and the
//! tokenizer and generation files copied beside them. Every file is written whole or not at all.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::weights::{DType, HostTensor};

use super::network::Network;

/// Writes `network` to `dir` as a checkpoint in `dtype`, `config` its config.json.
pub fn save_checkpoint(
    dir: &Path,
    network: &Network,
    config: &Value,
    dtype: DType,
    companions: &[PathBuf],
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut config = config.clone();
    if let Value::Object(map) = &mut config {
        let exits = network.exit_layers();
        if exits.is_empty() {
            map.remove("lm_head_layer_indices");
        } else {
            map.insert("lm_head_layer_indices".into(), exits.into());
        }
        let name = match dtype {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            _ => "float32",
        };
        map.insert("torch_dtype".into(), name.into());
    }
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::invalid("config", e.to_string()))?;
    write_atomically(&dir.join("config.json"), text.as_bytes())?;
    let p = &network.params;
    write_safetensors(&dir.join("model.safetensors"), &p.to_tensors(&p.values, dtype))?;
    for file in companions {
        if let Some(name) = file.file_name() {
            let target = dir.join(name);
            if target != *file {
                std::fs::copy(file, &target).map_err(|e| Error::io(file, e))?;
            }
        }
    }
    Ok(())
}

/// Writes `bytes` to a temporary sibling, then renames it over `path`: a kill mid-write leaves the
/// previous file whole.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, bytes).map_err(|e| Error::io(&partial, e))?;
    std::fs::rename(&partial, path).map_err(|e| Error::io(path, e))
}

/// Writes `tensors` as one safetensors file (metadata `format: pt`, as transformers writes).
pub fn write_safetensors(path: &Path, tensors: &[(String, HostTensor)]) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, t)| {
            safetensors::tensor::TensorView::new(t.dtype().to_safetensors(), t.shape().to_vec(), t.bytes())
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::invalid(name.clone(), e.to_string()))
        })
        .collect::<Result<_>>()?;
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    let bytes =
        safetensors::serialize(views, Some(metadata)).map_err(|e| Error::invalid("checkpoint", e.to_string()))?;
    write_atomically(path, &bytes)
}
