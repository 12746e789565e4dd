//! The step-by-step decoder: sequences over a paged KV cache, one batched forward per step, the exit
//! plan applied to each sequence's last position. Generation strategies, the CLI and services are
//! written on top of it.
//!
//! A step builds its [`StepLayout`] once (tokens, positions, cache slots, block tables, output rows,
//! blocks to copy), hands it to the backend once, and brings back only what was asked for: the plan's
//! scores ([`Decoder::step`]) or just the best ids ([`StepResult::argmax`]), plus what each sequence
//! requested ([`SeqRequest`]).
//!
//! ```
//! use layerwise::runtime::{Decoder, DecoderOptions};
//! use layerwise::exits::{ExitPlan, PlanOptions, Upper};
//!
//! # fn main() -> layerwise::Result<()> {
//! # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/gpt2-sharded");
//! let loaded = layerwise::load(dir)?;
//! // ACD between the top layer's exit head (4) and layer 2's.
//! let plan = PlanOptions { plan: ExitPlan::Contrast { upper: Upper::Layer(4), lower: 2 }, ..Default::default() };
//! let mut decoder = Decoder::new(&loaded.model, DecoderOptions { plan, ..Default::default() })?;
//! let seq = decoder.add_sequence(&[5, 17, 42])?;
//! for _ in 0..4 {
//!     let out = decoder.step()?; // prefill first, then one token per step
//!     let scores = &out[0].logits; // contrasted log-probabilities over the vocabulary
//!     let next = (0..scores.len()).max_by(|&a, &b| scores[a].total_cmp(&scores[b])).unwrap() as u32;
//!     decoder.append(seq, next)?;
//! }
//! assert_eq!(decoder.tokens(seq)?.len(), 7);
//! let beam = decoder.fork(seq)?; // shares every cache block with `seq` until one of them appends
//! decoder.release(beam)?;
//! # Ok(())
//! # }
//! ```

mod speculation;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use speculation::{DraftPick, Speculation};

use super::kv::{BlockCopy, BlockPool, BlockTable};
use crate::backend::{Backend, SeqLayout, StepLayout};
use crate::error::{Error, Result};
use crate::exits::{PlanOptions, Projection, Source};
use crate::model::heads::Scores;
use crate::model::probes::{HeadMask, HeadScales, Masked, Tap};
use crate::model::Model;

/// Handle of a sequence in a [`Decoder`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeqId(u64);

impl SeqId {
    /// The handle as a number (sequences are numbered in order of creation), for bindings.
    pub fn index(self) -> u64 {
        self.0
    }

    /// The handle numbered `n`; a decoder refuses one it does not hold.
    pub fn from_index(n: u64) -> SeqId {
        SeqId(n)
    }
}

/// How a decoder is set up.
#[derive(Clone, Debug)]
pub struct DecoderOptions {
    /// What each step outputs.
    pub plan: PlanOptions,
    /// Token slots per cache block.
    pub block_size: usize,
    /// Cache capacity in tokens over all sequences (rounded up to whole blocks); `None`: one full
    /// context of the model.
    pub cache_tokens: Option<usize>,
    /// Heads to mask in every step (transformers' `head_mask`), e.g. to generate from a model as
    /// pruning would leave it.
    pub head_mask: Option<HeadMask>,
}

impl Default for DecoderOptions {
    fn default() -> Self {
        DecoderOptions { plan: PlanOptions::default(), block_size: 16, cache_tokens: None, head_mask: None }
    }
}

/// What a sequence wants from the steps that run it, besides the plan's output at its last token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeqRequest {
    /// The plan's main layer after the final norm at every token a step runs (transformers' last
    /// `hidden_states` entry for the original head): contrastive search's degeneration penalty.
    pub normed_states: bool,
    /// These layers' raw states (0 = embeddings) at the last token through the LM head, without the
    /// final norm, as transformers' DoLa reads its premature layers. Each must lie below the
    /// decoder's depth.
    pub raw_head_logits: Vec<usize>,
}

/// One sequence's output of a step, on the host.
#[derive(Clone, Debug)]
pub struct StepOutput {
    pub seq: SeqId,
    /// `[vocab]`: the plan's output at the sequence's last position (logits, or log-probabilities
    /// for a contrast).
    pub logits: Vec<f32>,
    /// With [`SeqRequest::normed_states`]: `[new tokens, hidden]`. Empty otherwise.
    pub hidden: Vec<f32>,
    /// With [`SeqRequest::raw_head_logits`]: `[vocab]` logits for each requested layer, in the
    /// request's order. Empty otherwise.
    pub premature: Vec<Vec<f32>>,
}

/// A step's outputs, the plan's scores still where the backend computed them.
pub struct StepResult<'m, B: Backend> {
    model: &'m Model<B>,
    vocab: usize,
    /// The sequences that ran, in order; row `i` of the scores is sequence `i`'s.
    sequences: Vec<SeqId>,
    /// What finding the source of a non-finite score needs: each sequence's tokens, the plan's
    /// sources and projection, the head mask.
    replay: Replay,
    scores: Option<Scores<B>>,
    /// Per sequence: its requested states and premature logits, on the host.
    hidden: Vec<Vec<f32>>,
    premature: Vec<Vec<Vec<f32>>>,
}

impl<B: Backend> StepResult<'_, B> {
    /// The sequences that ran, in order of creation.
    pub fn sequences(&self) -> &[SeqId] {
        &self.sequences
    }

    /// Each sequence's best-scoring token (first among ties), in [`StepResult::sequences`] order:
    /// only the ids cross to the host. Scores holding NaN or +inf (or nothing above -inf) are an
    /// [`Error::NonFinite`] naming the sequence and the first layer or head where a non-finite
    /// value appeared.
    pub fn argmax(&self) -> Result<Vec<u32>> {
        match &self.scores {
            Some(scores) => scores.argmax(self.model.backend(), self.vocab).map_err(|e| self.explain(e)),
            None => Ok(Vec::new()),
        }
    }

    /// Everything on the host, one [`StepOutput`] per sequence; the finite check as in
    /// [`StepResult::argmax`].
    pub fn into_outputs(self) -> Result<Vec<StepOutput>> {
        let scores = match &self.scores {
            Some(scores) => scores.to_host(self.model.backend(), self.vocab).map_err(|e| self.explain(e))?,
            None => Vec::new(),
        };
        let vocab = self.vocab;
        Ok(self
            .sequences
            .iter()
            .zip(self.hidden)
            .zip(self.premature)
            .enumerate()
            .map(|(row, ((&seq, hidden), premature))| StepOutput {
                seq,
                logits: scores[row * vocab..(row + 1) * vocab].to_vec(),
                hidden,
                premature,
            })
            .collect())
    }
}

impl<B: Backend> StepResult<'_, B> {
    /// A failed finite check, with the sequence it hit and where its first non-finite value appears
    /// (the sequence run again as one prompt); other errors as they are.
    fn explain(&self, e: Error) -> Error {
        let Error::NonFinite { row, what } = e else { return e };
        let (Some(seq), Some(tokens)) = (self.sequences.get(row), self.replay.tokens.get(row)) else {
            return Error::NonFinite { row, what };
        };
        let location = self
            .model
            .locate_non_finite(tokens, self.replay.sources, self.replay.projection, self.replay.head_mask.as_ref())
            .unwrap_or_else(|e| format!("looking for its source failed: {e}"));
        Error::NonFinite {
            row,
            what: format!("the model's scores for sequence {} hold non-finite values ({what}); {location}", seq.0),
        }
    }
}

/// What [`StepResult`] keeps to explain a failed finite check.
struct Replay {
    tokens: Vec<Arc<Vec<u32>>>,
    sources: (Source, Option<Source>),
    projection: Projection,
    head_mask: Option<HeadMask>,
}

struct Sequence {
    table: BlockTable,
    /// Shared with the step results still alive (for a failed finite check's search), copied on
    /// the next append only if one is: no copy per step.
    tokens: Arc<Vec<u32>>,
    /// Tokens at the end of `tokens` not yet run through the model.
    pending: usize,
    request: SeqRequest,
    /// Tokens whose outputs were already reported: after an eviction the whole sequence runs
    /// again, but only the states of tokens past this point come back.
    reported: usize,
    /// Normed states of the rows run so far in a prefill split over several steps, handed out
    /// with the step that completes it.
    partial_hidden: Vec<f32>,
}

/// Step-by-step decoding over a paged KV cache. See the module documentation for an example.
pub struct Decoder<'m, B: Backend> {
    model: &'m Model<B>,
    plan: PlanOptions,
    sources: (Source, Option<Source>),
    /// Blocks every step runs (the plan needs nothing above).
    depth: usize,
    pool: BlockPool,
    store: B::KvStore,
    sequences: BTreeMap<SeqId, Sequence>,
    next_id: u64,
    blocks_run: u64,
    head_scales: Option<HeadScales<B>>,
    head_mask: Option<HeadMask>,
}

impl<'m, B: Backend> Decoder<'m, B> {
    /// A decoder for `model` under `options.plan`. The cache holds only the layers the plan needs.
    pub fn new(model: &'m Model<B>, options: DecoderOptions) -> Result<Self> {
        let spec = model.spec();
        let sources = model.plan_sources(&options.plan)?;
        let depth = options.plan.depth(spec)?;
        if options.block_size == 0 {
            return Err(Error::invalid("block_size", "must be at least 1"));
        }
        let tokens = options.cache_tokens.unwrap_or(spec.max_positions);
        if tokens == 0 {
            return Err(Error::invalid("cache_tokens", "must be at least 1"));
        }
        let b = model.backend();
        let head_scales = options.head_mask.as_ref().map(|mask| HeadScales::new(b, mask, spec)).transpose()?;
        let head_mask = options.head_mask;
        let num_blocks = tokens.div_ceil(options.block_size);
        // Keys and values in f32 for every block of `depth` layers: refused before allocating when
        // they would not fit the backend's memory.
        let kv_bytes = [depth, num_blocks, options.block_size, spec.num_kv_heads * spec.head_dim, 2 * 4]
            .iter()
            .fold(1u128, |n, &k| n.saturating_mul(k as u128));
        if let Some(memory) = b.memory_bytes() {
            if kv_bytes > memory as u128 {
                return Err(Error::invalid(
                    "cache_tokens",
                    format!(
                        "a cache of {tokens} tokens needs {:.1} GB of keys and values, more than the {:.1} GB of memory of the {} backend",
                        kv_bytes as f64 / 1e9,
                        memory as f64 / 1e9,
                        b.name()
                    ),
                ));
            }
        }
        let store = b.kv_store(depth, num_blocks, options.block_size, spec.num_kv_heads * spec.head_dim)?;
        Ok(Decoder {
            model,
            plan: options.plan,
            sources,
            depth,
            pool: BlockPool::new(num_blocks, options.block_size),
            store,
            sequences: BTreeMap::new(),
            next_id: 0,
            blocks_run: 0,
            head_scales,
            head_mask,
        })
    }

    /// Starts a sequence; its prompt runs at the next [`Decoder::step`]. A prompt-tuning adapter's
    /// virtual tokens go first ([`Model::virtual_prefix`]): they are part of the sequence's tokens.
    pub fn add_sequence(&mut self, prompt: &[u32]) -> Result<SeqId> {
        self.model.check_prompt(prompt)?;
        let id = SeqId(self.next_id);
        self.next_id += 1;
        let mut tokens = self.model.virtual_prefix();
        tokens.extend_from_slice(prompt);
        let sequence = Sequence {
            table: BlockTable::default(),
            pending: tokens.len(),
            tokens: Arc::new(tokens),
            request: SeqRequest::default(),
            reported: 0,
            partial_hidden: Vec::new(),
        };
        self.sequences.insert(id, sequence);
        Ok(id)
    }

    /// Asks every later step that runs `seq` for more than the plan's output (forks inherit it).
    pub fn set_request(&mut self, seq: SeqId, request: SeqRequest) -> Result<()> {
        if let Some(&layer) = request.raw_head_logits.iter().find(|&&l| l >= self.depth.max(1)) {
            return Err(Error::invalid(
                "raw_head_logits",
                format!("layer {layer} is not below the {} layers this plan runs", self.depth),
            ));
        }
        self.sequence_mut(seq)?.request = request;
        Ok(())
    }

    /// Adds `token` to `seq`; it runs at the next step.
    pub fn append(&mut self, seq: SeqId, token: u32) -> Result<()> {
        self.model.check_token(token, "appended token")?;
        let max = self.model.spec().max_positions;
        let sequence = self.sequence_mut(seq)?;
        if sequence.tokens.len() >= max {
            return Err(Error::invalid(
                "sequence",
                format!("already holds {max} tokens, the model's whole context; no position is left for another"),
            ));
        }
        Arc::make_mut(&mut sequence.tokens).push(token);
        sequence.pending += 1;
        Ok(())
    }

    /// A new sequence with the same tokens and request, sharing every cache block with `seq` (copy
    /// on write).
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        let pool = &mut self.pool;
        let source = self.sequences.get(&seq).ok_or_else(|| unknown(seq))?;
        let copy = Sequence {
            table: source.table.fork(pool),
            tokens: Arc::clone(&source.tokens),
            pending: source.pending,
            request: source.request.clone(),
            reported: source.reported,
            partial_hidden: source.partial_hidden.clone(),
        };
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.sequences.insert(id, copy);
        Ok(id)
    }

    /// Ends `seq` and returns its cache blocks to the pool.
    pub fn release(&mut self, seq: SeqId) -> Result<()> {
        let mut sequence = self.sequences.remove(&seq).ok_or_else(|| unknown(seq))?;
        sequence.table.release(&mut self.pool);
        Ok(())
    }

    /// Gives `seq`'s cache blocks back to the pool but keeps its tokens: the whole sequence runs
    /// again at the next step that includes it (recomputation), and that step returns what the
    /// sequence was waiting for, as if nothing had happened. A scheduler's preemption.
    pub fn evict(&mut self, seq: SeqId) -> Result<()> {
        let pool = &mut self.pool;
        let sequence = self.sequences.get_mut(&seq).ok_or_else(|| unknown(seq))?;
        sequence.table.release(pool);
        sequence.pending = sequence.tokens.len();
        sequence.partial_hidden.clear();
        Ok(())
    }

    /// Tokens of `seq` not yet run through the model.
    pub fn pending(&self, seq: SeqId) -> Result<usize> {
        Ok(self.sequences.get(&seq).ok_or_else(|| unknown(seq))?.pending)
    }

    /// Free cache blocks that running `tokens` more of `seq`'s pending tokens would take
    /// (including a shared last block copied on write).
    pub fn blocks_needed(&self, seq: SeqId, tokens: usize) -> Result<usize> {
        Ok(self.sequences.get(&seq).ok_or_else(|| unknown(seq))?.table.blocks_needed(&self.pool, tokens))
    }

    /// Every token of `seq` (prompt and appended).
    pub fn tokens(&self, seq: SeqId) -> Result<&[u32]> {
        Ok(&self.sequences.get(&seq).ok_or_else(|| unknown(seq))?.tokens)
    }

    /// The cache blocks of `seq`, in position order.
    pub fn block_table(&self, seq: SeqId) -> Result<&[u32]> {
        Ok(self.sequences.get(&seq).ok_or_else(|| unknown(seq))?.table.blocks())
    }

    /// The cache's block pool (free blocks, reference counts).
    pub fn pool(&self) -> &super::kv::BlockPool {
        &self.pool
    }

    /// Blocks (transformer layers) each step runs.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Total transformer blocks run so far, summed over steps.
    pub fn blocks_run(&self) -> u64 {
        self.blocks_run
    }

    /// The model this decoder runs.
    pub fn model(&self) -> &'m Model<B> {
        self.model
    }

    /// The plan this decoder applies.
    pub fn plan(&self) -> &PlanOptions {
        &self.plan
    }

    /// Runs every sequence's pending tokens through the model in one batched forward and returns, for
    /// each of them (in order of creation), the plan's output at its last position on the host.
    /// Sequences with nothing pending are left out. If the cache cannot hold the new tokens, nothing
    /// changes and the error says so.
    pub fn step(&mut self) -> Result<Vec<StepOutput>> {
        self.run_step()?.into_outputs()
    }

    /// [`Decoder::step`] with the plan's scores left on the backend, for callers that want less
    /// than every score (e.g. [`StepResult::argmax`]).
    pub fn run_step(&mut self) -> Result<StepResult<'m, B>> {
        let all: Vec<(SeqId, usize)> =
            self.sequences.iter().filter(|(_, s)| s.pending > 0).map(|(&id, _)| (id, usize::MAX)).collect();
        self.run_step_for(&all)
    }

    /// A step over the chosen sequences only, each running at most the given number of its pending
    /// tokens (a long prompt split over several steps: chunked prefill). Only the sequences left
    /// with nothing pending have outputs; the others' states are kept until their last chunk runs.
    /// Sequences with nothing pending are skipped.
    pub fn run_step_for(&mut self, chosen: &[(SeqId, usize)]) -> Result<StepResult<'m, B>> {
        let mut budget: Vec<(SeqId, usize)> = Vec::with_capacity(chosen.len());
        for &(id, limit) in chosen {
            let pending = self.sequences.get(&id).ok_or_else(|| unknown(id))?.pending;
            if pending > 0 && limit > 0 && !budget.iter().any(|&(b, _)| b == id) {
                budget.push((id, pending.min(limit)));
            }
        }
        // A step is a hundred or so parallel ops: run it where the backend runs them best.
        let backend = self.model.backend();
        backend.run(|| self.step_here(&budget))
    }

    /// Reserves cache slots for every pending token (shared blocks to copy are listed in the
    /// layout) and lays the step out: every ready sequence's pending tokens, in order. On failure
    /// nothing is reserved.
    fn layout(&mut self, budget: &[(SeqId, usize)]) -> Result<StepLayout> {
        let mut layout = StepLayout { block_size: self.pool.block_size(), ..Default::default() };
        let mut reserved: Vec<(SeqId, usize)> = Vec::new();
        let mut copies: Vec<BlockCopy> = Vec::new();
        for &(id, run) in budget {
            let sequence = self.sequences.get_mut(&id).ok_or_else(|| unknown(id))?;
            let before = sequence.table.len();
            match sequence.table.reserve(&mut self.pool, run, &mut copies) {
                Ok(slots) => {
                    reserved.push((id, before));
                    let first = sequence.tokens.len() - sequence.pending;
                    let new = &sequence.tokens[first..first + run];
                    let table = sequence.table.blocks();
                    layout.sequences.push(SeqLayout {
                        first_row: layout.ids.len(),
                        len: new.len(),
                        first_position: before,
                        table_start: layout.block_tables.len(),
                        table_len: table.len(),
                    });
                    layout.block_tables.extend_from_slice(table);
                    layout.ids.extend_from_slice(new);
                    layout.positions.extend(before as u32..(before + new.len()) as u32);
                    layout.slots.extend(slots.iter().map(|&s| s as u32));
                    if run == sequence.pending {
                        layout.output_rows.push(layout.ids.len() as u32 - 1);
                    }
                }
                Err(e) => {
                    // Blocks already copied on write keep their copies: make them before giving up.
                    if !copies.is_empty() {
                        let b = self.model.backend();
                        let only_copies = StepLayout {
                            block_copies: copies.iter().map(|c| (c.from, c.to)).collect(),
                            ..Default::default()
                        };
                        b.kv_copy_blocks(&mut self.store, &b.upload_step(only_copies)?)?;
                    }
                    for (id, len) in reserved {
                        if let Some(s) = self.sequences.get_mut(&id) {
                            s.table.truncate(&mut self.pool, len);
                        }
                    }
                    return Err(e);
                }
            }
        }
        layout.block_copies = copies.iter().map(|c| (c.from, c.to)).collect();
        Ok(layout)
    }

    fn step_here(&mut self, budget: &[(SeqId, usize)]) -> Result<StepResult<'m, B>> {
        let b = self.model.backend();
        let spec = self.model.spec();
        let (vocab, hidden_size, n) = (spec.vocab_size, spec.hidden_size, spec.num_layers);
        // The sequences this step completes (their last pending token runs): the ones with outputs.
        let ready: Vec<SeqId> =
            budget.iter().filter(|&&(id, run)| self.sequences[&id].pending == run).map(|&(id, _)| id).collect();
        let mut result = StepResult {
            model: self.model,
            vocab,
            sequences: ready.clone(),
            replay: Replay {
                tokens: ready.iter().map(|id| Arc::clone(&self.sequences[id].tokens)).collect(),
                sources: self.sources,
                projection: self.plan.projection,
                head_mask: self.head_mask.clone(),
            },
            scores: None,
            hidden: vec![Vec::new(); ready.len()],
            premature: vec![Vec::new(); ready.len()],
        };
        if budget.is_empty() {
            return Ok(result);
        }
        let layout = self.layout(budget)?;
        // Per sequence run: its rows in the step and the position of its first row.
        let row_spans: Vec<(usize, usize, usize)> =
            layout.sequences.iter().map(|s| (s.first_row, s.len, s.first_position)).collect();
        let requests: Vec<SeqRequest> = ready.iter().map(|id| self.sequences[id].request.clone()).collect();
        // Premature layers any sequence asked for, each computed once for every row.
        let mut premature: Vec<usize> = requests.iter().flat_map(|r| r.raw_head_logits.iter().copied()).collect();
        premature.sort_unstable();
        premature.dedup();
        let want_states = budget.iter().any(|(id, _)| self.sequences[id].request.normed_states);

        // The one upload of the step, then everything stays on the backend.
        let step = b.upload_step(layout)?;
        b.kv_copy_blocks(&mut self.store, &step)?;

        // Run the blocks the plan needs, keeping each sequence's last row at the layers it reads.
        let (main, lower) = self.sources;
        let wanted = |layer: usize| {
            (layer > 0 && (main.depth(n) == layer || lower.is_some_and(|l| l.depth(n) == layer)))
                || premature.contains(&layer)
        };
        let mut kept: BTreeMap<usize, B::Tensor> = BTreeMap::new();
        let mut main_state = None;
        self.model.run(
            &step,
            &mut self.store,
            self.depth,
            &mut Masked {
                scales: self.head_scales.as_ref(),
                probe: Tap(|layer, x: &B::Tensor| {
                    if wanted(layer) && !ready.is_empty() {
                        kept.insert(layer, b.gather_output_rows(x, &step)?);
                    }
                    if want_states && layer == main.depth(n) {
                        main_state = Some(b.copy(x)?);
                    }
                    Ok(())
                }),
            },
        )?;
        self.blocks_run += self.depth as u64;
        let normed = match main_state {
            Some(states) => Some(b.to_host(&self.model.final_norm(&states)?)?),
            None => None,
        };
        for (&(id, run), &(first, len, position)) in budget.iter().zip(&row_spans) {
            let Some(sequence) = self.sequences.get_mut(&id) else { continue };
            sequence.pending -= run;
            if let (Some(normed), true) = (&normed, sequence.request.normed_states) {
                // Rows of tokens already reported (a sequence recomputed after an eviction) are skipped.
                let skip = sequence.reported.saturating_sub(position).min(len);
                sequence
                    .partial_hidden
                    .extend_from_slice(&normed[(first + skip) * hidden_size..(first + len) * hidden_size]);
            }
            sequence.reported = sequence.reported.max(position + len);
            if sequence.pending == 0 {
                if let Some(row) = ready.iter().position(|&r| r == id) {
                    result.hidden[row] = std::mem::take(&mut sequence.partial_hidden);
                }
            }
        }

        if ready.is_empty() {
            // Only parts of prompts ran: nothing to score yet.
            return Ok(result);
        }
        let state = |source: Source| &kept[&source.depth(n)];
        if premature.is_empty() {
            result.scores =
                Some(self.model.plan_output(&self.plan, (main, state(main)), lower.map(|l| (l, state(l))))?);
            return Ok(result);
        }
        // Every premature layer's rows through the LM head in one product: one read of the head. When
        // the plan's output is the original head's, its rows join that product too.
        let joins = main == Source::Original && lower.is_none();
        let normed_main = if joins { Some(self.model.final_norm(state(main))?) } else { None };
        let parts: Vec<&B::Tensor> = normed_main.iter().chain(premature.iter().map(|layer| &kept[layer])).collect();
        let mut logits = b.to_host(&self.model.lm_head_raw(&b.concat_rows(&parts)?)?)?;
        result.scores = Some(if joins {
            Scores::Host(logits.drain(..ready.len() * vocab).collect())
        } else {
            self.model.plan_output(&self.plan, (main, state(main)), lower.map(|l| (l, state(l))))?
        });
        for (row, request) in requests.iter().enumerate() {
            result.premature[row] = request
                .raw_head_logits
                .iter()
                .map(|layer| {
                    let p = premature.iter().position(|l| l == layer).unwrap_or_default();
                    let r = p * ready.len() + row;
                    logits[r * vocab..(r + 1) * vocab].to_vec()
                })
                .collect();
        }
        Ok(result)
    }

    fn sequence_mut(&mut self, seq: SeqId) -> Result<&mut Sequence> {
        self.sequences.get_mut(&seq).ok_or_else(|| unknown(seq))
    }
}

fn unknown(seq: SeqId) -> Error {
    Error::invalid("sequence", format!("{seq:?} is not active in this decoder (released, or from another decoder)"))
}
