//! Self-speculation on the decoder: draft tokens with an exit head, running only the blocks below it,
//! then verify them all with the plan in one pass over the blocks above (LayerSkip's cache reuse).
//!
//! A round on a sequence whose last token is pending (`t`): the lower blocks `0..d` run `t`, the exit
//! head at `d` scores the next token, the caller picks a draft `x1`, which runs the lower blocks in
//! turn, and so on for `k` drafts; then the upper blocks `d..depth` run all `k + 1` rows (`t, x1 ..
//! xk`) at once from their states at `d`, and the plan scores every row. The lower blocks' cache
//! entries of the drafted positions are exactly what a full step computes there (a block reads only
//! the blocks below it), so after the round every position has its entries in every block, as if the
//! drafts had been decoded one by one. The caller keeps the prefix it accepts
//! ([`Decoder::rollback`]) and appends its own next token; the rest of the round is forgotten.
//!
//! The upper weights are read once for `k + 1` tokens instead of `k + 1` times: that is the gain,
//! bought with `k + 1` passes over the lower blocks and `k` products with the draft head.

use std::collections::BTreeMap;

use super::{unknown, Decoder, SeqId};
use crate::backend::{Backend, SeqLayout, StepLayout};
use crate::error::{Error, Result};
use crate::exits::Source;
use crate::model::probes::Tap;

/// Picks a draft from the sequence's tokens so far and the draft head's scores; `None` ends drafting.
pub type DraftPick<'a> = dyn FnMut(&[u32], &[f32]) -> Result<Option<u32>> + 'a;

/// What one speculation round produced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Speculation {
    /// The drafted tokens, now in the sequence with cache entries in every block.
    pub drafts: Vec<u32>,
    /// The draft head's scores before each draft (`drafts.len()` rows, the ones the drafts were
    /// picked from).
    pub draft_scores: Vec<Vec<f32>>,
    /// The plan's scores at the round's `drafts.len() + 1` positions: row `i` scores the token that
    /// follows the sequence's tokens before the round and `drafts[..i]`.
    pub target_scores: Vec<Vec<f32>>,
}

impl<B: Backend> Decoder<'_, B> {
    /// One speculation round on `seq` (exactly one pending token) with the exit head of
    /// `draft_layer` (below the plan's depth): at most `max_drafts` drafts, each picked by
    /// `pick(tokens so far, draft scores)` (`None` ends drafting), then the plan's scores at every
    /// drafted position from one pass over the upper blocks. The sequence then holds the drafts,
    /// every position cached; [`Decoder::rollback`] keeps the accepted part. On an error the
    /// sequence is as it was before the round.
    pub fn speculate(
        &mut self,
        seq: SeqId,
        draft_layer: usize,
        max_drafts: usize,
        pick: &mut DraftPick<'_>,
    ) -> Result<Speculation> {
        let before = self.sequences.get(&seq).map(|s| (s.tokens.len(), s.table.len(), s.pending, s.reported));
        let result = (|| -> Result<Speculation> {
            let model = self.model;
            let b = model.backend();
            let spec = model.spec();
            let n = spec.num_layers;
            if draft_layer == 0 || draft_layer >= self.depth || !spec.exit_layers.contains(&draft_layer) {
                return Err(Error::invalid(
                    "draft layer",
                    format!(
                        "{draft_layer} is not an exit below the {} blocks the plan runs ({})",
                        self.depth,
                        spec.describe_exits()
                    ),
                ));
            }
            if self.head_scales.is_some() {
                return Err(Error::invalid("speculation", "does not run with a head mask"));
            }
            let sequence = self.sequences.get(&seq).ok_or_else(|| unknown(seq))?;
            if sequence.pending != 1 {
                return Err(Error::invalid(
                    "speculation",
                    format!("needs exactly one pending token (the sequence has {})", sequence.pending),
                ));
            }
            let first_position = sequence.table.len();
            let (main, lower) = self.sources;
            // The plan's sources at or below the draft layer are read from the drafting passes.
            let below = |source: Source| source.depth(n) <= draft_layer;
            let mut lower_states: BTreeMap<usize, Vec<B::Tensor>> = BTreeMap::new();
            let mut draft_states: Vec<B::Tensor> = Vec::new();
            let mut out = Speculation::default();
            let max_positions = spec.max_positions;
            loop {
                // The pending token through the lower blocks.
                let layout = self.layout(&[(seq, 1)])?;
                let step = b.run(|| b.upload_step(layout))?;
                let state = b.run(|| -> Result<B::Tensor> {
                    b.kv_copy_blocks(&mut self.store, &step)?;
                    let mut kept: BTreeMap<usize, B::Tensor> = BTreeMap::new();
                    let x = model.run(
                        &step,
                        &mut self.store,
                        draft_layer,
                        &mut Tap(|layer, x: &B::Tensor| {
                            let wanted =
                                [Some(main), lower].into_iter().flatten().any(|s| below(s) && s.depth(n) == layer);
                            if wanted && layer < draft_layer && layer > 0 {
                                kept.insert(layer, b.copy(x)?);
                            }
                            Ok(())
                        }),
                    )?;
                    for (layer, x) in kept {
                        lower_states.entry(layer).or_default().push(x);
                    }
                    Ok(x)
                })?;
                self.blocks_run += draft_layer as u64;
                let sequence = self.sequences.get_mut(&seq).ok_or_else(|| unknown(seq))?;
                sequence.pending = 0;
                sequence.reported = sequence.reported.max(sequence.table.len());
                let tokens_now = sequence.tokens.len();
                let room = out.drafts.len() < max_drafts && tokens_now < max_positions;
                let next = if room {
                    let scores = b.run(|| b.to_host(&model.exit_logits(draft_layer, &state)?))?;
                    let tokens = std::sync::Arc::clone(&sequence.tokens);
                    let next = pick(&tokens, &scores)?;
                    if next.is_some() {
                        out.draft_scores.push(scores);
                    }
                    next
                } else {
                    None
                };
                draft_states.push(state);
                match next {
                    Some(token) => {
                        out.drafts.push(token);
                        self.append(seq, token)?;
                    }
                    None => break,
                }
            }

            // Verification: the upper blocks over every row of the round, from the states at the draft layer.
            let rows = draft_states.len();
            let sequence = &self.sequences[&seq];
            let block_size = self.pool.block_size();
            let table = sequence.table.blocks().to_vec();
            let positions: Vec<u32> = (first_position..first_position + rows).map(|p| p as u32).collect();
            let layout = StepLayout {
                ids: sequence.tokens[first_position..first_position + rows].to_vec(),
                slots: positions
                    .iter()
                    .map(|&p| table[p as usize / block_size] * block_size as u32 + p % block_size as u32)
                    .collect(),
                positions,
                sequences: vec![SeqLayout {
                    first_row: 0,
                    len: rows,
                    first_position,
                    table_start: 0,
                    table_len: table.len(),
                }],
                block_tables: table,
                block_size,
                output_rows: (0..rows as u32).collect(),
                block_copies: Vec::new(),
            };
            let depth = self.depth;
            let scores = b.run(|| -> Result<Vec<f32>> {
                let step = b.upload_step(layout)?;
                let parts: Vec<&B::Tensor> = draft_states.iter().collect();
                let at_draft = b.concat_rows(&parts)?;
                let mut upper: BTreeMap<usize, B::Tensor> = BTreeMap::new();
                let top = model.run_blocks(
                    &step,
                    &mut self.store,
                    b.copy(&at_draft)?,
                    draft_layer..depth,
                    &mut Tap(|layer, x: &B::Tensor| {
                        if layer < depth && [Some(main), lower].into_iter().flatten().any(|s| s.depth(n) == layer) {
                            upper.insert(layer, b.copy(x)?);
                        }
                        Ok(())
                    }),
                )?;
                upper.insert(depth, top);
                // Each source's rows: from the drafting passes at or below the draft layer, else from this one.
                let state_of = |source: Source| -> Result<B::Tensor> {
                    let layer = source.depth(n);
                    if layer == draft_layer {
                        return b.copy(&at_draft);
                    }
                    if layer < draft_layer {
                        let parts: Vec<&B::Tensor> =
                            lower_states.get(&layer).map(|v| v.iter().collect()).unwrap_or_default();
                        return b.concat_rows(&parts);
                    }
                    let missing =
                        || Error::invalid("speculation", format!("the state of layer {layer} was not kept (a bug)"));
                    b.copy(upper.get(&layer).ok_or_else(missing)?)
                };
                let main_state = state_of(main)?;
                let lower_state = lower.map(state_of).transpose()?;
                let out = model.plan_output(&self.plan, (main, &main_state), lower.zip(lower_state.as_ref()))?;
                out.to_host(b, spec.vocab_size)
            })?;
            self.blocks_run += (depth - draft_layer) as u64;
            let sequence = self.sequences.get_mut(&seq).ok_or_else(|| unknown(seq))?;
            sequence.reported = sequence.reported.max(sequence.table.len());
            let vocab = spec.vocab_size;
            out.target_scores = scores.chunks_exact(vocab).map(<[f32]>::to_vec).collect();
            Ok(out)
        })();
        if let (Err(_), Some((tokens, cached, pending, reported))) = (&result, before) {
            let pool = &mut self.pool;
            if let Some(sequence) = self.sequences.get_mut(&seq) {
                std::sync::Arc::make_mut(&mut sequence.tokens).truncate(tokens);
                sequence.table.truncate(pool, cached);
                sequence.pending = pending;
                sequence.reported = reported;
            }
        }
        result
    }

    /// Keeps the first `len` tokens of `seq` and forgets the rest (tokens and cache entries): the
    /// part of a speculation round that was not accepted. Only cached tokens can be kept.
    pub fn rollback(&mut self, seq: SeqId, len: usize) -> Result<()> {
        let pool = &mut self.pool;
        let sequence = self.sequences.get_mut(&seq).ok_or_else(|| unknown(seq))?;
        let cached = sequence.tokens.len() - sequence.pending;
        if len > cached {
            return Err(Error::invalid(
                "rollback",
                format!("{len} tokens asked for, but only {cached} of the sequence are cached"),
            ));
        }
        std::sync::Arc::make_mut(&mut sequence.tokens).truncate(len);
        sequence.table.truncate(pool, len);
        sequence.pending = 0;
        sequence.reported = sequence.reported.min(len);
        Ok(())
    }
}
