//! Self-speculative greedy decoding: an exit head drafts, the plan verifies (see
//! [`Decoder::speculate`]), and the output is the plan's greedy output exactly: each verified row is
//! processed and picked as a plain step would be, drafts are kept while they equal the pick, and
//! the first pick that differs (or the row after the last draft) is the round's own token.
//!
//! Adaptive: the number of drafts follows the acceptance (one more after a round that accepted
//! everything, the accepted count plus one after one that did not), and speculation turns itself off
//! while its measured time per token is above plain decoding's; it tries again after a while (twice
//! as long after each loss), so where the exits rarely agree with the plan, or the model is too small
//! to be bound by memory, decoding stays almost plain.
//!
//! ```
//! use layerwise::generation::speculative::{generate_speculative, SpeculationOptions};
//! use layerwise::generation::{generate, GenerationOptions};
//! use layerwise::runtime::{Decoder, DecoderOptions};
//!
//! # fn main() -> layerwise::Result<()> {
//! # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/gpt2-sharded");
//! let loaded = layerwise::load(dir)?;
//! let options = GenerationOptions { max_new_tokens: 12, ..Default::default() };
//! let mut decoder = Decoder::new(&loaded.model, DecoderOptions::default())?;
//! let plain = generate(&mut decoder, &[5, 17, 42], &options, None, |_| true)?;
//! let speculation = SpeculationOptions { draft_layer: Some(2), ..Default::default() };
//! let (fast, stats) = generate_speculative(&mut decoder, &[5, 17, 42], &options, &speculation, None, |_| true)?;
//! assert_eq!(fast.ids, plain.ids); // lossless
//! assert!(stats.rounds > 0);
//! # Ok(())
//! # }
//! ```

use std::time::Instant;

use super::strategy::{FinishReason, Run};
use super::{Generation, GenerationOptions, Strategy};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::exits::{ExitPlan, PlanOptions, Projection};
use crate::io::tokenizer::Tokenizer;
use crate::math::argmax;
use crate::runtime::{Decoder, SeqId};

/// How to speculate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpeculationOptions {
    /// The exit that drafts; `None`: the plan's lower layer for a contrast with exit heads, else the
    /// exit nearest half the plan's depth.
    pub draft_layer: Option<usize>,
    /// Most drafts per round.
    pub max_drafts: usize,
    /// Adapt the drafts per round and turn speculation off when it does not pay; else always draft
    /// `max_drafts`.
    pub adaptive: bool,
}

impl Default for SpeculationOptions {
    fn default() -> Self {
        SpeculationOptions { draft_layer: None, max_drafts: 6, adaptive: true }
    }
}

/// What speculation did during one generation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpeculationStats {
    pub draft_layer: usize,
    /// Speculation rounds, and plain steps (the prompt's, and those taken while speculation was off).
    pub rounds: usize,
    pub plain_steps: usize,
    /// Tokens drafted, and drafts accepted.
    pub drafted: usize,
    pub accepted: usize,
}

impl SpeculationStats {
    /// Fraction of drafts the plan accepted.
    pub fn acceptance_rate(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }

    /// Mean tokens a round produced (its accepted drafts and its own token).
    pub fn tokens_per_round(&self) -> f64 {
        (self.accepted + self.rounds) as f64 / self.rounds.max(1) as f64
    }
}

/// The draft layer `options` names, or the default one for `plan` (see [`SpeculationOptions`]).
pub fn choose_draft_layer<B: Backend>(decoder: &Decoder<'_, B>, options: &SpeculationOptions) -> Result<usize> {
    let spec = decoder.model().spec();
    let depth = decoder.depth();
    if let Some(layer) = options.draft_layer {
        if layer == 0 || layer >= depth || !spec.exit_layers.contains(&layer) {
            return Err(Error::invalid(
                "draft layer",
                format!("{layer} is not an exit below the {depth} blocks the plan runs ({})", spec.describe_exits()),
            ));
        }
        return Ok(layer);
    }
    let PlanOptions { plan, projection, .. } = decoder.plan();
    if let (ExitPlan::Contrast { lower, .. }, Projection::ExitHeads) = (plan, projection) {
        if spec.exit_layers.contains(lower) && *lower < depth {
            return Ok(*lower);
        }
    }
    spec.exit_layers
        .iter()
        .copied()
        .filter(|&l| l > 0 && l < depth)
        .min_by_key(|&l| (2 * l).abs_diff(depth))
        .ok_or_else(|| {
            Error::invalid("speculation", format!("no exit head below the {depth} blocks the plan runs to draft with"))
        })
}

/// Measured seconds per token of plain steps and of speculation rounds (moving averages): whether
/// speculation pays on this model and machine. Weight bytes alone do not say: a model that fits the
/// caches is bound by arithmetic and per-step costs, where drafting only adds work.
#[derive(Default)]
struct Pace {
    plain: Option<f64>,
    speculative: Option<f64>,
}

impl Pace {
    fn update(slot: &mut Option<f64>, seconds_per_token: f64) {
        *slot = Some(match *slot {
            Some(old) => 0.7 * old + 0.3 * seconds_per_token,
            None => seconds_per_token,
        });
    }

    /// Speculation measured slower than plain decoding.
    fn loses(&self) -> bool {
        matches!((self.plain, self.speculative), (Some(p), Some(s)) if s > p)
    }
}

/// A plain step of `seq` alone: the plan's scores at its last token.
fn plain_step<B: Backend>(decoder: &mut Decoder<'_, B>, seq: SeqId) -> Result<Vec<f32>> {
    let outputs = decoder.run_step_for(&[(seq, usize::MAX)])?.into_outputs()?;
    outputs
        .into_iter()
        .find(|o| o.seq == seq)
        .map(|o| o.logits)
        .ok_or_else(|| Error::invalid("speculation", "the step returned no scores for the sequence (a bug)"))
}

/// Greedy generation from `prompt` under the decoder's plan, with an exit head drafting: the same
/// tokens as [`super::generate`] with [`Strategy::Greedy`] (processors, EOS, `min_new_tokens` and text
/// stops included). Returns the generation and what speculation did.
pub fn generate_speculative<B: Backend>(
    decoder: &mut Decoder<'_, B>,
    prompt: &[u32],
    options: &GenerationOptions,
    speculation: &SpeculationOptions,
    tokenizer: Option<&Tokenizer>,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<(Generation, SpeculationStats)> {
    if options.strategy != Strategy::Greedy {
        return Err(Error::invalid(
            "speculation",
            "runs greedy decoding only (no sampling, beams or contrastive search)",
        ));
    }
    if speculation.max_drafts == 0 {
        return Err(Error::invalid("draft tokens", "must be at least 1"));
    }
    options.check(prompt.len(), decoder.model().spec())?;
    let draft_layer = choose_draft_layer(decoder, speculation)?;
    let run = Run::new(options.clone(), tokenizer)?;
    let mut text_stops = run.text_stops();
    let start = Instant::now();
    let mut stats = SpeculationStats { draft_layer, ..Default::default() };
    let seq = decoder.add_sequence(prompt)?;
    let mut sequence = prompt.to_vec();
    let mut ids: Vec<u32> = Vec::new();
    let mut prefill_s = 0.0;
    // Adaptation: drafts per round, the pace of both ways, plain steps left before speculation is
    // tried again, and how long it is off after the next loss (doubling while it keeps losing).
    let mut drafts = if speculation.adaptive { 1 } else { speculation.max_drafts };
    let mut pace = Pace::default();
    let mut off_for: usize = if speculation.adaptive { 2 } else { 0 }; // plain steps that measure the plain pace
    let mut backoff = 32usize;

    let result = (|| -> Result<FinishReason> {
        // Picks the round's token from a row of the plan's scores, as a plain greedy step does, and
        // says whether generation ends with it.
        let mut emit = |scores: &mut Vec<f32>,
                        sequence: &mut Vec<u32>,
                        ids: &mut Vec<u32>|
         -> Result<(u32, Option<FinishReason>)> {
            run.process(sequence, ids.len(), scores);
            let token = argmax(scores);
            ids.push(token);
            sequence.push(token);
            let mut finish = run.finished(token, sequence, ids.len(), text_stops.as_mut())?;
            if !on_token(token) && finish.is_none() {
                finish = Some(FinishReason::Stopped);
            }
            Ok((token, finish))
        };
        // The prompt: a plain step.
        let mut first = plain_step(decoder, seq)?;
        prefill_s = start.elapsed().as_secs_f64();
        stats.plain_steps += 1;
        let (token, finish) = emit(&mut first, &mut sequence, &mut ids)?;
        if let Some(finish) = finish {
            return Ok(finish);
        }
        decoder.append(seq, token)?;
        loop {
            let remaining = options.max_new_tokens - ids.len();
            let k = drafts.min(remaining.saturating_sub(1));
            if off_for > 0 || k == 0 {
                off_for = off_for.saturating_sub(1);
                let started = Instant::now();
                let mut scores = plain_step(decoder, seq)?;
                Pace::update(&mut pace.plain, started.elapsed().as_secs_f64());
                stats.plain_steps += 1;
                let (token, finish) = emit(&mut scores, &mut sequence, &mut ids)?;
                if let Some(finish) = finish {
                    return Ok(finish);
                }
                decoder.append(seq, token)?;
                continue;
            }
            // Draft greedily from the exit head, stopping at an end-of-sequence draft.
            let is_eos = |t: u32| options.eos_token_ids.contains(&t);
            let started = Instant::now();
            let round = decoder.speculate(seq, draft_layer, k, &mut |_tokens, scores| {
                let token = argmax(scores);
                Ok((!is_eos(token)).then_some(token))
            })?;
            stats.rounds += 1;
            stats.drafted += round.drafts.len();
            let base = sequence.len();
            let mut accepted = 0;
            let mut last = None;
            for (i, row) in round.target_scores.into_iter().enumerate() {
                let mut row = row;
                let (token, finish) = emit(&mut row, &mut sequence, &mut ids)?;
                if let Some(finish) = finish {
                    return Ok(finish);
                }
                if round.drafts.get(i) == Some(&token) {
                    accepted += 1;
                } else {
                    last = Some(token);
                    break;
                }
            }
            stats.accepted += accepted;
            // Keep the prompt, earlier tokens and the accepted drafts; the round's own token is pending.
            let token = last.ok_or_else(|| Error::invalid("speculation", "a round ended without its own token"))?;
            decoder.rollback(seq, base + accepted)?;
            decoder.append(seq, token)?;
            if speculation.adaptive {
                Pace::update(&mut pace.speculative, started.elapsed().as_secs_f64() / (accepted + 1) as f64);
                drafts = if accepted == round.drafts.len() { drafts + 1 } else { accepted + 1 };
                drafts = drafts.clamp(1, speculation.max_drafts);
                // A round that kept no draft cost more than the plain step it replaced, whatever the clock says.
                if accepted == 0 || pace.loses() {
                    // Not paying: decode plainly for a while (longer each time), then measure again.
                    off_for = backoff;
                    backoff = (2 * backoff).min(512);
                    pace.speculative = None;
                    drafts = 1;
                } else {
                    backoff = 32;
                }
            }
        }
    })();
    decoder.release(seq).ok();
    let finish = result?;
    let total = start.elapsed().as_secs_f64();
    Ok((
        Generation {
            ids: ids.clone(),
            sequences: vec![ids],
            finish,
            prompt_tokens: prompt.len(),
            prefill_s,
            decode_s: total - prefill_s,
        },
        stats,
    ))
}
