//! The one forward runner: embed a step's tokens and run blocks, showing a probe what it watches.
//! Decoding steps ([`crate::runtime::Decoder`]), whole prompts ([`Model::forward`]) and inspection
//! ([`Model::inspect`]) all go through [`Model::run`]; a prompt is one sequence over a scratch cache.
//!
//! Points are named after the checkpoint's modules, as transformers names them: for GPT-2 and
//! GPT-Neo `embed` (the input embeddings, `hidden_states[0]`), `h.5` (block 5's output), `h.5.ln_1`,
//! `h.5.attn` (the attention module's output, before the residual add), `h.5.resid_mid` (the residual
//! stream after the attention sub-layer), `h.5.ln_2`, `h.5.mlp` (the MLP's output) and `ln_f`; Llama
//! uses `layers.5`, `layers.5.input_layernorm`, `layers.5.self_attn`, `layers.5.post_attention_layernorm`,
//! `layers.5.mlp` and `norm`. A `transformer.` / `model.` prefix is accepted too.
//!
//! ```
//! use layerwise::model::InspectRequest;
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

use super::probes::{BlockPart, HeadMask, HeadScales, Masked, NoProbe, Point, Probe, Site, Tap};
use super::{Model, ModuleNames};
use crate::backend::{Backend, StepLayout};
use crate::error::{Error, Result};
use crate::exits::{PlanOptions, Source};

/// What a forward pass should return. Only the blocks needed for the requested outputs run.
#[derive(Clone, Debug, Default)]
pub struct ForwardRequest {
    /// The original LM head's logits at every position.
    pub logits: bool,
    /// Exit heads to apply (layers from the checkpoint's `lm_head_layer_indices`).
    pub exits: Vec<usize>,
    /// Hidden states in transformers' convention (index 0 = embeddings, i = output of block i, the
    /// last one after the final norm).
    pub hidden_states: bool,
    /// An exit plan whose output to compute at every position.
    pub plan: Option<PlanOptions>,
    /// Heads to mask (transformers' `head_mask`).
    pub head_mask: Option<HeadMask>,
}

impl ForwardRequest {
    /// Everything: logits, every exit head of `spec`, all hidden states.
    pub fn everything(spec: &super::config::ModelSpec) -> Self {
        ForwardRequest { logits: true, exits: spec.exit_layers.clone(), hidden_states: true, ..Default::default() }
    }
}

/// The outputs of [`Model::forward`], on the host, each `[t, width]` row-major.
#[derive(Clone, Debug, Default)]
pub struct ForwardOutput {
    /// Number of positions (rows of every output).
    pub tokens: usize,
    /// `[t, vocab]` when requested.
    pub logits: Option<Vec<f32>>,
    /// Exit layer -> `[t, vocab]`.
    pub exits: BTreeMap<usize, Vec<f32>>,
    /// `num_layers + 1` matrices `[t, hidden]` when requested.
    pub hidden_states: Vec<Vec<f32>>,
    /// The plan's output `[t, vocab]` when a plan was given (log-probabilities for a contrast).
    pub plan: Option<Vec<f32>>,
    /// How many blocks actually ran.
    pub blocks_run: usize,
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

/// What an inspection recorded, activations and logits still on the backend.
pub(crate) struct Recorded<B: Backend> {
    pub activations: BTreeMap<Point, B::Tensor>,
    pub attentions: BTreeMap<usize, Vec<f32>>,
    pub logits: Option<B::Tensor>,
    pub blocks_run: usize,
}

/// The probe behind [`Model::inspect`]: keeps a copy of each requested point.
struct Recorder<'a, B: Backend> {
    backend: &'a B,
    points: BTreeSet<Point>,
    attention_blocks: BTreeSet<usize>,
    activations: BTreeMap<Point, B::Tensor>,
    attentions: BTreeMap<usize, Vec<f32>>,
}

impl<B: Backend> Probe<B> for Recorder<'_, B> {
    fn embeddings(&mut self, x: &B::Tensor) -> Result<()> {
        if self.points.contains(&Point::Embeddings) {
            self.activations.insert(Point::Embeddings, self.backend.copy(x)?);
        }
        Ok(())
    }

    fn watches(&self, block: usize, site: Site) -> bool {
        self.points.contains(&Point::Block { block, site })
    }

    fn see(&mut self, block: usize, site: Site, x: &B::Tensor) -> Result<()> {
        let point = Point::Block { block, site };
        if self.points.contains(&point) {
            self.activations.insert(point, self.backend.copy(x)?);
        }
        Ok(())
    }

    fn wants_attention(&self, block: usize) -> bool {
        self.attention_blocks.contains(&block)
    }

    fn attention(&mut self, block: usize, probs: Vec<f32>) {
        self.attentions.insert(block, probs);
    }
}

impl<B: Backend> Model<B> {
    /// Embeds the step's tokens and runs blocks `0..depth`, showing the probe the embeddings and
    /// everything it watches inside the blocks. Returns the state after block `depth`.
    pub(crate) fn run(
        &self,
        step: &B::Step,
        kv: &mut B::KvStore,
        depth: usize,
        probe: &mut dyn Probe<B>,
    ) -> Result<B::Tensor> {
        let b = &self.backend;
        let x = self.body.embed(b, step)?;
        probe.embeddings(&x)?;
        self.run_blocks(step, kv, x, 0..depth, probe)
    }

    /// Runs blocks `layers` on the residual stream `x`, the state before block `layers.start`: the
    /// upper blocks of rows whose lower blocks ran in earlier steps (speculative decoding's
    /// verification). Returns the state after the last block.
    pub(crate) fn run_blocks(
        &self,
        step: &B::Step,
        kv: &mut B::KvStore,
        mut x: B::Tensor,
        layers: std::ops::Range<usize>,
        probe: &mut dyn Probe<B>,
    ) -> Result<B::Tensor> {
        for layer in layers {
            x = self.run_sublayers(layer, BlockPart::Whole, x, step, kv, probe)?;
        }
        Ok(x)
    }

    /// One block, or one of its two residual sub-layers, on the residual stream `x`.
    fn run_sublayers(
        &self,
        layer: usize,
        which: BlockPart,
        mut x: B::Tensor,
        step: &B::Step,
        kv: &mut B::KvStore,
        probe: &mut dyn Probe<B>,
    ) -> Result<B::Tensor> {
        let b = &self.backend;
        if which != BlockPart::Mlp {
            x = self.body.attention_sublayer(b, layer, x, step, kv, probe)?;
            probe.see(layer, Site::ResidMid, &x)?;
        }
        if which != BlockPart::Attention {
            x = self.body.mlp_sublayer(b, layer, x, probe)?;
            probe.see(layer, Site::Output, &x)?;
        }
        Ok(x)
    }

    /// A whole prompt as one step of one sequence over a scratch cache of `depth` layers.
    pub(crate) fn run_prompt(
        &self,
        ids: &[u32],
        depth: usize,
        head_mask: Option<&HeadMask>,
        probe: &mut dyn Probe<B>,
    ) -> Result<B::Tensor> {
        let b = &self.backend;
        let spec = &self.spec;
        let scales = head_mask.map(|mask| HeadScales::new(b, mask, spec)).transpose()?;
        let step = b.upload_step(StepLayout::prompt(ids))?;
        let mut kv = b.kv_store(depth.max(1), 1, ids.len(), spec.num_kv_heads * spec.head_dim)?;
        self.run(&step, &mut kv, depth, &mut Masked { probe, scales: scales.as_ref() })
    }

    /// Runs the prompt `ids` through the model and returns what `request` asks for, at every position.
    ///
    /// Only blocks up to the deepest one the request needs are computed: asking for exit 2 alone runs
    /// two blocks.
    pub fn forward(&self, ids: &[u32], request: &ForwardRequest) -> Result<ForwardOutput> {
        self.check_prompt(ids)?;
        for &layer in &request.exits {
            if !self.exit_heads.contains_key(&layer) {
                return Err(Error::invalid(
                    format!("exit {layer}"),
                    format!("no exit head at layer {layer}: {}", self.spec.describe_exits()),
                ));
            }
        }
        let b = &self.backend;
        let n = self.spec.num_layers;
        let plan = match &request.plan {
            Some(plan) => Some((plan, self.plan_sources(plan)?)),
            None => None,
        };
        let plan_depth = plan.map_or(0, |(_, (main, lower))| main.depth(n).max(lower.map_or(0, |l| l.depth(n))));
        let exit_depth = request.exits.iter().copied().max().unwrap_or(0);
        let depth = if request.logits || request.hidden_states { n } else { exit_depth.max(plan_depth) };

        let mut out = ForwardOutput { tokens: ids.len(), blocks_run: depth, ..Default::default() };
        let mut states: BTreeMap<usize, B::Tensor> = BTreeMap::new();
        let keep = |layer: usize| {
            plan.is_some_and(|(_, (main, lower))| main == Source::Layer(layer) || lower == Some(Source::Layer(layer)))
        };
        let top = self.run_prompt(
            ids,
            depth,
            request.head_mask.as_ref(),
            &mut Tap(|layer, x: &B::Tensor| {
                if layer < n {
                    if request.hidden_states {
                        out.hidden_states.push(b.to_host(x)?);
                    }
                    if request.exits.contains(&layer) {
                        out.exits.insert(layer, b.to_host(&self.exit_logits(layer, x)?)?);
                    }
                    if keep(layer) {
                        states.insert(layer, b.copy(x)?);
                    }
                }
                Ok(())
            }),
        )?;
        if depth == n {
            // The top layer's state is read after the final norm, by the LM head and the top exit.
            let normed = self.final_norm(&top)?;
            if request.hidden_states {
                out.hidden_states.push(b.to_host(&normed)?);
            }
            if request.logits {
                out.logits = Some(b.to_host(&self.lm_head_raw(&normed)?)?);
            }
            if let Some(head) = request.exits.contains(&n).then(|| &self.exit_heads[&n]) {
                out.exits.insert(n, b.to_host(&b.linear(&normed, head, None)?)?);
            }
            states.insert(n, top);
        }
        if let Some((plan, (main, lower))) = plan {
            let state = |source: Source| &states[&source.depth(n)];
            let scores = self.plan_output(plan, (main, state(main)), lower.map(|l| (l, state(l))))?;
            out.plan = Some(scores.to_host(b, self.spec.vocab_size)?);
        }
        Ok(out)
    }

    /// Runs `ids` through the model, recording what `request` asks for. Blocks above the deepest
    /// requested point (or attention map) do not run.
    pub fn inspect(&self, ids: &[u32], request: &InspectRequest) -> Result<Inspection> {
        let b = &self.backend;
        let recorded = self.inspect_on_backend(ids, request)?;
        Ok(Inspection {
            tokens: ids.len(),
            activations: recorded
                .activations
                .iter()
                .map(|(&point, x)| Ok((point, b.to_host(x)?)))
                .collect::<Result<_>>()?,
            attentions: recorded.attentions,
            logits: recorded.logits.as_ref().map(|x| b.to_host(x)).transpose()?,
            blocks_run: recorded.blocks_run,
        })
    }

    /// [`Model::inspect`] with the activations and logits left on the backend.
    pub(crate) fn inspect_on_backend(&self, ids: &[u32], request: &InspectRequest) -> Result<Recorded<B>> {
        self.check_prompt(ids)?;
        let n = self.spec.num_layers;
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
        let depth = request
            .points
            .iter()
            .map(|p| p.depth(n))
            .chain(request.attentions.iter().map(|b| b + 1))
            .chain(request.logits.then_some(n))
            .max()
            .unwrap_or(0);

        let mut recorder = Recorder {
            backend: &self.backend,
            points: request.points.iter().copied().collect(),
            attention_blocks: request.attentions.iter().copied().collect(),
            activations: BTreeMap::new(),
            attentions: BTreeMap::new(),
        };
        let top = self.run_prompt(ids, depth, request.head_mask.as_ref(), &mut recorder)?;
        let mut recorded = Recorded {
            activations: recorder.activations,
            attentions: recorder.attentions,
            logits: None,
            blocks_run: depth,
        };
        if depth == n && (request.logits || request.points.contains(&Point::FinalNorm)) {
            let normed = self.final_norm(&top)?;
            if request.logits {
                recorded.logits = Some(self.lm_head_raw(&normed)?);
            }
            if request.points.contains(&Point::FinalNorm) {
                recorded.activations.insert(Point::FinalNorm, normed);
            }
        }
        Ok(recorded)
    }

    /// Runs `parts` (`(block, part)`, in order) on the residual states `x: [t, hidden]` of one
    /// sequence at positions `0..t`, as a fresh pass: attention sees only these states (what
    /// transformer-utils' lens decoders do with `decoder_layer_names` such as `h.11.mlp`).
    pub fn run_parts(&self, x: B::Tensor, parts: &[(usize, BlockPart)]) -> Result<B::Tensor> {
        let b = &self.backend;
        let spec = &self.spec;
        let (t, _) = b.shape(&x);
        // The positions matter (rotary embeddings); the ids are never looked up.
        let step = b.upload_step(StepLayout::prompt(&vec![0; t]))?;
        let mut kv = b.kv_store(spec.num_layers, 1, t, spec.num_kv_heads * spec.head_dim)?;
        let mut x = x;
        for &(layer, which) in parts {
            x = self.run_sublayers(layer, which, x, &step, &mut kv, &mut NoProbe)?;
        }
        Ok(x)
    }

    /// The point called `name` in this checkpoint (see [`Point`]: `embed`, `h.5`, `h.5.ln_1`, `h.5.attn`, `h.5.resid_mid`, `h.5.ln_2`, `h.5.mlp`, `ln_f`; Llama `layers.5.self_attn` etc.).
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
}

fn point_help(names: &ModuleNames) -> String {
    let h = names.blocks;
    format!(
        "names are embed, {h}.N (block N's output), {h}.N.{}, {h}.N.{}, {h}.N.resid_mid, {h}.N.{}, {h}.N.{} and {}",
        names.norm_1, names.attention, names.norm_2, names.mlp, names.final_norm
    )
}
