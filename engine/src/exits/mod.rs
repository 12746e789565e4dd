//! Exit plans: which layer's prediction to read, through which projection, and how to contrast two
//! of them (Auto-Contrastive Decoding, Gera et al. 2023). Same meanings as upstream
//! autocontrastive-gen's `MultiExitConfiguration` and `VocabularyProjectionMode`.
//!
//! Owns: the plan types and their validation against a checkpoint. The ACD formula itself is in
//! [`crate::math::acd`]; a plan's output is computed by the model ([`crate::model::Model`]'s heads) on
//! the backend. Imports: `model::config`, `error`.

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::model::config::ModelSpec;

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
                            "min_candidates",
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
