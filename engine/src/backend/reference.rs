//! The reference backend: every op as plain, obviously correct Rust, one function per op, shapes in
//! the comments, sums in f64, no threads, no vector instructions. It defines what each op computes:
//! the [`super::conformance`] suite holds every other backend to it. Select it with
//! `--device reference` or [`crate::load_on`]; it is slow, and meant to be.

use super::q8::Q8Matrix;
use super::{AttentionParams, Backend, Layout, Lookup, Matrix, StepLayout, WeightFormat};
use crate::error::{Error, Result};
use crate::io::weights::HostTensor;
use crate::math;
use crate::model::config::Activation;

/// The reference backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reference {
    /// Compute with weight matrices rounded to this dtype, or quantised to 8-bit blocks and
    /// dequantised (None: as stored), as the CPU backend's option of the same name.
    pub weights: Option<WeightFormat>,
}

/// A weight: the checkpoint tensor (rounded to the compute dtype) and its logical `[out, in]` shape.
#[derive(Debug)]
pub struct RefWeight {
    tensor: HostTensor,
    layout: Layout,
    out_features: usize,
    in_features: usize,
}

impl RefWeight {
    /// Element `(o, i)` of the logical `[out, in]` matrix, from all of its values in storage order.
    fn at(&self, values: &[f32], o: usize, i: usize) -> f32 {
        match self.layout {
            Layout::OutIn => values[o * self.in_features + i],
            Layout::InOut => values[i * self.out_features + o],
        }
    }

    fn values(&self) -> Vec<f32> {
        self.tensor.data().to_f32_vec()
    }
}

/// The cache: keys and values `[layer][slot][width]`.
#[derive(Debug)]
pub struct RefKv {
    keys: Vec<f32>,
    values: Vec<f32>,
    layers: usize,
    slots: usize,
    block_size: usize,
    width: usize,
}

impl RefKv {
    fn at(&self, layer: usize, slot: usize) -> usize {
        (layer * self.slots + slot) * self.width
    }
}

fn check(condition: bool, op: &str, why: impl FnOnce() -> String) -> Result<()> {
    if condition {
        Ok(())
    } else {
        Err(Error::invalid(format!("backend op {op}"), why()))
    }
}

impl Backend for Reference {
    type Tensor = Matrix;
    type Weight = RefWeight;
    type KvStore = RefKv;
    type Step = StepLayout;

    fn name(&self) -> &'static str {
        "reference"
    }

    fn weight(&self, tensor: &HostTensor, layout: Layout) -> Result<RefWeight> {
        let (out_features, in_features) = super::logical_shape(tensor, layout)?;
        let (tensor, layout) = match self.weights {
            Some(WeightFormat::Float(dtype)) if in_features > 1 && dtype != tensor.dtype() => {
                (tensor.converted(dtype), layout)
            }
            // The dequantised 8-bit weights, [out, in] whatever the stored layout.
            Some(WeightFormat::Q8) if in_features > 1 => {
                let q8 = Q8Matrix::quantize(tensor.data(), layout, out_features, in_features);
                (HostTensor::from_f32(q8.dequantize(), vec![out_features, in_features]), Layout::OutIn)
            }
            _ => (tensor.clone(), layout),
        };
        Ok(RefWeight { tensor, layout, out_features, in_features })
    }

    fn weight_bytes(&self, w: &RefWeight) -> usize {
        w.tensor.numel() * w.tensor.dtype().size()
    }

    fn upload(&self, data: Vec<f32>, rows: usize, cols: usize) -> Result<Matrix> {
        Matrix::new(data, rows, cols)
    }

    fn upload_step(&self, layout: StepLayout) -> Result<StepLayout> {
        Ok(layout)
    }

    fn to_host(&self, x: &Matrix) -> Result<Vec<f32>> {
        Ok(x.data.clone())
    }

    fn shape(&self, x: &Matrix) -> (usize, usize) {
        (x.rows, x.cols)
    }

    fn copy(&self, x: &Matrix) -> Result<Matrix> {
        Ok(x.clone())
    }

    /// `x: [t, a + b + ...]` -> `[t, a]`, `[t, b]`, ...
    fn split_columns(&self, x: &Matrix, widths: &[usize]) -> Result<Vec<Matrix>> {
        check(widths.iter().sum::<usize>() == x.cols, "split_columns", || format!("{widths:?} vs {} columns", x.cols))?;
        let mut parts = Vec::new();
        let mut start = 0;
        for &w in widths {
            let mut part = Matrix::zeros(x.rows, w);
            for r in 0..x.rows {
                for c in 0..w {
                    part.data[r * w + c] = x.data[r * x.cols + start + c];
                }
            }
            parts.push(part);
            start += w;
        }
        Ok(parts)
    }

    /// `x: [t, d]` -> `[output rows, d]`.
    fn gather_output_rows(&self, x: &Matrix, step: &StepLayout) -> Result<Matrix> {
        let mut out = Matrix::zeros(step.output_rows.len(), x.cols);
        for (i, &r) in step.output_rows.iter().enumerate() {
            check((r as usize) < x.rows, "gather_output_rows", || format!("row {r} of {}", x.rows))?;
            out.data[i * x.cols..(i + 1) * x.cols].copy_from_slice(x.row(r as usize));
        }
        Ok(out)
    }

    /// `[a, d]`, `[b, d]`, ... -> `[a + b + ..., d]`.
    fn concat_rows(&self, parts: &[&Matrix]) -> Result<Matrix> {
        let cols = parts.first().map_or(0, |p| p.cols);
        check(parts.iter().all(|p| p.cols == cols), "concat_rows", || "parts of different widths".into())?;
        let data: Vec<f32> = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
        let rows = parts.iter().map(|p| p.rows).sum();
        Matrix::new(data, rows, cols)
    }

    /// `table: [n, d]` -> `[t, d]`, row `i` = `table[ids[i]]` (or `table[positions[i]]`).
    fn embed(&self, table: &RefWeight, step: &StepLayout, lookup: Lookup) -> Result<Matrix> {
        let index: Vec<usize> = match lookup {
            Lookup::Tokens => step.ids.iter().map(|&i| i as usize).collect(),
            Lookup::Positions => step.positions.iter().map(|&p| p as usize).collect(),
        };
        let (n, d) = (table.out_features, table.in_features);
        let values = table.values();
        let mut out = Matrix::zeros(index.len(), d);
        for (r, &i) in index.iter().enumerate() {
            check(i < n, "embed", || format!("row {i} of a table of {n}"))?;
            for c in 0..d {
                out.data[r * d + c] = table.at(&values, i, c);
            }
        }
        Ok(out)
    }

    /// `x += y`, both `[t, d]`.
    fn add_assign(&self, x: &mut Matrix, y: &Matrix) -> Result<()> {
        check(x.rows == y.rows && x.cols == y.cols, "add_assign", || "shapes differ".into())?;
        for (a, b) in x.data.iter_mut().zip(&y.data) {
            *a += b;
        }
        Ok(())
    }

    /// `x *= y`, both `[t, d]`.
    fn mul_assign(&self, x: &mut Matrix, y: &Matrix) -> Result<()> {
        check(x.rows == y.rows && x.cols == y.cols, "mul_assign", || "shapes differ".into())?;
        for (a, b) in x.data.iter_mut().zip(&y.data) {
            *a *= b;
        }
        Ok(())
    }

    /// `y = (x - mean) / sqrt(var + eps) * weight + bias` per row, biased variance.
    fn layer_norm(&self, x: &Matrix, weight: &RefWeight, bias: &RefWeight, eps: f32) -> Result<Matrix> {
        let (w, b) = (weight.values(), bias.values());
        check(w.len() == x.cols && b.len() == x.cols, "layer_norm", || "weight width".into())?;
        let mut out = x.clone();
        for r in 0..x.rows {
            let row = &mut out.data[r * x.cols..(r + 1) * x.cols];
            let n = row.len() as f64;
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for (c, v) in row.iter_mut().enumerate() {
                *v = ((*v as f64 - mean) * inv * w[c] as f64 + b[c] as f64) as f32;
            }
        }
        Ok(out)
    }

    /// `y = x / sqrt(mean(x^2) + eps) * weight` per row.
    fn rms_norm(&self, x: &Matrix, weight: &RefWeight, eps: f32) -> Result<Matrix> {
        let w = weight.values();
        check(w.len() == x.cols, "rms_norm", || "weight width".into())?;
        let mut out = x.clone();
        for r in 0..x.rows {
            let row = &mut out.data[r * x.cols..(r + 1) * x.cols];
            let mean_sq = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / row.len() as f64;
            let inv = 1.0 / (mean_sq + eps as f64).sqrt();
            for (c, v) in row.iter_mut().enumerate() {
                *v = (w[c] as f64 * (*v as f64 * inv)) as f32;
            }
        }
        Ok(out)
    }

    /// `out[t][o] = Σ_i x[t][i] * w[o][i] + bias[o]`.
    fn linear(&self, x: &Matrix, w: &RefWeight, bias: Option<&RefWeight>) -> Result<Matrix> {
        check(x.cols == w.in_features, "linear", || format!("input width {} vs {}", x.cols, w.in_features))?;
        let values = w.values();
        let bias = bias.map(RefWeight::values);
        let mut out = Matrix::zeros(x.rows, w.out_features);
        for t in 0..x.rows {
            for o in 0..w.out_features {
                let mut sum = 0.0f64;
                for i in 0..w.in_features {
                    sum += x.data[t * x.cols + i] as f64 * w.at(&values, o, i) as f64;
                }
                if let Some(b) = &bias {
                    sum += b[o] as f64;
                }
                out.data[t * w.out_features + o] = sum as f32;
            }
        }
        Ok(out)
    }

    /// `x = act(x)` elementwise.
    fn activate(&self, x: &mut Matrix, act: Activation) -> Result<()> {
        let f: fn(f32) -> f32 = match act {
            Activation::GeluTanh => math::gelu_tanh,
            Activation::Gelu => math::gelu_erf,
            Activation::Relu => |v| v.max(0.0),
            Activation::Silu => math::silu,
        };
        x.data.iter_mut().for_each(|v| *v = f(*v));
        Ok(())
    }

    /// Each head's halves `(a, b)` at position p become `(a cos - b sin, b cos + a sin)` with angle
    /// `p * inv_freq[j]`.
    fn rope(&self, x: &mut Matrix, head_dim: usize, step: &StepLayout, theta: f32) -> Result<()> {
        check(step.positions.len() == x.rows, "rope", || "one position per row".into())?;
        let half = head_dim / 2;
        for r in 0..x.rows {
            let pos = step.positions[r] as f32;
            for head in 0..x.cols / head_dim {
                let base = r * x.cols + head * head_dim;
                for j in 0..half {
                    let inv_freq = 1.0 / theta.powf((2 * j) as f32 / head_dim as f32);
                    let (sin, cos) = (pos * inv_freq).sin_cos();
                    let (a, b) = (x.data[base + j], x.data[base + half + j]);
                    x.data[base + j] = a * cos - b * sin;
                    x.data[base + half + j] = b * cos + a * sin;
                }
            }
        }
        Ok(())
    }

    /// `x[t][h * d + c] *= scales[h]`.
    fn scale_heads(&self, x: &mut Matrix, scales: &RefWeight, head_dim: usize) -> Result<()> {
        let scales = scales.values();
        for r in 0..x.rows {
            for c in 0..x.cols {
                x.data[r * x.cols + c] *= scales[c / head_dim];
            }
        }
        Ok(())
    }

    fn kv_store(&self, layers: usize, num_blocks: usize, block_size: usize, kv_width: usize) -> Result<RefKv> {
        let slots = num_blocks * block_size;
        let elements = super::kv_elements(layers, slots, kv_width)?;
        Ok(RefKv { keys: vec![0.0; elements], values: vec![0.0; elements], layers, slots, block_size, width: kv_width })
    }

    /// For every layer, block `to` becomes a copy of block `from`.
    fn kv_copy_blocks(&self, store: &mut RefKv, step: &StepLayout) -> Result<()> {
        let span = store.block_size * store.width;
        for &(from, to) in &step.block_copies {
            for layer in 0..store.layers {
                let src = store.at(layer, from as usize * store.block_size);
                let dst = store.at(layer, to as usize * store.block_size);
                store.keys.copy_within(src..src + span, dst);
                store.values.copy_within(src..src + span, dst);
            }
        }
        Ok(())
    }

    /// `keys[layer][slots[i]][..width] = k[i]`, the same for values.
    fn kv_write(&self, store: &mut RefKv, layer: usize, step: &StepLayout, k: &Matrix, v: &Matrix) -> Result<()> {
        check(k.cols <= store.width && layer < store.layers, "kv_write", || "outside the cache".into())?;
        for (i, &slot) in step.slots.iter().enumerate() {
            let at = store.at(layer, slot as usize);
            store.keys[at..at + k.cols].copy_from_slice(k.row(i));
            store.values[at..at + v.cols].copy_from_slice(v.row(i));
        }
        Ok(())
    }

    /// `out[row][h] = Σ_j p_j v_j` with `p = softmax(scale * q_h · k_j)` over the visible positions j.
    fn paged_attention(
        &self,
        q: &Matrix,
        store: &RefKv,
        layer: usize,
        step: &StepLayout,
        p: &AttentionParams,
    ) -> Result<Matrix> {
        let d = p.head_dim;
        let mut out = Matrix::zeros(q.rows, p.num_heads * d);
        for s in 0..step.sequences.len() {
            let probs = attention_probabilities(q, store, layer, step, s, p);
            let seq = step.sequences[s];
            let ctx = seq.first_position + seq.len;
            for h in 0..p.num_heads {
                let kv_head = h / (p.num_heads / p.num_kv_heads);
                for i in 0..seq.len {
                    let row = seq.first_row + i;
                    for (pos, &weight) in probs[(h * seq.len + i) * ctx..][..ctx].iter().enumerate() {
                        let at = store.at(layer, step.slot_of(s, pos)) + kv_head * d;
                        for c in 0..d {
                            out.data[row * out.cols + h * d + c] += (weight * store.values[at + c] as f64) as f32;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    fn attention_probs(
        &self,
        q: &Matrix,
        store: &RefKv,
        layer: usize,
        step: &StepLayout,
        seq: usize,
        p: &AttentionParams,
    ) -> Result<Matrix> {
        let probs = attention_probabilities(q, store, layer, step, seq, p);
        let s = step.sequences[seq];
        Matrix::new(probs.iter().map(|&v| v as f32).collect(), p.num_heads * s.len, s.first_position + s.len)
    }

    /// `upper` against `lower = lower_features · lower_head^T`, row by row ([`math::acd`]).
    fn contrast_acd(
        &self,
        upper: &Matrix,
        lower_features: &Matrix,
        lower_head: &RefWeight,
        alpha: f32,
        min_candidates: usize,
    ) -> Result<Matrix> {
        let lower = self.linear(lower_features, lower_head, None)?;
        check(lower.rows == upper.rows && lower.cols == upper.cols, "contrast_acd", || "shapes differ".into())?;
        let mut out = Matrix::zeros(upper.rows, upper.cols);
        for r in 0..upper.rows {
            let row = &mut out.data[r * upper.cols..(r + 1) * upper.cols];
            math::acd(upper.row(r), lower.row(r), alpha, min_candidates, row);
        }
        Ok(out)
    }

    fn argmax_rows(&self, x: &Matrix) -> Result<Vec<u32>> {
        math::checked_argmax_rows(&x.data, x.cols)
    }
}

/// Sequence `s`'s attention probabilities, `[heads][len][context]`, in f64: `softmax(scale * q · k)`
/// over the positions row `i` sees ([`AttentionParams::visible`]: `first ..= first_position + i`,
/// `first` from the window, or the whole sequence when not causal), zero elsewhere.
fn attention_probabilities(
    q: &Matrix,
    store: &RefKv,
    layer: usize,
    step: &StepLayout,
    s: usize,
    p: &AttentionParams,
) -> Vec<f64> {
    let seq = step.sequences[s];
    let d = p.head_dim;
    let ctx = seq.first_position + seq.len;
    let mut probs = vec![0.0f64; p.num_heads * seq.len * ctx];
    for h in 0..p.num_heads {
        let kv_head = h / (p.num_heads / p.num_kv_heads);
        for i in 0..seq.len {
            let pos = seq.first_position + i;
            let seen = p.visible(pos, ctx);
            let query = &q.row(seq.first_row + i)[h * d..(h + 1) * d];
            let row = &mut probs[(h * seq.len + i) * ctx..][..ctx];
            for (j, score) in row.iter_mut().enumerate().take(seen.end).skip(seen.start) {
                let at = store.at(layer, step.slot_of(s, j)) + kv_head * d;
                let dot: f64 = (0..d).map(|c| query[c] as f64 * store.keys[at + c] as f64).sum();
                *score = dot * p.scale as f64;
            }
            let max = row[seen.clone()].iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = row[seen.clone()].iter().map(|v| (v - max).exp()).sum();
            for v in &mut row[seen] {
                *v = (*v - max).exp() / sum;
            }
        }
    }
    probs
}
