//! Attention heads: how spread out each one attends (entropy), how much the language-modeling loss
//! rises when it is masked (importance, by ablation), the greedy procedure that masks the least
//! important head until the loss rises past a threshold, and physical pruning of masked heads into a
//! smaller checkpoint that transformers reloads (`pruned_heads`, GPT-2).
//!
//! Heads are numbered as in the original checkpoint, also in a checkpoint that was already pruned.
//!
//! ```
//! use layerwise::analysis::heads::{head_importance, lm_loss, prune_search};
//!
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/gpt2-sharded");
//! let model = layerwise::load(dir)?.model;
//! let texts = vec![vec![5, 17, 42, 3, 88, 61], vec![9, 0, 73, 26, 50]];
//! let loss = lm_loss(&model, &texts, None)?;
//! let importance = head_importance(&model, &texts, None)?;
//! assert_eq!(importance.base_loss, loss);
//! let search = prune_search(&model, &texts, 0.02, 1)?;
//! assert!(search.curve[0].1 == loss && search.masked_heads() == search.mask.masked().len());
//! # Ok::<(), layerwise::Error>(())
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::source::ModelFiles;
use crate::io::weights::{DType, HostTensor};
use crate::math::{entropy, log_normaliser, pearson};
use crate::model::config::{Architecture, ModelSpec};
use crate::model::{HeadMask, InspectRequest, Model};

/// Mean next-token cross-entropy (nats) over every position of every text that has a next token,
/// with `mask` applied: transformers' loss with `labels = input_ids`, weighted by tokens across texts.
pub fn lm_loss<B: Backend>(model: &Model<B>, texts: &[Vec<u32>], mask: Option<&HeadMask>) -> Result<f64> {
    let vocab = model.spec().vocab_size;
    let (mut total, mut count) = (0.0f64, 0usize);
    for text in texts {
        if text.len() < 2 {
            continue;
        }
        let request = InspectRequest { logits: true, head_mask: mask.cloned(), ..Default::default() };
        let logits = model.inspect(text, &request)?.logits.expect("logits were requested");
        for (row, &next) in logits.chunks_exact(vocab).zip(&text[1..]) {
            total += log_normaliser(row) - row[next as usize] as f64;
            count += 1;
        }
    }
    if count == 0 {
        return Err(Error::invalid("texts", "need at least one text of two or more tokens"));
    }
    Ok(total / count as f64)
}

/// Entropy (nats) of every head's attention distribution at every query position of `ids`.
#[derive(Clone, Debug, Serialize)]
pub struct HeadEntropy {
    /// `[layer][head][query]` (heads in the original numbering; pruned heads have empty rows).
    pub per_token: Vec<Vec<Vec<f32>>>,
    /// `[layer][head]`: summed over the query positions.
    pub total: Vec<Vec<f32>>,
}

/// The attention entropy of every head over `ids`.
pub fn head_entropy<B: Backend>(model: &Model<B>, ids: &[u32]) -> Result<HeadEntropy> {
    let spec = model.spec();
    let n = spec.num_layers;
    let seen = model.inspect(ids, &InspectRequest { attentions: (0..n).collect(), ..Default::default() })?;
    let t = ids.len();
    let mut per_token = vec![vec![Vec::new(); spec.num_heads]; n];
    for (layer, probs) in &seen.attentions {
        for (head, map) in spec.kept_heads(*layer).into_iter().zip(probs.chunks_exact(t * t)) {
            per_token[*layer][head] = map.chunks_exact(t).map(|row| entropy(row) as f32).collect();
        }
    }
    let total = per_token.iter().map(|heads| heads.iter().map(|e| e.iter().sum()).collect()).collect();
    Ok(HeadEntropy { per_token, total })
}

/// Each head's attention entropy per token over several texts: the per-text totals summed and
/// divided by the texts' tokens (the bertology exercise's `attn_entropy / tot_tokens`).
pub fn entropy_per_token(entropies: &[HeadEntropy], tokens: usize) -> Vec<Vec<f32>> {
    let Some(first) = entropies.first() else { return Vec::new() };
    let mut sum: Vec<Vec<f64>> = first.total.iter().map(|row| vec![0.0; row.len()]).collect();
    for e in entropies {
        for (acc, row) in sum.iter_mut().zip(&e.total) {
            acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v as f64);
        }
    }
    sum.iter().map(|row| row.iter().map(|&v| (v / tokens.max(1) as f64) as f32).collect()).collect()
}

/// Entropy against importance, one point per head.
#[derive(Clone, Debug, Serialize)]
pub struct EntropyImportance {
    /// Pearson's coefficient over the heads (None when either side is constant).
    pub coefficient: Option<f64>,
    /// `(layer, head, entropy, importance)` of every head both tables have.
    pub points: Vec<(usize, usize, f64, f64)>,
}

/// The correlation of each head's entropy and importance (both `[layer][head]`), with the points
/// for a scatter plot. Heads with a non-finite value on either side are left out.
pub fn entropy_importance(entropy: &[Vec<f32>], importance: &[Vec<f32>]) -> EntropyImportance {
    let points: Vec<(usize, usize, f64, f64)> = entropy
        .iter()
        .zip(importance)
        .enumerate()
        .flat_map(|(layer, (e, i))| {
            e.iter().zip(i).enumerate().map(move |(head, (&e, &i))| (layer, head, e as f64, i as f64))
        })
        .filter(|p| p.2.is_finite() && p.3.is_finite())
        .collect();
    let (xs, ys): (Vec<f64>, Vec<f64>) = points.iter().map(|p| (p.2, p.3)).unzip();
    EntropyImportance { coefficient: pearson(&xs, &ys), points }
}

/// How much the loss rises when each head is masked on its own.
#[derive(Clone, Debug, Serialize)]
pub struct HeadImportance {
    /// The loss with the given mask (all heads kept when none was given).
    pub base_loss: f64,
    /// `[layer][head]`: loss with the head also masked, minus `base_loss`; `None` for heads already
    /// masked or pruned.
    pub increase: Vec<Vec<Option<f64>>>,
}

/// Importance of every head still active under `mask`, by masking it and measuring [`lm_loss`].
pub fn head_importance<B: Backend>(
    model: &Model<B>,
    texts: &[Vec<u32>],
    mask: Option<&HeadMask>,
) -> Result<HeadImportance> {
    let spec = model.spec();
    let mask = mask.cloned().unwrap_or_else(|| HeadMask::ones(spec.num_layers, spec.num_heads));
    let base_loss = lm_loss(model, texts, Some(&mask))?;
    let mut increase = vec![vec![None; spec.num_heads]; spec.num_layers];
    for (layer, head) in active_heads(model, &mask) {
        let mut trial = mask.clone();
        trial.set(layer, head, 0.0);
        increase[layer][head] = Some(lm_loss(model, texts, Some(&trial))? - base_loss);
    }
    Ok(HeadImportance { base_loss, increase })
}

/// Heads neither pruned nor masked, `(layer, head)`.
fn active_heads<B: Backend>(model: &Model<B>, mask: &HeadMask) -> Vec<(usize, usize)> {
    let spec = model.spec();
    (0..spec.num_layers)
        .flat_map(|layer| spec.kept_heads(layer).into_iter().map(move |head| (layer, head)))
        .filter(|&(layer, head)| mask.get(layer, head) != 0.0)
        .collect()
}

/// The outcome of [`prune_search`].
#[derive(Clone, Debug, Serialize)]
pub struct PruneSearch {
    /// Loss with every head.
    pub base_loss: f64,
    /// The last mask whose loss stayed within the threshold.
    #[serde(serialize_with = "mask_rows")]
    pub mask: HeadMask,
    /// `(heads masked, loss)` after each step, starting with `(0, base_loss)`; the last point is
    /// the step that crossed the threshold, if one did.
    pub curve: Vec<(usize, f64)>,
    /// The heads in the order they were masked, `(layer, head)`.
    pub order: Vec<(usize, usize)>,
}

impl PruneSearch {
    pub fn masked_heads(&self) -> usize {
        self.mask.masked().len()
    }
}

fn mask_rows<S: serde::Serializer>(mask: &HeadMask, s: S) -> std::result::Result<S::Ok, S::Error> {
    mask.rows().serialize(s)
}

/// Masks the least important heads, `per_step` at a time (importance recomputed under the current
/// mask at every step), until the loss exceeds `(1 + threshold)` times the unmasked loss. A block's
/// last active head is never masked (a pruned block keeps at least one head, as in transformers).
pub fn prune_search<B: Backend>(
    model: &Model<B>,
    texts: &[Vec<u32>],
    threshold: f64,
    per_step: usize,
) -> Result<PruneSearch> {
    if !(threshold >= 0.0 && threshold.is_finite()) {
        return Err(Error::invalid("threshold", format!("{threshold} is not a non-negative number")));
    }
    if per_step == 0 {
        return Err(Error::invalid("heads per step", "must be at least 1"));
    }
    let spec = model.spec();
    let mut mask = HeadMask::ones(spec.num_layers, spec.num_heads);
    let base_loss = lm_loss(model, texts, None)?;
    let limit = base_loss * (1.0 + threshold);
    let mut search = PruneSearch { base_loss, mask: mask.clone(), curve: vec![(0, base_loss)], order: Vec::new() };
    loop {
        let importance = head_importance(model, texts, Some(&mask))?;
        let mut candidates: Vec<(f64, usize, usize)> = active_heads(model, &mask)
            .into_iter()
            .filter_map(|(layer, head)| importance.increase[layer][head].map(|gain| (gain, layer, head)))
            .collect();
        candidates.sort_by(|a, b| a.0.total_cmp(&b.0).then((a.1, a.2).cmp(&(b.1, b.2))));
        let mut left = vec![0usize; spec.num_layers]; // active heads per block
        for (layer, _) in active_heads(model, &mask) {
            left[layer] += 1;
        }
        let mut chosen = Vec::new();
        for (_, layer, head) in candidates {
            if left[layer] > 1 && chosen.len() < per_step {
                mask.set(layer, head, 0.0);
                left[layer] -= 1;
                chosen.push((layer, head));
            }
        }
        if chosen.is_empty() {
            return Ok(search);
        }
        let loss = lm_loss(model, texts, Some(&mask))?;
        search.curve.push((mask.masked().len(), loss));
        if loss > limit {
            return Ok(search);
        }
        search.order.extend(chosen);
        search.mask = mask.clone();
    }
}

/// What [`prune_checkpoint`] wrote.
#[derive(Clone, Debug, Serialize)]
pub struct PruneReport {
    pub directory: PathBuf,
    pub parameters_before: usize,
    pub parameters_after: usize,
    /// The checkpoint's `pruned_heads` after pruning.
    pub pruned_heads: BTreeMap<usize, Vec<usize>>,
}

/// Writes to `out` a copy of the checkpoint `files` (a GPT-2) without the heads `mask` zeroes:
/// smaller `attn.c_attn` / `attn.c_proj` matrices and transformers' `pruned_heads` in config.json,
/// so that layerwise and transformers load it and compute what the masked model computes. Other
/// tensors (exit heads included), the tokenizer and generation_config.json are copied.
pub fn prune_checkpoint<B: Backend>(
    model: &Model<B>,
    files: &ModelFiles,
    mask: &HeadMask,
    out: &Path,
) -> Result<PruneReport> {
    prune_checkpoint_files(model.spec(), files, mask, out)
}

/// [`prune_checkpoint`] for any checkpoint [`check_prunable`] accepts, given its spec: GPT-2 as
/// there; BERT as `BertModel.prune_heads` (rows of `attention.self.{query,key,value}`, columns of
/// `attention.output.dense`).
pub fn prune_checkpoint_files(
    spec: &ModelSpec,
    files: &ModelFiles,
    mask: &HeadMask,
    out: &Path,
) -> Result<PruneReport> {
    check_prunable(spec)?;
    if mask.layers() != spec.num_layers || mask.heads() != spec.num_heads {
        return Err(Error::invalid(
            "head mask",
            format!("needs {} layers x {} heads", spec.num_layers, spec.num_heads),
        ));
    }
    if mask.rows().iter().flatten().any(|&f| f != 0.0 && f != 1.0) {
        return Err(Error::invalid("head mask", "pruning takes a mask of zeros and ones"));
    }
    let mut pruned = spec.pruned_heads.clone();
    for (layer, head) in mask.masked() {
        let list = pruned.entry(layer).or_default();
        if !list.contains(&head) {
            list.push(head);
            list.sort_unstable();
        }
        if list.len() >= spec.num_heads {
            return Err(Error::invalid("head mask", format!("would remove every head of block {layer}")));
        }
    }
    let weights = crate::io::open_weights(&files.weights)?;
    let mut tensors: Vec<(String, HostTensor)> = Vec::new();
    let (mut before, mut after) = (0, 0);
    for name in weights.names().map(str::to_owned).collect::<Vec<_>>() {
        let tensor = weights.get(&name)?;
        before += tensor.numel();
        let shrunk = match spec.architecture {
            Architecture::Bert => shrink_bert_tensor(spec, &pruned, &name, tensor),
            _ => shrink_gpt2_tensor(spec, &pruned, &name, tensor),
        };
        let tensor = shrunk.unwrap_or_else(|| tensor.clone());
        after += tensor.numel();
        tensors.push((name, tensor));
    }
    write_pruned(files, &pruned, &tensors, out)?;
    Ok(PruneReport {
        directory: out.to_path_buf(),
        parameters_before: before,
        parameters_after: after,
        pruned_heads: pruned,
    })
}

/// The block a tensor `name` ending in `suffix` belongs to: the number after the last `marker`.
fn block_of(name: &str, suffix: &str, marker: &str) -> Option<usize> {
    name.strip_suffix(suffix)?.rsplit_once(marker)?.1.parse().ok()
}

/// A GPT-2 tensor without the pruned heads' rows or columns; None for tensors pruning leaves alone.
fn shrink_gpt2_tensor(
    spec: &ModelSpec,
    pruned: &BTreeMap<usize, Vec<usize>>,
    name: &str,
    tensor: &HostTensor,
) -> Option<HostTensor> {
    let d = spec.head_dim;
    let layer_of = |suffix: &str| block_of(name, suffix, "h.");
    if let Some(layer) = layer_of(".attn.c_attn.weight").or_else(|| layer_of(".attn.c_attn.bias")) {
        // Columns [q | k | v], each `heads * d` wide: keep the surviving heads' columns of each.
        let keep = surviving(spec.kept_heads(layer), pruned.get(&layer), d);
        let width = spec.kept_heads(layer).len() * d;
        let columns: Vec<usize> = (0..3).flat_map(|part| keep.iter().map(move |&c| part * width + c)).collect();
        Some(select_columns(tensor, &columns))
    } else {
        // [in = heads * d, out]: keep the surviving heads' rows.
        layer_of(".attn.c_proj.weight")
            .map(|layer| select_rows(tensor, &surviving(spec.kept_heads(layer), pruned.get(&layer), d)))
    }
}

/// A BERT tensor without the pruned heads' rows or columns (`BertSelfAttention` holds `[heads * d,
/// hidden]` query / key / value matrices and `BertSelfOutput.dense` reads `heads * d` columns);
/// None for tensors pruning leaves alone.
fn shrink_bert_tensor(
    spec: &ModelSpec,
    pruned: &BTreeMap<usize, Vec<usize>>,
    name: &str,
    tensor: &HostTensor,
) -> Option<HostTensor> {
    let keep = |layer: usize| surviving(spec.kept_heads(layer), pruned.get(&layer), spec.head_dim);
    for part in ["query", "key", "value"] {
        if let Some(layer) = block_of(name, &format!(".attention.self.{part}.weight"), "layer.") {
            return Some(select_rows(tensor, &keep(layer)));
        }
        if let Some(layer) = block_of(name, &format!(".attention.self.{part}.bias"), "layer.") {
            return Some(select_columns(tensor, &keep(layer)));
        }
    }
    block_of(name, ".attention.output.dense.weight", "layer.").map(|layer| select_columns(tensor, &keep(layer)))
}

/// Writes the pruned tensors as model.safetensors, config.json with `pruned_heads`, and copies of the
/// tokenizer and generation files.
fn write_pruned(
    files: &ModelFiles,
    pruned: &BTreeMap<usize, Vec<usize>>,
    tensors: &[(String, HostTensor)],
    out: &Path,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let views = tensors
        .iter()
        .map(|(name, t)| {
            let dtype = match t.dtype() {
                DType::F32 => safetensors::Dtype::F32,
                DType::F16 => safetensors::Dtype::F16,
                DType::BF16 => safetensors::Dtype::BF16,
            };
            safetensors::tensor::TensorView::new(dtype, t.shape().to_vec(), t.bytes())
                .map(|view| (name.clone(), view))
                .map_err(|e| Error::invalid(format!("tensor {name}"), e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let model_file = out.join("model.safetensors");
    safetensors::serialize_to_file(views, None, &model_file)
        .map_err(|e| Error::bad_file(&model_file, format!("cannot write: {e}")))?;

    let text = crate::io::read_config_file(&files.config)?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::bad_file(&files.config, format!("not valid JSON: {e}")))?;
    let listed: serde_json::Map<String, serde_json::Value> =
        pruned.iter().map(|(layer, heads)| (layer.to_string(), serde_json::json!(heads))).collect();
    config["pruned_heads"] = serde_json::Value::Object(listed);
    let config_file = out.join("config.json");
    let pretty = serde_json::to_string_pretty(&config).map_err(|e| Error::invalid("config", e.to_string()))?;
    std::fs::write(&config_file, pretty).map_err(|e| Error::io(&config_file, e))?;
    for name in [
        "generation_config.json",
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
    ] {
        let from = files.dir.join(name);
        if from.is_file() {
            std::fs::copy(&from, out.join(name)).map_err(|e| Error::io(&from, e))?;
        }
    }
    Ok(())
}

/// Whether [`prune_checkpoint_files`] can prune this architecture (GPT-2 and BERT: the ones
/// transformers reloads pruned).
pub fn check_prunable(spec: &ModelSpec) -> Result<()> {
    if !matches!(spec.architecture, Architecture::Gpt2 | Architecture::Bert) {
        return Err(Error::invalid(
            "prune",
            "physical pruning is implemented for GPT-2 and BERT checkpoints (the ones transformers can reload \
             pruned); use a head mask with this architecture",
        ));
    }
    Ok(())
}

/// Offsets (within one `heads * d` group of the current layout) of the heads that survive `pruned`.
fn surviving(current: Vec<usize>, pruned: Option<&Vec<usize>>, d: usize) -> Vec<usize> {
    current
        .iter()
        .enumerate()
        .filter(|(_, head)| !pruned.is_some_and(|p| p.contains(head)))
        .flat_map(|(slot, _)| slot * d..(slot + 1) * d)
        .collect()
}

/// The given columns of a `[rows, cols]` tensor (a vector is one row), any dtype.
fn select_columns(tensor: &HostTensor, columns: &[usize]) -> HostTensor {
    let size = tensor.dtype().size();
    let cols = *tensor.shape().last().unwrap_or(&1);
    let bytes = tensor.bytes();
    let mut out = Vec::with_capacity(bytes.len() / cols * columns.len());
    for row in bytes.chunks_exact(cols * size) {
        for &c in columns {
            out.extend_from_slice(&row[c * size..(c + 1) * size]);
        }
    }
    let mut shape = tensor.shape().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = columns.len();
    }
    HostTensor::from_bytes(out, tensor.dtype(), shape)
}

/// The given rows of a `[rows, cols]` tensor, any dtype.
fn select_rows(tensor: &HostTensor, rows: &[usize]) -> HostTensor {
    let size = tensor.dtype().size();
    let cols = tensor.shape()[1];
    let bytes = tensor.bytes();
    let out: Vec<u8> = rows.iter().flat_map(|&r| &bytes[r * cols * size..(r + 1) * cols * size]).copied().collect();
    HostTensor::from_bytes(out, tensor.dtype(), vec![rows.len(), cols])
}
