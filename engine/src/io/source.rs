//! Where a model comes from (a local directory or a Hugging Face Hub id) and which of the usual
//! checkpoint files it has.
//!
//! Hub ids are resolved with `hf-hub`'s blocking client into the standard HF cache (`HF_HOME`,
//! `HF_HUB_CACHE`), so files downloaded by transformers are reused and vice versa. With
//! `HF_HUB_OFFLINE=1` only the cache is consulted.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// The files that hold a checkpoint's weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightFiles {
    /// `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    Safetensors(Vec<PathBuf>),
    /// `pytorch_model.bin`, or the shards listed in `pytorch_model.bin.index.json`.
    TorchBin(Vec<PathBuf>),
}

/// The tokenizer files a checkpoint ships.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizerFiles {
    /// `tokenizer.json` (the tokenizers library's own format).
    Json(PathBuf),
    /// GPT-2-era byte-level BPE: `vocab.json` + `merges.txt`, special tokens from the config files.
    VocabMerges {
        vocab: PathBuf,
        merges: PathBuf,
        tokenizer_config: Option<PathBuf>,
        special_tokens_map: Option<PathBuf>,
    },
    /// BERT's WordPiece: `vocab.txt`, the normaliser's options from `tokenizer_config.json`.
    WordPiece { vocab: PathBuf, tokenizer_config: Option<PathBuf> },
    /// None found: the model still runs on token ids.
    None,
}

/// A checkpoint directory and the files found in it.
#[derive(Clone, Debug)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub generation_config: Option<PathBuf>,
    pub tokenizer: TokenizerFiles,
    pub weights: WeightFiles,
}

/// Names looked for, in order of preference.
const SAFETENSORS: &str = "model.safetensors";
const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
const TORCH_BIN: &str = "pytorch_model.bin";
const TORCH_BIN_INDEX: &str = "pytorch_model.bin.index.json";
const TOKENIZER_FILES: [&str; 6] =
    ["tokenizer.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"];

impl ModelFiles {
    /// Resolves `source`: an existing directory is used as it is; anything else shaped like
    /// `owner/name` (optionally `owner/name@revision`) is looked up on the Hugging Face Hub.
    pub fn resolve(source: &str) -> Result<Self> {
        let path = Path::new(source);
        if path.is_dir() {
            return Self::from_dir(path);
        }
        if looks_like_hub_id(source) {
            return resolve_hub(source);
        }
        Err(Error::MissingFile {
            path: path.to_path_buf(),
            what: "no such model directory (pass a local checkpoint directory, or a Hub id such as ibm/gpt2-medium-multiexit)".into(),
        })
    }

    /// Inspects a local checkpoint directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config = dir.join("config.json");
        if !config.is_file() {
            return Err(Error::MissingFile { path: config, what: "config.json not found".into() });
        }
        let existing = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
        let weights = if let Some(file) = existing(SAFETENSORS) {
            WeightFiles::Safetensors(vec![file])
        } else if let Some(index) = existing(SAFETENSORS_INDEX) {
            WeightFiles::Safetensors(shards(dir, &index)?)
        } else if let Some(file) = existing(TORCH_BIN) {
            WeightFiles::TorchBin(vec![file])
        } else if let Some(index) = existing(TORCH_BIN_INDEX) {
            WeightFiles::TorchBin(shards(dir, &index)?)
        } else {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
                what: format!(
                    "no weights found (looked for {SAFETENSORS}, {SAFETENSORS_INDEX}, {TORCH_BIN}, {TORCH_BIN_INDEX})"
                ),
            });
        };
        let tokenizer = tokenizer_files(dir);
        Ok(ModelFiles {
            dir: dir.to_path_buf(),
            config,
            generation_config: existing("generation_config.json"),
            tokenizer,
            weights,
        })
    }
}

/// The tokenizer files in `dir`: `tokenizer.json` first, else `vocab.json` + `merges.txt`, else
/// `vocab.txt`.
pub fn tokenizer_files(dir: &Path) -> TokenizerFiles {
    let existing = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
    if let Some(json) = existing("tokenizer.json") {
        TokenizerFiles::Json(json)
    } else if let (Some(vocab), Some(merges)) = (existing("vocab.json"), existing("merges.txt")) {
        TokenizerFiles::VocabMerges {
            vocab,
            merges,
            tokenizer_config: existing("tokenizer_config.json"),
            special_tokens_map: existing("special_tokens_map.json"),
        }
    } else if let Some(vocab) = existing("vocab.txt") {
        TokenizerFiles::WordPiece { vocab, tokenizer_config: existing("tokenizer_config.json") }
    } else {
        TokenizerFiles::None
    }
}

impl TokenizerFiles {
    /// Every tokenizer file present, the config files beside a `tokenizer.json` included: what a
    /// copy of the checkpoint must carry.
    pub fn paths(&self) -> Vec<PathBuf> {
        match self {
            TokenizerFiles::Json(json) => {
                let mut out = vec![json.clone()];
                for name in ["tokenizer_config.json", "special_tokens_map.json"] {
                    out.extend(Some(json.with_file_name(name)).filter(|p| p.is_file()));
                }
                out
            }
            TokenizerFiles::VocabMerges { vocab, merges, tokenizer_config, special_tokens_map } => {
                [Some(vocab), Some(merges), tokenizer_config.as_ref(), special_tokens_map.as_ref()]
                    .into_iter()
                    .flatten()
                    .cloned()
                    .collect()
            }
            TokenizerFiles::WordPiece { vocab, tokenizer_config } => {
                [Some(vocab), tokenizer_config.as_ref()].into_iter().flatten().cloned().collect()
            }
            TokenizerFiles::None => Vec::new(),
        }
    }
}

/// The distinct shard file names listed by a `*.index.json` (`{"weight_map": {tensor: file}}`).
fn shard_names(index: &Path) -> Result<BTreeSet<String>> {
    let text = super::read_config_file(index)?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::bad_file(index, format!("not valid JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::bad_file(index, "no `weight_map` object"))?;
    let mut names = BTreeSet::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| Error::bad_file(index, format!("weight_map entry `{tensor}` is not a file name")))?;
        if file.contains("..") || Path::new(file).is_absolute() {
            return Err(Error::bad_file(index, format!("shard `{file}` is outside the checkpoint directory")));
        }
        names.insert(file.to_string());
    }
    Ok(names)
}

/// The shard files of a local sharded checkpoint; all must exist.
fn shards(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let files: Vec<PathBuf> = shard_names(index)?.into_iter().map(|n| dir.join(n)).collect();
    if let Some(missing) = files.iter().find(|f| !f.is_file()) {
        return Err(Error::MissingFile {
            path: missing.clone(),
            what: format!("not found, although {} lists it as a weight shard", index.display()),
        });
    }
    Ok(files)
}

fn looks_like_hub_id(source: &str) -> bool {
    let id = source.split('@').next().unwrap_or(source);
    let mut parts = id.split('/');
    let valid = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    matches!((parts.next(), parts.next(), parts.next()), (Some(owner), Some(name), None)
        if valid(owner) && valid(name) && owner != "." && owner != "..")
}

fn hub_cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => Cache::new(PathBuf::from(dir)),
        None => Cache::from_env(),
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "True" | "yes" | "ON" | "on"))
}

fn resolve_hub(source: &str) -> Result<ModelFiles> {
    let (id, revision) = match source.split_once('@') {
        Some((id, rev)) => (id.to_string(), rev.to_string()),
        None => (source.to_string(), "main".to_string()),
    };
    let repo = Repo::with_revision(id.clone(), RepoType::Model, revision);
    let hub_error = |reason: String| Error::Hub { repo: source.to_string(), reason };
    let cache = hub_cache();
    if offline() {
        // Everything a snapshot holds sits in one folder; its config.json tells us which.
        let config = cache.repo(repo).get("config.json").ok_or_else(|| {
            hub_error(format!(
                "not in the Hugging Face cache at {} and HF_HUB_OFFLINE is set; download it once online, \
                 or pass the path of a local checkpoint directory to --model",
                cache.path().display()
            ))
        })?;
        let dir = config.parent().unwrap_or(Path::new("."));
        return ModelFiles::from_dir(dir);
    }
    let api = ApiBuilder::from_cache(cache)
        .with_progress(false)
        .build()
        .map_err(|e| hub_error(format!("cannot start the Hub client: {e}")))?;
    let api_repo = api.repo(repo);
    let no_network = |e: hf_hub::api::sync::ApiError| {
        hub_error(format!(
            "{e}; if you are offline, set HF_HUB_OFFLINE=1 to use the Hugging Face cache, or pass a local checkpoint directory"
        ))
    };
    let info = api_repo.info().map_err(no_network)?;
    let listed: BTreeSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let fetch = |name: &str| api_repo.get(name).map_err(no_network);
    let config = fetch("config.json")?;
    for name in TOKENIZER_FILES.iter().chain(&["generation_config.json"]) {
        if listed.contains(name) {
            fetch(name)?;
        }
    }
    let dir = config.parent().unwrap_or(Path::new(".")).to_path_buf();
    let weights = [SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX]
        .into_iter()
        .find(|name| listed.contains(name))
        .ok_or_else(|| hub_error("the repository has no safetensors or pytorch_model.bin weights".into()))?;
    let weights = fetch(weights)?;
    if weights.to_string_lossy().ends_with(".index.json") {
        for shard in shard_names(&weights)? {
            fetch(&shard)?;
        }
    }
    ModelFiles::from_dir(&dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_told_apart_from_paths() {
        assert!(looks_like_hub_id("ibm/gpt2-medium-multiexit"));
        assert!(looks_like_hub_id("ibm/gpt-neo-125m-multiexit@main"));
        assert!(!looks_like_hub_id("./models/x"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("gpt2"));
    }
}
