//! The CPU backend: plain Rust, parallel over rows or heads with rayon. It is also the reference
//! every faster path is tested against, so clarity wins over cleverness here.

use rayon::prelude::*;

use super::{AttentionParams, Backend, Layout, SeqSlice};
use crate::config::Activation;
use crate::error::{Error, Result};
use crate::weights::{HostTensor, WeightData};

/// The CPU backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

/// A row-major `[rows, cols]` f32 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl Matrix {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Matrix { data: vec![0.0; rows * cols], rows, cols }
    }

    pub fn from_vec(data: Vec<f32>, rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix data does not match its shape");
        Matrix { data, rows, cols }
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    fn rows_mut(&mut self) -> std::slice::ChunksExactMut<'_, f32> {
        self.data.chunks_exact_mut(self.cols)
    }
}

/// The CPU's KV storage: `[layer][slot][kv_width]` for keys and the same for values.
#[derive(Debug)]
pub struct CpuKv {
    keys: Vec<f32>,
    values: Vec<f32>,
    slots_per_layer: usize,
    block_size: usize,
    width: usize,
}

impl CpuKv {
    #[inline]
    fn offset(&self, layer: usize, slot: usize) -> usize {
        (layer * self.slots_per_layer + slot) * self.width
    }
}

/// A checkpoint tensor seen as a weight: its mapped data, logical `[out, in]` and stored layout.
/// Vectors (norm weights, biases) have `in_features == 1`.
#[derive(Clone, Debug)]
pub struct CpuWeight {
    tensor: HostTensor,
    layout: Layout,
    out_features: usize,
    in_features: usize,
}

impl CpuWeight {
    fn data(&self) -> WeightData<'_> {
        self.tensor.data()
    }

    fn vector(&self) -> Vec<f32> {
        self.data().to_f32_vec()
    }
}

/// Rows at a time handed to one rayon task in the matrix products: small enough to balance, large
/// enough to amortise the task.
const ROWS_PER_TASK: usize = 16;

impl Backend for Cpu {
    type Tensor = Matrix;
    type Weight = CpuWeight;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn weight(&self, tensor: &HostTensor, layout: Layout) -> Result<CpuWeight> {
        let (out_features, in_features) = match (tensor.shape(), layout) {
            ([n], _) => (*n, 1),
            ([out, inp], Layout::OutIn) => (*out, *inp),
            ([inp, out], Layout::InOut) => (*out, *inp),
            (shape, _) => {
                return Err(Error::invalid("weight", format!("expected a vector or a matrix, got shape {shape:?}")))
            }
        };
        Ok(CpuWeight { tensor: tensor.clone(), layout, out_features, in_features })
    }

    fn embed(&self, table: &CpuWeight, ids: &[u32]) -> Matrix {
        // A table is [vocab, d] as nn.Embedding stores it.
        let d = table.in_features;
        let mut out = Matrix::zeros(ids.len(), d);
        let data = table.data();
        for (row, &id) in out.rows_mut().zip(ids) {
            data.read_f32(id as usize * d, row);
        }
        out
    }

    fn add_assign(&self, x: &mut Matrix, y: &Matrix) {
        debug_assert_eq!((x.rows, x.cols), (y.rows, y.cols));
        for (a, b) in x.data.iter_mut().zip(&y.data) {
            *a += b;
        }
    }

    fn mul_assign(&self, x: &mut Matrix, y: &Matrix) {
        debug_assert_eq!((x.rows, x.cols), (y.rows, y.cols));
        for (a, b) in x.data.iter_mut().zip(&y.data) {
            *a *= b;
        }
    }

    fn layer_norm(&self, x: &Matrix, weight: &CpuWeight, bias: &CpuWeight, eps: f32) -> Matrix {
        let (w, b) = (weight.vector(), bias.vector());
        let mut out = x.clone();
        out.rows_mut().for_each(|row| layer_norm_row(row, &w, &b, eps));
        out
    }

    fn rms_norm(&self, x: &Matrix, weight: &CpuWeight, eps: f32) -> Matrix {
        let w = weight.vector();
        let mut out = x.clone();
        out.rows_mut().for_each(|row| rms_norm_row(row, &w, eps));
        out
    }

    fn linear(&self, x: &Matrix, w: &CpuWeight, bias: Option<&CpuWeight>) -> Matrix {
        assert_eq!(x.cols, w.in_features, "linear: input width does not match the weight");
        let mut out = match w.layout {
            Layout::OutIn => matmul_out_in(x, w),
            Layout::InOut => matmul_in_out(x, w),
        };
        if let Some(bias) = bias {
            let b = bias.vector();
            out.rows_mut().for_each(|row| {
                for (o, bv) in row.iter_mut().zip(&b) {
                    *o += bv;
                }
            });
        }
        out
    }

    fn activate(&self, x: &mut Matrix, act: Activation) {
        let f: fn(f32) -> f32 = match act {
            Activation::GeluTanh => gelu_tanh,
            Activation::Gelu => gelu_erf,
            Activation::Relu => |v| v.max(0.0),
            Activation::Silu => silu,
        };
        x.data.par_chunks_mut(4096).for_each(|chunk| chunk.iter_mut().for_each(|v| *v = f(*v)));
    }

    fn rope(&self, x: &mut Matrix, head_dim: usize, positions: &[usize], theta: f32) {
        let half = head_dim / 2;
        // Computed like transformers: inv_freq in f32 from theta^(2i/d), angle = position * inv_freq in f32.
        let inv_freq: Vec<f32> = (0..half).map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32)).collect();
        for (row, &pos) in x.rows_mut().zip(positions) {
            let (sin, cos): (Vec<f32>, Vec<f32>) = inv_freq.iter().map(|f| (pos as f32 * f).sin_cos()).unzip();
            for head in row.chunks_exact_mut(head_dim) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * cos[i] - x2 * sin[i];
                    b[i] = x2 * cos[i] + x1 * sin[i];
                }
            }
        }
    }

    fn split_columns(&self, x: &Matrix, widths: &[usize]) -> Vec<Matrix> {
        assert_eq!(widths.iter().sum::<usize>(), x.cols, "split widths do not cover the row");
        let mut start = 0;
        widths
            .iter()
            .map(|&w| {
                let mut part = Matrix::zeros(x.rows, w);
                for (r, row) in part.rows_mut().enumerate() {
                    row.copy_from_slice(&x.row(r)[start..start + w]);
                }
                start += w;
                part
            })
            .collect()
    }

    type KvStore = CpuKv;

    fn kv_store(&self, layers: usize, num_blocks: usize, block_size: usize, kv_width: usize) -> Result<CpuKv> {
        let elements = layers
            .checked_mul(num_blocks)
            .and_then(|n| n.checked_mul(block_size))
            .and_then(|n| n.checked_mul(kv_width))
            .filter(|&n| n < isize::MAX as usize / 8)
            .ok_or_else(|| Error::invalid("KV cache", "requested size overflows memory"))?;
        // Zeroed allocations come from the OS lazily: untouched slots cost no resident memory.
        Ok(CpuKv {
            keys: vec![0.0; elements],
            values: vec![0.0; elements],
            slots_per_layer: num_blocks * block_size,
            block_size,
            width: kv_width,
        })
    }

    fn kv_write(&self, store: &mut CpuKv, layer: usize, slots: &[usize], k: &Matrix, v: &Matrix) {
        for (row, &slot) in slots.iter().enumerate() {
            let at = store.offset(layer, slot);
            store.keys[at..at + store.width].copy_from_slice(k.row(row));
            store.values[at..at + store.width].copy_from_slice(v.row(row));
        }
    }

    fn kv_copy_block(&self, store: &mut CpuKv, from: u32, to: u32) {
        let span = store.block_size * store.width;
        let layers = store.keys.len() / (store.slots_per_layer * store.width).max(1);
        for layer in 0..layers {
            let src = store.offset(layer, from as usize * store.block_size);
            let dst = store.offset(layer, to as usize * store.block_size);
            store.keys.copy_within(src..src + span, dst);
            store.values.copy_within(src..src + span, dst);
        }
    }

    fn paged_attention(
        &self,
        q: &Matrix,
        store: &CpuKv,
        layer: usize,
        sequences: &[SeqSlice<'_>],
        p: &AttentionParams,
    ) -> Matrix {
        let d = p.head_dim;
        let group = p.num_heads / p.num_kv_heads;
        // One task per (sequence, head); each returns its [len, d] slab.
        let tasks: Vec<(usize, usize)> =
            (0..sequences.len()).flat_map(|s| (0..p.num_heads).map(move |h| (s, h))).collect();
        let slabs: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&(s, h)| {
                let seq = &sequences[s];
                let kv = h / group;
                let last_position = seq.first_position + seq.len;
                // Where each visible position's key/value row starts, for this layer and kv head.
                let rows: Vec<usize> = (0..last_position)
                    .map(|pos| {
                        let slot = seq.block_table[pos / store.block_size] as usize * store.block_size
                            + pos % store.block_size;
                        store.offset(layer, slot) + kv * d
                    })
                    .collect();
                let mut out = vec![0.0f32; seq.len * d];
                let mut scores = vec![0.0f32; last_position];
                for i in 0..seq.len {
                    let pos = seq.first_position + i;
                    let first = p.window.map_or(0, |w| (pos + 1).saturating_sub(w));
                    let qi = &q.row(seq.first_row + i)[h * d..(h + 1) * d];
                    let visible = &mut scores[first..=pos];
                    for (score, &at) in visible.iter_mut().zip(&rows[first..=pos]) {
                        *score = dot(qi, &store.keys[at..at + d]) * p.scale;
                    }
                    softmax_in_place(visible);
                    let oi = &mut out[i * d..(i + 1) * d];
                    for (&weight, &at) in visible.iter().zip(&rows[first..=pos]) {
                        axpy(oi, weight, &store.values[at..at + d]);
                    }
                }
                out
            })
            .collect();
        let mut out = Matrix::zeros(q.rows, p.num_heads * d);
        for (&(s, h), slab) in tasks.iter().zip(&slabs) {
            let seq = &sequences[s];
            for i in 0..seq.len {
                out.data[(seq.first_row + i) * out.cols + h * d..][..d].copy_from_slice(&slab[i * d..(i + 1) * d]);
            }
        }
        out
    }

    fn gather_rows(&self, x: &Matrix, rows: &[usize]) -> Matrix {
        let mut out = Matrix::zeros(rows.len(), x.cols);
        for (dst, &r) in out.rows_mut().zip(rows) {
            dst.copy_from_slice(x.row(r));
        }
        out
    }

    fn contrast_acd(&self, upper: &Matrix, lower: &Matrix, alpha: f32, min_candidates: usize) -> Matrix {
        let mut out = Matrix::zeros(upper.rows, upper.cols);
        out.data.par_chunks_mut(upper.cols.max(1)).enumerate().for_each(|(r, row)| {
            crate::exits::acd(upper.row(r), lower.row(r), alpha, min_candidates, row);
        });
        out
    }

    fn upload(&self, data: Vec<f32>, rows: usize, cols: usize) -> Matrix {
        Matrix::from_vec(data, rows, cols)
    }

    fn shape(&self, x: &Matrix) -> (usize, usize) {
        (x.rows, x.cols)
    }

    fn to_host(&self, x: &Matrix) -> Vec<f32> {
        x.data.clone()
    }
}

/// `x: [t, in]`, `w: [out, in]` stored row by row: each output feature is a dot product with one
/// weight row, so the weight streams through once for all tokens.
fn matmul_out_in(x: &Matrix, w: &CpuWeight) -> Matrix {
    let (t, n_in, n_out) = (x.rows, w.in_features, w.out_features);
    let data = w.data();
    let mut out_t = vec![0.0f32; n_out * t]; // [out, t], transposed at the end
    out_t.par_chunks_mut(t * ROWS_PER_TASK).enumerate().for_each(|(chunk, block)| {
        let mut wrow = vec![0.0f32; n_in];
        for (r, outs) in block.chunks_exact_mut(t).enumerate() {
            let o = chunk * ROWS_PER_TASK + r;
            data.read_f32(o * n_in, &mut wrow);
            for (ti, slot) in outs.iter_mut().enumerate() {
                *slot = dot(x.row(ti), &wrow);
            }
        }
    });
    let mut out = Matrix::zeros(t, n_out);
    for (ti, row) in out.rows_mut().enumerate() {
        for (o, slot) in row.iter_mut().enumerate() {
            *slot = out_t[o * t + ti];
        }
    }
    out
}

/// `x: [t, in]`, `w: [in, out]` stored row by row (GPT-2 Conv1D): each input feature scales one
/// weight row into the outputs. Parallel over column blocks of the output.
fn matmul_in_out(x: &Matrix, w: &CpuWeight) -> Matrix {
    let (t, n_in, n_out) = (x.rows, w.in_features, w.out_features);
    let data = w.data();
    const COLS_PER_TASK: usize = 256;
    let blocks: Vec<(usize, Vec<f32>)> = (0..n_out.div_ceil(COLS_PER_TASK))
        .into_par_iter()
        .map(|b| {
            let c0 = b * COLS_PER_TASK;
            let width = COLS_PER_TASK.min(n_out - c0);
            let mut acc = vec![0.0f32; t * width];
            let mut seg = vec![0.0f32; width];
            for i in 0..n_in {
                data.read_f32(i * n_out + c0, &mut seg);
                for ti in 0..t {
                    axpy(&mut acc[ti * width..(ti + 1) * width], x.row(ti)[i], &seg);
                }
            }
            (c0, acc)
        })
        .collect();
    let mut out = Matrix::zeros(t, n_out);
    for (c0, acc) in blocks {
        let width = acc.len() / t.max(1);
        for (ti, row) in out.rows_mut().enumerate() {
            row[c0..c0 + width].copy_from_slice(&acc[ti * width..(ti + 1) * width]);
        }
    }
    out
}

/// Dot product with eight independent accumulators so that the compiler can vectorise it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += a * x`.
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

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

/// LayerNorm of one row: biased variance, as torch computes it.
pub fn layer_norm_row(row: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, w), b) in row.iter_mut().zip(weight).zip(bias) {
        *v = (*v - mean) * inv * w + b;
    }
}

/// RMSNorm of one row (Llama): x / sqrt(mean(x^2) + eps) * weight.
pub fn rms_norm_row(row: &mut [f32], weight: &[f32], eps: f32) {
    let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    for (v, w) in row.iter_mut().zip(weight) {
        *v = w * (*v * inv);
    }
}

/// GELU, tanh approximation (transformers' `NewGELUActivation`).
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
