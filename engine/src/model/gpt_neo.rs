//! GPT-Neo (Black et al. 2021): GPT-2's shape with separate q/k/v projections, layers alternating
//! between global and local (windowed) attention, and no 1/sqrt(head_dim) scaling of the scores.

use super::config::{Activation, Architecture, AttentionSpan, Details, Fields, ModelSpec};
use super::layers::{attend_qkv, Linear, Norm};
use super::probes::{Probe, Site};
use super::{base_prefix, ModuleNames, Transformer, GPT_NAMES};
use crate::backend::{AttentionParams, Backend, Layout, Lookup};
use crate::error::Result;
use crate::io::weights::Weights;
use serde_json::Value;

struct Block<B: Backend> {
    ln_1: Norm<B>,
    /// q_proj, k_proj and v_proj stacked: one product, its output read in place by the attention.
    qkv_proj: Linear<B>,
    out_proj: Linear<B>,
    ln_2: Norm<B>,
    c_fc: Linear<B>,
    c_proj: Linear<B>,
    attention: AttentionParams,
}

pub(crate) struct GptNeo<B: Backend> {
    wte: B::Weight,
    wpe: B::Weight,
    blocks: Vec<Block<B>>,
    ln_f: Norm<B>,
    activation: Activation,
}

impl<B: Backend> GptNeo<B> {
    pub(crate) fn load(b: &B, w: &Weights, spec: &ModelSpec) -> Result<Self> {
        let p = base_prefix(w, "transformer.", "wte.weight");
        let (d, eps, ff) = (spec.hidden_size, spec.norm_eps, spec.intermediate_size);
        let blocks = (0..spec.num_layers)
            .map(|i| {
                let h = format!("{p}h.{i}");
                let attn = format!("{h}.attn.attention");
                let [q, k, v] = ["q_proj", "k_proj", "v_proj"].map(|name| format!("{attn}.{name}"));
                Ok(Block {
                    ln_1: Norm::layer_norm(b, w, &format!("{h}.ln_1"), d, eps)?,
                    qkv_proj: Linear::load_stacked(b, w, &[(q.as_str(), d), (k.as_str(), d), (v.as_str(), d)], d)?,
                    out_proj: Linear::load(b, w, &format!("{attn}.out_proj"), (d, d), Layout::OutIn, true)?,
                    ln_2: Norm::layer_norm(b, w, &format!("{h}.ln_2"), d, eps)?,
                    c_fc: Linear::load(b, w, &format!("{h}.mlp.c_fc"), (ff, d), Layout::OutIn, true)?,
                    c_proj: Linear::load(b, w, &format!("{h}.mlp.c_proj"), (d, ff), Layout::OutIn, true)?,
                    attention: AttentionParams {
                        num_heads: spec.num_heads,
                        num_kv_heads: spec.num_heads,
                        head_dim: spec.head_dim,
                        scale: 1.0,
                        window: match spec.attention_spans[i] {
                            AttentionSpan::Global => None,
                            AttentionSpan::Local { window } => Some(window),
                        },
                        causal: true,
                    },
                })
            })
            .collect::<Result<_>>()?;
        Ok(GptNeo {
            wte: b.weight(w.get_shaped(&format!("{p}wte.weight"), &[spec.embedding_rows(), d])?, Layout::OutIn)?,
            wpe: b.weight(w.get_shaped(&format!("{p}wpe.weight"), &[spec.max_positions, d])?, Layout::OutIn)?,
            blocks,
            ln_f: Norm::layer_norm(b, w, &format!("{p}ln_f"), d, eps)?,
            activation: spec.activation,
        })
    }
}

impl<B: Backend> Transformer<B> for GptNeo<B> {
    fn embed(&self, b: &B, step: &B::Step) -> Result<B::Tensor> {
        let mut x = b.embed(&self.wte, step, Lookup::Tokens)?;
        b.add_assign(&mut x, &b.embed(&self.wpe, step, Lookup::Positions)?)?;
        Ok(x)
    }

    fn attention_sublayer(
        &self,
        b: &B,
        layer: usize,
        mut x: B::Tensor,
        step: &B::Step,
        kv: &mut B::KvStore,
        probe: &mut dyn Probe<B>,
    ) -> Result<B::Tensor> {
        let blk = &self.blocks[layer];

        // x = x + out_proj(attn(q_proj, k_proj, v_proj of ln_1(x))), local or global
        let qkv = blk.ln_1.feed_linear(b, &x, &blk.qkv_proj, None, probe, layer, Site::Norm1)?;
        let heads = attend_qkv(b, kv, layer, step, &qkv, &blk.attention, probe)?;
        blk.out_proj.add_to(b, &mut x, &heads, probe, layer, Site::Attention)?;
        Ok(x)
    }

    fn mlp_sublayer(&self, b: &B, layer: usize, mut x: B::Tensor, probe: &mut dyn Probe<B>) -> Result<B::Tensor> {
        let blk = &self.blocks[layer];

        // x = x + c_proj(act(c_fc(ln_2(x))))
        let m = blk.ln_2.feed_linear(b, &x, &blk.c_fc, Some(self.activation), probe, layer, Site::Norm2)?;
        blk.c_proj.add_to(b, &mut x, &m, probe, layer, Site::Mlp)?;
        Ok(x)
    }

    fn block_bytes(&self, b: &B, layer: usize) -> usize {
        let blk = &self.blocks[layer];
        blk.ln_1.bytes(b)
            + blk.qkv_proj.bytes(b)
            + blk.out_proj.bytes(b)
            + blk.ln_2.bytes(b)
            + blk.c_fc.bytes(b)
            + blk.c_proj.bytes(b)
    }

    fn final_norm(&self) -> &Norm<B> {
        &self.ln_f
    }

    fn names(&self) -> &'static ModuleNames {
        &GPT_NAMES
    }
}

/// The GPT-Neo fields of `config.json` (`GPTNeoConfig`'s names and defaults).
pub(crate) fn spec(f: &Fields) -> Result<ModelSpec> {
    let hidden = f.usize("hidden_size")?;
    let heads = f.usize("num_heads")?;
    let layers = f.usize("num_layers")?;
    let window = f.usize("window_size")?;
    if window == 0 {
        return Err(f.error("window_size", "must be at least 1 (a local layer sees its own position)"));
    }
    let spans = attention_spans(f, layers, window)?;
    Ok(ModelSpec {
        architecture: Architecture::GptNeo,
        vocab_size: f.usize("vocab_size")?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: heads,
        head_dim: hidden / heads.max(1),
        intermediate_size: f.usize_opt("intermediate_size")?.unwrap_or(4 * hidden),
        max_positions: f.usize("max_position_embeddings")?,
        norm_eps: f.epsilon_or("layer_norm_epsilon", 1e-5)? as f32,
        activation: f.activation("activation_function", "gelu_new")?,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", true)?,
        attention_spans: spans,
        exit_layers: Vec::new(),
        pruned_heads: Default::default(),
        bos_token_id: None,
        eos_token_ids: Vec::new(),
        details: Details::GptNeo,
        virtual_tokens: 0,
    })
}

/// GPT-Neo lists its layer kinds either expanded (`attention_layers`) or run-length encoded
/// (`attention_types`: `[[["global", "local"], 12]]`); transformers prefers the latter.
fn attention_spans(f: &Fields, layers: usize, window: usize) -> Result<Vec<AttentionSpan>> {
    let span_of = |field: &str, kind: &Value| match kind.as_str() {
        Some("global") => Ok(AttentionSpan::Global),
        Some("local") => Ok(AttentionSpan::Local { window }),
        _ => Err(f.error(field, format!("attention kind {kind} is not `global` or `local`"))),
    };
    let mut spans = Vec::new();
    if let Some(types) = f.present("attention_types") {
        let bad = || f.error("attention_types", "expected [[[kinds...], repeat], ...]");
        for group in types.as_array().ok_or_else(bad)? {
            let pair = group.as_array().filter(|p| p.len() == 2).ok_or_else(bad)?;
            let kinds = pair[0].as_array().ok_or_else(bad)?;
            let repeat = pair[1].as_u64().ok_or_else(bad)?;
            for _ in 0..repeat {
                for kind in kinds {
                    spans.push(span_of("attention_types", kind)?);
                }
            }
        }
    } else if let Some(list) = f.present("attention_layers") {
        let items = list.as_array().ok_or_else(|| f.error("attention_layers", "expected a list"))?;
        for kind in items {
            spans.push(span_of("attention_layers", kind)?);
        }
    } else {
        return Err(f.error("attention_types", "missing"));
    }
    if spans.len() != layers {
        return Err(f.error("attention_types", format!("describes {} layers but num_layers is {layers}", spans.len())));
    }
    Ok(spans)
}
