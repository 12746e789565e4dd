//! Exit plans: which layer's prediction to read, through which projection, and how to contrast two
//! of them (Auto-Contrastive Decoding, Gera et al. 2023). Same meanings as upstream
//! autocontrastive-gen's `MultiExitConfiguration` and `VocabularyProjectionMode`.

use std::fmt;
use std::sync::Arc;

use crate::config::ModelSpec;
use crate::error::{Error, Result};

/// The upper side of a contrast: a layer, or the model's original LM head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upper {
    Original,
    Layer(usize),
}

/// What a forward step outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ExitPlan {
    /// The model's own LM head (upstream `use_original_head=True`).
    #[default]
    Original,
    /// The prediction at layer L (upstream `output_layer_index`).
    Exit(usize),
    /// ACD between an upper and a lower exit (upstream `contrast_layer_indices`); the output is the
    /// contrasted log-probabilities.
    Contrast { upper: Upper, lower: usize },
}

/// How a layer's state is projected to the vocabulary (upstream `VocabularyProjectionMode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Projection {
    /// The checkpoint's exit head for that layer (`LAYER_SPECIFIC_PROJECTION`, the default).
    #[default]
    ExitHeads,
    /// The model's own final norm and LM head applied to the layer (`SHARED_PROJECTION_DIRECT`): the
    /// logit lens; works on any checkpoint and any layer.
    Lens,
    /// The conversion matrix `name_to_conv_matrix.{L}_to_{N}` (hidden -> hidden) applied to the normed
    /// layer-L state, then the original head (`SHARED_PROJECTION_CAST_OUTPUTS`).
    Converted,
}

/// A contrast of two logit rows into one row of log-probabilities.
pub trait ContrastFn: Send + Sync {
    /// `upper, lower: [vocab]` logits -> `out: [vocab]`.
    fn contrast(&self, upper: &[f32], lower: &[f32], out: &mut [f32]);
}

impl<F: Fn(&[f32], &[f32], &mut [f32]) + Send + Sync> ContrastFn for F {
    fn contrast(&self, upper: &[f32], lower: &[f32], out: &mut [f32]) {
        self(upper, lower, out)
    }
}

/// How a contrast plan combines its two exits.
#[derive(Clone)]
pub enum Contrast {
    /// Upstream's `calculate_contrasted_logits(upper, lower, minimum_candidates, alpha)`.
    Acd { alpha: f32, min_candidates: usize },
    /// A function of the caller's.
    Custom(Arc<dyn ContrastFn>),
}

impl Default for Contrast {
    /// Upstream's defaults: `alpha = 0.1`, `minimum_candidates = 1`.
    fn default() -> Self {
        Contrast::Acd { alpha: 0.1, min_candidates: 1 }
    }
}

impl fmt::Debug for Contrast {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Contrast::Acd { alpha, min_candidates } => {
                write!(f, "Acd {{ alpha: {alpha}, min_candidates: {min_candidates} }}")
            }
            Contrast::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// A plan with its projection and contrast: everything that decides a step's output.
#[derive(Clone, Debug, Default)]
pub struct PlanOptions {
    pub plan: ExitPlan,
    pub projection: Projection,
    pub contrast: Contrast,
}

/// Where a side of a plan reads from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    Original,
    Layer(usize),
}

impl Source {
    /// Blocks that must run before this source can be read.
    pub(crate) fn depth(self, num_layers: usize) -> usize {
        match self {
            Source::Original => num_layers,
            Source::Layer(l) => l,
        }
    }
}

impl PlanOptions {
    /// Checks the plan against the checkpoint (as upstream does: exits must exist) and returns the
    /// sources it reads: `(main, Some(lower))` for a contrast.
    pub(crate) fn sources(
        &self,
        spec: &ModelSpec,
        has_conversion: impl Fn(usize) -> bool,
    ) -> Result<(Source, Option<Source>)> {
        let check_layer = |layer: usize, flag: &str| -> Result<Source> {
            let n = spec.num_layers;
            if layer == 0 || layer > n {
                return Err(Error::invalid(flag, format!("layer {layer} is outside 1..={n}")));
            }
            match self.projection {
                Projection::ExitHeads if !spec.exit_layers.contains(&layer) => Err(Error::invalid(
                    flag,
                    format!("no exit head at layer {layer}: {} (use the lens projection to read any layer through the original head)", spec.describe_exits()),
                )),
                Projection::Converted if layer != n && !has_conversion(layer) => Err(Error::invalid(
                    flag,
                    format!("no conversion matrix name_to_conv_matrix.{layer}_to_{n} in the checkpoint"),
                )),
                _ => Ok(Source::Layer(layer)),
            }
        };
        match self.plan {
            ExitPlan::Original => Ok((Source::Original, None)),
            ExitPlan::Exit(layer) => Ok((check_layer(layer, "exit")?, None)),
            ExitPlan::Contrast { upper, lower } => {
                let upper = match upper {
                    Upper::Original => Source::Original,
                    Upper::Layer(l) => check_layer(l, "contrast (upper layer)")?,
                };
                let lower = check_layer(lower, "contrast (lower layer)")?;
                if let Contrast::Acd { alpha, min_candidates } = self.contrast {
                    if !(0.0..=1.0).contains(&alpha) || alpha.is_nan() {
                        return Err(Error::invalid("alpha", format!("{alpha} is outside [0, 1]")));
                    }
                    if min_candidates == 0 || min_candidates > spec.vocab_size {
                        return Err(Error::invalid(
                            "min-candidates",
                            format!("{min_candidates} is outside 1..={}", spec.vocab_size),
                        ));
                    }
                }
                Ok((upper, Some(lower)))
            }
        }
    }

    /// Blocks this plan needs: nothing above its highest source runs.
    pub fn depth(&self, spec: &ModelSpec) -> Result<usize> {
        let (main, lower) = self.sources(spec, |_| true)?;
        let n = spec.num_layers;
        Ok(main.depth(n).max(lower.map_or(0, |l| l.depth(n))))
    }
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

/// log(softmax(x)), computed stably.
pub fn log_softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = x.iter().map(|v| (v - max).exp()).sum();
    let log_sum = sum.ln() + max;
    x.iter().map(|v| v - log_sum).collect()
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
