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
use super::strategy::{Decode, FinishReason, Job, JobOutputs, Run};
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
    fn job<'t>(&self, prompt: &[u32], run: Run<'t>, _: &Decoder<'_, B>) -> Result<Box<dyn Job<B> + 't>> {
        if run.text_stops().is_some() {
            return Err(Error::invalid(
                "num_beams",
                "stop strings and brace matching apply to one sequence, not to beams",
            ));
        }
        Ok(Box::new(BeamJob::new(prompt, run.options, self.clone())?))
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
    let mut job = BeamJob::new(prompt, options.clone(), beams.clone())?;
    super::drive(decoder, &mut job, &mut |_| true)?;
    Ok(job.hypotheses)
}

/// A beam search in progress: the running beams, the finished hypotheses, and once done the
/// returned ones.
struct BeamJob {
    prompt: Vec<u32>,
    options: GenerationOptions,
    settings: BeamOptions,
    running: Vec<Beam>,
    finished: Finished,
    hypotheses: Vec<Hypothesis>,
}

impl BeamJob {
    fn new(prompt: &[u32], options: GenerationOptions, settings: BeamOptions) -> Result<Self> {
        settings.validate(false)?;
        let finished = Finished {
            capacity: settings.num_beams,
            length_penalty: settings.length_penalty,
            beams: Vec::new(),
            worst: 1e9,
        };
        Ok(BeamJob {
            prompt: prompt.to_vec(),
            options,
            settings,
            running: Vec::new(),
            finished,
            hypotheses: Vec::new(),
        })
    }

    /// One step of the search from every running beam's scores: the next beams (forks of their
    /// parents), and whether the search is done.
    fn select<B: Backend>(&mut self, decoder: &mut Decoder<'_, B>, outputs: &mut JobOutputs) -> Result<bool> {
        let (options, settings) = (&self.options, &self.settings);
        let num_beams = settings.num_beams;
        let eos = &options.eos_token_ids;
        let keep = 2.max(1 + eos.len()) * num_beams;
        let mut sequence = self.prompt.clone();
        // Candidates over every running beam: (score, beam, token), best first. transformers starts
        // with num_beams copies of the prompt, all but one at -1e9; one prompt sequence is the same.
        let mut candidates: Vec<(f32, usize, u32)> = Vec::with_capacity(self.running.len() * keep);
        for (b, beam) in self.running.iter().enumerate() {
            let mut scores = log_softmax(&outputs.full(beam.seq)?.logits);
            sequence.truncate(self.prompt.len());
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
        let generated = self.running[0].ids.len() + 1;
        let mut next: Vec<(usize, u32, f32)> = Vec::with_capacity(num_beams);
        for (rank, &(score, b, token)) in candidates.iter().enumerate() {
            if eos.contains(&token) {
                if rank >= num_beams {
                    continue;
                }
                // The stored hypothesis is the beam without its EOS (transformers adds eos[0] at the end).
                self.finished.add(self.running[b].ids.clone(), score, generated);
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
        let done = self.finished.is_done(candidates[0].0, generated, options.max_new_tokens, settings.early_stopping);

        // Fork the chosen parents, then let the old beams go: shared prefixes stay shared.
        let mut children = Vec::with_capacity(num_beams);
        for &(b, token, score) in &next {
            let seq = decoder.fork(self.running[b].seq)?;
            let mut ids = self.running[b].ids.clone();
            ids.push(token);
            children.push(Beam { seq, ids, score });
        }
        for beam in std::mem::replace(&mut self.running, children) {
            decoder.release(beam.seq)?;
        }
        Ok(done)
    }

    /// transformers' `finalize`: running beams join the finished ones unless the search was done;
    /// the best `num_return_sequences`, padded with eos[0] as transformers pads them.
    fn finalize(&mut self, done: bool) {
        if !done {
            for beam in &self.running {
                self.finished.add(beam.ids.clone(), beam.score, beam.ids.len());
            }
        }
        let mut ranked = std::mem::take(&mut self.finished.beams);
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        ranked.truncate(self.settings.num_return_sequences);
        // Sequences shorter than the longest returned one (+1, at most the maximum) get eos[0] appended.
        let longest = ranked.iter().map(|(_, ids)| ids.len()).max().unwrap_or(0);
        let width = (longest + 1).min(self.options.max_new_tokens);
        let eos = self.options.eos_token_ids.first().copied();
        self.hypotheses = ranked
            .into_iter()
            .map(|(score, mut ids)| {
                if let (true, Some(eos)) = (ids.len() < width, eos) {
                    ids.push(eos);
                }
                Hypothesis { ids, score }
            })
            .collect();
    }
}

impl<B: Backend> Job<B> for BeamJob {
    fn start(&mut self, decoder: &mut Decoder<'_, B>) -> Result<Option<FinishReason>> {
        if self.options.max_new_tokens == 0 {
            self.hypotheses = vec![Hypothesis { ids: Vec::new(), score: 0.0 }];
            return Ok(Some(FinishReason::MaxNewTokens));
        }
        let first = decoder.add_sequence(&self.prompt)?;
        self.running = vec![Beam { seq: first, ids: Vec::new(), score: 0.0 }];
        Ok(None)
    }

    fn sequences(&self) -> Vec<SeqId> {
        self.running.iter().map(|b| b.seq).collect()
    }

    fn waiting_on(&self) -> Vec<SeqId> {
        self.running.iter().map(|b| b.seq).collect()
    }

    fn needs_scores(&self) -> bool {
        true
    }

    fn width(&self) -> usize {
        self.settings.num_beams
    }

    /// The best hypothesis is handed to the caller once the search ends (the best beam is known
    /// only then).
    fn advance(
        &mut self,
        decoder: &mut Decoder<'_, B>,
        outputs: &mut JobOutputs,
        stream: &mut Vec<u32>,
    ) -> Result<Option<FinishReason>> {
        let done = self.select(decoder, outputs)?;
        if !done && self.running[0].ids.len() < self.options.max_new_tokens {
            for beam in &self.running {
                let token = *beam.ids.last().expect("a child has its new token");
                decoder.append(beam.seq, token)?;
            }
            return Ok(None);
        }
        self.finalize(done);
        let best = self.hypotheses.first().map(|h| h.ids.clone()).unwrap_or_default();
        stream.extend_from_slice(&best);
        Ok(Some(match best.last() {
            Some(last) if self.options.eos_token_ids.contains(last) => FinishReason::Eos,
            _ => FinishReason::MaxNewTokens,
        }))
    }

    fn finish(&mut self, decoder: &mut Decoder<'_, B>) -> Vec<Vec<u32>> {
        for beam in self.running.drain(..) {
            decoder.release(beam.seq).ok();
        }
        self.hypotheses.iter().map(|h| h.ids.clone()).collect()
    }
}
