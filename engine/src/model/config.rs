//! `config.json` into one typed [`ModelSpec`]: the architecture, its dimensions and its exit heads.
//!
//! Field names and defaults follow transformers' `GPT2Config`, `GPTNeoConfig`, `LlamaConfig` and
//! `BertConfig`. Options
//! the engine does not implement are refused by name rather than approximated. What is common lives
//! here (the spec, typed field reading, exit heads, pruned heads, checks); each architecture's file
//! reads its own fields (`gpt2::spec`, `gpt_neo::spec`, `llama::spec`, `bert::spec`).

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The architectures the engine runs (HF `model_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Gpt2,
    GptNeo,
    Llama,
    /// The encoder (`layerwise::encoder`); it has no language-model head to decode with.
    Bert,
}

/// Elementwise activation of the MLP (transformers' `ACT2FN` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    /// `gelu`: the exact erf form.
    Gelu,
    Relu,
    /// `silu` / `swish`.
    Silu,
}

impl Activation {
    fn parse(name: &str) -> Option<Activation> {
        match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluTanh),
            "gelu" => Some(Activation::Gelu),
            "relu" => Some(Activation::Relu),
            "silu" | "swish" => Some(Activation::Silu),
            _ => None,
        }
    }
}

/// Which positions a layer's attention sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionSpan {
    /// Every earlier position.
    Global,
    /// Only the last `window` positions, the query's own included (GPT-Neo "local").
    Local { window: usize },
}

/// Architecture-specific details that do not fit the common dimensions.
#[derive(Clone, Debug, PartialEq)]
pub enum Details {
    Gpt2 {
        /// Divide scores by sqrt(head_dim) (`scale_attn_weights`).
        scale_attn_weights: bool,
        /// Further divide layer i's scores by i + 1 (`scale_attn_by_inverse_layer_idx`).
        scale_attn_by_inverse_layer_idx: bool,
    },
    GptNeo,
    Llama {
        rope_theta: f32,
        attention_bias: bool,
        mlp_bias: bool,
    },
    Bert {
        /// Rows of the token-type embedding (`type_vocab_size`).
        type_vocab_size: usize,
        /// `id2label` in id order; empty when the config has none.
        labels: Vec<String>,
    },
}

/// Everything the engine needs to know about a checkpoint's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// Key/value heads (fewer than `num_heads` under grouped-query attention).
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    /// Longest sequence the position embeddings (or the config) allow.
    pub max_positions: usize,
    pub norm_eps: f32,
    pub activation: Activation,
    /// Use the token embedding as the LM head when `lm_head.weight` is absent.
    pub tie_word_embeddings: bool,
    /// Attention span of each layer.
    pub attention_spans: Vec<AttentionSpan>,
    /// Layers with an exit head (`lm_head_layer_indices`), 1-based block outputs, ascending.
    pub exit_layers: Vec<usize>,
    /// transformers' `pruned_heads`: block (0-based) -> the heads removed from it, in the original
    /// numbering, ascending (GPT-2 only; see [`crate::analysis::heads`]).
    pub pruned_heads: std::collections::BTreeMap<usize, Vec<usize>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub details: Details,
    /// Virtual tokens of a prompt-tuning adapter: rows `vocab_size ..` of the token embedding,
    /// put before every prompt the decoder runs (0 without such an adapter).
    pub virtual_tokens: usize,
}

/// The largest value a config's integer field may hold, far above any real model's: layers 4096,
/// heads 65536, widths (hidden, intermediate, head) 2^20, vocabulary 2^24, positions and windows
/// 2^30; any other integer (token ids) 2^32 - 1.
pub fn size_limit(key: &str) -> usize {
    match key {
        "n_layer" | "num_layers" | "num_hidden_layers" => 4096,
        "n_head" | "num_heads" | "num_attention_heads" | "num_key_value_heads" => 1 << 16,
        "n_embd" | "hidden_size" | "n_inner" | "intermediate_size" | "head_dim" => 1 << 20,
        "vocab_size" => 1 << 24,
        "n_positions" | "max_position_embeddings" | "window_size" => 1 << 30,
        _ => u32::MAX as usize,
    }
}

/// Reads typed fields from a JSON object and names the field (and file) in every error.
pub(crate) struct Fields<'a> {
    path: &'a Path,
    map: &'a Map<String, Value>,
}

impl Fields<'_> {
    pub(crate) fn error(&self, field: &str, reason: impl Into<String>) -> Error {
        Error::Config { path: self.path.to_path_buf(), field: field.to_string(), reason: reason.into() }
    }

    pub(crate) fn present(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// A non-negative integer field, at most [`size_limit`] of it: a size is bounded before anything
    /// is sized by it (a `n_layer` of a billion would otherwise allocate per-layer tables of
    /// gigabytes before the missing tensors are noticed).
    pub(crate) fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.present(key) else { return Ok(None) };
        let n = v.as_u64().ok_or_else(|| self.error(key, format!("expected a non-negative integer, found {v}")))?;
        let limit = size_limit(key);
        if n > limit as u64 {
            return Err(self.error(key, format!("{n} is beyond {limit}, the most this engine accepts")));
        }
        Ok(Some(n as usize))
    }

    pub(crate) fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| self.error(key, "missing"))
    }

    pub(crate) fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.error(key, format!("expected a number, found {v}"))),
        }
    }

    /// A norm's epsilon: finite and not negative (a negative one turns variance-free rows into NaN).
    pub(crate) fn epsilon_or(&self, key: &str, default: f64) -> Result<f64> {
        let eps = self.f64_or(key, default)?;
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(self.error(key, format!("must be a finite number >= 0, found {eps}")));
        }
        Ok(eps)
    }

    /// A strictly positive, finite number that fits an f32 (a rotary base, a scale).
    pub(crate) fn positive_or(&self, key: &str, default: f64) -> Result<f64> {
        let x = self.f64_or(key, default)?;
        if !(x.is_finite() && x > 0.0 && x <= f32::MAX as f64) {
            return Err(self.error(key, format!("must be a finite number > 0, found {x}")));
        }
        Ok(x)
    }

    pub(crate) fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.error(key, format!("expected true or false, found {v}"))),
        }
    }

    pub(crate) fn str_or<'s>(&'s self, key: &str, default: &'s str) -> Result<&'s str> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| self.error(key, format!("expected a string, found {v}"))),
        }
    }

    pub(crate) fn activation(&self, key: &str, default: &str) -> Result<Activation> {
        let name = self.str_or(key, default)?;
        Activation::parse(name).ok_or_else(|| {
            self.error(key, format!("activation `{name}` is not supported (gelu_new, gelu, relu, silu)"))
        })
    }

    pub(crate) fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        let bad = || self.error(key, "expected a token id or a list of token ids");
        match self.present(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(|v| v.as_u64().map(|n| n as u32).ok_or_else(bad)).collect(),
            Some(v) => v.as_u64().map(|n| vec![n as u32]).ok_or_else(bad),
        }
    }
}

impl ModelSpec {
    /// Rows of the token embedding: the vocabulary and any virtual tokens after it.
    pub fn embedding_rows(&self) -> usize {
        self.vocab_size + self.virtual_tokens
    }

    /// Reads `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::io::read_config(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::MissingFile { path: path.to_path_buf(), what: "config.json not found".into() }
            }
            _ => Error::io(path, e),
        })?;
        Self::from_json(&text, path)
    }

    /// Parses the text of a `config.json`; `path` is only used in error messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| Error::bad_file(path, format!("not valid JSON: {e}")))?;
        let map = value.as_object().ok_or_else(|| Error::bad_file(path, "expected a JSON object"))?;
        let f = Fields { path, map };
        let model_type =
            f.present("model_type").and_then(Value::as_str).ok_or_else(|| f.error("model_type", "missing"))?;
        let mut spec = match model_type {
            "gpt2" => super::gpt2::spec(&f)?,
            "gpt_neo" => super::gpt_neo::spec(&f)?,
            "llama" => super::llama::spec(&f)?,
            "bert" => super::bert::spec(&f)?,
            other => {
                return Err(Error::UnknownArchitecture { path: path.to_path_buf(), model_type: other.to_string() })
            }
        };
        spec.bos_token_id = f.usize_opt("bos_token_id")?.map(|n| n as u32);
        spec.eos_token_ids = f.token_ids("eos_token_id")?;
        spec.exit_layers = exit_layers(&f, spec.num_layers)?;
        spec.pruned_heads = pruned_heads(&f, &spec)?;
        spec.validate(&f)?;
        Ok(spec)
    }

    fn validate(&self, f: &Fields) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(f.error(field, "must be positive"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(f.error(
                "num_key_value_heads",
                format!("{} does not divide num_attention_heads {}", self.num_kv_heads, self.num_heads),
            ));
        }
        if !matches!(self.details, Details::Llama { .. }) && !self.hidden_size.is_multiple_of(self.num_heads) {
            return Err(f.error(
                "num_attention_heads",
                format!("{} does not divide the hidden size {}", self.num_heads, self.hidden_size),
            ));
        }
        Ok(())
    }

    /// The exit layers, as a human-readable list for messages.
    pub fn describe_exits(&self) -> String {
        if self.exit_layers.is_empty() {
            "the checkpoint has no exit heads".to_string()
        } else {
            format!("the checkpoint has exit heads at layers {:?}", self.exit_layers)
        }
    }
}

fn exit_layers(f: &Fields, num_layers: usize) -> Result<Vec<usize>> {
    let key = "lm_head_layer_indices";
    let Some(value) = f.present(key) else {
        return Ok(Vec::new());
    };
    let items =
        value.as_array().ok_or_else(|| f.error(key, format!("expected a list of layer indices, found {value}")))?;
    let mut layers = Vec::with_capacity(items.len());
    for item in items {
        let layer = item
            .as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| f.error(key, format!("expected a layer index, found {item}")))?;
        if layer == 0 || layer > num_layers {
            return Err(f.error(key, format!("layer {layer} is outside 1..={num_layers}")));
        }
        layers.push(layer);
    }
    layers.sort_unstable();
    layers.dedup();
    Ok(layers)
}

/// `pruned_heads`: `{"layer": [heads]}` (transformers writes the keys as strings).
fn pruned_heads(f: &Fields, spec: &ModelSpec) -> Result<std::collections::BTreeMap<usize, Vec<usize>>> {
    let key = "pruned_heads";
    let mut pruned = std::collections::BTreeMap::new();
    let Some(value) = f.present(key) else { return Ok(pruned) };
    let map =
        value.as_object().ok_or_else(|| f.error(key, format!("expected {{\"layer\": [heads]}}, found {value}")))?;
    if map.is_empty() {
        return Ok(pruned);
    }
    if !matches!(spec.architecture, Architecture::Gpt2 | Architecture::Bert) {
        return Err(f.error(key, "pruned heads are supported for gpt2 and bert checkpoints only (as in transformers)"));
    }
    for (layer, heads) in map {
        let layer: usize = layer
            .parse()
            .ok()
            .filter(|&l| l < spec.num_layers)
            .ok_or_else(|| f.error(key, format!("`{layer}` is not a layer in 0..{}", spec.num_layers)))?;
        let mut list: Vec<usize> = heads
            .as_array()
            .and_then(|items| items.iter().map(|h| h.as_u64().map(|h| h as usize)).collect::<Option<_>>())
            .ok_or_else(|| f.error(key, format!("layer {layer}: expected a list of head indices")))?;
        list.sort_unstable();
        list.dedup();
        if list.iter().any(|&h| h >= spec.num_heads) || list.len() >= spec.num_heads {
            return Err(
                f.error(key, format!("layer {layer}: heads must be in 0..{} and one must remain", spec.num_heads))
            );
        }
        if !list.is_empty() {
            pruned.insert(layer, list);
        }
    }
    Ok(pruned)
}

impl ModelSpec {
    /// The heads block `layer` still has, in the original numbering.
    pub fn kept_heads(&self, layer: usize) -> Vec<usize> {
        let pruned = self.pruned_heads.get(&layer).map_or(&[][..], Vec::as_slice);
        (0..self.num_heads).filter(|h| !pruned.contains(h)).collect()
    }
}
