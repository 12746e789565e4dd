//! Models: one file per architecture, each a short forward pass written with the backend's ops, plus
//! the driver shared by all of them (run the blocks a request needs, collect hidden states, apply the
//! final norm and the LM or exit heads).

mod gpt2;
mod gpt_neo;
mod llama;

use std::collections::BTreeMap;

use crate::backend::{AttentionParams, Backend, Layout, SeqSlice};
use crate::config::{Architecture, ModelSpec};
use crate::error::{Error, Result};
use crate::exits::{Contrast, PlanOptions, Projection, Source};
use crate::inspect::{BlockPart, HeadMask, Masked, Probe, Site, Tap};
use crate::weights::Weights;

/// A linear layer: `w: [out, in]` and an optional bias `[out]`.
pub(crate) struct Linear<B: Backend> {
    weight: B::Weight,
    bias: Option<B::Weight>,
}

impl<B: Backend> Linear<B> {
    /// Loads `{prefix}.weight` with shape `[out, in]` (or `[in, out]` for `Layout::InOut`) and, when
    /// `bias` is true, `{prefix}.bias` with shape `[out]`.
    pub(crate) fn load(
        b: &B,
        w: &Weights,
        prefix: &str,
        (out_features, in_features): (usize, usize),
        layout: Layout,
        bias: bool,
    ) -> Result<Self> {
        let shape = match layout {
            Layout::OutIn => [out_features, in_features],
            Layout::InOut => [in_features, out_features],
        };
        let weight = b.weight(w.get_shaped(&format!("{prefix}.weight"), &shape)?, layout)?;
        let bias = if bias {
            Some(b.weight(w.get_shaped(&format!("{prefix}.bias"), &[out_features])?, Layout::OutIn)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// `x: [t, in]` -> `[t, out]`.
    pub(crate) fn forward(&self, b: &B, x: &B::Tensor) -> B::Tensor {
        b.linear(x, &self.weight, self.bias.as_ref())
    }

    pub(crate) fn bytes(&self, b: &B) -> usize {
        b.weight_bytes(&self.weight) + self.bias.as_ref().map_or(0, |w| b.weight_bytes(w))
    }
}

/// LayerNorm (GPT-2, GPT-Neo) or RMSNorm (Llama) over the hidden dimension.
pub(crate) enum Norm<B: Backend> {
    Layer { weight: B::Weight, bias: B::Weight, eps: f32 },
    Rms { weight: B::Weight, eps: f32 },
}

impl<B: Backend> Norm<B> {
    pub(crate) fn layer_norm(b: &B, w: &Weights, prefix: &str, dim: usize, eps: f32) -> Result<Self> {
        Ok(Norm::Layer {
            weight: b.weight(w.get_shaped(&format!("{prefix}.weight"), &[dim])?, Layout::OutIn)?,
            bias: b.weight(w.get_shaped(&format!("{prefix}.bias"), &[dim])?, Layout::OutIn)?,
            eps,
        })
    }

    pub(crate) fn rms_norm(b: &B, w: &Weights, prefix: &str, dim: usize, eps: f32) -> Result<Self> {
        Ok(Norm::Rms { weight: b.weight(w.get_shaped(&format!("{prefix}.weight"), &[dim])?, Layout::OutIn)?, eps })
    }

    pub(crate) fn bytes(&self, b: &B) -> usize {
        match self {
            Norm::Layer { weight, bias, .. } => b.weight_bytes(weight) + b.weight_bytes(bias),
            Norm::Rms { weight, .. } => b.weight_bytes(weight),
        }
    }

    pub(crate) fn forward(&self, b: &B, x: &B::Tensor) -> B::Tensor {
        match self {
            Norm::Layer { weight, bias, eps } => b.layer_norm(x, weight, bias, *eps),
            Norm::Rms { weight, eps } => b.rms_norm(x, weight, *eps),
        }
    }
}

/// What an architecture file provides: the embedding, a block's two residual sub-layers, the final
/// norm. The driver in [`Model`] composes them.
pub(crate) trait Transformer<B: Backend>: Send + Sync {
    /// Token (and, where the architecture has them, position) embeddings: `[t, hidden]`.
    fn embed(&self, b: &B, ids: &[u32], positions: &[usize]) -> B::Tensor;
    /// `x + attention(norm_1(x))` of block `layer` (0-based) on the residual stream `x: [t, hidden]`;
    /// its keys and values go to the cache at `batch.slots`.
    fn attention_sublayer(
        &self,
        b: &B,
        layer: usize,
        x: B::Tensor,
        batch: &Batch<'_>,
        kv: &mut B::KvStore,
        probe: &mut dyn Probe<B>,
    ) -> B::Tensor;
    /// `x + mlp(norm_2(x))` of block `layer`.
    fn mlp_sublayer(&self, b: &B, layer: usize, x: B::Tensor, probe: &mut dyn Probe<B>) -> B::Tensor;
    /// The norm applied after the last block (`ln_f` / `norm`); exits reuse it.
    fn final_norm(&self) -> &Norm<B>;
    /// Bytes of weights block `layer` reads per step.
    fn block_bytes(&self, b: &B, layer: usize) -> usize;
    /// The checkpoint's module names, for naming points inside the forward pass.
    fn names(&self) -> &'static ModuleNames;
}

/// How a checkpoint names its modules (transformers' attribute names): `{blocks}.{i}.{norm_1}` etc.
#[derive(Debug)]
pub struct ModuleNames {
    pub blocks: &'static str,
    pub norm_1: &'static str,
    pub attention: &'static str,
    pub norm_2: &'static str,
    pub mlp: &'static str,
    pub final_norm: &'static str,
}

/// GPT-2 and GPT-Neo: `h.{i}.ln_1`, `h.{i}.attn`, `h.{i}.ln_2`, `h.{i}.mlp`, `ln_f`.
pub(crate) static GPT_NAMES: ModuleNames =
    ModuleNames { blocks: "h", norm_1: "ln_1", attention: "attn", norm_2: "ln_2", mlp: "mlp", final_norm: "ln_f" };

/// The tokens of one forward call, possibly from several sequences: row `i` is at `positions[i]`
/// and its keys and values go to cache slot `slots[i]`.
pub(crate) struct Batch<'a> {
    pub positions: Vec<usize>,
    pub slots: Vec<usize>,
    pub sequences: Vec<SeqSlice<'a>>,
}

/// The one attention of every architecture: store the new keys and values, then attend over each
/// sequence's cache. `q: [t, heads * head_dim]`, `k, v: [t, kv_heads * head_dim]`. A probe may mask
/// heads (transformers' `head_mask`: each head's probabilities, hence its output, scaled) and read
/// the probabilities.
pub(crate) fn attend<B: Backend>(
    b: &B,
    kv: &mut B::KvStore,
    layer: usize,
    batch: &Batch<'_>,
    (q, k, v): (&B::Tensor, &B::Tensor, &B::Tensor),
    params: &AttentionParams,
    probe: &mut dyn Probe<B>,
) -> B::Tensor {
    b.kv_write(kv, layer, &batch.slots, k, v);
    let mut out = b.paged_attention(q, kv, layer, &batch.sequences, params);
    let mask = probe.head_mask(layer).map(<[f32]>::to_vec);
    if let Some(mask) = &mask {
        b.scale_heads(&mut out, mask, params.head_dim);
    }
    if probe.wants_attention(layer) {
        for seq in &batch.sequences {
            let mut probs = b.attention_probs(q, kv, layer, seq, params);
            if let Some(mask) = &mask {
                // transformers returns the probabilities after the mask.
                let per_head = probs.len() / params.num_heads;
                for (head, &m) in probs.chunks_exact_mut(per_head).zip(mask) {
                    head.iter_mut().for_each(|p| *p *= m);
                }
            }
            probe.attention(layer, probs);
        }
    }
    out
}

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
    pub fn everything(spec: &ModelSpec) -> Self {
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

/// A loaded model: its spec, its architecture's weights, the LM head, exit heads and conversions.
pub struct Model<B: Backend> {
    spec: ModelSpec,
    backend: B,
    body: Box<dyn Transformer<B>>,
    lm_head: B::Weight,
    exit_heads: BTreeMap<usize, B::Weight>,
    /// `name_to_conv_matrix.{L}_to_{N}`: hidden -> hidden, for the converted projection.
    conversions: BTreeMap<usize, B::Weight>,
}

impl<B: Backend> Model<B> {
    /// Builds the model described by `spec` from `weights`. Weights stay where they are (mapped
    /// files on the CPU); nothing is read beyond shapes.
    pub fn load(spec: ModelSpec, weights: &Weights, backend: B) -> Result<Self> {
        let body: Box<dyn Transformer<B>> = match spec.architecture {
            Architecture::Gpt2 => Box::new(gpt2::Gpt2::load(&backend, weights, &spec)?),
            Architecture::GptNeo => Box::new(gpt_neo::GptNeo::load(&backend, weights, &spec)?),
            Architecture::Llama => Box::new(llama::Llama::load(&backend, weights, &spec)?),
        };
        let vocab_by_hidden = [spec.vocab_size, spec.hidden_size];
        let lm_head = if weights.contains("lm_head.weight") || !spec.tie_word_embeddings {
            weights.get_shaped("lm_head.weight", &vocab_by_hidden)?
        } else {
            weights.get_shaped(embedding_name(&spec, weights), &vocab_by_hidden)?
        };
        let lm_head = backend.weight(lm_head, Layout::OutIn)?;
        let mut exit_heads = BTreeMap::new();
        for &layer in &spec.exit_layers {
            let tensor = weights.get_shaped(&exit_head_name(layer), &vocab_by_hidden)?;
            exit_heads.insert(layer, backend.weight(tensor, Layout::OutIn)?);
        }
        let mut conversions = BTreeMap::new();
        for layer in 1..spec.num_layers {
            let name = conversion_name(layer, spec.num_layers);
            if weights.contains(&name) {
                let tensor = weights.get_shaped(&name, &[spec.hidden_size, spec.hidden_size])?;
                conversions.insert(layer, backend.weight(tensor, Layout::OutIn)?);
            }
        }
        Ok(Model { spec, backend, body, lm_head, exit_heads, conversions })
    }

    /// The checkpoint's dimensions and options.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Layers that have a conversion matrix to the top layer.
    pub fn conversion_layers(&self) -> Vec<usize> {
        self.conversions.keys().copied().collect()
    }

    /// Checks a token id against the vocabulary; `what` names the argument in the error.
    pub fn check_token(&self, id: u32, what: &str) -> Result<()> {
        if id as usize >= self.spec.vocab_size {
            return Err(Error::invalid(
                what,
                format!("token id {id} is outside the vocabulary (size {})", self.spec.vocab_size),
            ));
        }
        Ok(())
    }

    /// Checks token ids against the vocabulary and the length against the context.
    pub fn check_prompt(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::invalid("prompt", "is empty"));
        }
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= self.spec.vocab_size) {
            return Err(Error::invalid(
                "prompt",
                format!("token id {id} at position {i} is outside the vocabulary (size {})", self.spec.vocab_size),
            ));
        }
        if ids.len() > self.spec.max_positions {
            return Err(Error::invalid(
                "prompt",
                format!("{} tokens exceed the model's context of {} positions", ids.len(), self.spec.max_positions),
            ));
        }
        Ok(())
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

        // The whole prompt is one sequence over a scratch cache of one block.
        let t = ids.len();
        let table = [0u32];
        let batch = Batch {
            positions: (0..t).collect(),
            slots: (0..t).collect(),
            sequences: vec![SeqSlice { first_row: 0, len: t, first_position: 0, block_table: &table }],
        };
        let mut kv = b.kv_store(depth, 1, t, self.spec.num_kv_heads * self.spec.head_dim)?;
        let mut out = ForwardOutput { tokens: t, ..Default::default() };
        let mut states: BTreeMap<usize, B::Tensor> = BTreeMap::new();
        let keep = |layer: usize| {
            plan.is_some_and(|(_, (main, lower))| main == Source::Layer(layer) || lower == Some(Source::Layer(layer)))
        };
        let factors = request.head_mask.as_ref().map(|mask| mask.factors(&self.spec)).transpose()?;
        let top = self.run_blocks(
            ids,
            &batch,
            &mut kv,
            depth,
            &mut Masked {
                factors: factors.as_deref(),
                probe: Tap(|layer, x: &B::Tensor| {
                    if request.hidden_states && layer < n {
                        out.hidden_states.push(b.to_host(x));
                    }
                    if layer < n && request.exits.contains(&layer) {
                        let logits = b.linear(&self.body.final_norm().forward(b, x), &self.exit_heads[&layer], None);
                        out.exits.insert(layer, b.to_host(&logits));
                    }
                    if layer < n && keep(layer) {
                        states.insert(layer, x.clone());
                    }
                }),
            },
        );
        out.blocks_run = depth;
        if depth == n {
            // The top layer's state is read after the final norm, by the LM head and the top exit.
            let normed = self.body.final_norm().forward(b, &top);
            if request.hidden_states {
                out.hidden_states.push(b.to_host(&normed));
            }
            if request.logits {
                out.logits = Some(b.to_host(&b.linear(&normed, &self.lm_head, None)));
            }
            if request.exits.contains(&n) {
                out.exits.insert(n, b.to_host(&b.linear(&normed, &self.exit_heads[&n], None)));
            }
            states.insert(n, top);
        }
        if let Some((plan, (main, lower))) = plan {
            let state = |source: Source| &states[&source.depth(n)];
            let logits = self.plan_output(plan, (main, state(main)), lower.map(|l| (l, state(l))));
            out.plan = Some(b.to_host(&logits));
        }
        Ok(out)
    }

    /// Embeds `ids` and runs blocks `1..=depth`, showing the probe the embeddings and everything it
    /// watches inside the blocks. Returns the state after block `depth`.
    pub(crate) fn run_blocks(
        &self,
        ids: &[u32],
        batch: &Batch<'_>,
        kv: &mut B::KvStore,
        depth: usize,
        probe: &mut dyn Probe<B>,
    ) -> B::Tensor {
        let b = &self.backend;
        let mut x = self.body.embed(b, ids, &batch.positions);
        probe.embeddings(&x);
        for layer in 0..depth {
            x = self.run_sublayers(layer, BlockPart::Whole, x, batch, kv, probe);
        }
        x
    }

    /// One block, or one of its two residual sub-layers, on the residual stream `x`.
    pub(crate) fn run_sublayers(
        &self,
        layer: usize,
        which: BlockPart,
        mut x: B::Tensor,
        batch: &Batch<'_>,
        kv: &mut B::KvStore,
        probe: &mut dyn Probe<B>,
    ) -> B::Tensor {
        let b = &self.backend;
        if which != BlockPart::Mlp {
            x = self.body.attention_sublayer(b, layer, x, batch, kv, probe);
            probe.see(layer, Site::ResidMid, &x);
        }
        if which != BlockPart::Attention {
            x = self.body.mlp_sublayer(b, layer, x, probe);
            probe.see(layer, Site::Output, &x);
        }
        x
    }

    /// The checkpoint's module names.
    pub fn module_names(&self) -> &'static ModuleNames {
        self.body.names()
    }

    /// Bytes of weights one decoding step under `plan` reads: the blocks it runs, the final norm and
    /// the heads it projects with (embedding rows are negligible).
    pub fn step_weight_bytes(&self, plan: &PlanOptions) -> Result<usize> {
        let b = &self.backend;
        let (main, lower) = self.plan_sources(plan)?;
        let depth = plan.depth(&self.spec)?;
        let blocks: usize = (0..depth).map(|layer| self.body.block_bytes(b, layer)).sum();
        let head_bytes = |source: Source| match (source, plan.projection) {
            (Source::Original, _) | (Source::Layer(_), Projection::Lens) => b.weight_bytes(&self.lm_head),
            (Source::Layer(layer), Projection::ExitHeads) => b.weight_bytes(&self.exit_heads[&layer]),
            (Source::Layer(layer), Projection::Converted) => {
                b.weight_bytes(&self.lm_head) + self.conversions.get(&layer).map_or(0, |w| b.weight_bytes(w))
            }
        };
        let mut heads = head_bytes(main);
        match (lower, &plan.contrast) {
            // ACD reads only the plausible tokens' rows of the lower head (a few, against a vocabulary
            // of them): count its conversion matrix, if any.
            (Some(Source::Layer(layer)), Contrast::Acd { .. }) if plan.projection == Projection::Converted => {
                heads += self.conversions.get(&layer).map_or(0, |w| b.weight_bytes(w))
            }
            (Some(_), Contrast::Acd { .. }) | (None, _) => {}
            // An upper lens/converted projection and a lower one share the LM head's reads only in
            // cache-sized models; count both.
            (Some(lower), Contrast::Custom(_)) => heads += head_bytes(lower),
        }
        Ok(blocks + self.body.final_norm().bytes(b) + heads)
    }

    /// Validates a plan against this checkpoint; returns its main and (for a contrast) lower source.
    pub(crate) fn plan_sources(&self, plan: &PlanOptions) -> Result<(Source, Option<Source>)> {
        plan.sources(&self.spec, |layer| self.conversions.contains_key(&layer))
    }

    /// The final norm of `state: [t, hidden]` (transformers' last `hidden_states` entry for the top layer).
    pub(crate) fn final_norm(&self, state: &B::Tensor) -> B::Tensor {
        self.body.final_norm().forward(&self.backend, state)
    }

    /// The original LM head applied to `state` as it is, without the final norm (what DoLa does to
    /// its premature layers).
    pub(crate) fn lm_head_raw(&self, state: &B::Tensor) -> B::Tensor {
        self.backend.linear(state, &self.lm_head, None)
    }

    /// Logits of `source` from the raw (un-normed) output `state: [t, hidden]` of its layer.
    pub(crate) fn project(&self, source: Source, projection: Projection, state: &B::Tensor) -> B::Tensor {
        let (features, head) = self.head_input(source, projection, state);
        self.backend.linear(&features, head, None)
    }

    /// What `source`'s vocabulary head multiplies, and the head: the final norm of the layer's state
    /// (through the conversion matrix for a converted projection).
    fn head_input(&self, source: Source, projection: Projection, state: &B::Tensor) -> (B::Tensor, &B::Weight) {
        let b = &self.backend;
        let normed = self.body.final_norm().forward(b, state);
        match (source, projection) {
            (Source::Original, _) | (Source::Layer(_), Projection::Lens) => (normed, &self.lm_head),
            (Source::Layer(layer), Projection::ExitHeads) => (normed, &self.exit_heads[&layer]),
            (Source::Layer(layer), Projection::Converted) => match self.conversions.get(&layer) {
                Some(conversion) => (b.linear(&normed, conversion, None), &self.lm_head),
                None => (normed, &self.lm_head), // the top layer converts to itself
            },
        }
    }

    /// A plan's output from the raw states of its sources: logits, or contrasted log-probabilities.
    pub(crate) fn plan_output(
        &self,
        plan: &PlanOptions,
        (main, main_state): (Source, &B::Tensor),
        lower: Option<(Source, &B::Tensor)>,
    ) -> B::Tensor {
        let b = &self.backend;
        let upper = self.project(main, plan.projection, main_state);
        let Some((lower, lower_state)) = lower else { return upper };
        match &plan.contrast {
            Contrast::Acd { alpha, min_candidates } => {
                let (features, head) = self.head_input(lower, plan.projection, lower_state);
                b.contrast_acd(&upper, &features, head, *alpha, *min_candidates)
            }
            Contrast::Custom(f) => {
                let lower = self.project(lower, plan.projection, lower_state);
                let (rows, cols) = b.shape(&upper);
                let (up, low) = (b.to_host(&upper), b.to_host(&lower));
                let mut out = vec![0.0f32; rows * cols];
                for r in 0..rows {
                    let span = r * cols..(r + 1) * cols;
                    f.contrast(&up[span.clone()], &low[span.clone()], &mut out[span]);
                }
                b.upload(out, rows, cols)
            }
        }
    }
}

/// The checkpoint name of the exit head at `layer` (upstream autocontrastive-gen format).
pub fn exit_head_name(layer: usize) -> String {
    format!("name_to_lm_exit_head.lm_head_{layer}.weight")
}

/// The checkpoint name of the conversion matrix from `layer` to the top layer `num_layers`.
pub fn conversion_name(layer: usize, num_layers: usize) -> String {
    format!("name_to_conv_matrix.{layer}_to_{num_layers}.weight")
}

fn embedding_name(spec: &ModelSpec, weights: &Weights) -> &'static str {
    let candidates: &[&'static str] = match spec.architecture {
        Architecture::Gpt2 | Architecture::GptNeo => &["transformer.wte.weight", "wte.weight"],
        Architecture::Llama => &["model.embed_tokens.weight", "embed_tokens.weight"],
    };
    candidates.iter().copied().find(|name| weights.contains(name)).unwrap_or(candidates[0])
}

/// The prefix under which a base model's tensors live: checkpoints saved from `*LMHeadModel` use
/// `transformer.` / `model.`, those saved from the bare model (e.g. the original `gpt2`) use none.
pub(crate) fn base_prefix(weights: &Weights, with_prefix: &'static str, probe: &str) -> &'static str {
    if weights.contains(&format!("{with_prefix}{probe}")) || !weights.contains(probe) {
        with_prefix
    } else {
        ""
    }
}
