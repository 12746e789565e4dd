//! The gradient of a loss with respect to transformers' `head_mask`, and head importance from it as
//! Michel et al. (2019) define it: [`HeadMaskGradient`], computed by [`super::bert`] for classifiers
//! and [`super::network`] for language models.

/// The mean cross-entropy of a batch (a classifier's, or a language model's next-token loss) and its gradient with respect to the head mask.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadMaskGradient {
    pub loss: f64,
    /// `[layers][heads]`: d loss / d mask.
    pub gradient: Vec<Vec<f32>>,
    /// Real tokens of the batch (every input's whole length, as transformers' `attention_mask`
    /// counts them).
    pub tokens: usize,
    /// A classifier's logits of each input `[labels]` (under the mask); empty for language models.
    pub logits: Vec<Vec<f32>>,
}

impl HeadMaskGradient {
    /// Head importance as Michel et al. (2019) define it (transformers' bertology example):
    /// `|d loss / d mask|` divided by the batch's tokens, then each layer divided by its L2 norm
    /// (+1e-20).
    pub fn importance(&self) -> Vec<Vec<f32>> {
        self.gradient
            .iter()
            .map(|layer| {
                let raw: Vec<f32> = layer.iter().map(|g| g.abs() / self.tokens as f32).collect();
                let norm = raw.iter().map(|v| v * v).sum::<f32>().sqrt() + 1e-20;
                raw.iter().map(|v| v / norm).collect()
            })
            .collect()
    }
}
