//! The step-by-step decoder: sequences over a paged KV cache, one batched forward per step, the exit
//! plan applied to each sequence's last position. Generation loops, samplers, beam search and the CLI
//! are written on top of it.
//!
//! ```
//! use layerwise::decoder::{Decoder, DecoderOptions};
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

use std::collections::BTreeMap;

use crate::backend::{Backend, SeqSlice};
use crate::error::{Error, Result};
use crate::exits::{PlanOptions, Source};
use crate::inspect::{HeadMask, Masked, Tap};
use crate::kv::{BlockCopy, BlockPool, BlockTable};
use crate::model::{Batch, Model};

/// Handle of a sequence in a [`Decoder`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeqId(u64);

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

/// One sequence's output of a step.
#[derive(Clone, Debug)]
pub struct StepOutput {
    pub seq: SeqId,
    /// `[vocab]`: the plan's output at the sequence's last position (logits, or log-probabilities
    /// for a contrast).
    pub logits: Vec<f32>,
    /// With [`StepExtras::hidden_states`]: `[new tokens, hidden]`, the final-normed state of the plan's
    /// main layer at every token this step ran (transformers' last `hidden_states` entry for the
    /// original head). Empty otherwise.
    pub hidden: Vec<f32>,
    /// With [`StepExtras::premature_layers`]: for each of those layers, `[vocab]` logits of the
    /// original LM head applied to that layer's raw state at the last position (no final norm, as
    /// transformers' DoLa does). Empty otherwise.
    pub premature: Vec<Vec<f32>>,
}

/// What a step returns besides the plan's output (strategies that look inside the model).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepExtras {
    /// Final-normed states of every new token (contrastive search's degeneration penalty).
    pub hidden_states: bool,
    /// Layers (0 = embeddings) whose raw last-position states go through the LM head (DoLa).
    pub premature_layers: Vec<usize>,
}

struct Sequence {
    table: BlockTable,
    tokens: Vec<u32>,
    /// Tokens at the end of `tokens` not yet run through the model.
    pending: usize,
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
    extras: StepExtras,
    /// The head mask's factors per block, if any.
    head_factors: Option<Vec<Vec<f32>>>,
}

impl<'m, B: Backend> Decoder<'m, B> {
    /// A decoder for `model` under `options.plan`. The cache holds only the layers the plan needs.
    pub fn new(model: &'m Model<B>, options: DecoderOptions) -> Result<Self> {
        let spec = model.spec();
        let sources = model.plan_sources(&options.plan)?;
        let depth = options.plan.depth(spec)?;
        if options.block_size == 0 {
            return Err(Error::invalid("block size", "must be at least 1"));
        }
        let tokens = options.cache_tokens.unwrap_or(spec.max_positions);
        if tokens == 0 {
            return Err(Error::invalid("cache tokens", "must be at least 1"));
        }
        let head_factors = options.head_mask.as_ref().map(|mask| mask.factors(spec)).transpose()?;
        let num_blocks = tokens.div_ceil(options.block_size);
        let store =
            model.backend().kv_store(depth, num_blocks, options.block_size, spec.num_kv_heads * spec.head_dim)?;
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
            extras: StepExtras::default(),
            head_factors,
        })
    }

    /// Asks every later step for more than the plan's output. Premature layers must lie below the
    /// plan's depth (the layers a step runs).
    pub fn set_extras(&mut self, extras: StepExtras) -> Result<()> {
        if let Some(&layer) = extras.premature_layers.iter().find(|&&l| l >= self.depth.max(1)) {
            return Err(Error::invalid(
                "dola-layers",
                format!("layer {layer} is not below the {} layers this plan runs", self.depth),
            ));
        }
        self.extras = extras;
        Ok(())
    }

    /// Starts a sequence; its prompt runs at the next [`Decoder::step`].
    pub fn add_sequence(&mut self, prompt: &[u32]) -> Result<SeqId> {
        self.model.check_prompt(prompt)?;
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.sequences
            .insert(id, Sequence { table: BlockTable::default(), tokens: prompt.to_vec(), pending: prompt.len() });
        Ok(id)
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
        sequence.tokens.push(token);
        sequence.pending += 1;
        Ok(())
    }

    /// A new sequence with the same tokens, sharing every cache block with `seq` (copy on write).
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        let pool = &mut self.pool;
        let source = self.sequences.get(&seq).ok_or_else(|| unknown(seq))?;
        let copy = Sequence { table: source.table.fork(pool), tokens: source.tokens.clone(), pending: source.pending };
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

    /// Every token of `seq` (prompt and appended).
    pub fn tokens(&self, seq: SeqId) -> Result<&[u32]> {
        Ok(&self.sequences.get(&seq).ok_or_else(|| unknown(seq))?.tokens)
    }

    /// The cache blocks of `seq`, in position order.
    pub fn block_table(&self, seq: SeqId) -> Result<&[u32]> {
        Ok(self.sequences.get(&seq).ok_or_else(|| unknown(seq))?.table.blocks())
    }

    /// The cache's block pool (free blocks, reference counts).
    pub fn pool(&self) -> &BlockPool {
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
    /// each of them (in order of creation), the plan's output at its last position. Sequences with
    /// nothing pending are left out. If the cache cannot hold the new tokens, nothing changes and
    /// the error says so.
    pub fn step(&mut self) -> Result<Vec<StepOutput>> {
        // A step is a hundred or so parallel ops: run it where the backend runs them best.
        let backend = self.model.backend();
        backend.run(|| self.step_here())
    }

    fn step_here(&mut self) -> Result<Vec<StepOutput>> {
        let b = self.model.backend();
        let ready: Vec<SeqId> = self.sequences.iter().filter(|(_, s)| s.pending > 0).map(|(&id, _)| id).collect();
        if ready.is_empty() {
            return Ok(Vec::new());
        }

        // Reserve cache slots for every new token, copying shared blocks first.
        let mut slots = Vec::new();
        let mut reserved: Vec<(SeqId, usize)> = Vec::new();
        for &id in &ready {
            let sequence = self.sequences.get_mut(&id).ok_or_else(|| unknown(id))?;
            let before = sequence.table.len();
            let mut copies: Vec<BlockCopy> = Vec::new();
            match sequence.table.reserve(&mut self.pool, sequence.pending, &mut copies) {
                Ok(new_slots) => {
                    for copy in copies {
                        b.kv_copy_block(&mut self.store, copy.from, copy.to);
                    }
                    slots.extend(new_slots);
                    reserved.push((id, before));
                }
                Err(e) => {
                    for (id, len) in reserved {
                        if let Some(s) = self.sequences.get_mut(&id) {
                            s.table.truncate(&mut self.pool, len);
                        }
                    }
                    return Err(e);
                }
            }
        }

        // One batch: every ready sequence's pending tokens, in order.
        let mut ids = Vec::with_capacity(slots.len());
        let mut positions = Vec::with_capacity(slots.len());
        let mut slices = Vec::with_capacity(ready.len());
        let mut last_rows = Vec::with_capacity(ready.len());
        let mut row_spans = Vec::with_capacity(ready.len());
        for (&id, &(_, before)) in ready.iter().zip(&reserved) {
            let sequence = &self.sequences[&id];
            let new = &sequence.tokens[sequence.tokens.len() - sequence.pending..];
            slices.push(SeqSlice {
                first_row: ids.len(),
                len: new.len(),
                first_position: before,
                block_table: sequence.table.blocks(),
            });
            row_spans.push((ids.len(), new.len()));
            ids.extend_from_slice(new);
            positions.extend(before..before + new.len());
            last_rows.push(ids.len() - 1);
        }
        let batch = Batch { positions, slots, sequences: slices };

        // Run the blocks the plan needs, keeping the last row of each sequence at the layers it reads.
        let n = self.model.spec().num_layers;
        let (main, lower) = self.sources;
        let premature = &self.extras.premature_layers;
        let wanted = |layer: usize| {
            (layer > 0 && (main.depth(n) == layer || lower.is_some_and(|l| l.depth(n) == layer)))
                || premature.contains(&layer)
        };
        let all_rows: Vec<usize> = if self.extras.hidden_states { (0..ids.len()).collect() } else { Vec::new() };
        let mut kept: BTreeMap<usize, B::Tensor> = BTreeMap::new();
        let mut main_state = None;
        self.model.run_blocks(
            &ids,
            &batch,
            &mut self.store,
            self.depth,
            &mut Masked {
                factors: self.head_factors.as_deref(),
                probe: Tap(|layer, x: &B::Tensor| {
                    if wanted(layer) {
                        kept.insert(layer, b.gather_rows(x, &last_rows));
                    }
                    if !all_rows.is_empty() && layer == main.depth(n) {
                        main_state = Some(b.gather_rows(x, &all_rows));
                    }
                }),
            },
        );
        drop(batch);
        self.blocks_run += self.depth as u64;
        let state = |source: Source| &kept[&source.depth(n)];
        let vocab = self.model.spec().vocab_size;
        let hidden_size = self.model.spec().hidden_size;
        let hidden = main_state.map(|state| b.to_host(&self.model.final_norm(&state))).unwrap_or_default();
        // Every premature layer's last rows through the LM head in one product: one read of the head.
        // When the plan's output is the original head's, its rows join that product too.
        let joins_premature = !premature.is_empty() && main == Source::Original && lower.is_none();
        let mut head_rows = Vec::new();
        if joins_premature {
            head_rows.extend(b.to_host(&self.model.final_norm(state(main))));
        }
        for layer in premature {
            head_rows.extend(b.to_host(&kept[layer]));
        }
        let mut premature_logits = if head_rows.is_empty() {
            Vec::new()
        } else {
            let rows = head_rows.len() / hidden_size;
            b.to_host(&self.model.lm_head_raw(&b.upload(head_rows, rows, hidden_size)))
        };
        let host = if joins_premature {
            premature_logits.drain(..ready.len() * vocab).collect()
        } else {
            let output = self.model.plan_output(&self.plan, (main, state(main)), lower.map(|l| (l, state(l))));
            b.to_host(&output)
        };
        let mut outputs = Vec::with_capacity(ready.len());
        for (row, (&id, span)) in ready.iter().zip(&row_spans).enumerate() {
            if let Some(sequence) = self.sequences.get_mut(&id) {
                sequence.pending = 0;
            }
            let hidden = if hidden.is_empty() {
                Vec::new()
            } else {
                hidden[span.0 * hidden_size..(span.0 + span.1) * hidden_size].to_vec()
            };
            let premature = (0..premature.len())
                .map(|p| {
                    let r = p * ready.len() + row;
                    premature_logits[r * vocab..(r + 1) * vocab].to_vec()
                })
                .collect();
            outputs.push(StepOutput {
                seq: id,
                logits: host[row * vocab..(row + 1) * vocab].to_vec(),
                hidden,
                premature,
            });
        }
        Ok(outputs)
    }

    fn sequence_mut(&mut self, seq: SeqId) -> Result<&mut Sequence> {
        self.sequences.get_mut(&seq).ok_or_else(|| unknown(seq))
    }
}

fn unknown(seq: SeqId) -> Error {
    Error::invalid("sequence", format!("{seq:?} is not active in this decoder (released, or from another decoder)"))
}
