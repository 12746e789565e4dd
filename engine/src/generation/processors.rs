//! Logits processors with transformers' names, semantics and order of application (as of 4.48's
//! `_get_logits_processor`): repetition penalty, no-repeat n-grams and the minimum of new tokens act
//! on every strategy; temperature, top-k, top-p, min-p and typical-p warp the scores when sampling.
//! Removed tokens get -inf, as transformers' `filter_value`.
//!
//! ```
//! use layerwise::generation::processors::{ProcessorOptions, SamplingOptions};
//!
//! let sequence = [3, 1, 3]; // prompt and generated tokens so far
//! let mut scores = vec![2.0, -1.0, 0.5, 4.0];
//! ProcessorOptions { repetition_penalty: 2.0, ..Default::default() }.apply(&sequence, &mut scores);
//! assert_eq!(scores, [2.0, -2.0, 0.5, 2.0]); // tokens 1 and 3 were seen: divided if positive, multiplied if not
//! SamplingOptions { top_k: 2, ..Default::default() }.warp(&mut scores, 1);
//! assert!(scores[1].is_infinite() && scores[2].is_infinite());
//! ```

use crate::error::{Error, Result};

/// Processors that apply whatever the strategy (greedy, sampling, beams).
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessorOptions {
    /// `RepetitionPenaltyLogitsProcessor`: every token already in the sequence (prompt included) has
    /// its score divided by the penalty when positive, multiplied when negative (1 = off).
    pub repetition_penalty: f32,
    /// `NoRepeatNGramLogitsProcessor`: no n-gram of this size occurs twice in the sequence, prompt
    /// included (0 = off).
    pub no_repeat_ngram_size: usize,
}

impl Default for ProcessorOptions {
    fn default() -> Self {
        ProcessorOptions { repetition_penalty: 1.0, no_repeat_ngram_size: 0 }
    }
}

impl ProcessorOptions {
    /// Checks the options; errors name the field.
    pub fn validate(&self) -> Result<()> {
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(Error::invalid(
                "repetition_penalty",
                format!("{} must be a positive number", self.repetition_penalty),
            ));
        }
        Ok(())
    }

    /// Whether any processor changes scores.
    pub fn is_active(&self) -> bool {
        self.repetition_penalty != 1.0 || self.no_repeat_ngram_size > 0
    }

    /// Applies the processors to `scores` for the sequence `tokens` (prompt and generated so far).
    pub fn apply(&self, tokens: &[u32], scores: &mut [f32]) {
        if self.repetition_penalty != 1.0 {
            repetition_penalty(tokens, scores, self.repetition_penalty);
        }
        if self.no_repeat_ngram_size > 0 {
            no_repeat_ngram(tokens, scores, self.no_repeat_ngram_size);
        }
    }
}

/// `RepetitionPenaltyLogitsProcessor`.
pub fn repetition_penalty(tokens: &[u32], scores: &mut [f32], penalty: f32) {
    // A token seen twice is penalised once: transformers gathers, then scatters the same value.
    let mut seen = vec![false; scores.len()];
    for &t in tokens {
        let Some(s) = scores.get_mut(t as usize) else { continue };
        if !std::mem::replace(&mut seen[t as usize], true) {
            *s = if *s < 0.0 { *s * penalty } else { *s / penalty };
        }
    }
}

/// `NoRepeatNGramLogitsProcessor`: bans every token that would complete an n-gram already present.
pub fn no_repeat_ngram(tokens: &[u32], scores: &mut [f32], n: usize) {
    if n == 0 || tokens.len() + 1 < n {
        return;
    }
    let prefix = &tokens[tokens.len() + 1 - n..];
    for window in tokens.windows(n) {
        if &window[..n - 1] == prefix {
            if let Some(s) = scores.get_mut(window[n - 1] as usize) {
                *s = f32::NEG_INFINITY;
            }
        }
    }
}

/// `MinNewTokensLengthLogitsProcessor`: the EOS tokens cannot be chosen yet.
pub fn suppress(scores: &mut [f32], ids: &[u32]) {
    for &id in ids {
        if let Some(s) = scores.get_mut(id as usize) {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// Sampling warpers (transformers' `do_sample=True`), applied in its order: temperature, top-k,
/// top-p, min-p, typical-p.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingOptions {
    /// Divides the scores before the other warpers (1 = unchanged).
    pub temperature: f32,
    /// Keep only the `top_k` highest scores (0 = off). transformers' default is 50.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the top probability (None = off).
    pub min_p: Option<f32>,
    /// Locally typical sampling: keep the tokens closest to the entropy until this mass (1 = off).
    pub typical_p: f32,
    /// Seed of the random generator: the same seed gives the same tokens.
    pub seed: u64,
}

impl Default for SamplingOptions {
    /// transformers' `GenerationConfig` defaults.
    fn default() -> Self {
        SamplingOptions { temperature: 1.0, top_k: 50, top_p: 1.0, min_p: None, typical_p: 1.0, seed: 0 }
    }
}

impl SamplingOptions {
    /// Checks the options; errors name the field.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(Error::invalid("temperature", format!("{} must be a positive number", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid("top_p", format!("{} is outside (0, 1]", self.top_p)));
        }
        if let Some(min_p) = self.min_p {
            if !(0.0..=1.0).contains(&min_p) {
                return Err(Error::invalid("min_p", format!("{min_p} is outside [0, 1]")));
            }
        }
        if !(self.typical_p > 0.0 && self.typical_p <= 1.0) {
            return Err(Error::invalid("typical_p", format!("{} is outside (0, 1]", self.typical_p)));
        }
        Ok(())
    }

    /// Warps `scores` in place; `min_tokens_to_keep` is 1 for one sequence (transformers keeps more
    /// for beam sampling).
    pub fn warp(&self, scores: &mut [f32], min_tokens_to_keep: usize) {
        if self.temperature != 1.0 {
            scores.iter_mut().for_each(|s| *s /= self.temperature);
        }
        if self.top_k > 0 {
            top_k(scores, self.top_k.max(min_tokens_to_keep));
        }
        if self.top_p < 1.0 {
            top_p(scores, self.top_p, min_tokens_to_keep);
        }
        if let Some(min_p) = self.min_p {
            self::min_p(scores, min_p, min_tokens_to_keep);
        }
        if self.typical_p < 1.0 {
            typical_p(scores, self.typical_p, min_tokens_to_keep);
        }
    }
}

/// `TopKLogitsWarper`: scores below the k-th largest go (ties at the boundary stay).
pub fn top_k(scores: &mut [f32], k: usize) {
    if k == 0 || k >= scores.len() {
        return;
    }
    let mut sorted = scores.to_vec();
    sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    scores.iter_mut().filter(|s| **s < kth).for_each(|s| *s = f32::NEG_INFINITY);
}

/// `TopPLogitsWarper`: ascending sort; the low tail whose cumulative probability is at most
/// `1 - top_p` goes, but the `keep` most likely tokens stay.
pub fn top_p(scores: &mut [f32], top_p: f32, keep: usize) {
    let order = sorted_order(scores, |a, b| scores[a].total_cmp(&scores[b]));
    let probs = softmax(&order.iter().map(|&i| scores[i]).collect::<Vec<_>>());
    let mut cumulative = 0.0f32;
    let protected = order.len().saturating_sub(keep);
    for (rank, (&i, p)) in order.iter().zip(probs).enumerate() {
        cumulative += p;
        if cumulative <= 1.0 - top_p && rank < protected {
            scores[i] = f32::NEG_INFINITY;
        }
    }
}

/// `MinPLogitsWarper`: tokens less likely than `min_p` times the most likely one go; the `keep`
/// highest scores stay.
pub fn min_p(scores: &mut [f32], min_p: f32, keep: usize) {
    let probs = softmax(scores);
    let threshold = min_p * probs.iter().copied().fold(0.0f32, f32::max);
    let order = sorted_order(scores, |a, b| scores[b].total_cmp(&scores[a]));
    for &i in order.iter().skip(keep) {
        if probs[i] < threshold {
            scores[i] = f32::NEG_INFINITY;
        }
    }
}

/// `TypicalLogitsWarper`: tokens sorted by how far their surprisal is from the entropy; those
/// beyond the first that brings the cumulative probability to `mass` go; the first `keep` stay.
pub fn typical_p(scores: &mut [f32], mass: f32, keep: usize) {
    let log_probs = crate::math::log_softmax(scores);
    // The entropy skips tokens already removed (transformers' nansum over 0 * -inf).
    let entropy: f32 = -log_probs.iter().filter(|l| l.is_finite()).map(|&l| l * l.exp()).sum::<f32>();
    let shifted: Vec<f32> = log_probs.iter().map(|&l| (-l - entropy).abs()).collect();
    let order = sorted_order(scores, |a, b| shifted[a].total_cmp(&shifted[b]));
    let probs = softmax(&order.iter().map(|&i| scores[i]).collect::<Vec<_>>());
    let mut cumulative = 0.0f32;
    let mut last = 0;
    for p in &probs {
        cumulative += p;
        if cumulative < mass {
            last += 1;
        }
    }
    let cutoff = shifted[order[last.min(order.len() - 1)]];
    for &i in order.iter().skip(keep) {
        if shifted[i] > cutoff {
            scores[i] = f32::NEG_INFINITY;
        }
    }
}

/// Indices of `scores` in a stable sort by `cmp`.
fn sorted_order(scores: &[f32], cmp: impl Fn(usize, usize) -> std::cmp::Ordering) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| cmp(a, b));
    order
}

pub use crate::math::softmax;
