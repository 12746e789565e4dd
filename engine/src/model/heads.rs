//! The heads that turn a layer's state into scores over the vocabulary: the final norm and the LM
//! head, the exit heads, the conversion matrices, and an exit plan's output (a projection, or the
//! contrast of two). Everything stays on the backend, except a caller's own contrast function, which
//! runs on the host on the two rows it contrasts.

use super::Model;
use crate::backend::Backend;
use crate::error::Result;
use crate::exits::{Contrast, PlanOptions, Projection, Source};

/// A plan's output for some rows: on the backend, or on the host when a caller's contrast function
/// made it.
pub enum Scores<B: Backend> {
    Backend(B::Tensor),
    /// `[rows, vocab]`, row-major.
    Host(Vec<f32>),
}

impl<B: Backend> Scores<B> {
    /// The scores on the host, row-major; an [`Error::NonFinite`](crate::Error::NonFinite) for a
    /// row that [`crate::math::scores_fault`] refuses (the step's finite check).
    pub fn to_host(&self, b: &B, vocab: usize) -> Result<Vec<f32>> {
        let scores = match self {
            Scores::Backend(x) => b.to_host(x)?,
            Scores::Host(v) => v.clone(),
        };
        for (row, r) in scores.chunks_exact(vocab.max(1)).enumerate() {
            if let Some(fault) = crate::math::scores_fault(r) {
                return Err(crate::math::non_finite_row(row, fault));
            }
        }
        Ok(scores)
    }

    /// The best-scoring index of each row (first among ties): only the ids cross to the host. The
    /// finite check as in [`Scores::to_host`].
    pub fn argmax(&self, b: &B, vocab: usize) -> Result<Vec<u32>> {
        match self {
            Scores::Backend(x) => b.argmax_rows(x),
            Scores::Host(v) => crate::math::checked_argmax_rows(v, vocab),
        }
    }
}

impl<B: Backend> Model<B> {
    /// Bytes of weights one decoding step under `plan` reads: the blocks it runs, the final norm and
    /// the heads it projects with (embedding rows are negligible).
    pub fn step_weight_bytes(&self, plan: &PlanOptions) -> Result<usize> {
        let b = &self.backend;
        let (main, lower) = self.plan_sources(plan)?;
        let depth = plan.depth(&self.spec)?;
        let blocks: usize = (0..depth).map(|layer| self.body.block_bytes(b, layer)).sum();
        let head_bytes = |source: Source| match (source, plan.projection) {
            (Source::Original, _) | (Source::Layer(_), Projection::Lens) => b.weight_bytes(&self.lm_head),
            (Source::Layer(layer), Projection::ExitHeads) => b.weight_bytes(&self.exit_heads[&layer]),
            (Source::Layer(layer), Projection::Converted) => {
                b.weight_bytes(&self.lm_head) + self.conversions.get(&layer).map_or(0, |w| b.weight_bytes(w))
            }
        };
        let mut heads = head_bytes(main);
        match (lower, &plan.contrast) {
            // ACD reads only the plausible tokens' rows of the lower head (a few, against a vocabulary
            // of them): count its conversion matrix, if any.
            (Some(Source::Layer(layer)), Contrast::Acd { .. }) if plan.projection == Projection::Converted => {
                heads += self.conversions.get(&layer).map_or(0, |w| b.weight_bytes(w))
            }
            (Some(_), Contrast::Acd { .. }) | (None, _) => {}
            // An upper lens/converted projection and a lower one share the LM head's reads only in
            // cache-sized models; count both.
            (Some(lower), Contrast::Custom(_)) => heads += head_bytes(lower),
        }
        Ok(blocks + self.body.final_norm().bytes(b) + heads)
    }

    /// Validates a plan against this checkpoint; returns its main and (for a contrast) lower source.
    pub(crate) fn plan_sources(&self, plan: &PlanOptions) -> Result<(Source, Option<Source>)> {
        plan.sources(&self.spec, |layer| self.conversions.contains_key(&layer))
    }

    /// The final norm of `state: [t, hidden]` (transformers' last `hidden_states` entry for the top layer).
    pub(crate) fn final_norm(&self, state: &B::Tensor) -> Result<B::Tensor> {
        self.body.final_norm().forward(&self.backend, state)
    }

    /// The original LM head applied to `state` as it is, without the final norm (what DoLa does to
    /// its premature layers).
    pub(crate) fn lm_head_raw(&self, state: &B::Tensor) -> Result<B::Tensor> {
        self.backend.linear(state, &self.lm_head, None)
    }

    /// Logits of the exit head at `layer` from the raw output of that layer (final norm, then the head).
    pub(crate) fn exit_logits(&self, layer: usize, state: &B::Tensor) -> Result<B::Tensor> {
        self.project(Source::Layer(layer), Projection::ExitHeads, state)
    }

    /// Logits of `source` from the raw (un-normed) output `state: [t, hidden]` of its layer.
    pub(crate) fn project(&self, source: Source, projection: Projection, state: &B::Tensor) -> Result<B::Tensor> {
        match self.plain_head(source, projection) {
            Some(head) => self.body.final_norm().then_linear(&self.backend, state, head),
            None => {
                let (features, head) = self.head_input(source, projection, state)?;
                self.backend.linear(&features, head, None)
            }
        }
    }

    /// The head that multiplies the final norm of `source`'s state directly (no conversion matrix
    /// between them), if so: the product can be fused with the norm.
    fn plain_head(&self, source: Source, projection: Projection) -> Option<&B::Weight> {
        match (source, projection) {
            (Source::Original, _) | (Source::Layer(_), Projection::Lens) => Some(&self.lm_head),
            (Source::Layer(layer), Projection::ExitHeads) => self.exit_heads.get(&layer),
            (Source::Layer(layer), Projection::Converted) => {
                (!self.conversions.contains_key(&layer)).then_some(&self.lm_head)
            }
        }
    }

    /// What `source`'s vocabulary head multiplies, and the head: the final norm of the layer's state
    /// (through the conversion matrix for a converted projection).
    fn head_input(&self, source: Source, projection: Projection, state: &B::Tensor) -> Result<(B::Tensor, &B::Weight)> {
        let b = &self.backend;
        let normed = self.body.final_norm().forward(b, state)?;
        Ok(match (source, projection) {
            (Source::Original, _) | (Source::Layer(_), Projection::Lens) => (normed, &self.lm_head),
            (Source::Layer(layer), Projection::ExitHeads) => (normed, &self.exit_heads[&layer]),
            (Source::Layer(layer), Projection::Converted) => match self.conversions.get(&layer) {
                Some(conversion) => (b.linear(&normed, conversion, None)?, &self.lm_head),
                None => (normed, &self.lm_head), // the top layer converts to itself
            },
        })
    }

    /// A plan's output from the raw states of its sources: logits, or contrasted log-probabilities.
    pub(crate) fn plan_output(
        &self,
        plan: &PlanOptions,
        (main, main_state): (Source, &B::Tensor),
        lower: Option<(Source, &B::Tensor)>,
    ) -> Result<Scores<B>> {
        let b = &self.backend;
        let upper = self.project(main, plan.projection, main_state)?;
        let Some((lower, lower_state)) = lower else { return Ok(Scores::Backend(upper)) };
        match &plan.contrast {
            Contrast::Acd { alpha, min_candidates } => {
                let (features, head) = self.head_input(lower, plan.projection, lower_state)?;
                Ok(Scores::Backend(b.contrast_acd(&upper, &features, head, *alpha, *min_candidates)?))
            }
            Contrast::Custom(f) => {
                // The caller's function runs on the host: both rows come back, the result stays there.
                let lower = self.project(lower, plan.projection, lower_state)?;
                let (rows, cols) = b.shape(&upper);
                let (up, low) = (b.to_host(&upper)?, b.to_host(&lower)?);
                let mut out = vec![0.0f32; rows * cols];
                for r in 0..rows {
                    let span = r * cols..(r + 1) * cols;
                    f.contrast(&up[span.clone()], &low[span.clone()], &mut out[span]);
                }
                Ok(Scores::Host(out))
            }
        }
    }
}
