//! Self-speculative decoding: an exit head drafts, the plan verifies (see [`Decoder::speculate`]),
//! and the output is what plain decoding under the plan gives.
//!
//! - Greedy: each verified row is processed and picked as a plain step would be, drafts are kept
//!   while they equal the pick, and the first pick that differs (or the row after the last draft)
//!   is the round's own token: the plan's greedy output exactly.
//! - Sampling: drafts are drawn from the exit head's processed and warped distribution, and each is
//!   kept or replaced by speculative sampling's rule ([`acceptance`]), so the tokens are distributed
//!   exactly as plain sampling's (the random stream, and so the tokens of one seed, differ).
//!
//! Adaptive ([`adaptation`]): drafts per round follow the acceptance, the draft exit follows the
//! measured pace (with `draft_layer: None`), and speculation turns itself off while it is slower than
//! plain decoding, so where the exits rarely agree with the plan, or the model is too small to be
//! bound by memory, decoding stays almost plain.
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

use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::processors::SamplingOptions;
use super::search::draw;
use super::strategy::{FinishReason, Run};
use super::{Generation, GenerationOptions, Strategy};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::exits::{ExitPlan, PlanOptions, Projection};
use crate::io::tokenizer::Tokenizer;
use crate::math::{argmax, softmax};
use crate::runtime::{Decoder, SeqId};

mod acceptance;
mod adaptation;

use acceptance::{verify_draft, Verdict};
use adaptation::Adaptation;

/// How to speculate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpeculationOptions {
    /// The exit that drafts; `None`: chosen and adapted while generating, starting from the plan's
    /// lower layer for a contrast with exit heads, else the exit nearest half the plan's depth.
    pub draft_layer: Option<usize>,
    /// Most drafts per round.
    pub max_drafts: usize,
    /// Adapt the drafts per round (and the exit, when not given) and turn speculation off when it
    /// does not pay; else always draft `max_drafts` from the first exit.
    pub adaptive: bool,
}

impl Default for SpeculationOptions {
    fn default() -> Self {
        SpeculationOptions { draft_layer: None, max_drafts: 6, adaptive: true }
    }
}

/// What the rounds drafted from one exit did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerStats {
    pub layer: usize,
    pub rounds: usize,
    pub drafted: usize,
    pub accepted: usize,
}

impl LayerStats {
    /// Fraction of this exit's drafts the plan accepted.
    pub fn acceptance_rate(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }
}

/// What speculation did during one generation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpeculationStats {
    /// The exit that drafted the most rounds (the first candidate when none ran).
    pub draft_layer: usize,
    /// Speculation rounds, and plain steps (the prompt's, and those taken while speculation was off).
    pub rounds: usize,
    pub plain_steps: usize,
    /// Tokens drafted, and drafts accepted.
    pub drafted: usize,
    pub accepted: usize,
    /// Per draft exit that ran, in layer order.
    pub layers: Vec<LayerStats>,
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

/// The exits speculation may draft from, the first one first: the one `options` names, or (when it
/// names none) every exit below the plan, nearest the default first.
fn candidate_layers<B: Backend>(decoder: &Decoder<'_, B>, options: &SpeculationOptions) -> Result<Vec<usize>> {
    let first = choose_draft_layer(decoder, options)?;
    if options.draft_layer.is_some() || !options.adaptive {
        return Ok(vec![first]);
    }
    let depth = decoder.depth();
    let mut layers: Vec<usize> =
        decoder.model().spec().exit_layers.iter().copied().filter(|&l| l > 0 && l < depth).collect();
    layers.sort_by_key(|&l| (l != first, l.abs_diff(first), l));
    Ok(layers)
}

/// How tokens are chosen: the plan's best, or drawn (drafts from the exit's distribution, verified
/// by the acceptance rule).
enum Chooser {
    Best,
    Draw { sampling: SamplingOptions, rng: Box<ChaCha8Rng> },
}

impl Chooser {
    fn new(options: &GenerationOptions) -> Result<Self> {
        match &options.strategy {
            Strategy::Greedy => Ok(Chooser::Best),
            Strategy::Sample(sample) => {
                sample.sampling.validate()?;
                if sample.num_return_sequences != 1 {
                    return Err(Error::invalid(
                        "num_return_sequences",
                        "speculation generates one sequence at a time; generate the others with other seeds",
                    ));
                }
                let rng = Box::new(ChaCha8Rng::seed_from_u64(sample.sampling.seed));
                Ok(Chooser::Draw { sampling: sample.sampling.clone(), rng })
            }
            _ => Err(Error::invalid(
                "speculation",
                "runs greedy decoding and sampling only (no beams, contrastive search or DoLa)",
            )),
        }
    }

    /// A draft from the exit head's processed scores, and the distribution it was drawn from (empty
    /// for greedy drafts).
    fn draft(&mut self, scores: &mut [f32]) -> (u32, Vec<f32>) {
        match self {
            Chooser::Best => (argmax(scores), Vec::new()),
            Chooser::Draw { sampling, rng } => {
                sampling.warp(scores, 1);
                let q = softmax(scores);
                (draw(&q, rng), q)
            }
        }
    }

    /// The token at a verified row (the plan's processed scores), given the draft made there, if any.
    fn verify(&mut self, scores: &mut [f32], draft: Option<(u32, &[f32])>) -> u32 {
        match self {
            Chooser::Best => argmax(scores),
            Chooser::Draw { sampling, rng } => {
                sampling.warp(scores, 1);
                let p = softmax(scores);
                match draft {
                    Some((x, q)) => match verify_draft(&p, q, x, rng) {
                        Verdict::Accept => x,
                        Verdict::Replace(token) => token,
                    },
                    None => draw(&p, rng),
                }
            }
        }
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

/// Generation from `prompt` under the decoder's plan, with exit heads drafting: greedy decoding
/// gives the same tokens as [`super::generate`] (processors, EOS, `min_new_tokens` and text stops
/// included), sampling tokens from the same distribution. Returns the generation and what
/// speculation did.
pub fn generate_speculative<B: Backend>(
    decoder: &mut Decoder<'_, B>,
    prompt: &[u32],
    options: &GenerationOptions,
    speculation: &SpeculationOptions,
    tokenizer: Option<&Tokenizer>,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<(Generation, SpeculationStats)> {
    let mut chooser = Chooser::new(options)?;
    if speculation.max_drafts == 0 {
        return Err(Error::invalid("draft tokens", "must be at least 1"));
    }
    options.check(prompt.len(), decoder.model().spec())?;
    let candidates = candidate_layers(decoder, speculation)?;
    let mut adaptation = Adaptation::new(&candidates, speculation.max_drafts, speculation.adaptive);
    let run = Run::new(options.clone(), tokenizer)?;
    let mut text_stops = run.text_stops();
    let start = Instant::now();
    let mut plain_steps = 0;
    let seq = decoder.add_sequence(prompt)?;
    let mut sequence = prompt.to_vec();
    let mut ids: Vec<u32> = Vec::new();
    let mut prefill_s = 0.0;

    let result = (|| -> Result<FinishReason> {
        if options.max_new_tokens == 0 {
            return Ok(FinishReason::MaxNewTokens);
        }
        // Takes the round's next token, as a plain step does, and says whether generation ends with it.
        let mut emit = |token: u32, sequence: &mut Vec<u32>, ids: &mut Vec<u32>| -> Result<Option<FinishReason>> {
            ids.push(token);
            sequence.push(token);
            let mut finish = run.finished(token, sequence, ids.len(), text_stops.as_mut())?;
            if !on_token(token) && finish.is_none() {
                finish = Some(FinishReason::Stopped);
            }
            Ok(finish)
        };
        // The prompt's step is plain, and so is every step while speculation is off.
        let mut prefilled = false;
        loop {
            let remaining = options.max_new_tokens - ids.len();
            let round = adaptation.next_round().filter(|_| prefilled);
            let Some((layer, k)) =
                round.map(|(layer, drafts)| (layer, drafts.min(remaining.saturating_sub(1)))).filter(|&(_, k)| k > 0)
            else {
                let started = Instant::now();
                let mut scores = plain_step(decoder, seq)?;
                if prefilled {
                    adaptation.plain_step(started.elapsed().as_secs_f64());
                } else {
                    prefill_s = start.elapsed().as_secs_f64();
                    prefilled = true;
                }
                plain_steps += 1;
                run.process(&sequence, ids.len(), &mut scores);
                let token = chooser.verify(&mut scores, None);
                if let Some(finish) = emit(token, &mut sequence, &mut ids)? {
                    return Ok(finish);
                }
                decoder.append(seq, token)?;
                continue;
            };
            // Draft from the exit head's processed scores; an end-of-sequence draft is the last.
            let started = Instant::now();
            let mut drafted = sequence.clone();
            let mut distributions: Vec<Vec<f32>> = Vec::new();
            let mut ended = false;
            let round = decoder.speculate(seq, layer, k, &mut |_tokens, scores| {
                if ended {
                    return Ok(None);
                }
                let mut scores = scores.to_vec();
                run.process(&drafted, drafted.len() - prompt.len(), &mut scores);
                let (token, q) = chooser.draft(&mut scores);
                ended = run.is_eos(token);
                drafted.push(token);
                distributions.push(q);
                Ok(Some(token))
            })?;
            let base = sequence.len();
            let (mut accepted, mut own, mut finish) = (0, None, None);
            for (i, mut row) in round.target_scores.into_iter().enumerate() {
                run.process(&sequence, ids.len(), &mut row);
                let draft = round.drafts.get(i).map(|&x| (x, distributions[i].as_slice()));
                let token = chooser.verify(&mut row, draft);
                finish = emit(token, &mut sequence, &mut ids)?;
                let kept = round.drafts.get(i) == Some(&token);
                if kept {
                    accepted += 1;
                } else {
                    own = Some(token);
                }
                if finish.is_some() || !kept {
                    break;
                }
            }
            adaptation.round(round.drafts.len(), accepted, started.elapsed().as_secs_f64());
            if let Some(finish) = finish {
                return Ok(finish);
            }
            // Keep the prompt, earlier tokens and the accepted drafts; the round's own token is pending.
            let token = own.ok_or_else(|| Error::invalid("speculation", "a round ended without its own token"))?;
            decoder.rollback(seq, base + accepted)?;
            decoder.append(seq, token)?;
        }
    })();
    decoder.release(seq).ok();
    let finish = result?;
    let total = start.elapsed().as_secs_f64();
    let layers = adaptation.stats();
    let stats = SpeculationStats {
        draft_layer: layers
            .iter()
            .max_by_key(|l| (l.rounds, std::cmp::Reverse(l.layer)))
            .map_or(candidates[0], |l| l.layer),
        rounds: layers.iter().map(|l| l.rounds).sum(),
        plain_steps,
        drafted: layers.iter().map(|l| l.drafted).sum(),
        accepted: layers.iter().map(|l| l.accepted).sum(),
        layers,
    };
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
