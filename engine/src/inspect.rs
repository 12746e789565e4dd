//! Looking inside a forward pass: activations by name (computed no further than needed), attention
//! probabilities, and head masks.
//!
//! Points are named after the checkpoint's modules, as transformers names them: for GPT-2 and
//! GPT-Neo `embed` (the input embeddings, `hidden_states[0]`), `h.5` (block 5's output), `h.5.ln_1`,
//! `h.5.attn` (the attention module's output, before the residual add), `h.5.resid_mid` (the residual
//! stream after the attention sub-layer), `h.5.ln_2`, `h.5.mlp` (the MLP's output) and `ln_f`; Llama
//! uses `layers.5`, `layers.5.input_layernorm`, `layers.5.self_attn`, `layers.5.post_attention_layernorm`,
//! `layers.5.mlp` and `norm`. A `transformer.` / `model.` prefix is accepted too.
//!
//! ```
//! use layerwise::inspect::InspectRequest;
//!
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/gpt2-sharded");
//! let loaded = layerwise::load(dir)?;
//! let model = &loaded.model;
//! let request = InspectRequest {
//!     points: vec![model.point("h.0.mlp")?, model.point("h.1")?],
//!     attentions: vec![0],
//!     ..Default::default()
//! };
//! let seen = model.inspect(&[1, 2, 3], &request)?;
//! assert_eq!(seen.blocks_run, 2); // nothing above block 1 ran
//! assert_eq!(seen.activations[&model.point("h.1")?].len(), 3 * model.spec().hidden_size);
//! assert_eq!(seen.attentions[&0].len(), model.spec().num_heads * 3 * 3);
//! # Ok::<(), layerwise::Error>(())
//! ```

use std::collections::{BTreeMap, BTreeSet};

use crate::backend::{Backend, SeqSlice};
use crate::error::{Error, Result};
use crate::model::{Batch, Model, ModuleNames};

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
    pub(crate) fn factors(&self, spec: &crate::ModelSpec) -> Result<Vec<Vec<f32>>> {
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

/// What [`Model::inspect`] should record.
#[derive(Clone, Debug, Default)]
pub struct InspectRequest {
    /// Activations to return.
    pub points: Vec<Point>,
    /// Blocks (0-based) whose attention probabilities to return.
    pub attentions: Vec<usize>,
    /// Heads to mask (or scale) during the pass.
    pub head_mask: Option<HeadMask>,
    /// The LM head's logits at every position (runs every block).
    pub logits: bool,
}

/// What [`Model::inspect`] recorded, on the host, row-major.
#[derive(Clone, Debug, Default)]
pub struct Inspection {
    /// Number of positions.
    pub tokens: usize,
    /// Each requested point: `[tokens, hidden]`.
    pub activations: BTreeMap<Point, Vec<f32>>,
    /// Block -> attention probabilities `[heads, tokens, tokens]` (zero above the diagonal; in a
    /// pruned checkpoint, the block's remaining heads).
    pub attentions: BTreeMap<usize, Vec<f32>>,
    /// `[tokens, vocab]` when requested.
    pub logits: Option<Vec<f32>>,
    /// How many blocks ran: the forward pass stops after the deepest requested point.
    pub blocks_run: usize,
}

/// What a forward pass shows to, and takes from, whoever inspects it. Every method defaults to
/// doing nothing, so decoding pays one call per site.
pub(crate) trait Probe<B: Backend> {
    /// The input embeddings.
    fn embeddings(&mut self, _x: &B::Tensor) {}
    /// The value at `site` of block `block`.
    fn see(&mut self, _block: usize, _site: Site, _x: &B::Tensor) {}
    /// Factors for `block`'s heads (transformers' `head_mask`).
    fn head_mask(&self, _block: usize) -> Option<&[f32]> {
        None
    }
    /// Whether to compute `block`'s attention probabilities.
    fn wants_attention(&self, _block: usize) -> bool {
        false
    }
    /// `block`'s attention probabilities for one sequence, `[heads, len, context]`.
    fn attention(&mut self, _block: usize, _probs: Vec<f32>) {}
}

/// A probe that watches nothing.
pub(crate) struct NoProbe;

impl<B: Backend> Probe<B> for NoProbe {}

/// A probe calling `f(layer, state)` with the embeddings (layer 0) and each block's output (layer
/// `block + 1`), transformers' `hidden_states` numbering.
pub(crate) struct Tap<F>(pub F);

impl<B: Backend, F: FnMut(usize, &B::Tensor)> Probe<B> for Tap<F> {
    fn embeddings(&mut self, x: &B::Tensor) {
        (self.0)(0, x)
    }

    fn see(&mut self, block: usize, site: Site, x: &B::Tensor) {
        if site == Site::Output {
            (self.0)(block + 1, x)
        }
    }
}

/// Any probe, plus a head mask (per block, the factors of the heads the block has).
pub(crate) struct Masked<'a, P> {
    pub probe: P,
    pub factors: Option<&'a [Vec<f32>]>,
}

impl<B: Backend, P: Probe<B>> Probe<B> for Masked<'_, P> {
    fn embeddings(&mut self, x: &B::Tensor) {
        self.probe.embeddings(x)
    }

    fn see(&mut self, block: usize, site: Site, x: &B::Tensor) {
        self.probe.see(block, site, x)
    }

    fn head_mask(&self, block: usize) -> Option<&[f32]> {
        self.factors.map(|factors| factors[block].as_slice())
    }

    fn wants_attention(&self, block: usize) -> bool {
        self.probe.wants_attention(block)
    }

    fn attention(&mut self, block: usize, probs: Vec<f32>) {
        self.probe.attention(block, probs)
    }
}

/// The probe behind [`Model::inspect`].
struct Recorder<'a, B: Backend> {
    backend: &'a B,
    points: BTreeSet<Point>,
    attention_blocks: BTreeSet<usize>,
    seen: Inspection,
}

impl<B: Backend> Probe<B> for Recorder<'_, B> {
    fn embeddings(&mut self, x: &B::Tensor) {
        if self.points.contains(&Point::Embeddings) {
            self.seen.activations.insert(Point::Embeddings, self.backend.to_host(x));
        }
    }

    fn see(&mut self, block: usize, site: Site, x: &B::Tensor) {
        let point = Point::Block { block, site };
        if self.points.contains(&point) {
            self.seen.activations.insert(point, self.backend.to_host(x));
        }
    }

    fn wants_attention(&self, block: usize) -> bool {
        self.attention_blocks.contains(&block)
    }

    fn attention(&mut self, block: usize, probs: Vec<f32>) {
        self.seen.attentions.insert(block, probs);
    }
}

/// One sequence at positions `0..t` over a scratch cache of one block of `t` slots.
pub(crate) fn scratch_batch(t: usize, table: &[u32]) -> Batch<'_> {
    Batch {
        positions: (0..t).collect(),
        slots: (0..t).collect(),
        sequences: vec![SeqSlice { first_row: 0, len: t, first_position: 0, block_table: table }],
    }
}

impl<B: Backend> Model<B> {
    /// The point called `name` in this checkpoint (see the [module docs](crate::inspect)).
    pub fn point(&self, name: &str) -> Result<Point> {
        let names = self.module_names();
        let n = self.spec().num_layers;
        let bad = |why: String| Error::invalid(format!("point `{name}`"), why);
        let short = name.strip_prefix("transformer.").or_else(|| name.strip_prefix("model.")).unwrap_or(name);
        if short == "embed" || short == "wte" || short == "embed_tokens" {
            return Ok(Point::Embeddings);
        }
        if short == names.final_norm {
            return Ok(Point::FinalNorm);
        }
        let Some(rest) = short.strip_prefix(names.blocks).and_then(|r| r.strip_prefix('.')) else {
            return Err(bad(point_help(names)));
        };
        let (index, sub) = rest.split_once('.').map_or((rest, None), |(i, s)| (i, Some(s)));
        let block: usize = index.parse().map_err(|_| bad(point_help(names)))?;
        if block >= n {
            return Err(bad(format!("the model has blocks {}.0 to {}.{}", names.blocks, names.blocks, n - 1)));
        }
        let site = match sub {
            None => Site::Output,
            Some(s) if s == names.norm_1 => Site::Norm1,
            Some(s) if s == names.attention => Site::Attention,
            Some("resid_mid") => Site::ResidMid,
            Some(s) if s == names.norm_2 => Site::Norm2,
            Some(s) if s == names.mlp => Site::Mlp,
            Some(_) => return Err(bad(point_help(names))),
        };
        Ok(Point::Block { block, site })
    }

    /// The name of `point` in this checkpoint (the inverse of [`Model::point`]).
    pub fn point_name(&self, point: Point) -> String {
        let names = self.module_names();
        match point {
            Point::Embeddings => "embed".into(),
            Point::FinalNorm => names.final_norm.into(),
            Point::Block { block, site } => {
                let sub = match site {
                    Site::Output => return format!("{}.{block}", names.blocks),
                    Site::Norm1 => names.norm_1,
                    Site::Attention => names.attention,
                    Site::ResidMid => "resid_mid",
                    Site::Norm2 => names.norm_2,
                    Site::Mlp => names.mlp,
                };
                format!("{}.{block}.{sub}", names.blocks)
            }
        }
    }

    /// Runs `ids` through the model, recording what `request` asks for. Blocks above the deepest
    /// requested point (or attention map) do not run.
    pub fn inspect(&self, ids: &[u32], request: &InspectRequest) -> Result<Inspection> {
        self.check_prompt(ids)?;
        let spec = self.spec();
        let n = spec.num_layers;
        for point in &request.points {
            if let Point::Block { block, .. } = point {
                if *block >= n {
                    return Err(Error::invalid("point", format!("block {block} is past the model's {n} blocks")));
                }
            }
        }
        if let Some(&block) = request.attentions.iter().find(|&&b| b >= n) {
            return Err(Error::invalid("attention", format!("block {block} is past the model's {n} blocks")));
        }
        let head_factors = request.head_mask.as_ref().map(|mask| mask.factors(spec)).transpose()?;
        let depth = request
            .points
            .iter()
            .map(|p| p.depth(n))
            .chain(request.attentions.iter().map(|b| b + 1))
            .chain(request.logits.then_some(n))
            .max()
            .unwrap_or(0);

        let b = self.backend();
        let t = ids.len();
        let table = [0u32];
        let batch = scratch_batch(t, &table);
        let mut kv = b.kv_store(depth.max(1), 1, t, spec.num_kv_heads * spec.head_dim)?;
        let recorder = Recorder {
            backend: b,
            points: request.points.iter().copied().collect(),
            attention_blocks: request.attentions.iter().copied().collect(),
            seen: Inspection { tokens: t, blocks_run: depth, ..Default::default() },
        };
        let mut probe = Masked { probe: recorder, factors: head_factors.as_deref() };
        let top = self.run_blocks(ids, &batch, &mut kv, depth, &mut probe);
        let mut seen = probe.probe.seen;
        if depth == n && (request.logits || request.points.contains(&Point::FinalNorm)) {
            let normed = self.final_norm(&top);
            if request.logits {
                seen.logits = Some(b.to_host(&self.lm_head_raw(&normed)));
            }
            if request.points.contains(&Point::FinalNorm) {
                seen.activations.insert(Point::FinalNorm, b.to_host(&normed));
            }
        }
        Ok(seen)
    }

    /// Runs `parts` (`(block, part)`, in order) on the residual states `x: [t, hidden]` of one
    /// sequence at positions `0..t`, as a fresh pass: attention sees only these states (what
    /// transformer-utils' lens decoders do with `decoder_layer_names` such as `h.11.mlp`).
    pub fn run_parts(&self, x: B::Tensor, parts: &[(usize, BlockPart)]) -> Result<B::Tensor> {
        let b = self.backend();
        let spec = self.spec();
        let (t, _) = b.shape(&x);
        let table = [0u32];
        let batch = scratch_batch(t, &table);
        let mut kv = b.kv_store(spec.num_layers, 1, t, spec.num_kv_heads * spec.head_dim)?;
        let mut x = x;
        for &(layer, which) in parts {
            x = self.run_sublayers(layer, which, x, &batch, &mut kv, &mut NoProbe);
        }
        Ok(x)
    }
}

fn point_help(names: &ModuleNames) -> String {
    let h = names.blocks;
    format!(
        "names are embed, {h}.N (block N's output), {h}.N.{}, {h}.N.{}, {h}.N.resid_mid, {h}.N.{}, {h}.N.{} and {}",
        names.norm_1, names.attention, names.norm_2, names.mlp, names.final_norm
    )
}
