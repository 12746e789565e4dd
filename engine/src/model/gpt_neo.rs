//! GPT-Neo (Black et al. 2021): GPT-2's shape with separate q/k/v projections, layers alternating
//! between global and local (windowed) attention, and no 1/sqrt(head_dim) scaling of the scores.

use super::config::{Activation, AttentionSpan, ModelSpec};
use super::layers::{attend, Linear, Norm};
use super::probes::{Probe, Site};
use super::{base_prefix, ModuleNames, Transformer, GPT_NAMES};
use crate::backend::{AttentionParams, Backend, Layout, Lookup};
use crate::error::Result;
use crate::io::weights::Weights;

struct Block<B: Backend> {
    ln_1: Norm<B>,
    q_proj: Linear<B>,
    k_proj: Linear<B>,
    v_proj: Linear<B>,
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
                Ok(Block {
                    ln_1: Norm::layer_norm(b, w, &format!("{h}.ln_1"), d, eps)?,
                    q_proj: Linear::load(b, w, &format!("{attn}.q_proj"), (d, d), Layout::OutIn, false)?,
                    k_proj: Linear::load(b, w, &format!("{attn}.k_proj"), (d, d), Layout::OutIn, false)?,
                    v_proj: Linear::load(b, w, &format!("{attn}.v_proj"), (d, d), Layout::OutIn, false)?,
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
                    },
                })
            })
            .collect::<Result<_>>()?;
        Ok(GptNeo {
            wte: b.weight(w.get_shaped(&format!("{p}wte.weight"), &[spec.vocab_size, d])?, Layout::OutIn)?,
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
        let h = blk.ln_1.forward(b, &x)?;
        probe.see(layer, Site::Norm1, &h)?;
        let (q, k, v) = (blk.q_proj.forward(b, &h)?, blk.k_proj.forward(b, &h)?, blk.v_proj.forward(b, &h)?);
        let a = blk.out_proj.forward(b, &attend(b, kv, layer, step, (&q, &k, &v), &blk.attention, probe)?)?;
        probe.see(layer, Site::Attention, &a)?;
        b.add_assign(&mut x, &a)?;
        Ok(x)
    }

    fn mlp_sublayer(&self, b: &B, layer: usize, mut x: B::Tensor, probe: &mut dyn Probe<B>) -> Result<B::Tensor> {
        let blk = &self.blocks[layer];

        // x = x + c_proj(act(c_fc(ln_2(x))))
        let h = blk.ln_2.forward(b, &x)?;
        probe.see(layer, Site::Norm2, &h)?;
        let mut m = blk.c_fc.forward(b, &h)?;
        b.activate(&mut m, self.activation)?;
        let m = blk.c_proj.forward(b, &m)?;
        probe.see(layer, Site::Mlp, &m)?;
        b.add_assign(&mut x, &m)?;
        Ok(x)
    }

    fn block_bytes(&self, b: &B, layer: usize) -> usize {
        let blk = &self.blocks[layer];
        blk.ln_1.bytes(b)
            + blk.q_proj.bytes(b)
            + blk.k_proj.bytes(b)
            + blk.v_proj.bytes(b)
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
