//! Llama (Touvron et al. 2023): RMSNorm, rotary position embeddings, grouped-query attention and a
//! SiLU-gated MLP; no biases unless the config asks for them.

use super::config::{Activation, Architecture, AttentionSpan, Details, Fields, ModelSpec};
use super::layers::{attend, Linear, Norm};
use super::probes::{Probe, Site};
use super::{base_prefix, ModuleNames, Transformer};
use crate::backend::{AttentionParams, Backend, Layout, Lookup};
use crate::error::Result;
use crate::io::weights::Weights;
use serde_json::Value;

struct Block<B: Backend> {
    input_layernorm: Norm<B>,
    q_proj: Linear<B>,
    k_proj: Linear<B>,
    v_proj: Linear<B>,
    o_proj: Linear<B>,
    post_attention_layernorm: Norm<B>,
    gate_proj: Linear<B>,
    up_proj: Linear<B>,
    down_proj: Linear<B>,
}

pub(crate) struct Llama<B: Backend> {
    embed_tokens: B::Weight,
    blocks: Vec<Block<B>>,
    norm: Norm<B>,
    attention: AttentionParams,
    rope_theta: f32,
    activation: Activation,
}

impl<B: Backend> Llama<B> {
    pub(crate) fn load(b: &B, w: &Weights, spec: &ModelSpec) -> Result<Self> {
        let p = base_prefix(w, "model.", "embed_tokens.weight");
        let Details::Llama { rope_theta, attention_bias, mlp_bias } = spec.details else {
            unreachable!("llama loader called with another architecture's spec")
        };
        let (d, eps, ff) = (spec.hidden_size, spec.norm_eps, spec.intermediate_size);
        let (q_width, kv_width) = (spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim);
        let blocks = (0..spec.num_layers)
            .map(|i| {
                let l = format!("{p}layers.{i}");
                let linear =
                    |name: &str, shape, bias| Linear::load(b, w, &format!("{l}.{name}"), shape, Layout::OutIn, bias);
                Ok(Block {
                    input_layernorm: Norm::rms_norm(b, w, &format!("{l}.input_layernorm"), d, eps)?,
                    q_proj: linear("self_attn.q_proj", (q_width, d), attention_bias)?,
                    k_proj: linear("self_attn.k_proj", (kv_width, d), attention_bias)?,
                    v_proj: linear("self_attn.v_proj", (kv_width, d), attention_bias)?,
                    o_proj: linear("self_attn.o_proj", (d, q_width), attention_bias)?,
                    post_attention_layernorm: Norm::rms_norm(b, w, &format!("{l}.post_attention_layernorm"), d, eps)?,
                    gate_proj: linear("mlp.gate_proj", (ff, d), mlp_bias)?,
                    up_proj: linear("mlp.up_proj", (ff, d), mlp_bias)?,
                    down_proj: linear("mlp.down_proj", (d, ff), mlp_bias)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Llama {
            embed_tokens: b.weight(
                w.get_shaped(&format!("{p}embed_tokens.weight"), &[spec.embedding_rows(), d])?,
                Layout::OutIn,
            )?,
            blocks,
            norm: Norm::rms_norm(b, w, &format!("{p}norm"), d, eps)?,
            attention: AttentionParams {
                num_heads: spec.num_heads,
                num_kv_heads: spec.num_kv_heads,
                head_dim: spec.head_dim,
                scale: 1.0 / (spec.head_dim as f32).sqrt(),
                window: None,
                causal: true,
            },
            rope_theta,
            activation: spec.activation,
        })
    }
}

/// transformers' module names for Llama.
static LLAMA_NAMES: ModuleNames = ModuleNames {
    blocks: "layers",
    norm_1: "input_layernorm",
    attention: "self_attn",
    norm_2: "post_attention_layernorm",
    mlp: "mlp",
    final_norm: "norm",
};

impl<B: Backend> Transformer<B> for Llama<B> {
    fn embed(&self, b: &B, step: &B::Step) -> Result<B::Tensor> {
        b.embed(&self.embed_tokens, step, Lookup::Tokens)
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
        let head_dim = self.attention.head_dim;

        // x = x + o_proj(attn(rope(q), rope(k), v)) on input_layernorm(x)
        let h = blk.input_layernorm.forward(b, &x)?;
        probe.see(layer, Site::Norm1, &h)?;
        let (mut q, mut k, v) = (blk.q_proj.forward(b, &h)?, blk.k_proj.forward(b, &h)?, blk.v_proj.forward(b, &h)?);
        b.rope(&mut q, head_dim, step, self.rope_theta)?;
        b.rope(&mut k, head_dim, step, self.rope_theta)?;
        let heads = attend(b, kv, layer, step, (&q, &k, &v), &self.attention, probe)?;
        blk.o_proj.add_to(b, &mut x, &heads, probe, layer, Site::Attention)?;
        Ok(x)
    }

    fn mlp_sublayer(&self, b: &B, layer: usize, mut x: B::Tensor, probe: &mut dyn Probe<B>) -> Result<B::Tensor> {
        let blk = &self.blocks[layer];

        // x = x + down_proj(act(gate_proj(h)) * up_proj(h)) on h = post_attention_layernorm(x)
        let h = blk.post_attention_layernorm.forward(b, &x)?;
        probe.see(layer, Site::Norm2, &h)?;
        let mut gate = blk.gate_proj.forward_act(b, &h, self.activation)?;
        b.mul_assign(&mut gate, &blk.up_proj.forward(b, &h)?)?;
        blk.down_proj.add_to(b, &mut x, &gate, probe, layer, Site::Mlp)?;
        Ok(x)
    }

    fn block_bytes(&self, b: &B, layer: usize) -> usize {
        let blk = &self.blocks[layer];
        blk.input_layernorm.bytes(b)
            + blk.q_proj.bytes(b)
            + blk.k_proj.bytes(b)
            + blk.v_proj.bytes(b)
            + blk.o_proj.bytes(b)
            + blk.post_attention_layernorm.bytes(b)
            + blk.gate_proj.bytes(b)
            + blk.up_proj.bytes(b)
            + blk.down_proj.bytes(b)
    }

    fn final_norm(&self) -> &Norm<B> {
        &self.norm
    }

    fn names(&self) -> &'static ModuleNames {
        &LLAMA_NAMES
    }
}

/// The Llama fields of `config.json` (`LlamaConfig`'s names and defaults).
pub(crate) fn spec(f: &Fields) -> Result<ModelSpec> {
    if let Some(scaling) = f.present("rope_scaling") {
        let kind = scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(Value::as_str).unwrap_or("?");
        if kind != "default" {
            return Err(f.error("rope_scaling", format!("rope scaling `{kind}` is not implemented")));
        }
    }
    // `pretraining_tp` is ignored, as transformers 4.48 ignores it: the slicing it meant is exact math.
    let hidden = f.usize("hidden_size")?;
    let heads = f.usize("num_attention_heads")?;
    let layers = f.usize("num_hidden_layers")?;
    let sliding = f.bool_or("use_sliding_window", false)?;
    if sliding {
        return Err(f.error("use_sliding_window", "sliding-window attention is not implemented for llama"));
    }
    Ok(ModelSpec {
        architecture: Architecture::Llama,
        vocab_size: f.usize("vocab_size")?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: f.usize_opt("num_key_value_heads")?.unwrap_or(heads),
        head_dim: f.usize_opt("head_dim")?.unwrap_or(hidden / heads.max(1)),
        intermediate_size: f.usize("intermediate_size")?,
        max_positions: f.usize_opt("max_position_embeddings")?.unwrap_or(2048),
        norm_eps: f.epsilon_or("rms_norm_eps", 1e-6)? as f32,
        activation: f.activation("hidden_act", "silu")?,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
        attention_spans: vec![AttentionSpan::Global; layers],
        exit_layers: Vec::new(),
        pruned_heads: Default::default(),
        bos_token_id: None,
        eos_token_ids: Vec::new(),
        details: Details::Llama {
            rope_theta: f.positive_or("rope_theta", 10000.0)? as f32,
            attention_bias: f.bool_or("attention_bias", false)?,
            mlp_bias: f.bool_or("mlp_bias", false)?,
        },
        virtual_tokens: 0,
    })
}
