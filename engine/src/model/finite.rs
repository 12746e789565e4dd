//! Where a non-finite value first appears. A decoding step checks its scores on the values it
//! already reduces (`Backend::argmax_rows`, or the rows it downloads); when a row fails, the decoder
//! runs that sequence again as one prompt with a probe that reads every point of every block in
//! forward order, then the plan's heads, and names the first place NaN or an infinity shows up.
//!
//! Owns: the search ([`Model::locate_non_finite`]) and its probe. Imports: `backend`, `exits`,
//! `model` (the forward runner, the heads, point names).

use std::collections::BTreeMap;

use super::probes::{HeadMask, Probe, Site};
use super::{exit_head_name, Model, Point};
use crate::backend::Backend;
use crate::error::Result;
use crate::exits::{Projection, Source};

/// What is wrong with `values`, if anything: the first NaN, +inf or -inf.
fn first_non_finite(values: &[f32]) -> Option<&'static str> {
    values.iter().find(|v| !v.is_finite()).map(|&v| match v {
        v if v.is_nan() => "NaN",
        v if v > 0.0 => "+inf",
        _ => "-inf",
    })
}

/// Checks every point it is shown until one holds a non-finite value, and keeps the block outputs
/// at the depths the plan's heads read.
struct FirstNonFinite<'a, B: Backend> {
    backend: &'a B,
    /// Depths (0 = the embeddings) whose states the heads need.
    keep: Vec<usize>,
    states: BTreeMap<usize, B::Tensor>,
    found: Option<(Point, &'static str)>,
}

impl<B: Backend> FirstNonFinite<'_, B> {
    fn check(&mut self, point: Point, x: &B::Tensor) -> Result<()> {
        if self.found.is_none() {
            if let Some(fault) = first_non_finite(&self.backend.to_host(x)?) {
                self.found = Some((point, fault));
            }
        }
        Ok(())
    }

    fn keep(&mut self, depth: usize, x: &B::Tensor) -> Result<()> {
        if self.keep.contains(&depth) {
            self.states.insert(depth, self.backend.copy(x)?);
        }
        Ok(())
    }
}

impl<B: Backend> Probe<B> for FirstNonFinite<'_, B> {
    fn embeddings(&mut self, x: &B::Tensor) -> Result<()> {
        self.check(Point::Embeddings, x)?;
        self.keep(0, x)
    }

    fn watches(&self, _block: usize, _site: Site) -> bool {
        true
    }

    fn see(&mut self, block: usize, site: Site, x: &B::Tensor) -> Result<()> {
        self.check(Point::Block { block, site }, x)?;
        if site == Site::Output {
            self.keep(block + 1, x)?;
        }
        Ok(())
    }
}

impl<B: Backend> Model<B> {
    /// Where a non-finite value first appears when `ids` run as one prompt under a plan reading
    /// `sources` through `projection`: a point of the forward pass (the embeddings, or a block's
    /// norm, attention, MLP or output, in forward order), else the head whose logits hold it. A
    /// sentence for the error of a step whose scores failed the finite check.
    pub(crate) fn locate_non_finite(
        &self,
        ids: &[u32],
        (main, lower): (Source, Option<Source>),
        projection: Projection,
        head_mask: Option<&HeadMask>,
    ) -> Result<String> {
        let n = self.spec.num_layers;
        let sources: Vec<Source> = std::iter::once(main).chain(lower).collect();
        let depth = sources.iter().map(|s| s.depth(n)).max().unwrap_or(0);
        let mut watch = FirstNonFinite {
            backend: &self.backend,
            keep: sources.iter().map(|s| s.depth(n)).collect(),
            states: BTreeMap::new(),
            found: None,
        };
        self.run_prompt(ids, depth, head_mask, &mut watch)?;
        if let Some((point, fault)) = watch.found {
            let name = self.point_name(point);
            return Ok(format!("{fault} first appears at `{name}` ({}): check the weights it uses", describe(point)));
        }
        for source in sources {
            let logits = self.project(source, projection, &watch.states[&source.depth(n)])?;
            if let Some(fault) = first_non_finite(&self.backend.to_host(&logits)?) {
                return Ok(format!(
                    "every block's values are finite; {fault} first appears in the logits of {}: check its weights",
                    self.head_description(source, projection)
                ));
            }
        }
        Ok("running the sequence again as one prompt gives finite values everywhere (the fault depends on the \
            step's batch or cache)"
            .into())
    }

    /// The head `source` is read through, by its checkpoint name.
    fn head_description(&self, source: Source, projection: Projection) -> String {
        match (source, projection) {
            (Source::Original, _) | (Source::Layer(_), Projection::Lens) => "the LM head (and final norm)".into(),
            (Source::Layer(layer), Projection::ExitHeads) => format!("the exit head `{}`", exit_head_name(layer)),
            (Source::Layer(layer), Projection::Converted) => {
                format!("layer {layer}'s conversion matrix and the LM head")
            }
        }
    }
}

fn describe(point: Point) -> String {
    match point {
        Point::Embeddings => "the input embeddings".into(),
        Point::FinalNorm => "the final norm".into(),
        Point::Block { block, site } => {
            let what = match site {
                Site::Norm1 => "first norm",
                Site::Attention => "attention output",
                Site::ResidMid => "residual stream after attention",
                Site::Norm2 => "second norm",
                Site::Mlp => "MLP output",
                Site::Output => "output",
            };
            format!("block {block}'s {what}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::first_non_finite;

    #[test]
    fn the_first_non_finite_value_is_named() {
        assert_eq!(first_non_finite(&[1.0, 2.0]), None);
        assert_eq!(first_non_finite(&[1.0, f32::NEG_INFINITY, f32::NAN]), Some("-inf"));
        assert_eq!(first_non_finite(&[f32::NAN, f32::INFINITY]), Some("NaN"));
        assert_eq!(first_non_finite(&[0.0, f32::INFINITY]), Some("+inf"));
    }
}
