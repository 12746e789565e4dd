//! BERT's classification loss and its gradient with respect to a head mask: transformers'
//! `head_mask` as a differentiable input (each head's context scaled by its factor), the quantity
//! Michel et al. (2019) turn into head importance. A forward with tapes over the host's f32 copy of
//! the weights, with the ops of [`super::ops`], and the backward from the loss down to the first
//! block (no parameter gradients: nothing here trains).
//!
//! The inference encoder (`model/bert.rs`) is the reference for the forward: a test checks both give
//! the same logits; the gradient is checked against finite differences here and against PyTorch's
//! autograd in `tests/`.

use super::head_mask::HeadMaskGradient;
use super::ops::{self, AttentionShape, NormKind};
use crate::encoder::EncoderInput;
use crate::error::{Error, Result};
use crate::io::weights::Weights;
use crate::model::bert::{layer_norm_names, prefix};
use crate::model::config::{Activation, Details, ModelSpec};
use crate::model::HeadMask;

/// `y = x·wᵀ + b`, `w: [n_out, n_in]`.
struct Lin {
    w: Vec<f32>,
    b: Vec<f32>,
    n_in: usize,
    n_out: usize,
}

impl Lin {
    fn load(w: &Weights, name: &str, (n_out, n_in): (usize, usize)) -> Result<Self> {
        Ok(Lin {
            w: w.get_shaped(&format!("{name}.weight"), &[n_out, n_in])?.data().to_f32_vec(),
            b: w.get_shaped(&format!("{name}.bias"), &[n_out])?.data().to_f32_vec(),
            n_in,
            n_out,
        })
    }

    fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut y = vec![0.0; rows * self.n_out];
        ops::linear_forward(&mut y, x, &self.w, Some(&self.b), (rows, self.n_in, self.n_out));
        y
    }

    /// `dx += dy·w`.
    fn backward(&self, dy: &[f32], x: &[f32], rows: usize, dx: &mut [f32]) {
        ops::linear_backward(dy, x, &self.w, (rows, self.n_in, self.n_out), Some(dx), None, None);
    }
}

struct Ln {
    w: Vec<f32>,
    b: Vec<f32>,
}

impl Ln {
    fn load(w: &Weights, name: &str, d: usize) -> Result<Self> {
        let (weight, bias) = layer_norm_names(w, name);
        Ok(Ln {
            w: w.get_shaped(&weight, &[d])?.data().to_f32_vec(),
            b: w.get_shaped(&bias, &[d])?.data().to_f32_vec(),
        })
    }
}

struct Layer {
    query: Lin,
    key: Lin,
    value: Lin,
    attention_output: Lin,
    attention_norm: Ln,
    intermediate: Lin,
    output: Lin,
    output_norm: Ln,
}

/// What a block's backward needs from its forward.
struct Tape {
    x: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    /// `P·V` per head, before the mask.
    context: Vec<f32>,
    /// The context after the mask: the attention output's input.
    masked: Vec<f32>,
    /// `x + attention_output(masked)`, the first norm's input, and its statistics.
    z1: Vec<f32>,
    stats1: (Vec<f32>, Vec<f32>),
    y1: Vec<f32>,
    /// The intermediate product before and after the activation.
    pre: Vec<f32>,
    act: Vec<f32>,
    z2: Vec<f32>,
    stats2: (Vec<f32>, Vec<f32>),
}

/// A BERT classifier on the host in f32, for gradients.
pub struct ClassifierNetwork {
    spec: ModelSpec,
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    embedding_norm: Ln,
    layers: Vec<Layer>,
    pooler: Lin,
    classifier: Lin,
}

impl ClassifierNetwork {
    /// Copies a `BertForSequenceClassification` checkpoint's weights to the host as f32.
    pub fn new(spec: &ModelSpec, w: &Weights) -> Result<Self> {
        let Details::Bert { type_vocab_size, .. } = spec.details else {
            return Err(Error::invalid("model", "head-mask gradients of classifiers need a bert checkpoint"));
        };
        if !spec.pruned_heads.is_empty() {
            return Err(Error::invalid("model", "head-mask gradients need a checkpoint without pruned_heads"));
        }
        if !w.contains("classifier.weight") {
            return Err(Error::invalid("model", "the checkpoint has no classification head (classifier.weight)"));
        }
        let p = prefix(w);
        let (d, ff) = (spec.hidden_size, spec.intermediate_size);
        let labels = w.get("classifier.weight")?.shape().first().copied().unwrap_or(0);
        let table = |name: &str, rows: usize| {
            Ok::<_, Error>(w.get_shaped(&format!("{p}embeddings.{name}"), &[rows, d])?.data().to_f32_vec())
        };
        let layers = (0..spec.num_layers)
            .map(|i| {
                let l = format!("{p}encoder.layer.{i}");
                Ok(Layer {
                    query: Lin::load(w, &format!("{l}.attention.self.query"), (d, d))?,
                    key: Lin::load(w, &format!("{l}.attention.self.key"), (d, d))?,
                    value: Lin::load(w, &format!("{l}.attention.self.value"), (d, d))?,
                    attention_output: Lin::load(w, &format!("{l}.attention.output.dense"), (d, d))?,
                    attention_norm: Ln::load(w, &format!("{l}.attention.output.LayerNorm"), d)?,
                    intermediate: Lin::load(w, &format!("{l}.intermediate.dense"), (ff, d))?,
                    output: Lin::load(w, &format!("{l}.output.dense"), (d, ff))?,
                    output_norm: Ln::load(w, &format!("{l}.output.LayerNorm"), d)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(ClassifierNetwork {
            spec: spec.clone(),
            word: table("word_embeddings.weight", spec.vocab_size)?,
            position: table("position_embeddings.weight", spec.max_positions)?,
            token_type: table("token_type_embeddings.weight", type_vocab_size)?,
            embedding_norm: Ln::load(w, &format!("{p}embeddings.LayerNorm"), d)?,
            layers,
            pooler: Lin::load(w, &format!("{p}pooler.dense"), (d, d))?,
            classifier: Lin::load(w, "classifier", (labels, d))?,
        })
    }

    /// Encoder layers.
    pub fn layers(&self) -> usize {
        self.spec.num_layers
    }

    /// Attention heads per layer.
    pub fn heads(&self) -> usize {
        self.spec.num_heads
    }

    fn shape(&self, time: usize) -> AttentionShape {
        let s = &self.spec;
        AttentionShape {
            batch: 1,
            time,
            heads: s.num_heads,
            kv_heads: s.num_heads,
            head_dim: s.head_dim,
            scale: 1.0 / (s.head_dim as f32).sqrt(),
            window: None,
            causal: false,
        }
    }

    fn norm(&self, x: &[f32], n: &Ln) -> (Vec<f32>, (Vec<f32>, Vec<f32>)) {
        let rows = x.len() / self.spec.hidden_size;
        let (mut y, mut mean, mut rstd) = (vec![0.0; x.len()], vec![0.0; rows], vec![0.0; rows]);
        ops::norm_forward(NormKind::Layer, &mut y, &mut mean, &mut rstd, x, &n.w, Some(&n.b), self.spec.norm_eps);
        (y, (mean, rstd))
    }

    /// The mean cross-entropy of `inputs` against `labels` under `mask`, and its gradient with
    /// respect to the mask (transformers' loss of `BertForSequenceClassification(..., labels,
    /// head_mask)` and `head_mask.grad`).
    pub fn head_mask_gradient(
        &self,
        inputs: &[EncoderInput],
        labels: &[usize],
        mask: &HeadMask,
    ) -> Result<HeadMaskGradient> {
        let factors = mask.factors(&self.spec)?;
        if inputs.len() != labels.len() || inputs.is_empty() {
            return Err(Error::invalid("labels", format!("{} labels for {} inputs", labels.len(), inputs.len())));
        }
        let classes = self.classifier.n_out;
        if let Some(bad) = labels.iter().find(|&&l| l >= classes) {
            return Err(Error::invalid("labels", format!("label {bad} is outside 0..{classes}")));
        }
        let mut out = HeadMaskGradient {
            loss: 0.0,
            gradient: vec![vec![0.0; self.spec.num_heads]; self.spec.num_layers],
            tokens: 0,
            logits: Vec::new(),
        };
        let weight = 1.0 / inputs.len() as f32;
        for (input, &label) in inputs.iter().zip(labels) {
            self.check(input)?;
            let (loss, logits) = self.one(input, label, &factors, weight, &mut out.gradient);
            out.loss += loss / inputs.len() as f64;
            out.tokens += input.ids.len();
            out.logits.push(logits);
        }
        Ok(out)
    }

    fn check(&self, input: &EncoderInput) -> Result<()> {
        let Details::Bert { type_vocab_size, .. } = self.spec.details else { unreachable!("checked at construction") };
        let ok = !input.ids.is_empty()
            && input.ids.len() == input.types.len()
            && input.ids.len() <= self.spec.max_positions
            && input.ids.iter().all(|&i| (i as usize) < self.spec.vocab_size)
            && input.types.iter().all(|&t| (t as usize) < type_vocab_size);
        if ok {
            Ok(())
        } else {
            Err(Error::invalid(
                "input",
                "ids and token types must be non-empty, equally long and within the model's sizes",
            ))
        }
    }

    /// One input: its loss and logits; adds `weight ·` d loss / d mask to `gradient`.
    fn one(
        &self,
        input: &EncoderInput,
        label: usize,
        factors: &[Vec<f32>],
        weight: f32,
        gradient: &mut [Vec<f32>],
    ) -> (f64, Vec<f32>) {
        let (t, d, hd) = (input.ids.len(), self.spec.hidden_size, self.spec.head_dim);
        let shape = self.shape(t);
        let act: Activation = self.spec.activation;

        // Forward: embeddings, then each post-norm block, keeping its tape.
        let mut x = vec![0.0f32; t * d];
        for (i, row) in x.chunks_exact_mut(d).enumerate() {
            let parts = [
                &self.word[input.ids[i] as usize * d..][..d],
                &self.position[i * d..][..d],
                &self.token_type[input.types[i] as usize * d..][..d],
            ];
            for (c, v) in row.iter_mut().enumerate() {
                *v = parts[0][c] + parts[1][c] + parts[2][c];
            }
        }
        let mut x = self.norm(&x, &self.embedding_norm).0;
        let mut tapes = Vec::with_capacity(self.layers.len());
        for (l, layer) in self.layers.iter().enumerate() {
            let (q, k, v) = (layer.query.forward(&x, t), layer.key.forward(&x, t), layer.value.forward(&x, t));
            let (mut context, mut probs) = (vec![0.0; t * d], vec![0.0; shape.heads * t * t]);
            ops::attention_forward(&mut context, &mut probs, &q, &k, &v, shape);
            let mut masked = context.clone();
            for row in masked.chunks_exact_mut(d) {
                for (h, head) in row.chunks_exact_mut(hd).enumerate() {
                    head.iter_mut().for_each(|v| *v *= factors[l][h]);
                }
            }
            let mut z1 = layer.attention_output.forward(&masked, t);
            z1.iter_mut().zip(&x).for_each(|(z, x)| *z += x);
            let (y1, stats1) = self.norm(&z1, &layer.attention_norm);
            let pre = layer.intermediate.forward(&y1, t);
            let mut activated = vec![0.0; pre.len()];
            ops::activation_forward(act, &mut activated, &pre);
            let mut z2 = layer.output.forward(&activated, t);
            z2.iter_mut().zip(&y1).for_each(|(z, y)| *z += y);
            let (next, stats2) = self.norm(&z2, &layer.output_norm);
            tapes.push(Tape { x, q, k, v, probs, context, masked, z1, stats1, y1, pre, act: activated, z2, stats2 });
            x = next;
        }
        // The pooler reads the first token; the classifier the pooled state.
        let mut pooled = self.pooler.forward(&x[..d], 1);
        pooled.iter_mut().for_each(|v| *v = v.tanh());
        let logits = self.classifier.forward(&pooled, 1);
        let mut dlogits = logits.clone();
        let (loss, _) = ops::cross_entropy(&mut dlogits, &[Some(label as u32)], weight);

        // Backward, to the first block's input.
        let mut dpooled = vec![0.0; d];
        self.classifier.backward(&dlogits, &pooled, 1, &mut dpooled);
        dpooled.iter_mut().zip(&pooled).for_each(|(g, p)| *g *= 1.0 - p * p);
        let mut dx = vec![0.0f32; t * d];
        self.pooler.backward(&dpooled, &x[..d], 1, &mut dx[..d]);
        for (l, (layer, tape)) in self.layers.iter().zip(&tapes).enumerate().rev() {
            // x_next = LN2(z2), z2 = y1 + output(act(pre)), pre = intermediate(y1)
            let mut dz2 = vec![0.0; t * d];
            let (mean, rstd) = &tape.stats2;
            ops::norm_backward(
                NormKind::Layer,
                &dx,
                &tape.z2,
                mean,
                rstd,
                &layer.output_norm.w,
                Some(&mut dz2),
                None,
                None,
            );
            let mut dact = vec![0.0; tape.act.len()];
            layer.output.backward(&dz2, &tape.act, t, &mut dact);
            let mut dpre = vec![0.0; tape.pre.len()];
            ops::activation_backward(act, &mut dpre, &dact, &tape.pre);
            let mut dy1 = dz2;
            layer.intermediate.backward(&dpre, &tape.y1, t, &mut dy1);
            // y1 = LN1(z1), z1 = x + attention_output(masked), masked = mask ∘ context
            let mut dz1 = vec![0.0; t * d];
            let (mean, rstd) = &tape.stats1;
            ops::norm_backward(
                NormKind::Layer,
                &dy1,
                &tape.z1,
                mean,
                rstd,
                &layer.attention_norm.w,
                Some(&mut dz1),
                None,
                None,
            );
            let mut dmasked = vec![0.0; t * d];
            layer.attention_output.backward(&dz1, &tape.masked, t, &mut dmasked);
            let mut dcontext = dmasked;
            for (grow, crow) in dcontext.chunks_exact_mut(d).zip(tape.context.chunks_exact(d)) {
                for (h, (g, c)) in grow.chunks_exact_mut(hd).zip(crow.chunks_exact(hd)).enumerate() {
                    // d mask_h = Σ d(masked) · context; d context = mask_h · d(masked)
                    gradient[l][h] += g.iter().zip(c).map(|(g, c)| g * c).sum::<f32>();
                    g.iter_mut().for_each(|g| *g *= factors[l][h]);
                }
            }
            let (mut dq, mut dk, mut dv) = (vec![0.0; t * d], vec![0.0; t * d], vec![0.0; t * d]);
            ops::attention_backward(
                &mut dq,
                &mut dk,
                &mut dv,
                &dcontext,
                &tape.probs,
                &tape.q,
                &tape.k,
                &tape.v,
                shape,
            );
            if l == 0 {
                break;
            }
            let mut dx_in = dz1;
            layer.query.backward(&dq, &tape.x, t, &mut dx_in);
            layer.key.backward(&dk, &tape.x, t, &mut dx_in);
            layer.value.backward(&dv, &tape.x, t, &mut dx_in);
            dx = dx_in;
        }
        (loss, logits)
    }
}
