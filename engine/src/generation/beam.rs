//! Beam search with transformers 4.48's semantics (`_beam_search` and `BeamSearchScorer`): scores are
//! cumulative log-probabilities (after the logits processors), `2 * num_beams` candidates per step,
//! finished hypotheses ranked by score / generated_length ^ length_penalty, and the three
//! `early_stopping` rules. Beams are decoder sequences: a step forks the chosen parents, so beams
//! share the cache blocks of their common prefix.
//!
//! ```
//! use layerwise::generation::beam::{beam_search, BeamOptions, EarlyStopping};
//! use layerwise::generation::{GenerationOptions, Strategy};
//! use layerwise::runtime::{Decoder, DecoderOptions};
//!
//! # fn main() -> layerwise::Result<()> {
//! # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/gpt2-sharded");
//! let loaded = layerwise::load(dir)?;
//! let beams = BeamOptions { num_beams: 3, num_return_sequences: 2, early_stopping: EarlyStopping::Never, ..Default::default() };
//! let options = GenerationOptions {
//!     max_new_tokens: 6,
//!     eos_token_ids: vec![46],
//!     strategy: Strategy::Beam(beams.clone()),
//!     ..Default::default()
//! };
//! let cache_tokens = Some(options.cache_tokens(3));
//! let mut decoder = Decoder::new(&loaded.model, DecoderOptions { cache_tokens, ..Default::default() })?;
//! let hypotheses = beam_search(&mut decoder, &[5, 17, 42], &options, &beams)?;
//! assert_eq!(hypotheses.len(), 2);
//! assert!(hypotheses[0].score >= hypotheses[1].score); // best first
//! # Ok(())
//! # }
//! ```

use super::options::GenerationOptions;
pub use super::options::{BeamOptions, EarlyStopping};
use super::processors::suppress;
use super::strategy::{Decode, FinishReason, Outcome, Run};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::math::log_softmax;
use crate::runtime::{Decoder, SeqId};

/// One returned hypothesis.
#[derive(Clone, Debug, PartialEq)]
pub struct Hypothesis {
    /// Generated ids (an ending EOS included, as transformers' output shows it).
    pub ids: Vec<u32>,
    /// Sum of log-probabilities / generated length ^ length_penalty.
    pub score: f32,
}

/// The finished hypotheses of one search (transformers' `BeamHypotheses`).
struct Finished {
    capacity: usize,
    length_penalty: f32,
    beams: Vec<(f32, Vec<u32>)>,
    worst: f32,
}

impl Finished {
    fn add(&mut self, ids: Vec<u32>, sum_logprobs: f32, generated_len: usize) {
        let score = sum_logprobs / (generated_len as f32).powf(self.length_penalty);
        if self.beams.len() < self.capacity || score > self.worst {
            self.beams.push((score, ids));
            if self.beams.len() > self.capacity {
                let mut order: Vec<usize> = (0..self.beams.len()).collect();
                order.sort_by(|&a, &b| self.beams[a].0.total_cmp(&self.beams[b].0));
                self.worst = self.beams[order[1]].0;
                self.beams.remove(order[0]);
            } else {
                self.worst = self.worst.min(score);
            }
        }
    }

    /// `BeamHypotheses.is_done` with lengths counted from the end of the prompt.
    fn is_done(&self, best_sum_logprobs: f32, generated: usize, max_new_tokens: usize, rule: EarlyStopping) -> bool {
        if self.beams.len() < self.capacity {
            return false;
        }
        let attainable = |len: usize| best_sum_logprobs / (len as f32).powf(self.length_penalty);
        match rule {
            EarlyStopping::Always => true,
            EarlyStopping::Heuristic => self.worst >= attainable(generated),
            EarlyStopping::Never if self.length_penalty > 0.0 => self.worst >= attainable(max_new_tokens),
            EarlyStopping::Never => self.worst >= attainable(generated),
        }
    }
}

/// A running beam: its decoder sequence, generated ids and cumulative score.
struct Beam {
    seq: SeqId,
    ids: Vec<u32>,
    score: f32,
}

impl<B: Backend> Decode<B> for BeamOptions {
    /// The best hypothesis is handed to the caller once the search ends (the best beam is known
    /// only then).
    fn decode(&self, decoder: &mut Decoder<'_, B>, prompt: &[u32], run: &mut Run<'_>) -> Result<Outcome> {
        if run.text_stops().is_some() {
            return Err(Error::invalid(
                "num_beams",
                "stop strings and brace matching apply to one sequence, not to beams",
            ));
        }
        let hypotheses = beam_search(decoder, prompt, run.options, self)?;
        let sequences: Vec<Vec<u32>> = hypotheses.into_iter().map(|h| h.ids).collect();
        let best = sequences.first().cloned().unwrap_or_default();
        let mut finish = match best.last() {
            Some(&last) if run.is_eos(last) => FinishReason::Eos,
            _ => FinishReason::MaxNewTokens,
        };
        for &token in &best {
            if !run.emit(token) {
                finish = FinishReason::Stopped;
                break;
            }
        }
        Ok(Outcome { sequences, finish, prefill_s: None })
    }
}

/// Beam search from `prompt` (the processors, limits and EOS ids of `options`); returns
/// `num_return_sequences` hypotheses, best first.
pub fn beam_search<B: Backend>(
    decoder: &mut Decoder<'_, B>,
    prompt: &[u32],
    options: &GenerationOptions,
    beams: &BeamOptions,
) -> Result<Vec<Hypothesis>> {
    beams.validate(false)?;
    let first = decoder.add_sequence(prompt)?;
    let mut running = vec![Beam { seq: first, ids: Vec::new(), score: 0.0 }];
    let result = search(decoder, prompt, options, beams, &mut running);
    for beam in running {
        decoder.release(beam.seq)?;
    }
    result
}

fn search<B: Backend>(
    decoder: &mut Decoder<'_, B>,
    prompt: &[u32],
    options: &GenerationOptions,
    settings: &BeamOptions,
    running: &mut Vec<Beam>,
) -> Result<Vec<Hypothesis>> {
    let num_beams = settings.num_beams;
    let eos = &options.eos_token_ids;
    let keep = 2.max(1 + eos.len()) * num_beams;
    let mut finished =
        Finished { capacity: num_beams, length_penalty: settings.length_penalty, beams: Vec::new(), worst: 1e9 };
    let mut done = false;
    let mut sequence = prompt.to_vec();
    while running[0].ids.len() < options.max_new_tokens {
        let outputs = decoder.step()?;
        // Candidates over every running beam: (score, beam, token), best first. transformers starts
        // with num_beams copies of the prompt, all but one at -1e9; one prompt sequence is the same.
        let mut candidates: Vec<(f32, usize, u32)> = Vec::with_capacity(running.len() * keep);
        for (b, beam) in running.iter().enumerate() {
            let logits = outputs
                .iter()
                .find(|o| o.seq == beam.seq)
                .map(|o| &o.logits)
                .ok_or_else(|| Error::invalid("decoder", "a step returned no scores for a beam"))?;
            let mut scores = log_softmax(logits);
            sequence.truncate(prompt.len());
            sequence.extend_from_slice(&beam.ids);
            options.processors.apply(&sequence, &mut scores);
            if beam.ids.len() < options.min_new_tokens {
                suppress(&mut scores, eos);
            }
            for (token, s) in scores.iter().enumerate() {
                candidates.push((s + beam.score, b, token as u32));
            }
        }
        // torch.topk(sorted=True): highest first; among equal scores the lower index first.
        let by_score =
            |a: &(f32, usize, u32), b: &(f32, usize, u32)| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2)));
        let keep = keep.min(candidates.len());
        if keep < candidates.len() {
            candidates.select_nth_unstable_by(keep - 1, by_score);
            candidates.truncate(keep);
        }
        candidates.sort_by(by_score);

        // BeamSearchScorer.process: EOS candidates among the top num_beams finish a hypothesis; the
        // others fill the next beams.
        let generated = running[0].ids.len() + 1;
        let mut next: Vec<(usize, u32, f32)> = Vec::with_capacity(num_beams);
        for (rank, &(score, b, token)) in candidates.iter().enumerate() {
            if eos.contains(&token) {
                if rank >= num_beams {
                    continue;
                }
                // The stored hypothesis is the beam without its EOS (transformers adds eos[0] at the end).
                finished.add(running[b].ids.clone(), score, generated);
            } else {
                next.push((b, token, score));
            }
            if next.len() == num_beams {
                break;
            }
        }
        if next.len() < num_beams {
            return Err(Error::invalid("num_beams", "fewer candidate tokens than beams (vocabulary too small)"));
        }
        done = finished.is_done(candidates[0].0, generated, options.max_new_tokens, settings.early_stopping);

        // Fork the chosen parents, then let the old beams go: shared prefixes stay shared.
        let mut children = Vec::with_capacity(num_beams);
        for &(b, token, score) in &next {
            let seq = decoder.fork(running[b].seq)?;
            let mut ids = running[b].ids.clone();
            ids.push(token);
            children.push(Beam { seq, ids, score });
        }
        for beam in std::mem::replace(running, children) {
            decoder.release(beam.seq)?;
        }
        if done || running[0].ids.len() >= options.max_new_tokens {
            break;
        }
        for beam in running.iter() {
            let token = *beam.ids.last().expect("a child has its new token");
            decoder.append(beam.seq, token)?;
        }
    }

    // finalize: running beams join the finished ones unless the search was done.
    if !done {
        for beam in running.iter() {
            finished.add(beam.ids.clone(), beam.score, beam.ids.len());
        }
    }
    let mut ranked = finished.beams;
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    ranked.truncate(settings.num_return_sequences);
    // Sequences shorter than the longest returned one (+1, at most the maximum) get eos[0] appended.
    let longest = ranked.iter().map(|(_, ids)| ids.len()).max().unwrap_or(0);
    let width = (longest + 1).min(options.max_new_tokens);
    Ok(ranked
        .into_iter()
        .map(|(score, mut ids)| {
            if ids.len() < width {
                if let Some(&eos) = eos.first() {
                    ids.push(eos);
                }
            }
            Hypothesis { ids, score }
        })
        .collect())
}
