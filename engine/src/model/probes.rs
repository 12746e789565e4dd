//! Probes: the points of a forward pass that can be read (activations by name, attention maps) and
//! the head mask that can be applied there. A model's blocks call a [`Probe`] at each site; decoding
//! passes one that watches only what a step needs, inspection one that records.
//!
//! Owns: [`Site`], [`BlockPart`], [`Point`], [`HeadMask`] and the probe trait with its small
//! adapters. Imports: `backend`, `model::config`.

use crate::backend::{Backend, Layout};
use crate::error::{Error, Result};
use crate::io::weights::HostTensor;
use crate::model::config::ModelSpec;

/// A point inside a block, in the order the forward pass reaches them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Site {
    /// The first norm's output (`ln_1`, `input_layernorm`).
    Norm1,
    /// The attention module's output, after its output projection, before the residual add.
    Attention,
    /// The residual stream after the attention sub-layer (`x + attn(ln_1(x))`).
    ResidMid,
    /// The second norm's output (`ln_2`, `post_attention_layernorm`).
    Norm2,
    /// The MLP's output, before the residual add.
    Mlp,
    /// The block's output (the residual stream after the MLP sub-layer).
    Output,
}

/// A block, or one of its two residual sub-layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BlockPart {
    /// The whole block.
    Whole,
    /// `x + attention(norm_1(x))` only.
    Attention,
    /// `x + mlp(norm_2(x))` only.
    Mlp,
}

/// A point of the forward pass whose value can be read: each is `[tokens, hidden]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Point {
    /// The input embeddings (transformers' `hidden_states[0]`).
    Embeddings,
    /// A site inside block `block` (0-based).
    Block { block: usize, site: Site },
    /// The final norm's output on the last block's state (transformers' last `hidden_states` entry).
    FinalNorm,
}

impl Point {
    /// How many blocks must run to reach this point.
    pub fn depth(self, num_layers: usize) -> usize {
        match self {
            Point::Embeddings => 0,
            Point::Block { block, .. } => block + 1,
            Point::FinalNorm => num_layers,
        }
    }
}

/// transformers' `head_mask`: one factor per layer and head, multiplying that head's attention
/// probabilities (1 keeps a head, 0 masks it). Heads are numbered as in the original checkpoint;
/// the factors of heads a pruned checkpoint no longer has are ignored.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadMask {
    heads: usize,
    factors: Vec<f32>,
}

impl HeadMask {
    /// Every head kept.
    pub fn ones(layers: usize, heads: usize) -> Self {
        HeadMask { heads, factors: vec![1.0; layers * heads] }
    }

    /// From `[layers][heads]` factors.
    pub fn from_rows(rows: &[Vec<f32>]) -> Result<Self> {
        let heads = rows.first().map_or(0, Vec::len);
        if rows.iter().any(|r| r.len() != heads) {
            return Err(Error::invalid("head mask", "every layer needs the same number of heads"));
        }
        if let Some(bad) = rows.iter().flatten().find(|f| !f.is_finite()) {
            return Err(Error::invalid("head mask", format!("factor {bad} is not finite")));
        }
        Ok(HeadMask { heads, factors: rows.concat() })
    }

    /// From JSON text `[[factor per head] per layer]` (the `mask` of `layerwise heads`'
    /// pruning.json), checked against `spec`'s layers and heads.
    pub fn from_json(text: &str, spec: &ModelSpec) -> Result<Self> {
        let rows: Vec<Vec<f32>> = serde_json::from_str(text).map_err(|e| {
            Error::invalid("head mask", format!("expected [[factor per head] per layer] of numbers: {e}"))
        })?;
        let mask = HeadMask::from_rows(&rows)?;
        if mask.layers() != spec.num_layers || mask.heads() != spec.num_heads {
            return Err(Error::invalid(
                "head mask",
                format!(
                    "is {} layers x {} heads; the model has {} x {}",
                    mask.layers(),
                    mask.heads(),
                    spec.num_layers,
                    spec.num_heads
                ),
            ));
        }
        Ok(mask)
    }

    pub fn layers(&self) -> usize {
        self.factors.len().checked_div(self.heads).unwrap_or(0)
    }

    pub fn heads(&self) -> usize {
        self.heads
    }

    /// The factors of `layer`'s heads.
    pub fn layer(&self, layer: usize) -> &[f32] {
        &self.factors[layer * self.heads..(layer + 1) * self.heads]
    }

    pub fn get(&self, layer: usize, head: usize) -> f32 {
        self.factors[layer * self.heads + head]
    }

    pub fn set(&mut self, layer: usize, head: usize, factor: f32) {
        self.factors[layer * self.heads + head] = factor;
    }

    /// `(layer, head)` of every head whose factor is 0.
    pub fn masked(&self) -> Vec<(usize, usize)> {
        (0..self.factors.len()).filter(|&i| self.factors[i] == 0.0).map(|i| (i / self.heads, i % self.heads)).collect()
    }

    /// Per block, the factors of the heads the block has (pruned heads dropped), checked against
    /// the model's shape.
    pub(crate) fn factors(&self, spec: &ModelSpec) -> Result<Vec<Vec<f32>>> {
        if self.layers() != spec.num_layers || self.heads() != spec.num_heads {
            return Err(Error::invalid(
                "head mask",
                format!(
                    "is {} layers x {} heads; the model has {} x {}",
                    self.layers(),
                    self.heads(),
                    spec.num_layers,
                    spec.num_heads
                ),
            ));
        }
        Ok((0..spec.num_layers)
            .map(|block| spec.kept_heads(block).iter().map(|&h| self.get(block, h)).collect())
            .collect())
    }

    /// `[layers][heads]`.
    pub fn rows(&self) -> Vec<Vec<f32>> {
        self.factors.chunks(self.heads.max(1)).map(<[f32]>::to_vec).collect()
    }
}

/// As `[[factor per head] per layer]`, the form [`HeadMask::from_json`] reads.
impl serde::Serialize for HeadMask {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        self.rows().serialize(serializer)
    }
}

/// A head mask made ready for a backend: per block, the factors of the heads the block has, on the
/// host (to mask returned attention maps) and as a backend vector (to scale the attention output).
pub(crate) struct HeadScales<B: Backend> {
    host: Vec<Vec<f32>>,
    weights: Vec<B::Weight>,
}

impl<B: Backend> HeadScales<B> {
    pub(crate) fn new(b: &B, mask: &HeadMask, spec: &ModelSpec) -> Result<Self> {
        let host = mask.factors(spec)?;
        let weights = host
            .iter()
            .map(|f| b.weight(&HostTensor::from_f32(f.clone(), vec![f.len()]), Layout::OutIn))
            .collect::<Result<_>>()?;
        Ok(HeadScales { host, weights })
    }

    /// Block `block`'s factors, on the host and on the backend.
    pub(crate) fn block(&self, block: usize) -> (&[f32], &B::Weight) {
        (&self.host[block], &self.weights[block])
    }
}

/// What a forward pass shows to, and takes from, whoever watches it. Every method defaults to
/// doing nothing, so decoding pays one call per site.
pub(crate) trait Probe<B: Backend> {
    /// The input embeddings.
    fn embeddings(&mut self, _x: &B::Tensor) -> Result<()> {
        Ok(())
    }
    /// Whether [`Probe::see`] wants the value at `site` of `block`: a site nobody watches may be
    /// fused away (a norm's output read by the product that follows it, a residual branch's output
    /// added to the stream as its product stores it). The norms and the branch outputs
    /// (`Norm1`, `Norm2`, `Attention`, `Mlp`) ask; the residual stream's sites are always shown.
    fn watches(&self, _block: usize, _site: Site) -> bool {
        false
    }
    /// The value at `site` of block `block`.
    fn see(&mut self, _block: usize, _site: Site, _x: &B::Tensor) -> Result<()> {
        Ok(())
    }
    /// Scales for `block`'s heads (transformers' `head_mask`).
    fn head_mask(&self, _block: usize) -> Option<(&[f32], &B::Weight)> {
        None
    }
    /// Whether to compute `block`'s attention probabilities.
    fn wants_attention(&self, _block: usize) -> bool {
        false
    }
    /// `block`'s attention probabilities for one sequence, `[heads, len, context]`, on the host.
    fn attention(&mut self, _block: usize, _probs: Vec<f32>) {}
}

/// A probe that watches nothing.
pub(crate) struct NoProbe;

impl<B: Backend> Probe<B> for NoProbe {}

/// A probe calling `f(layer, state)` with the embeddings (layer 0) and each block's output (layer
/// `block + 1`), transformers' `hidden_states` numbering.
pub(crate) struct Tap<F>(pub F);

impl<B: Backend, F: FnMut(usize, &B::Tensor) -> Result<()>> Probe<B> for Tap<F> {
    fn embeddings(&mut self, x: &B::Tensor) -> Result<()> {
        (self.0)(0, x)
    }

    fn watches(&self, _block: usize, site: Site) -> bool {
        site == Site::Output
    }

    fn see(&mut self, block: usize, site: Site, x: &B::Tensor) -> Result<()> {
        if site == Site::Output {
            (self.0)(block + 1, x)?;
        }
        Ok(())
    }
}

/// Any probe, plus a head mask.
pub(crate) struct Masked<'a, B: Backend, P> {
    pub probe: P,
    pub scales: Option<&'a HeadScales<B>>,
}

impl<B: Backend, P: Probe<B>> Probe<B> for Masked<'_, B, P> {
    fn embeddings(&mut self, x: &B::Tensor) -> Result<()> {
        self.probe.embeddings(x)
    }

    fn watches(&self, block: usize, site: Site) -> bool {
        self.probe.watches(block, site)
    }

    fn see(&mut self, block: usize, site: Site, x: &B::Tensor) -> Result<()> {
        self.probe.see(block, site, x)
    }

    fn head_mask(&self, block: usize) -> Option<(&[f32], &B::Weight)> {
        self.scales.map(|s| s.block(block))
    }

    fn wants_attention(&self, block: usize) -> bool {
        self.probe.wants_attention(block)
    }

    fn attention(&mut self, block: usize, probs: Vec<f32>) {
        self.probe.attention(block, probs)
    }
}

impl<B: Backend, P: Probe<B> + ?Sized> Probe<B> for &mut P {
    fn embeddings(&mut self, x: &B::Tensor) -> Result<()> {
        (**self).embeddings(x)
    }

    fn watches(&self, block: usize, site: Site) -> bool {
        (**self).watches(block, site)
    }

    fn see(&mut self, block: usize, site: Site, x: &B::Tensor) -> Result<()> {
        (**self).see(block, site, x)
    }

    fn head_mask(&self, block: usize) -> Option<(&[f32], &B::Weight)> {
        (**self).head_mask(block)
    }

    fn wants_attention(&self, block: usize) -> bool {
        (**self).wants_attention(block)
    }

    fn attention(&mut self, block: usize, probs: Vec<f32>) {
        (**self).attention(block, probs)
    }
}
