//! GPT-2 (Radford et al. 2019): learned positions, pre-LayerNorm blocks, fused QKV projection, GELU MLP.
//! `Conv1D` weights are stored `[in, out]`.

use super::config::{Activation, Architecture, AttentionSpan, Details, Fields, ModelSpec};
use super::layers::{attend_qkv, Linear, Norm};
use super::probes::{Probe, Site};
use super::{base_prefix, ModuleNames, Transformer, GPT_NAMES};
use crate::backend::{AttentionParams, Backend, Layout, Lookup};
use crate::error::Result;
use crate::io::weights::Weights;

struct Block<B: Backend> {
    ln_1: Norm<B>,
    c_attn: Linear<B>,
    attn_proj: Linear<B>,
    ln_2: Norm<B>,
    c_fc: Linear<B>,
    mlp_proj: Linear<B>,
    attention: AttentionParams,
}

pub(crate) struct Gpt2<B: Backend> {
    wte: B::Weight,
    wpe: B::Weight,
    blocks: Vec<Block<B>>,
    ln_f: Norm<B>,
    activation: Activation,
}

impl<B: Backend> Gpt2<B> {
    pub(crate) fn load(b: &B, w: &Weights, spec: &ModelSpec) -> Result<Self> {
        let p = base_prefix(w, "transformer.", "wte.weight");
        let (d, eps) = (spec.hidden_size, spec.norm_eps);
        let Details::Gpt2 { scale_attn_weights, scale_attn_by_inverse_layer_idx } = spec.details else {
            unreachable!("gpt2 loader called with another architecture's spec")
        };
        let blocks = (0..spec.num_layers)
            .map(|i| {
                let h = format!("{p}h.{i}");
                // Pruned heads (transformers' `pruned_heads`) shrink this block's attention.
                let heads = spec.kept_heads(i).len();
                let width = heads * spec.head_dim;
                let mut scale = if scale_attn_weights { 1.0 / (spec.head_dim as f32).sqrt() } else { 1.0 };
                if scale_attn_by_inverse_layer_idx {
                    scale /= (i + 1) as f32;
                }
                Ok(Block {
                    ln_1: Norm::layer_norm(b, w, &format!("{h}.ln_1"), d, eps)?,
                    c_attn: Linear::load(b, w, &format!("{h}.attn.c_attn"), (3 * width, d), Layout::InOut, true)?,
                    attn_proj: Linear::load(b, w, &format!("{h}.attn.c_proj"), (d, width), Layout::InOut, true)?,
                    ln_2: Norm::layer_norm(b, w, &format!("{h}.ln_2"), d, eps)?,
                    c_fc: Linear::load(
                        b,
                        w,
                        &format!("{h}.mlp.c_fc"),
                        (spec.intermediate_size, d),
                        Layout::InOut,
                        true,
                    )?,
                    mlp_proj: Linear::load(
                        b,
                        w,
                        &format!("{h}.mlp.c_proj"),
                        (d, spec.intermediate_size),
                        Layout::InOut,
                        true,
                    )?,
                    attention: AttentionParams {
                        num_heads: heads,
                        num_kv_heads: heads,
                        head_dim: spec.head_dim,
                        scale,
                        window: None,
                        causal: true,
                    },
                })
            })
            .collect::<Result<_>>()?;
        Ok(Gpt2 {
            wte: b.weight(w.get_shaped(&format!("{p}wte.weight"), &[spec.embedding_rows(), d])?, Layout::OutIn)?,
            wpe: b.weight(w.get_shaped(&format!("{p}wpe.weight"), &[spec.max_positions, d])?, Layout::OutIn)?,
            blocks,
            ln_f: Norm::layer_norm(b, w, &format!("{p}ln_f"), d, eps)?,
            activation: spec.activation,
        })
    }
}

impl<B: Backend> Transformer<B> for Gpt2<B> {
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

        // x = x + c_proj(attn(c_attn(ln_1(x))))
        let qkv = blk.ln_1.feed_linear(b, &x, &blk.c_attn, None, probe, layer, Site::Norm1)?;
        let heads = attend_qkv(b, kv, layer, step, &qkv, &blk.attention, probe)?;
        blk.attn_proj.add_to(b, &mut x, &heads, probe, layer, Site::Attention)?;
        Ok(x)
    }

    fn mlp_sublayer(&self, b: &B, layer: usize, mut x: B::Tensor, probe: &mut dyn Probe<B>) -> Result<B::Tensor> {
        let blk = &self.blocks[layer];

        // x = x + c_proj(act(c_fc(ln_2(x))))
        let m = blk.ln_2.feed_linear(b, &x, &blk.c_fc, Some(self.activation), probe, layer, Site::Norm2)?;
        blk.mlp_proj.add_to(b, &mut x, &m, probe, layer, Site::Mlp)?;
        Ok(x)
    }

    fn block_bytes(&self, b: &B, layer: usize) -> usize {
        let blk = &self.blocks[layer];
        blk.ln_1.bytes(b)
            + blk.c_attn.bytes(b)
            + blk.attn_proj.bytes(b)
            + blk.ln_2.bytes(b)
            + blk.c_fc.bytes(b)
            + blk.mlp_proj.bytes(b)
    }

    fn final_norm(&self) -> &Norm<B> {
        &self.ln_f
    }

    fn names(&self) -> &'static ModuleNames {
        &GPT_NAMES
    }
}

/// The GPT-2 fields of `config.json` (`GPT2Config`'s names and defaults).
pub(crate) fn spec(f: &Fields) -> Result<ModelSpec> {
    let hidden = f.usize("n_embd")?;
    let heads = f.usize("n_head")?;
    let layers = f.usize("n_layer")?;
    Ok(ModelSpec {
        architecture: Architecture::Gpt2,
        vocab_size: f.usize("vocab_size")?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: heads,
        head_dim: hidden / heads.max(1),
        intermediate_size: f.usize_opt("n_inner")?.unwrap_or(4 * hidden),
        max_positions: f.usize("n_positions")?,
        norm_eps: f.epsilon_or("layer_norm_epsilon", 1e-5)? as f32,
        activation: f.activation("activation_function", "gelu_new")?,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", true)?,
        attention_spans: vec![AttentionSpan::Global; layers],
        exit_layers: Vec::new(),
        pruned_heads: Default::default(),
        bos_token_id: None,
        eos_token_ids: Vec::new(),
        details: Details::Gpt2 {
            scale_attn_weights: f.bool_or("scale_attn_weights", true)?,
            scale_attn_by_inverse_layer_idx: f.bool_or("scale_attn_by_inverse_layer_idx", false)?,
        },
        virtual_tokens: 0,
    })
}
