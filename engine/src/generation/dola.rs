//! DoLa, decoding by contrasting layers (Chuang et al. 2023), as transformers 4.48 ran it: at each
//! step the premature layer whose next-token distribution is farthest (Jensen-Shannon) from the
//! final one is picked among candidate layers, and the final log-probabilities minus the premature
//! ones are the scores, on the tokens within a factor 10 of the top probability. Quirks kept: the
//! premature layers go through the LM head without the final norm, layer 0 is the embeddings, and
//! the candidates skip the first two layers when the head is tied to the embeddings.
//!
//! ```
//! use layerwise::generation::dola::contrast;
//!
//! let final_logits = [3.0, 2.9, -4.0];
//! let premature = vec![vec![3.0, 1.0, -4.0], vec![0.0, 0.0, 0.0]];
//! let (scores, chosen) = contrast(&final_logits, &premature);
//! assert_eq!(chosen, 1); // the layer whose distribution is farthest from the final one
//! assert!(scores[2].is_infinite()); // below a tenth of the top final probability
//! assert!(scores[0] > 0.0 && scores[1] > 0.0); // log p_final - log p_premature on the others
//! ```

pub use super::options::{DolaLayers, DolaOptions};
use super::search::{Pick, ScoreFn, SequenceJob};
use super::strategy::{Decode, Job, Run};
use crate::backend::Backend;
use crate::error::Result;
use crate::math::log_softmax;
use crate::runtime::{Decoder, SeqRequest};

impl<B: Backend> Decode<B> for DolaOptions {
    fn job<'t>(&self, prompt: &[u32], run: Run<'t>, decoder: &Decoder<'_, B>) -> Result<Box<dyn Job<B> + 't>> {
        let request =
            SeqRequest { raw_head_logits: self.layers.candidates(decoder.model().spec())?, ..Default::default() };
        let scores: ScoreFn = |out| contrast(&out.logits, &out.premature).0;
        let pick = match &self.sampling {
            None => Pick::BestOf(scores),
            Some(sampling) => {
                sampling.validate()?;
                Pick::draw(sampling, Some(scores))
            }
        };
        Ok(Box::new(SequenceJob::new(prompt, run, request, pick, self.num_return_sequences)))
    }
}

/// DoLa's scores from the final logits and each candidate layer's logits (same order as
/// `premature`); returns the scores and the index of the chosen candidate.
pub fn contrast(final_logits: &[f32], premature: &[Vec<f32>]) -> (Vec<f32>, usize) {
    let chosen = if premature.len() == 1 {
        0
    } else {
        // Jensen-Shannon divergence to the final distribution, as mean-reduced KL terms.
        let log_final = log_softmax(final_logits);
        let p_final: Vec<f32> = log_final.iter().map(|l| l.exp()).collect();
        let vocab = final_logits.len() as f32;
        let divergences: Vec<f32> = premature
            .iter()
            .map(|logits| {
                let log_layer = log_softmax(logits);
                let (mut kl1, mut kl2) = (0.0f32, 0.0f32);
                for ((&lf, &pf), &ll) in log_final.iter().zip(&p_final).zip(&log_layer) {
                    let avg = 0.5 * (pf + ll.exp());
                    if avg > 0.0 {
                        kl1 += avg * (avg.ln() - lf);
                        kl2 += avg * (avg.ln() - ll);
                    }
                }
                0.5 * (kl1 / vocab + kl2 / vocab)
            })
            .collect();
        let mut best = 0;
        for (i, &d) in divergences.iter().enumerate() {
            if d > divergences[best] {
                best = i;
            }
        }
        best
    };
    (relative_top_contrast(final_logits, &premature[chosen]), chosen)
}

/// transformers' `_relative_top_filter` (relative_top 0.1) and the difference of the two
/// log-probabilities: tokens below a tenth of the top final probability get -inf.
fn relative_top_contrast(final_logits: &[f32], base_logits: &[f32]) -> Vec<f32> {
    let final_lp = log_softmax(final_logits);
    let base_lp = log_softmax(base_logits);
    let max = final_lp.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let threshold = max + 0.1f64.ln() as f32;
    final_lp.iter().zip(&base_lp).map(|(&f, &b)| if f < threshold { f32::NEG_INFINITY } else { f - b }).collect()
}
