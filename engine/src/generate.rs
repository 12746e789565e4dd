//! Generation on top of the decoder: greedy and sampled decoding with transformers' semantics for
//! `max_new_tokens`, `min_new_tokens`, EOS, `temperature`, `top_k` and `top_p`.

use std::path::Path;
use std::time::Instant;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::backend::Backend;
use crate::config::ModelSpec;
use crate::decoder::Decoder;
use crate::error::{Error, Result};

/// Sampling settings (transformers' `do_sample=True` with its warpers).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingOptions {
    /// Divides the scores before the other warpers (1 = unchanged).
    pub temperature: f32,
    /// Keep only the `top_k` highest scores (0 = off). transformers' default is 50.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Seed of the random generator: the same seed gives the same tokens.
    pub seed: u64,
}

impl Default for SamplingOptions {
    /// transformers' `GenerationConfig` defaults.
    fn default() -> Self {
        SamplingOptions { temperature: 1.0, top_k: 50, top_p: 1.0, seed: 0 }
    }
}

/// What to generate and when to stop.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationOptions {
    pub max_new_tokens: usize,
    /// EOS is suppressed until this many tokens were generated.
    pub min_new_tokens: usize,
    /// Generation stops after any of these (the EOS token is part of the output, as in transformers).
    pub eos_token_ids: Vec<u32>,
    /// None: greedy.
    pub sampling: Option<SamplingOptions>,
}

impl GenerationOptions {
    /// Defaults for a checkpoint: EOS from its `generation_config.json`, else from config.json.
    pub fn for_checkpoint(spec: &ModelSpec, generation_config: Option<&Path>) -> Result<Self> {
        let mut eos = spec.eos_token_ids.clone();
        if let Some(path) = generation_config {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::bad_file(path, format!("not valid JSON: {e}")))?;
            match json.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => eos = n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
                Some(serde_json::Value::Array(list)) => {
                    eos = list.iter().filter_map(|v| v.as_u64().map(|v| v as u32)).collect()
                }
                _ => {}
            }
        }
        Ok(GenerationOptions { max_new_tokens: 32, min_new_tokens: 0, eos_token_ids: eos, sampling: None })
    }

    /// Checks the options; errors name the option.
    pub fn validate(&self) -> Result<()> {
        if let Some(s) = &self.sampling {
            if !(s.temperature > 0.0 && s.temperature.is_finite()) {
                return Err(Error::invalid("temperature", format!("{} must be a positive number", s.temperature)));
            }
            if !(s.top_p > 0.0 && s.top_p <= 1.0) {
                return Err(Error::invalid("top-p", format!("{} is outside (0, 1]", s.top_p)));
            }
        }
        Ok(())
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Eos,
    MaxNewTokens,
    /// The caller's callback asked to stop.
    Stopped,
}

/// The result of [`generate`].
#[derive(Clone, Debug)]
pub struct Generation {
    /// Generated ids only (the prompt is not repeated).
    pub ids: Vec<u32>,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    /// Seconds of the prompt's forward pass (to the first token's scores).
    pub prefill_s: f64,
    /// Seconds of the remaining steps.
    pub decode_s: f64,
}

/// Generates from `prompt` with `decoder` (whose plan decides the scores), calling `on_token` with
/// each new id as it is chosen; `on_token` returns false to stop early. The sequence is released at
/// the end.
pub fn generate<B: Backend>(
    decoder: &mut Decoder<'_, B>,
    prompt: &[u32],
    options: &GenerationOptions,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generation> {
    options.validate()?;
    let spec = decoder.model().spec();
    if prompt.len() + options.max_new_tokens > spec.max_positions {
        return Err(Error::invalid(
            "max-new-tokens",
            format!(
                "{} prompt tokens + {} new tokens exceed the model's context of {} positions",
                prompt.len(),
                options.max_new_tokens,
                spec.max_positions
            ),
        ));
    }
    let seq = decoder.add_sequence(prompt)?;
    let mut rng = options.sampling.as_ref().map(|s| ChaCha8Rng::seed_from_u64(s.seed));
    let mut ids = Vec::with_capacity(options.max_new_tokens);
    let mut finish = FinishReason::MaxNewTokens;
    let start = Instant::now();
    let mut prefill_s = 0.0;
    let result = (|| {
        while ids.len() < options.max_new_tokens {
            // Other sequences of the decoder may step along; only ours is read.
            let outputs = decoder.step()?;
            let mut scores = outputs
                .into_iter()
                .find(|o| o.seq == seq)
                .map(|o| o.logits)
                .ok_or_else(|| Error::invalid("decoder", "a step returned no scores for the generated sequence"))?;
            if ids.is_empty() {
                prefill_s = start.elapsed().as_secs_f64();
            }
            if ids.len() < options.min_new_tokens {
                suppress(&mut scores, &options.eos_token_ids);
            }
            let next = match (&options.sampling, rng.as_mut()) {
                (Some(sampling), Some(rng)) => {
                    warp(&mut scores, sampling);
                    sample(&scores, rng)
                }
                _ => argmax(&scores),
            };
            ids.push(next);
            if !on_token(next) {
                finish = FinishReason::Stopped;
                break;
            }
            if options.eos_token_ids.contains(&next) {
                finish = FinishReason::Eos;
                break;
            }
            if ids.len() < options.max_new_tokens {
                decoder.append(seq, next)?;
            }
        }
        Ok::<_, Error>(())
    })();
    decoder.release(seq)?;
    result?;
    let total = start.elapsed().as_secs_f64();
    Ok(Generation { ids, finish, prompt_tokens: prompt.len(), prefill_s, decode_s: total - prefill_s })
}

/// The first index of the largest score (torch.argmax's choice among ties).
pub fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best as u32
}

/// `MinNewTokensLengthLogitsProcessor`: EOS cannot be chosen yet.
fn suppress(scores: &mut [f32], ids: &[u32]) {
    for &id in ids {
        if let Some(s) = scores.get_mut(id as usize) {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// transformers' sampling warpers, in its order: temperature, top-k, top-p. Removed tokens get -inf.
pub fn warp(scores: &mut [f32], options: &SamplingOptions) {
    if options.temperature != 1.0 {
        scores.iter_mut().for_each(|s| *s /= options.temperature);
    }
    if options.top_k > 0 && options.top_k < scores.len() {
        // Keep scores >= the k-th largest (ties at the boundary stay, as in transformers).
        let mut sorted = scores.to_vec();
        sorted.select_nth_unstable_by(options.top_k - 1, |a, b| b.total_cmp(a));
        let kth = sorted[options.top_k - 1];
        scores.iter_mut().filter(|s| **s < kth).for_each(|s| *s = f32::NEG_INFINITY);
    }
    if options.top_p < 1.0 {
        // Ascending sort; drop the low tail whose cumulative probability is <= 1 - top_p, but always
        // keep the most likely token.
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
        let sorted: Vec<f32> = order.iter().map(|&i| scores[i]).collect();
        let probs = softmax(&sorted);
        let mut cumulative = 0.0f32;
        let last = order.len() - 1;
        for (rank, (&i, p)) in order.iter().zip(probs).enumerate() {
            cumulative += p;
            if cumulative <= 1.0 - options.top_p && rank != last {
                scores[i] = f32::NEG_INFINITY;
            }
        }
    }
}

/// Draws an index from softmax(scores).
fn sample(scores: &[f32], rng: &mut ChaCha8Rng) -> u32 {
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

/// softmax of a row (a new vector).
pub fn softmax(scores: &[f32]) -> Vec<f32> {
    let mut out = scores.to_vec();
    crate::backend::cpu::softmax_in_place(&mut out);
    out
}
