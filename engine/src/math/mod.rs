//! Host-side numerics shared by strategies, analysis and the backends: softmax and its logarithm,
//! argmax with torch's tie rule, the activations, upstream autocontrastive-gen's ACD formula, entropy
//! and Pearson's correlation.
//! Written once here so that every user computes them the same way.
//!
//! Owns: plain functions on slices. Imports: nothing of the engine's.

/// Numerically stable softmax of a row, in place.
pub fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// softmax of a row (a new vector).
pub fn softmax(scores: &[f32]) -> Vec<f32> {
    let mut out = scores.to_vec();
    softmax_in_place(&mut out);
    out
}

/// log(softmax(x)), computed stably.
pub fn log_softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = x.iter().map(|v| (v - max).exp()).sum();
    let log_sum = sum.ln() + max;
    x.iter().map(|v| v - log_sum).collect()
}

/// `log Σ exp(x)` in f64, computed stably.
pub fn log_normaliser(logits: &[f32]) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    max + logits.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln()
}

/// What makes a row of scores (logits or log-probabilities) unusable, if anything: a NaN, a +inf,
/// or no value above -inf (-inf itself is a legal score: a token a contrast or a processor rules
/// out). The finite check of every decoding step.
pub fn scores_fault(scores: &[f32]) -> Option<&'static str> {
    let mut any_above_neg_inf = false;
    for &s in scores {
        if s.is_nan() {
            return Some("NaN");
        }
        if s == f32::INFINITY {
            return Some("+inf");
        }
        any_above_neg_inf |= s > f32::NEG_INFINITY;
    }
    (!any_above_neg_inf).then_some("no value above -inf")
}

/// [`argmax`] of each row of `[rows, cols]` scores, an [`Error::NonFinite`](crate::Error) for the
/// first row [`scores_fault`] refuses.
pub fn checked_argmax_rows(scores: &[f32], cols: usize) -> crate::Result<Vec<u32>> {
    scores
        .chunks_exact(cols.max(1))
        .enumerate()
        .map(|(row, r)| match scores_fault(r) {
            Some(fault) => Err(non_finite_row(row, fault)),
            None => Ok(argmax(r)),
        })
        .collect()
}

/// The error for row `row` of a step's scores holding `fault` (see [`scores_fault`]).
pub fn non_finite_row(row: usize, fault: &str) -> crate::Error {
    crate::Error::NonFinite { row, what: format!("row {row} of the scores holds {fault}") }
}

/// Entropy (nats) of a probability row, `-Σ p ln p` with `0 ln 0 = 0`, accumulated in f64.
pub fn entropy(probs: &[f32]) -> f64 {
    -probs.iter().filter(|&&p| p > 0.0).map(|&p| p as f64 * (p as f64).ln()).sum::<f64>()
}

/// Pearson's correlation coefficient of paired samples; None when there are fewer than two, or
/// either side is constant.
pub fn pearson(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() || a.len() < 2 {
        return None;
    }
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    let (ma, mb) = (mean(a), mean(b));
    let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        let (dx, dy) = (x - ma, y - mb);
        ab += dx * dy;
        aa += dx * dx;
        bb += dy * dy;
    }
    (aa > 0.0 && bb > 0.0).then(|| ab / (aa.sqrt() * bb.sqrt()))
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

/// GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (transformers' `NewGELUActivation`).
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
}

/// GELU, exact: x * Phi(x).
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// SiLU: x * sigmoid(x).
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Auto-contrastive decoding of one row, exactly upstream's `calculate_contrasted_logits`:
/// softmax both rows; the threshold is min(alpha * max p_upper, the `min_candidates`-th largest
/// p_upper); tokens at or above it get softmax(log p_upper - log p_lower) over those tokens, scaled to
/// the probability mass they had under p_upper; the others keep p_upper; the output is the log.
pub fn acd(upper: &[f32], lower: &[f32], alpha: f32, min_candidates: usize, out: &mut [f32]) {
    acd_with(upper, alpha, min_candidates, out, |tokens, logits| {
        for (logit, &token) in logits.iter_mut().zip(tokens) {
            *logit = lower[token as usize];
        }
    });
}

/// [`acd`] with the lower row's logits computed on demand: `lower_logits(tokens, out)` fills the
/// lower logits of the plausible tokens only. The lower row's normaliser shifts every plausible
/// score alike and cancels in their softmax, so no other lower logit is ever needed: a backend reads
/// only the plausible rows of the lower head.
pub fn acd_with(
    upper: &[f32],
    alpha: f32,
    min_candidates: usize,
    out: &mut [f32],
    lower_logits: impl FnOnce(&[u32], &mut [f32]),
) {
    let max = upper.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let norm_upper = max + upper.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
    let max_p = (max - norm_upper).exp();
    let kth = if min_candidates <= 1 {
        max_p
    } else {
        let mut sorted: Vec<f32> = upper.iter().map(|v| (v - norm_upper).exp()).collect();
        let k = min_candidates.min(sorted.len()) - 1;
        sorted.select_nth_unstable_by(k, |a, b| b.total_cmp(a));
        sorted[k]
    };
    let threshold = (max_p * alpha).min(kth);

    // Every token starts with log p_upper; the plausible ones are collected for the contrast.
    let mut plausible = Vec::new();
    let mut mass = 0.0f32;
    for (i, (o, &logit)) in out.iter_mut().zip(upper).enumerate() {
        *o = logit - norm_upper;
        let p = o.exp();
        if p >= threshold {
            plausible.push(i as u32);
            mass += p;
        }
    }
    let mut scores = vec![0.0f32; plausible.len()];
    lower_logits(&plausible, &mut scores);
    // Contrast scores log p_upper - lower logit (the lower normaliser cancels below).
    let mut max_score = f32::NEG_INFINITY;
    for (score, &token) in scores.iter_mut().zip(&plausible) {
        *score = out[token as usize] - *score;
        max_score = max_score.max(*score);
    }
    let denom: f32 = scores.iter().map(|&s| (s - max_score).exp()).sum();
    // Plausible tokens share the mass by softmax of their scores.
    let log_share = mass.ln() - denom.ln() - max_score;
    for (score, &token) in scores.iter().zip(&plausible) {
        out[token as usize] = score + log_share;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acd_keeps_implausible_tokens_and_redistributes_the_plausible_mass() {
        // upper strongly prefers token 0, then 1; lower prefers token 0 even more.
        let upper = [3.0f32, 2.5, -2.0, -3.0];
        let lower = [5.0f32, 1.0, -2.0, -3.0];
        let mut out = [0.0f32; 4];
        acd(&upper, &lower, 0.1, 1, &mut out);
        let p_up: Vec<f32> = log_softmax(&upper).iter().map(|l| l.exp()).collect();
        let p: Vec<f32> = out.iter().map(|l| l.exp()).collect();
        // Tokens 2 and 3 fall below 0.1 * max p_upper and keep their upper probability.
        assert!((p[2] - p_up[2]).abs() < 1e-7 && (p[3] - p_up[3]).abs() < 1e-7);
        // The plausible mass is kept, and the contrast moves it to token 1.
        assert!(((p[0] + p[1]) - (p_up[0] + p_up[1])).abs() < 1e-6);
        assert!(p[1] > p[0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn acd_asks_only_for_the_plausible_lower_logits_and_ignores_their_normaliser() {
        let upper = [3.0f32, 2.5, -2.0, -3.0, 2.9];
        let lower = [5.0f32, 1.0, -2.0, -3.0, 0.5];
        let mut full = [0.0f32; 5];
        acd(&upper, &lower, 0.1, 1, &mut full);
        let mut asked = Vec::new();
        let mut sparse = [0.0f32; 5];
        acd_with(&upper, 0.1, 1, &mut sparse, |tokens, logits| {
            asked.extend_from_slice(tokens);
            // Shifted lower logits: the same log-probabilities.
            for (logit, &t) in logits.iter_mut().zip(tokens) {
                *logit = lower[t as usize] + 7.0;
            }
        });
        assert_eq!(asked, [0, 1, 4]);
        for (a, b) in full.iter().zip(&sparse) {
            assert!((a - b).abs() < 1e-5, "{full:?} vs {sparse:?}");
        }
    }
}
