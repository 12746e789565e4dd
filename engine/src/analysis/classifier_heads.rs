//! Attention heads of a classifier, as Michel et al. (2019) and transformers' bertology example
//! study them: importance from the gradient of the classification loss with respect to a head mask
//! ([`crate::training::bert`]), and the masking search that masks the least important head until
//! the accuracy drops too far; each head's attention entropy, to set beside its importance
//! ([`super::heads::entropy_importance`]).
//!
//! ```
//! use layerwise::analysis::classifier_heads::mask_search;
//! use layerwise::training::bert::ClassifierNetwork;
//!
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/bert/bert-classifier");
//! let loaded = layerwise::encoder::load(dir)?;
//! let weights = layerwise::io::open_weights(&loaded.files.weights)?;
//! let network = ClassifierNetwork::new(loaded.encoder.spec(), &weights)?;
//! let inputs = vec![loaded.encode("i feel so happy", None)?, loaded.encode("i hate rain", None)?];
//! let search = mask_search(&network, &inputs, &[1, 2], 0.05)?;
//! assert_eq!(search.curve[0], (0, 1.0)); // both right with every head
//! # Ok::<(), layerwise::Error>(())
//! ```

use serde::Serialize;

use crate::backend::Backend;
use crate::encoder::{Encoder, EncoderInput, EncoderRequest};
use crate::error::{Error, Result};
use crate::math::{argmax, entropy};
use crate::model::HeadMask;
use crate::training::bert::ClassifierNetwork;

/// What [`mask_search`] found.
#[derive(Clone, Debug, Serialize)]
pub struct MaskSearch {
    /// Accuracy with every head.
    pub base_accuracy: f64,
    /// (heads masked, accuracy rounded to 4 places) after each step, the start included; the last
    /// entry is the step that ended the search when the accuracy fell too far.
    pub curve: Vec<(usize, f64)>,
    /// The last mask whose accuracy stayed within the threshold.
    pub mask: HeadMask,
    /// Heads in the order they were masked (those of `mask`).
    pub order: Vec<(usize, usize)>,
    /// Each head's importance with every head (`[layers][heads]`, normalised per layer).
    pub importance: Vec<Vec<f32>>,
}

/// Each head's attention entropy per token over `inputs` (every query position's entropy summed,
/// divided by the inputs' tokens, as [`super::heads::entropy_per_token`]), `[layers][heads]`.
pub fn attention_entropy<B: Backend>(encoder: &Encoder<B>, inputs: &[EncoderInput]) -> Result<Vec<Vec<f32>>> {
    let spec = encoder.spec();
    let mut sum = vec![vec![0.0f64; spec.num_heads]; spec.num_layers];
    let mut tokens = 0;
    let request = EncoderRequest { attentions: true, ..Default::default() };
    for chunk in inputs.chunks(32) {
        for output in encoder.forward(chunk, &request)? {
            let t = output.tokens;
            tokens += t;
            for (layer, probs) in output.attentions.iter().enumerate() {
                for (head, map) in spec.kept_heads(layer).into_iter().zip(probs.chunks_exact(t * t)) {
                    sum[layer][head] += map.chunks_exact(t).map(entropy).sum::<f64>();
                }
            }
        }
    }
    Ok(sum.iter().map(|row| row.iter().map(|&v| (v / tokens.max(1) as f64) as f32).collect()).collect())
}

/// The fraction of `inputs` whose most probable label (under `mask`) is `labels`' and the
/// importance of each head, from one forward and backward pass.
pub fn accuracy_and_importance(
    network: &ClassifierNetwork,
    inputs: &[EncoderInput],
    labels: &[usize],
    mask: &HeadMask,
) -> Result<(f64, Vec<Vec<f32>>)> {
    let gradient = network.head_mask_gradient(inputs, labels, mask)?;
    let correct =
        gradient.logits.iter().zip(labels).filter(|(logits, &label)| argmax(logits) as usize == label).count();
    Ok((correct as f64 / labels.len() as f64, gradient.importance()))
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// The masking search: start unmasked; repeatedly mask the least important head still unmasked
/// (importance recomputed under the current mask; ties go to the lower layer, then head), then
/// measure the accuracy; stop when it falls below `(1 - threshold)` times the starting accuracy
/// (both rounded to 4 places), or when every head is masked.
pub fn mask_search(
    network: &ClassifierNetwork,
    inputs: &[EncoderInput],
    labels: &[usize],
    threshold: f64,
) -> Result<MaskSearch> {
    if !(0.0..=1.0).contains(&threshold) {
        return Err(Error::invalid("threshold", format!("{threshold} is not a fraction in 0..=1")));
    }
    let (layers, heads) = (network.layers(), network.heads());
    let mut mask = HeadMask::ones(layers, heads);
    let (base, importance) = accuracy_and_importance(network, inputs, labels, &mask)?;
    let base_accuracy = round4(base);
    let floor = base_accuracy * (1.0 - threshold);
    let mut search = MaskSearch {
        base_accuracy,
        curve: vec![(0, base_accuracy)],
        mask: mask.clone(),
        order: Vec::new(),
        importance,
    };
    let mut current = search.importance.clone();
    loop {
        let Some((layer, head)) = (0..layers)
            .flat_map(|l| (0..heads).map(move |h| (l, h)))
            .filter(|&(l, h)| mask.rows()[l][h] != 0.0)
            .min_by(|a, b| current[a.0][a.1].total_cmp(&current[b.0][b.1]).then(a.cmp(b)))
        else {
            return Ok(search);
        };
        mask.set(layer, head, 0.0);
        let (accuracy, importance) = accuracy_and_importance(network, inputs, labels, &mask)?;
        let accuracy = round4(accuracy);
        search.curve.push((mask.masked().len(), accuracy));
        if accuracy < floor {
            return Ok(search);
        }
        search.order.push((layer, head));
        search.mask = mask.clone();
        current = importance;
    }
}
