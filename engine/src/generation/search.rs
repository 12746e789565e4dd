//! Greedy decoding and sampling: one sequence at a time, the best or a drawn token at every step.
//! [`SequenceJob`] is the job both (and DoLa) share; they differ in how a step's scores are made
//! and how a token is picked from them.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use super::options::SampleOptions;
use super::processors::SamplingOptions;
use super::stopping::TextStops;
use super::strategy::{Decode, FinishReason, Job, JobOutputs, Run};
use crate::backend::Backend;
use crate::error::Result;
use crate::math::{argmax, softmax};
use crate::runtime::{Decoder, SeqId, SeqRequest, StepOutput};

/// Greedy decoding: the most likely token at every step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Greedy;

impl<B: Backend> Decode<B> for Greedy {
    fn job<'t>(&self, prompt: &[u32], run: Run<'t>, _: &Decoder<'_, B>) -> Result<Box<dyn Job<B> + 't>> {
        Ok(Box::new(SequenceJob::new(prompt, run, SeqRequest::default(), Pick::Best, 1)))
    }
}

impl<B: Backend> Decode<B> for SampleOptions {
    fn job<'t>(&self, prompt: &[u32], run: Run<'t>, _: &Decoder<'_, B>) -> Result<Box<dyn Job<B> + 't>> {
        self.sampling.validate()?;
        let pick = Pick::draw(&self.sampling, None);
        Ok(Box::new(SequenceJob::new(prompt, run, SeqRequest::default(), pick, self.num_return_sequences)))
    }
}

/// Scores made from a step's whole output (DoLa's contrast).
pub(crate) type ScoreFn = fn(&StepOutput) -> Vec<f32>;

/// How a token is picked from a step's output.
pub(crate) enum Pick {
    /// The best token of the plan's scores (after the processors).
    Best,
    /// Drawn from the warped scores (made by `scores` when given).
    Draw { sampling: SamplingOptions, rng: Box<ChaCha8Rng>, scores: Option<ScoreFn> },
    /// The best token of scores made from the whole output (DoLa).
    BestOf(ScoreFn),
}

impl Pick {
    /// Draws seeded with the options' seed.
    pub(crate) fn draw(sampling: &SamplingOptions, scores: Option<ScoreFn>) -> Self {
        Pick::Draw { sampling: sampling.clone(), rng: Box::new(ChaCha8Rng::seed_from_u64(sampling.seed)), scores }
    }
}

/// Greedy or sampled decoding of `repeats` sequences one after the other (the first streamed):
/// samples continue one random stream.
pub(crate) struct SequenceJob<'t> {
    run: Run<'t>,
    prompt: Vec<u32>,
    request: SeqRequest,
    pick: Pick,
    repeats: usize,
    /// Sequences finished, and why the first ended.
    done: Vec<Vec<u32>>,
    first_finish: Option<FinishReason>,
    /// The sequence being generated: its decoder sequence, new ids, and the whole sequence as
    /// transformers' processors and stopping criteria see it.
    seq: Option<SeqId>,
    ids: Vec<u32>,
    sequence: Vec<u32>,
    text_stops: Option<TextStops<'t>>,
}

impl<'t> SequenceJob<'t> {
    pub(crate) fn new(prompt: &[u32], run: Run<'t>, request: SeqRequest, pick: Pick, repeats: usize) -> Self {
        let text_stops = run.text_stops();
        SequenceJob {
            run,
            prompt: prompt.to_vec(),
            request,
            pick,
            repeats: repeats.max(1),
            done: Vec::new(),
            first_finish: None,
            seq: None,
            ids: Vec::new(),
            sequence: prompt.to_vec(),
            text_stops,
        }
    }

    /// Starts the next sequence from the prompt.
    fn begin<B: Backend>(&mut self, decoder: &mut Decoder<'_, B>) -> Result<()> {
        let seq = decoder.add_sequence(&self.prompt)?;
        self.seq = Some(seq);
        self.ids.clear();
        self.sequence = self.prompt.clone();
        self.text_stops = self.run.text_stops();
        decoder.set_request(seq, self.request.clone())
    }

    fn picks_where_scores_are(&self) -> bool {
        matches!(self.pick, Pick::Best) && !self.run.processes(self.ids.len())
    }
}

impl<B: Backend> Job<B> for SequenceJob<'_> {
    fn start(&mut self, decoder: &mut Decoder<'_, B>) -> Result<Option<FinishReason>> {
        if self.run.options.max_new_tokens == 0 {
            self.done = vec![Vec::new(); self.repeats];
            return Ok(Some(FinishReason::MaxNewTokens));
        }
        self.begin(decoder)?;
        Ok(None)
    }

    fn sequences(&self) -> Vec<SeqId> {
        self.seq.into_iter().collect()
    }

    fn waiting_on(&self) -> Vec<SeqId> {
        self.seq.into_iter().collect()
    }

    fn needs_scores(&self) -> bool {
        !self.picks_where_scores_are()
    }

    fn width(&self) -> usize {
        1
    }

    fn advance(
        &mut self,
        decoder: &mut Decoder<'_, B>,
        outputs: &mut JobOutputs,
        stream: &mut Vec<u32>,
    ) -> Result<Option<FinishReason>> {
        let Some(seq) = self.seq else { return Ok(self.first_finish) };
        let next = if self.picks_where_scores_are() {
            // Nothing to apply on the host: only the chosen id came back.
            outputs.best(seq)?
        } else {
            let output = outputs.full(seq)?;
            let mut scores = match &self.pick {
                Pick::BestOf(make) | Pick::Draw { scores: Some(make), .. } => make(&output),
                _ => output.logits,
            };
            self.run.process(&self.sequence, self.ids.len(), &mut scores);
            match &mut self.pick {
                Pick::Draw { sampling, rng, .. } => {
                    sampling.warp(&mut scores, 1);
                    sample(&scores, rng)
                }
                Pick::Best | Pick::BestOf(_) => argmax(&scores),
            }
        };
        self.ids.push(next);
        self.sequence.push(next);
        if self.done.is_empty() {
            stream.push(next);
        }
        let Some(reason) = self.run.finished(next, &self.sequence, self.ids.len(), self.text_stops.as_mut())? else {
            decoder.append(seq, next)?;
            return Ok(None);
        };
        decoder.release(seq)?;
        self.seq = None;
        self.done.push(std::mem::take(&mut self.ids));
        self.first_finish.get_or_insert(reason);
        if self.done.len() < self.repeats {
            self.begin(decoder)?;
            return Ok(None);
        }
        Ok(self.first_finish)
    }

    fn finish(&mut self, decoder: &mut Decoder<'_, B>) -> Vec<Vec<u32>> {
        if let Some(seq) = self.seq.take() {
            decoder.release(seq).ok();
            self.done.push(std::mem::take(&mut self.ids));
        }
        std::mem::take(&mut self.done)
    }
}

/// Draws an index from softmax(scores).
pub(crate) fn sample(scores: &[f32], rng: &mut ChaCha8Rng) -> u32 {
    draw(&softmax(scores), rng)
}

/// A uniform number in [0, 1) with 53 random bits.
pub(crate) fn uniform(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Draws an index from `probs` (summing to 1; zeros are never drawn).
pub(crate) fn draw(probs: &[f32], rng: &mut ChaCha8Rng) -> u32 {
    let u = uniform(rng);
    let mut cumulative = 0.0f64;
    let mut fallback = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            fallback = i;
            cumulative += p as f64;
            if u < cumulative {
                return i as u32;
            }
        }
    }
    fallback as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_follow_the_warped_distribution() {
        // Pearson's chi-square over many seeded draws from a top-p-and-min-p-filtered distribution:
        // removed tokens are never drawn, the kept ones in proportion.
        let logits: Vec<f32> = (0..12).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.4).collect();
        let options = SamplingOptions { top_k: 0, top_p: 0.9, min_p: Some(0.05), ..Default::default() };
        let mut scores = logits.clone();
        options.warp(&mut scores, 1);
        let probs = softmax(&scores);
        let kept = probs.iter().filter(|&&p| p > 0.0).count();
        assert!(kept > 3 && kept < logits.len(), "the filters keep some tokens and drop others");
        let draws = 40_000;
        let mut counts = vec![0usize; logits.len()];
        let mut rng = ChaCha8Rng::seed_from_u64(1234);
        for _ in 0..draws {
            counts[sample(&scores, &mut rng) as usize] += 1;
        }
        let mut chi2 = 0.0f64;
        for (&c, &p) in counts.iter().zip(&probs) {
            if p == 0.0 {
                assert_eq!(c, 0, "a removed token was drawn");
                continue;
            }
            let expected = draws as f64 * p as f64;
            chi2 += (c as f64 - expected).powi(2) / expected;
        }
        // Critical value of chi-square at p = 0.001 for up to 11 degrees of freedom.
        assert!(chi2 < 31.26, "chi-square {chi2} over {} degrees of freedom", kept - 1);
    }
}
