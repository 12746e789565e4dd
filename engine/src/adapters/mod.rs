//! PEFT adapters (a folder with `adapter_config.json` and `adapter_model.safetensors`, as the
//! `peft` library saves them), applied to a checkpoint's weights before the model is built:
//!
//! - LoRA ([`lora`]): `W + (lora_alpha / r) * B A` (`/ sqrt(r)` with `use_rslora`), merged at load
//!   into every target module, in f32; `lora_dropout` does nothing at inference.
//! - (IA)^3 ([`ia3`]): learned scales of a module's outputs (keys, values, ...; the bias too) or, for
//!   `feedforward_modules`, of its inputs, merged at load.
//! - Prompt tuning ([`prompt`]): `num_virtual_tokens` learned embeddings, appended to the token
//!   embedding as rows `vocab_size ..` and put before every prompt the decoder runs.
//!
//! Which way a module's matrix is stored (GPT-2's `Conv1D` `[in, out]`, `nn.Linear` `[out, in]`)
//! comes from the architecture, as peft decides `fan_in_fan_out` from the module's class. Anything
//! else (other adapter types, DoRA, trained biases, `modules_to_save`, LoRA on embeddings, per-module
//! rank or alpha patterns, target modules the checkpoint lacks) is refused by name.
//!
//! ```
//! # fn main() -> layerwise::Result<()> {
//! let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
//! let loaded = layerwise::load_adapted(
//!     &format!("{fixtures}/gpt2-sharded"),
//!     std::path::Path::new(&format!("{fixtures}/adapters/lora-gpt2")),
//!     layerwise::Cpu::default(),
//! )?;
//! assert_eq!(loaded.adapter.as_deref(), Some("LORA r=4 alpha=8 on 16 modules"));
//! # Ok(())
//! # }
//! ```

pub mod ia3;
pub mod lora;
pub mod prompt;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::weights::{HostTensor, Weights};
use crate::model::config::{Architecture, ModelSpec};

/// An adapter folder, read and checked.
pub struct Adapter {
    pub dir: PathBuf,
    pub kind: Kind,
    /// The adapter's tensors by name, as saved (`base_model.model.` prefixes included).
    tensors: HashMap<String, HostTensor>,
}

/// The adapter types layerwise applies.
#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    Lora { r: usize, alpha: f64, rslora: bool },
    Ia3 { feedforward_modules: Vec<String> },
    PromptTuning { num_virtual_tokens: usize },
}

impl Adapter {
    /// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`; an unsupported type or
    /// option is an error naming the file and the field.
    pub fn open(dir: &Path) -> Result<Adapter> {
        let config_path = dir.join("adapter_config.json");
        let text = crate::io::read_config_file(&config_path)?;
        let config: Value =
            serde_json::from_str(&text).map_err(|e| Error::bad_file(&config_path, format!("not JSON ({e})")))?;
        let field =
            |name: &str, reason: String| Error::Config { path: config_path.clone(), field: name.to_string(), reason };
        let peft_type = config.get("peft_type").and_then(Value::as_str).unwrap_or("");
        // Options that change what the weights mean: refused unless off.
        let refuse_if_set = |name: &str| -> Result<()> {
            match config.get(name) {
                None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(()),
                Some(Value::Object(map)) if map.is_empty() => Ok(()),
                Some(Value::Array(list)) if list.is_empty() => Ok(()),
                Some(Value::String(s)) if s == "none" => Ok(()),
                Some(other) => {
                    Err(field(name, format!("{other} is not supported (layerwise applies adapters without it)")))
                }
            }
        };
        refuse_if_set("modules_to_save")?;
        let kind = match peft_type {
            "LORA" => {
                for name in ["use_dora", "bias", "lora_bias", "rank_pattern", "alpha_pattern", "layer_replication"] {
                    refuse_if_set(name)?;
                }
                let r = config.get("r").and_then(Value::as_u64).filter(|&r| r > 0);
                let r = r.ok_or_else(|| field("r", "must be a positive integer".into()))? as usize;
                let alpha = config.get("lora_alpha").and_then(Value::as_f64);
                let alpha = alpha.ok_or_else(|| field("lora_alpha", "must be a number".into()))?;
                let rslora = config.get("use_rslora").and_then(Value::as_bool).unwrap_or(false);
                Kind::Lora { r, alpha, rslora }
            }
            "IA3" => {
                let feedforward_modules = match config.get("feedforward_modules") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
                    Some(Value::String(_)) => {
                        return Err(field(
                            "feedforward_modules",
                            "a regular expression is not supported; list the module names".into(),
                        ))
                    }
                    Some(other) => return Err(field("feedforward_modules", format!("{other} is not a list"))),
                };
                Kind::Ia3 { feedforward_modules }
            }
            "PROMPT_TUNING" => {
                let n = config.get("num_virtual_tokens").and_then(Value::as_u64).filter(|&n| n > 0);
                let n = n.ok_or_else(|| field("num_virtual_tokens", "must be a positive integer".into()))?;
                if config.get("num_transformer_submodules").and_then(Value::as_u64).unwrap_or(1) != 1 {
                    return Err(field(
                        "num_transformer_submodules",
                        "only decoder-only models (1) are supported".into(),
                    ));
                }
                Kind::PromptTuning { num_virtual_tokens: n as usize }
            }
            "" => return Err(field("peft_type", "missing".into())),
            other => {
                return Err(field(
                    "peft_type",
                    format!("`{other}` is not supported (supported: LORA, IA3, PROMPT_TUNING)"),
                ))
            }
        };
        let weights_path = dir.join("adapter_model.safetensors");
        if !weights_path.exists() {
            let what = if dir.join("adapter_model.bin").exists() {
                "adapter_model.safetensors not found (adapter_model.bin is not read; save the adapter with safetensors)"
            } else {
                "adapter_model.safetensors not found"
            };
            return Err(Error::MissingFile { path: weights_path, what: what.into() });
        }
        let weights = Weights::open(&[weights_path])?;
        let tensors = weights.names().map(|n| Ok((n.to_string(), weights.get(n)?.clone()))).collect::<Result<_>>()?;
        Ok(Adapter { dir: dir.to_path_buf(), kind, tensors })
    }

    /// Applies the adapter to `weights` (and, for prompt tuning, `spec`); returns a one-line
    /// description (e.g. `LORA r=4 alpha=8 on 16 modules`).
    pub fn apply(&self, weights: &mut Weights, spec: &mut ModelSpec) -> Result<String> {
        match &self.kind {
            Kind::Lora { r, alpha, rslora } => {
                let scaling = if *rslora { alpha / (*r as f64).sqrt() } else { alpha / *r as f64 };
                let n = lora::merge(self, weights, spec, scaling as f32)?;
                Ok(format!("LORA r={r} alpha={alpha} on {n} modules"))
            }
            Kind::Ia3 { feedforward_modules } => {
                let n = ia3::merge(self, weights, spec, feedforward_modules)?;
                Ok(format!("IA3 on {n} modules"))
            }
            Kind::PromptTuning { num_virtual_tokens } => {
                prompt::extend_embedding(self, weights, spec, *num_virtual_tokens)?;
                Ok(format!("PROMPT_TUNING with {num_virtual_tokens} virtual tokens"))
            }
        }
    }

    /// An error about this adapter's weights file.
    fn bad(&self, reason: impl Into<String>) -> Error {
        Error::bad_file(self.dir.join("adapter_model.safetensors"), reason)
    }

    /// The adapter's tensors whose names end with `suffix`, by module path (peft's
    /// `base_model.model.` prefix removed), sorted.
    fn modules(&self, suffix: &str) -> Vec<(String, &HostTensor)> {
        let mut found: Vec<(String, &HostTensor)> = self
            .tensors
            .iter()
            .filter_map(|(name, t)| {
                let module = name.strip_suffix(suffix)?;
                Some((module.strip_prefix("base_model.model.").unwrap_or(module).to_string(), t))
            })
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
    }

    /// Tensor names the adapter holds that no part of it used: refused, as an adapter type or
    /// target this code does not understand.
    fn check_all_used(&self, used: &[&str]) -> Result<()> {
        let mut unused: Vec<&String> =
            self.tensors.keys().filter(|n| !used.iter().any(|suffix| n.ends_with(suffix))).collect();
        unused.sort();
        match unused.first() {
            None => Ok(()),
            Some(name) => Err(self.bad(format!(
                "tensor `{name}` is not one layerwise applies (LoRA on embeddings or other layers is not supported)"
            ))),
        }
    }
}

/// How a target module's weight is stored, and its checkpoint name.
struct Target {
    /// The checkpoint tensor of the module's weight.
    weight: String,
    /// `[in, out]` (GPT-2's Conv1D) rather than `[out, in]`.
    in_out: bool,
}

/// Finds the checkpoint weight of `module` (a path like `transformer.h.0.attn.c_attn`), accepting the
/// `transformer.` / `model.` prefix on either side.
fn target(adapter: &Adapter, weights: &Weights, spec: &ModelSpec, module: &str) -> Result<Target> {
    let bare = module.strip_prefix("transformer.").or_else(|| module.strip_prefix("model.")).unwrap_or(module);
    let candidates = [
        format!("{module}.weight"),
        format!("{bare}.weight"),
        format!("transformer.{bare}.weight"),
        format!("model.{bare}.weight"),
    ];
    let weight = candidates.into_iter().find(|name| weights.contains(name)).ok_or_else(|| {
        adapter.bad(format!("target module `{module}` has no weight in the checkpoint (`{module}.weight`)"))
    })?;
    if bare.contains("wte") || bare.contains("wpe") || bare.contains("embed") {
        return Err(
            adapter.bad(format!("target module `{module}` is an embedding; LoRA on embeddings is not supported"))
        );
    }
    // GPT-2's blocks are Conv1D; its LM head and every other architecture's modules are nn.Linear.
    let in_out = spec.architecture == Architecture::Gpt2 && bare.starts_with("h.");
    Ok(Target { weight, in_out })
}
