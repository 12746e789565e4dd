//! Greedy decoding and sampling: one sequence at a time, the best or a drawn token at every step.
//! [`one_sequence`] is the loop both (and DoLa) share; they differ in how a step's scores are made
//! and how a token is picked from them.

use std::time::Instant;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use super::options::SampleOptions;
use super::processors::SamplingOptions;
use super::stopping::TextStops;
use super::strategy::{Decode, FinishReason, Outcome, Run};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::math::{argmax, softmax};
use crate::runtime::{Decoder, SeqId, SeqRequest, StepOutput};

/// Greedy decoding: the most likely token at every step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Greedy;

impl<B: Backend> Decode<B> for Greedy {
    fn decode(&self, decoder: &mut Decoder<'_, B>, prompt: &[u32], run: &mut Run<'_>) -> Result<Outcome> {
        let (ids, finish, prefill_s) = one_sequence(decoder, prompt, run, &SeqRequest::default(), &mut Pick::Best)?;
        Ok(Outcome { sequences: vec![ids], finish, prefill_s: Some(prefill_s) })
    }
}

impl<B: Backend> Decode<B> for SampleOptions {
    fn decode(&self, decoder: &mut Decoder<'_, B>, prompt: &[u32], run: &mut Run<'_>) -> Result<Outcome> {
        self.sampling.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(self.sampling.seed);
        let request = SeqRequest::default();
        let mut pick = Pick::Draw { sampling: &self.sampling, rng: &mut rng, scores: None };
        repeated(decoder, prompt, run, &request, &mut pick, self.num_return_sequences)
    }
}

/// `n` sequences one after the other (the first streamed): samples continuing one random stream.
pub(crate) fn repeated<B: Backend>(
    decoder: &mut Decoder<'_, B>,
    prompt: &[u32],
    run: &mut Run<'_>,
    request: &SeqRequest,
    pick: &mut Pick<'_>,
    n: usize,
) -> Result<Outcome> {
    let (ids, finish, prefill_s) = one_sequence(decoder, prompt, run, request, pick)?;
    let mut sequences = vec![ids];
    run.mute();
    for _ in 1..n {
        sequences.push(one_sequence(decoder, prompt, run, request, pick)?.0);
    }
    Ok(Outcome { sequences, finish, prefill_s: Some(prefill_s) })
}

/// How a token is picked from a step's output.
pub(crate) enum Pick<'a> {
    /// The best token of the plan's scores (after the processors).
    Best,
    /// Drawn from the warped scores.
    Draw { sampling: &'a SamplingOptions, rng: &'a mut ChaCha8Rng, scores: Option<fn(&StepOutput) -> Vec<f32>> },
    /// The best token of scores made from the whole output (DoLa).
    BestOf(fn(&StepOutput) -> Vec<f32>),
}

/// Greedy or sampled decoding of one sequence: its ids, why it ended, and the prefill seconds.
pub(crate) fn one_sequence<B: Backend>(
    decoder: &mut Decoder<'_, B>,
    prompt: &[u32],
    run: &mut Run<'_>,
    request: &SeqRequest,
    pick: &mut Pick<'_>,
) -> Result<(Vec<u32>, FinishReason, f64)> {
    let seq = decoder.add_sequence(prompt)?;
    let max_new_tokens = run.options.max_new_tokens;
    let mut ids = Vec::with_capacity(max_new_tokens);
    // The whole sequence, as transformers' processors and stopping criteria see it.
    let mut sequence = prompt.to_vec();
    let mut text_stops = run.text_stops();
    let mut finish = FinishReason::MaxNewTokens;
    let start = Instant::now();
    let mut prefill_s = 0.0;
    let result = (|| {
        decoder.set_request(seq, request.clone())?;
        while ids.len() < max_new_tokens {
            let next = next_token(decoder, seq, run, &sequence, ids.len(), pick)?;
            if ids.is_empty() {
                prefill_s = start.elapsed().as_secs_f64();
            }
            ids.push(next);
            sequence.push(next);
            if let Some(reason) = finished(run, next, &sequence, text_stops.as_mut())? {
                finish = reason;
                break;
            }
            if ids.len() < max_new_tokens {
                decoder.append(seq, next)?;
            }
        }
        Ok::<_, Error>(())
    })();
    decoder.release(seq)?;
    result?;
    Ok((ids, finish, prefill_s))
}

/// Runs a step and picks `seq`'s next token. Other sequences of the decoder may step along.
fn next_token<B: Backend>(
    decoder: &mut Decoder<'_, B>,
    seq: SeqId,
    run: &Run<'_>,
    sequence: &[u32],
    generated: usize,
    pick: &mut Pick<'_>,
) -> Result<u32> {
    let step = decoder.run_step()?;
    let row = step.sequences().iter().position(|&s| s == seq).ok_or_else(missing)?;
    if matches!(pick, Pick::Best) && !run.processes(generated) {
        // Nothing to apply on the host: only the chosen id comes back.
        return Ok(step.argmax()?[row]);
    }
    let output = step.into_outputs()?.swap_remove(row);
    let mut scores = match pick {
        Pick::BestOf(make) | Pick::Draw { scores: Some(make), .. } => make(&output),
        _ => output.logits,
    };
    run.process(sequence, generated, &mut scores);
    Ok(match pick {
        Pick::Draw { sampling, rng, .. } => {
            sampling.warp(&mut scores, 1);
            sample(&scores, rng)
        }
        Pick::Best | Pick::BestOf(_) => argmax(&scores),
    })
}

/// Why the sequence ends after `token`, if it does: the caller, EOS, or a text rule.
pub(crate) fn finished(
    run: &mut Run<'_>,
    token: u32,
    sequence: &[u32],
    text_stops: Option<&mut TextStops<'_>>,
) -> Result<Option<FinishReason>> {
    if !run.emit(token) {
        return Ok(Some(FinishReason::Stopped));
    }
    if run.is_eos(token) {
        return Ok(Some(FinishReason::Eos));
    }
    if let Some(stops) = text_stops {
        if stops.should_stop(sequence)? {
            return Ok(Some(FinishReason::StopText));
        }
    }
    Ok(None)
}

fn missing() -> Error {
    Error::invalid("decoder", "a step returned no scores for the generated sequence")
}

/// Draws an index from softmax(scores).
pub(crate) fn sample(scores: &[f32], rng: &mut ChaCha8Rng) -> u32 {
    let probs = softmax(scores);
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
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
