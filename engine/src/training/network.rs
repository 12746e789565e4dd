//! The trainable network: GPT-2, GPT-Neo and Llama as one pre-norm transformer whose few
//! differences (fused or separate q/k/v, LayerNorm or RMSNorm, rotary or learned positions, plain
//! or gated MLP, windows, scale) are data, with a forward that keeps what its backward needs and a
//! backward that runs the same steps in reverse. Losses are next-token cross-entropies of chosen
//! heads (the LM head and exit heads), summed as upstream's `MultiHeadGPT2.forward` sums them.
//!
//! The inference forward (`model/`) is the reference for this one: a test checks that both give
//! the same logits on the fixtures, and the gradients are checked against finite differences here
//! and against PyTorch's in `tests/`.

use crate::error::{Error, Result};
use crate::io::weights::Weights;
use crate::model::config::{Activation, Architecture, AttentionSpan, Details, ModelSpec};
use crate::model::{conversion_name, exit_head_name, HeadMask};

use super::head_mask::HeadMaskGradient;
use super::ops::{self, AttentionShape, NormKind};
use super::params::{Init, Normal, ParamId, ParamSet};

/// A linear layer's parameters: `y = x·wᵀ + b`, `w: [n_out, n_in]`.
#[derive(Clone, Copy, Debug)]
struct Lin {
    w: ParamId,
    b: Option<ParamId>,
    n_in: usize,
    n_out: usize,
}

#[derive(Clone, Copy, Debug)]
struct NormP {
    w: ParamId,
    b: Option<ParamId>,
}

struct Block {
    norm_1: NormP,
    /// One fused `[q | k | v]` projection (GPT-2) or three.
    qkv: Vec<Lin>,
    out: Lin,
    norm_2: NormP,
    /// `[fc]` (plain MLP) or `[gate, up]` (gated).
    mlp_in: Vec<Lin>,
    mlp_out: Lin,
    window: Option<usize>,
    scale: f32,
}

/// Which head a loss reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Head {
    /// The LM head on the top layer.
    Original,
    /// The exit head of layer L (1-based block output), on `final_norm(h_L)`.
    Exit(usize),
}

impl std::fmt::Display for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Head::Original => write!(f, "original"),
            Head::Exit(layer) => write!(f, "exit {layer}"),
        }
    }
}

/// A model whose parameters train.
pub struct Network {
    pub spec: ModelSpec,
    pub params: ParamSet,
    tokens: ParamId,
    positions: Option<ParamId>,
    blocks: Vec<Block>,
    final_norm: NormP,
    lm_head: ParamId,
    exit_heads: Vec<(usize, ParamId)>,
    norm: NormKind,
    rope_theta: Option<f32>,
    gated: bool,
    activation: Activation,
}

/// A batch: `batch` sequences of `time` tokens, row-major.
#[derive(Clone, Debug)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub batch: usize,
    pub time: usize,
}

impl Batch {
    /// Next-token targets: position i of each sequence predicts token i + 1; the last is unscored.
    fn targets(&self) -> Vec<Option<u32>> {
        (0..self.batch * self.time).map(|r| (r % self.time + 1 < self.time).then(|| self.tokens[r + 1])).collect()
    }
}

/// What one forward + backward computed.
#[derive(Clone, Debug)]
pub struct StepLosses {
    /// Mean cross-entropy (nats per token) of each head, in the order asked.
    pub per_head: Vec<(Head, f64)>,
    /// Tokens scored per head.
    pub scored: usize,
}

impl StepLosses {
    /// The summed loss that was differentiated.
    pub fn total(&self) -> f64 {
        self.per_head.iter().map(|(_, l)| l).sum()
    }
}

/// A head mask's factors per block, and where its gradient accumulates (`[layers][heads]` both).
type MaskAndGradient<'a> = (&'a [Vec<f32>], &'a mut Vec<Vec<f32>>);

/// What the forward keeps of one block for its backward.
#[derive(Default)]
struct BlockTape {
    x: Vec<f32>,
    n1: Vec<f32>,
    n1_stats: (Vec<f32>, Vec<f32>),
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    heads: Vec<f32>,
    /// The heads before a head mask scaled them (kept only under a mask, for its gradient).
    unmasked: Vec<f32>,
    x_mid: Vec<f32>,
    n2: Vec<f32>,
    n2_stats: (Vec<f32>, Vec<f32>),
    /// The MLP's input projections, before the activation.
    pre: Vec<Vec<f32>>,
    act: Vec<f32>,
}

/// Adds parameters under their checkpoint names, their values from the checkpoint when it has
/// them, else from their initialisation.
struct Builder<'w> {
    params: ParamSet,
    weights: Option<&'w Weights>,
    rng: Normal,
    /// The hidden size (norm widths).
    d: usize,
}

impl Builder<'_> {
    fn tensor(&mut self, name: String, shape: &[usize], transposed: bool, init: Init) -> Result<ParamId> {
        self.params.add(&name, shape, transposed, init, self.weights, &mut self.rng)
    }

    /// `{name}.weight` `[n_out, n_in]` (stored `[n_in, n_out]` when `transposed`) and `{name}.bias`.
    fn linear(
        &mut self,
        name: &str,
        (n_out, n_in): (usize, usize),
        bias: bool,
        transposed: bool,
        std: f32,
    ) -> Result<Lin> {
        let w = self.tensor(format!("{name}.weight"), &[n_out, n_in], transposed, Init::Normal(std))?;
        let b = if bias { Some(self.tensor(format!("{name}.bias"), &[n_out], false, Init::Zeros)?) } else { None };
        Ok(Lin { w, b, n_in, n_out })
    }

    fn norm(&mut self, name: &str, bias: bool) -> Result<NormP> {
        let d = self.d;
        let w = self.tensor(format!("{name}.weight"), &[d], false, Init::Ones)?;
        let b = if bias { Some(self.tensor(format!("{name}.bias"), &[d], false, Init::Zeros)?) } else { None };
        Ok(NormP { w, b })
    }
}

impl Network {
    /// The network of `spec`, its values from `weights` where present, else initialised as
    /// transformers' `_init_weights` does (N(0, 0.02) matrices, GPT-2's output projections scaled
    /// by 1/sqrt(2·layers), unit norms, zero biases). Exit heads of `spec.exit_layers` missing from
    /// `weights` start as a copy of the LM head when `exits_from_lm_head`, else random.
    pub fn new(spec: &ModelSpec, weights: Option<&Weights>, seed: u64, exits_from_lm_head: bool) -> Result<Network> {
        let (d, v, ff, hd) = (spec.hidden_size, spec.vocab_size, spec.intermediate_size, spec.head_dim);
        let (qw, kw) = (spec.num_heads * hd, spec.num_kv_heads * hd);
        let std = 0.02;
        let proj_std = std / (2.0 * spec.num_layers as f32).sqrt();
        let arch = spec.architecture;
        if arch == Architecture::Bert {
            return Err(Error::invalid("model", "training builds decoders (gpt2, gpt_neo, llama); bert is an encoder"));
        }
        let prefix = match (arch, weights) {
            (Architecture::Llama, Some(w)) if w.contains("embed_tokens.weight") => "",
            (Architecture::Llama, _) => "model.",
            (_, Some(w)) if w.contains("wte.weight") && !w.contains("transformer.wte.weight") => "",
            _ => "transformer.",
        };
        let mut b = Builder { params: ParamSet::default(), weights, rng: Normal::new(seed), d };
        let (tokens, positions) = match arch {
            Architecture::Llama => {
                (b.tensor(format!("{prefix}embed_tokens.weight"), &[v, d], false, Init::Normal(std))?, None)
            }
            _ => (
                b.tensor(format!("{prefix}wte.weight"), &[v, d], false, Init::Normal(std))?,
                Some(b.tensor(format!("{prefix}wpe.weight"), &[spec.max_positions, d], false, Init::Normal(std))?),
            ),
        };
        let mut blocks = Vec::with_capacity(spec.num_layers);
        for i in 0..spec.num_layers {
            let window = match spec.attention_spans[i] {
                AttentionSpan::Global => None,
                AttentionSpan::Local { window } => Some(window),
            };
            let block = match (arch, &spec.details) {
                (Architecture::Gpt2, Details::Gpt2 { scale_attn_weights, scale_attn_by_inverse_layer_idx }) => {
                    if !spec.pruned_heads.is_empty() {
                        return Err(Error::invalid(
                            "pruned_heads",
                            "training a model with pruned heads is not supported",
                        ));
                    }
                    let h = format!("{prefix}h.{i}");
                    let mut scale = if *scale_attn_weights { 1.0 / (hd as f32).sqrt() } else { 1.0 };
                    if *scale_attn_by_inverse_layer_idx {
                        scale /= (i + 1) as f32;
                    }
                    Block {
                        norm_1: b.norm(&format!("{h}.ln_1"), true)?,
                        qkv: vec![b.linear(&format!("{h}.attn.c_attn"), (3 * qw, d), true, true, std)?],
                        out: b.linear(&format!("{h}.attn.c_proj"), (d, qw), true, true, proj_std)?,
                        norm_2: b.norm(&format!("{h}.ln_2"), true)?,
                        mlp_in: vec![b.linear(&format!("{h}.mlp.c_fc"), (ff, d), true, true, std)?],
                        mlp_out: b.linear(&format!("{h}.mlp.c_proj"), (d, ff), true, true, proj_std)?,
                        window,
                        scale,
                    }
                }
                (Architecture::GptNeo, _) => {
                    let h = format!("{prefix}h.{i}");
                    let a = format!("{h}.attn.attention");
                    Block {
                        norm_1: b.norm(&format!("{h}.ln_1"), true)?,
                        qkv: vec![
                            b.linear(&format!("{a}.q_proj"), (qw, d), false, false, std)?,
                            b.linear(&format!("{a}.k_proj"), (kw, d), false, false, std)?,
                            b.linear(&format!("{a}.v_proj"), (kw, d), false, false, std)?,
                        ],
                        out: b.linear(&format!("{a}.out_proj"), (d, qw), true, false, std)?,
                        norm_2: b.norm(&format!("{h}.ln_2"), true)?,
                        mlp_in: vec![b.linear(&format!("{h}.mlp.c_fc"), (ff, d), true, false, std)?],
                        mlp_out: b.linear(&format!("{h}.mlp.c_proj"), (d, ff), true, false, std)?,
                        window,
                        scale: 1.0,
                    }
                }
                (Architecture::Llama, Details::Llama { attention_bias, mlp_bias, .. }) => {
                    let l = format!("{prefix}layers.{i}");
                    let (ab, mb) = (*attention_bias, *mlp_bias);
                    Block {
                        norm_1: b.norm(&format!("{l}.input_layernorm"), false)?,
                        qkv: vec![
                            b.linear(&format!("{l}.self_attn.q_proj"), (qw, d), ab, false, std)?,
                            b.linear(&format!("{l}.self_attn.k_proj"), (kw, d), ab, false, std)?,
                            b.linear(&format!("{l}.self_attn.v_proj"), (kw, d), ab, false, std)?,
                        ],
                        out: b.linear(&format!("{l}.self_attn.o_proj"), (d, qw), ab, false, std)?,
                        norm_2: b.norm(&format!("{l}.post_attention_layernorm"), false)?,
                        mlp_in: vec![
                            b.linear(&format!("{l}.mlp.gate_proj"), (ff, d), mb, false, std)?,
                            b.linear(&format!("{l}.mlp.up_proj"), (ff, d), mb, false, std)?,
                        ],
                        mlp_out: b.linear(&format!("{l}.mlp.down_proj"), (d, ff), mb, false, std)?,
                        window,
                        scale: 1.0 / (hd as f32).sqrt(),
                    }
                }
                _ => unreachable!("a spec's details always match its architecture"),
            };
            blocks.push(block);
        }
        let final_norm = match arch {
            Architecture::Llama => b.norm(&format!("{prefix}norm"), false)?,
            _ => b.norm(&format!("{prefix}ln_f"), true)?,
        };
        // Tied as transformers ties them: a stored `lm_head.weight` (torch .bin files keep both) is the
        // embedding, and one gradient serves both uses.
        let lm_head = if spec.tie_word_embeddings {
            tokens
        } else {
            let id = b.tensor("lm_head.weight".into(), &[v, d], false, Init::Normal(std))?;
            // A checkpoint trained tied, now untied: its head starts as what it was, the embedding.
            if weights.is_some_and(|w| !w.contains("lm_head.weight")) {
                let (from, to) = (b.params.params[tokens].offset, b.params.params[id].offset);
                b.params.values.copy_within(from..from + v * d, to);
            }
            id
        };
        let mut exit_heads = Vec::new();
        for &layer in &spec.exit_layers {
            let name = exit_head_name(layer);
            let present = weights.is_some_and(|w| w.contains(&name));
            let id = b.tensor(name, &[v, d], false, Init::Normal(std))?;
            if !present && exits_from_lm_head {
                let (from, to) = (b.params.params[lm_head].offset, b.params.params[id].offset);
                b.params.values.copy_within(from..from + v * d, to);
            }
            exit_heads.push((layer, id));
        }
        // Conversion matrices ride along unchanged (frozen) so that a saved checkpoint keeps them.
        if let Some(w) = weights {
            for layer in 1..spec.num_layers {
                let name = conversion_name(layer, spec.num_layers);
                if w.contains(&name) {
                    let id = b.tensor(name, &[d, d], false, Init::Zeros)?;
                    b.params.params[id].trainable = false;
                }
            }
        }
        let (norm_kind, rope_theta, gated) = match spec.details {
            Details::Llama { rope_theta, .. } => (NormKind::Rms, Some(rope_theta), true),
            _ => (NormKind::Layer, None, false),
        };
        Ok(Network {
            spec: spec.clone(),
            params: b.params,
            tokens,
            positions,
            blocks,
            final_norm,
            lm_head,
            exit_heads,
            norm: norm_kind,
            rope_theta,
            gated,
            activation: spec.activation,
        })
    }

    /// The exit layers that have heads.
    pub fn exit_layers(&self) -> Vec<usize> {
        self.exit_heads.iter().map(|(l, _)| *l).collect()
    }

    /// Parameter names of the body (everything but the LM and exit heads), for freezing.
    pub fn is_exit_head(name: &str) -> bool {
        name.starts_with("name_to_lm_exit_head.")
    }

    fn head_weight(&self, head: Head) -> Result<ParamId> {
        match head {
            Head::Original => Ok(self.lm_head),
            Head::Exit(layer) => self
                .exit_heads
                .iter()
                .find(|(l, _)| *l == layer)
                .map(|(_, id)| *id)
                .ok_or_else(|| Error::invalid("head", format!("layer {layer} has no exit head"))),
        }
    }

    /// Checks a batch against the model's vocabulary and context.
    fn check(&self, batch: &Batch) -> Result<()> {
        if batch.time > self.spec.max_positions {
            return Err(Error::invalid(
                "sequence length",
                format!("{} tokens exceed the model's context of {}", batch.time, self.spec.max_positions),
            ));
        }
        if batch.tokens.len() != batch.batch * batch.time || batch.time < 2 {
            return Err(Error::invalid("batch", "needs batch x time tokens, at least 2 per sequence"));
        }
        if let Some(&t) = batch.tokens.iter().find(|&&t| t as usize >= self.spec.vocab_size) {
            return Err(Error::invalid(
                "token",
                format!("id {t} is outside the vocabulary of {}", self.spec.vocab_size),
            ));
        }
        Ok(())
    }

    /// The residual stream after each block, `hidden[0]` the embeddings, plus the tapes.
    fn forward_body(&self, batch: &Batch, values: &[f32], mask: Option<&[Vec<f32>]>) -> (Vec<f32>, Vec<BlockTape>) {
        let s = &self.spec;
        let (d, rows) = (s.hidden_size, batch.batch * batch.time);
        let p = &self.params;
        let get = |id: ParamId| p.part(values, id);
        let positions: Vec<usize> = (0..rows).map(|r| r % batch.time).collect();

        // x = wte[tokens] (+ wpe[positions])
        let mut x = vec![0.0f32; rows * d];
        for (r, row) in x.chunks_mut(d).enumerate() {
            row.copy_from_slice(&get(self.tokens)[batch.tokens[r] as usize * d..][..d]);
            if let Some(wpe) = self.positions {
                row.iter_mut().zip(&get(wpe)[positions[r] * d..][..d]).for_each(|(a, b)| *a += b);
            }
        }

        let mut tapes = Vec::with_capacity(self.blocks.len());
        for (i, blk) in self.blocks.iter().enumerate() {
            let mut t = BlockTape { x, ..Default::default() };
            // x = x + out(attention(qkv(norm_1(x))))
            t.n1 = self.norm_forward(&t.x, blk.norm_1, values, &mut t.n1_stats);
            let (q, k, v) = self.project_qkv(blk, &t.n1, rows, values, &positions);
            let shape = self.attention_shape(blk, batch);
            t.heads = vec![0.0; rows * s.num_heads * s.head_dim];
            t.probs = vec![0.0; batch.batch * s.num_heads * batch.time * batch.time];
            ops::attention_forward(&mut t.heads, &mut t.probs, &q, &k, &v, shape);
            if let Some(mask) = mask {
                // transformers' head_mask scales each head's probabilities, so its output.
                t.unmasked = t.heads.clone();
                scale_heads(&mut t.heads, &mask[i], s.head_dim);
            }
            (t.q, t.k, t.v) = (q, k, v);
            t.x_mid = t.x.clone();
            let mut attn = vec![0.0; rows * d];
            self.linear(&mut attn, &t.heads, blk.out, rows, values);
            t.x_mid.iter_mut().zip(&attn).for_each(|(a, b)| *a += b);

            // x = x + mlp_out(act(mlp_in(norm_2(x))))
            t.n2 = self.norm_forward(&t.x_mid, blk.norm_2, values, &mut t.n2_stats);
            t.pre = blk
                .mlp_in
                .iter()
                .map(|l| {
                    let mut y = vec![0.0; rows * l.n_out];
                    self.linear(&mut y, &t.n2, *l, rows, values);
                    y
                })
                .collect();
            t.act = vec![0.0; rows * s.intermediate_size];
            if self.gated {
                ops::gate_forward(self.activation, &mut t.act, &t.pre[0], &t.pre[1]);
            } else {
                ops::activation_forward(self.activation, &mut t.act, &t.pre[0]);
            }
            let mut out = t.x_mid.clone();
            let mut mlp = vec![0.0; rows * d];
            self.linear(&mut mlp, &t.act, blk.mlp_out, rows, values);
            out.iter_mut().zip(&mlp).for_each(|(a, b)| *a += b);
            x = out;
            tapes.push(t);
        }
        (x, tapes)
    }

    fn attention_shape(&self, blk: &Block, batch: &Batch) -> AttentionShape {
        AttentionShape {
            batch: batch.batch,
            time: batch.time,
            heads: self.spec.num_heads,
            kv_heads: self.spec.num_kv_heads,
            head_dim: self.spec.head_dim,
            scale: blk.scale,
            window: blk.window,
            causal: true,
        }
    }

    fn linear(&self, y: &mut [f32], x: &[f32], l: Lin, rows: usize, values: &[f32]) {
        let b = l.b.map(|b| self.params.part(values, b));
        ops::linear_forward(y, x, self.params.part(values, l.w), b, (rows, l.n_in, l.n_out));
    }

    fn norm_forward(&self, x: &[f32], n: NormP, values: &[f32], stats: &mut (Vec<f32>, Vec<f32>)) -> Vec<f32> {
        let rows = x.len() / self.spec.hidden_size;
        let mut y = vec![0.0; x.len()];
        *stats = (vec![0.0; rows], vec![0.0; rows]);
        let b = n.b.map(|b| self.params.part(values, b));
        ops::norm_forward(
            self.norm,
            &mut y,
            &mut stats.0,
            &mut stats.1,
            x,
            self.params.part(values, n.w),
            b,
            self.spec.norm_eps,
        );
        y
    }

    /// q, k, v of a block (rotated when the architecture is rotary).
    fn project_qkv(
        &self,
        blk: &Block,
        n1: &[f32],
        rows: usize,
        values: &[f32],
        positions: &[usize],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let s = &self.spec;
        let (qw, kw) = (s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim);
        let mut outs: Vec<Vec<f32>> = blk
            .qkv
            .iter()
            .map(|l| {
                let mut y = vec![0.0; rows * l.n_out];
                self.linear(&mut y, n1, *l, rows, values);
                y
            })
            .collect();
        let (mut q, mut k, v) = if outs.len() == 1 {
            let fused = &outs[0];
            let split = |start: usize, width: usize| -> Vec<f32> {
                fused.chunks(qw + 2 * kw).flat_map(|row| row[start..start + width].iter().copied()).collect()
            };
            (split(0, qw), split(qw, kw), split(qw + kw, kw))
        } else {
            let v = outs.pop().unwrap_or_default();
            let k = outs.pop().unwrap_or_default();
            let q = outs.pop().unwrap_or_default();
            (q, k, v)
        };
        if let Some(theta) = self.rope_theta {
            ops::rope(&mut q, positions, s.head_dim, theta, 1.0);
            ops::rope(&mut k, positions, s.head_dim, theta, 1.0);
        }
        (q, k, v)
    }

    /// Logits of `head` for every position of `batch` (no gradients): for tests and evaluation.
    pub fn logits(&self, batch: &Batch, head: Head) -> Result<Vec<f32>> {
        self.check(batch)?;
        let (top, tapes) = self.forward_body(batch, &self.params.values, None);
        let h = self.head_input(head, &top, &tapes);
        let mut stats = Default::default();
        let n = self.norm_forward(h, self.final_norm, &self.params.values, &mut stats);
        let w = self.head_weight(head)?;
        let rows = batch.batch * batch.time;
        let mut logits = vec![0.0; rows * self.spec.vocab_size];
        ops::linear_forward(
            &mut logits,
            &n,
            self.params.get(w),
            None,
            (rows, self.spec.hidden_size, self.spec.vocab_size),
        );
        Ok(logits)
    }

    /// `final_norm(h_L)` at every position of `batch` for each of `layers` (1-based block outputs;
    /// the top layer's is the state the LM head reads).
    pub fn normed_states(&self, batch: &Batch, layers: &[usize]) -> Result<Vec<Vec<f32>>> {
        self.check(batch)?;
        let (top, tapes) = self.forward_body(batch, &self.params.values, None);
        layers
            .iter()
            .map(|&layer| {
                if layer == 0 || layer > self.spec.num_layers {
                    return Err(Error::invalid(
                        "layer",
                        format!("{layer} is not a layer of the model (1..={})", self.spec.num_layers),
                    ));
                }
                let mut stats = Default::default();
                Ok(self.norm_forward(
                    self.head_input(Head::Exit(layer), &top, &tapes),
                    self.final_norm,
                    &self.params.values,
                    &mut stats,
                ))
            })
            .collect()
    }

    /// Adds a frozen parameter `name` of `shape` holding `values` (a fitted conversion matrix), or
    /// replaces its values if it exists.
    pub fn set_parameter(&mut self, name: &str, shape: &[usize], values: Vec<f32>) -> Result<()> {
        let id = match self.params.id(name) {
            Some(id) => id,
            None => self.params.add(name, shape, false, Init::Zeros, None, &mut Normal::new(0))?,
        };
        let p = &mut self.params.params[id];
        if p.shape != shape || values.len() != p.numel() {
            return Err(Error::invalid(name, format!("shape {:?} does not match {shape:?}", p.shape)));
        }
        p.trainable = false;
        let offset = p.offset;
        self.params.values[offset..offset + values.len()].copy_from_slice(&values);
        Ok(())
    }

    fn head_input<'a>(&self, head: Head, top: &'a [f32], tapes: &'a [BlockTape]) -> &'a [f32] {
        match head {
            Head::Exit(layer) if layer < tapes.len() => &tapes[layer].x,
            _ => top,
        }
    }

    /// The next-token loss of each of `heads` on `batch`, without gradients.
    pub fn loss(&self, batch: &Batch, heads: &[Head]) -> Result<StepLosses> {
        self.forward_backward(batch, heads, None)
    }

    /// Forward and backward of one batch: the summed next-token loss of `heads` and, given `grads`
    /// (laid out like the parameter values), its gradient added in for every trainable parameter.
    pub fn forward_backward(&self, batch: &Batch, heads: &[Head], grads: Option<&mut [f32]>) -> Result<StepLosses> {
        self.run(batch, heads, grads, None)
    }

    /// The next-token loss of `head` over `texts` (each text its own sequence; the mean over every
    /// scored token of all of them, as transformers' loss of a padded batch with `labels` -100 at
    /// the padding) and its gradient with respect to `mask` (transformers' `head_mask.grad`).
    pub fn head_mask_gradient(&self, texts: &[Vec<u32>], head: Head, mask: &HeadMask) -> Result<HeadMaskGradient> {
        if !self.spec.pruned_heads.is_empty() {
            return Err(Error::invalid("model", "head-mask gradients need a checkpoint without pruned_heads"));
        }
        let factors = mask.factors(&self.spec)?;
        if texts.is_empty() {
            return Err(Error::invalid("texts", "no texts to score"));
        }
        let (layers, heads) = (self.spec.num_layers, self.spec.num_heads);
        let mut out =
            HeadMaskGradient { loss: 0.0, gradient: vec![vec![0.0; heads]; layers], tokens: 0, logits: Vec::new() };
        let mut scratch = vec![0.0f32; self.params.values.len()];
        let mut scored = 0usize;
        for (n, text) in texts.iter().enumerate() {
            let batch = Batch { tokens: text.clone(), batch: 1, time: text.len() };
            if text.len() < 2 {
                return Err(Error::invalid(format!("text {n}"), "needs at least 2 tokens to score a next token"));
            }
            let mut gradient = vec![vec![0.0; heads]; layers];
            let losses = self.run(&batch, &[head], Some(&mut scratch), Some((&factors, &mut gradient)))?;
            // Weight each text's mean by its scored tokens: the mean over the whole batch.
            let count = text.len() - 1;
            out.loss += losses.total() * count as f64;
            for (total, g) in out.gradient.iter_mut().flatten().zip(gradient.iter().flatten()) {
                *total += g * count as f32;
            }
            scored += count;
            out.tokens += text.len();
        }
        out.loss /= scored as f64;
        out.gradient.iter_mut().flatten().for_each(|g| *g /= scored as f32);
        Ok(out)
    }

    /// Forward and backward; with `mask` (per block, a factor per head), the heads are scaled and the
    /// gradient with respect to the factors is added into its second part, the body's backward run
    /// whatever trains.
    fn run(
        &self,
        batch: &Batch,
        heads: &[Head],
        mut grads: Option<&mut [f32]>,
        mut mask: Option<MaskAndGradient>,
    ) -> Result<StepLosses> {
        self.check(batch)?;
        let s = &self.spec;
        let p = &self.params;
        let values = &p.values;
        let (d, rows) = (s.hidden_size, batch.batch * batch.time);
        let (top, tapes) = self.forward_body(batch, values, mask.as_ref().map(|(factors, _)| *factors));
        let targets = batch.targets();
        // Gradients reach the body only when something in it trains, or a head mask's gradient is asked.
        let body_trains = grads.is_some()
            && (mask.is_some()
                || p.params.iter().enumerate().any(|(id, q)| {
                    q.trainable && !Self::is_exit_head(&q.name) && (id != self.lm_head || self.lm_head == self.tokens)
                }));

        // d(loss)/d(residual after block L), L = 0..=layers.
        let mut dhidden: Vec<Vec<f32>> =
            if body_trains { vec![vec![0.0; rows * d]; s.num_layers + 1] } else { Vec::new() };
        let mut per_head = Vec::with_capacity(heads.len());
        let mut scored = 0;
        let mut logits = vec![0.0f32; rows * s.vocab_size];
        for &head in heads {
            let layer = match head {
                Head::Original => s.num_layers,
                Head::Exit(l) => l,
            };
            let w = self.head_weight(head)?;
            let h = self.head_input(head, &top, &tapes);
            let mut stats = Default::default();
            let n = self.norm_forward(h, self.final_norm, values, &mut stats);
            ops::linear_forward(&mut logits, &n, p.get(w), None, (rows, d, s.vocab_size));
            let (loss, count) = ops::cross_entropy(&mut logits, &targets, 1.0);
            per_head.push((head, loss));
            scored = count;
            let Some(grads) = grads.as_deref_mut() else { continue };
            let mut dn = body_trains.then(|| vec![0.0; rows * d]);
            ops::linear_backward(
                &logits,
                &n,
                p.get(w),
                (rows, d, s.vocab_size),
                dn.as_deref_mut(),
                p.grad_of(grads, w),
                None,
            );
            if let Some(dn) = dn {
                let (fw, fb) = (self.final_norm.w, self.final_norm.b);
                ops::norm_backward(
                    self.norm,
                    &dn,
                    h,
                    &stats.0,
                    &stats.1,
                    p.get(fw),
                    Some(&mut dhidden[layer]),
                    p.grad_of(grads, fw),
                    None,
                );
                if let Some(fb) = fb {
                    ops::norm_backward(
                        self.norm,
                        &dn,
                        h,
                        &stats.0,
                        &stats.1,
                        p.get(fw),
                        None,
                        None,
                        p.grad_of(grads, fb),
                    );
                }
            }
        }
        let Some(grads) = grads.filter(|_| body_trains) else {
            return Ok(StepLosses { per_head, scored });
        };

        // Blocks in reverse: the gradient of the residual stream flows down, collecting each head's.
        let positions: Vec<usize> = (0..rows).map(|r| r % batch.time).collect();
        let mut dx = dhidden.pop().unwrap_or_default();
        for (i, (blk, t)) in self.blocks.iter().zip(&tapes).enumerate().rev() {
            // x_out = x_mid + mlp_out(act): dx flows to x_mid unchanged.
            let mut dx_mid = dx;
            let mut dact = vec![0.0; rows * s.intermediate_size];
            self.linear_back(&dx_mid, &t.act, blk.mlp_out, rows, Some(&mut dact), grads);
            let mut dpre: Vec<Vec<f32>> = t.pre.iter().map(|x| vec![0.0; x.len()]).collect();
            if self.gated {
                let (dg, du) = dpre.split_at_mut(1);
                ops::gate_backward(self.activation, &mut dg[0], &mut du[0], &dact, &t.pre[0], &t.pre[1]);
            } else {
                ops::activation_backward(self.activation, &mut dpre[0], &dact, &t.pre[0]);
            }
            let mut dn2 = vec![0.0; rows * d];
            for (l, dp) in blk.mlp_in.iter().zip(&dpre) {
                self.linear_back(dp, &t.n2, *l, rows, Some(&mut dn2), grads);
            }
            self.norm_back(&dn2, &t.x_mid, &t.n2_stats, blk.norm_2, &mut dx_mid, grads);

            // x_mid = x + out(heads)
            let mut dx_in = dx_mid.clone();
            let mut dheads = vec![0.0; t.heads.len()];
            self.linear_back(&dx_mid, &t.heads, blk.out, rows, Some(&mut dheads), grads);
            if let Some((factors, gradient)) = mask.as_mut() {
                // heads = m · unmasked: d m = Σ dheads · unmasked, d unmasked = m · dheads.
                for (row, unmasked) in
                    dheads.chunks_mut(t.unmasked.len() / rows).zip(t.unmasked.chunks(t.unmasked.len() / rows))
                {
                    for (h, (dh, u)) in row.chunks(s.head_dim).zip(unmasked.chunks(s.head_dim)).enumerate() {
                        gradient[i][h] += dh.iter().zip(u).map(|(a, b)| a * b).sum::<f32>();
                    }
                }
                scale_heads(&mut dheads, &factors[i], s.head_dim);
            }
            let (mut dq, mut dk, mut dv) = (vec![0.0; t.q.len()], vec![0.0; t.k.len()], vec![0.0; t.v.len()]);
            ops::attention_backward(
                &mut dq,
                &mut dk,
                &mut dv,
                &dheads,
                &t.probs,
                &t.q,
                &t.k,
                &t.v,
                self.attention_shape(blk, batch),
            );
            if let Some(theta) = self.rope_theta {
                ops::rope(&mut dq, &positions, s.head_dim, theta, -1.0);
                ops::rope(&mut dk, &positions, s.head_dim, theta, -1.0);
            }
            let mut dn1 = vec![0.0; rows * d];
            if blk.qkv.len() == 1 {
                let fused: Vec<f32> = dq
                    .chunks(dq.len() / rows)
                    .zip(dk.chunks(dk.len() / rows))
                    .zip(dv.chunks(dv.len() / rows))
                    .flat_map(|((q, k), v)| q.iter().chain(k).chain(v).copied())
                    .collect();
                self.linear_back(&fused, &t.n1, blk.qkv[0], rows, Some(&mut dn1), grads);
            } else {
                for (l, g) in blk.qkv.iter().zip([&dq, &dk, &dv]) {
                    self.linear_back(g, &t.n1, *l, rows, Some(&mut dn1), grads);
                }
            }
            self.norm_back(&dn1, &t.x, &t.n1_stats, blk.norm_1, &mut dx_in, grads);
            if let Some(dh) = dhidden.get(i) {
                dx_in.iter_mut().zip(dh).for_each(|(a, b)| *a += b);
            }
            dx = dx_in;
        }

        // Embeddings: scatter the gradient into the rows the batch read.
        let (tok_grad, pos) = (p.params[self.tokens].trainable, self.positions.filter(|&id| p.params[id].trainable));
        if tok_grad {
            let g = p.grad_of(grads, self.tokens).unwrap_or_default();
            for (r, row) in dx.chunks(d).enumerate() {
                g[batch.tokens[r] as usize * d..][..d].iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
        }
        if let Some(wpe) = pos {
            let g = p.grad_of(grads, wpe).unwrap_or_default();
            for (r, row) in dx.chunks(d).enumerate() {
                g[positions[r] * d..][..d].iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
        }
        Ok(StepLosses { per_head, scored })
    }

    fn linear_back(&self, dy: &[f32], x: &[f32], l: Lin, rows: usize, dx: Option<&mut [f32]>, grads: &mut [f32]) {
        let p = &self.params;
        if let Some(b) = l.b {
            ops::linear_backward(dy, x, p.get(l.w), (rows, l.n_in, l.n_out), None, None, p.grad_of(grads, b));
        }
        ops::linear_backward(dy, x, p.get(l.w), (rows, l.n_in, l.n_out), dx, p.grad_of(grads, l.w), None);
    }

    fn norm_back(
        &self,
        dy: &[f32],
        x: &[f32],
        stats: &(Vec<f32>, Vec<f32>),
        n: NormP,
        dx: &mut [f32],
        grads: &mut [f32],
    ) {
        let p = &self.params;
        let w = p.get(n.w);
        ops::norm_backward(self.norm, dy, x, &stats.0, &stats.1, w, Some(dx), p.grad_of(grads, n.w), None);
        if let Some(b) = n.b {
            ops::norm_backward(self.norm, dy, x, &stats.0, &stats.1, w, None, None, p.grad_of(grads, b));
        }
    }
}

/// Multiplies each head's `head_dim` values of every row of `x: [rows, heads·head_dim]` by its factor.
fn scale_heads(x: &mut [f32], factors: &[f32], head_dim: usize) {
    for row in x.chunks_mut(factors.len() * head_dim) {
        for (head, &m) in row.chunks_mut(head_dim).zip(factors) {
            head.iter_mut().for_each(|v| *v *= m);
        }
    }
}
