//! The CPU backend: the optimised host implementation of every op, parallel over rows, heads or
//! weight ranges with rayon and vectorised where the CPU allows ([`simd`]). The conformance suite
//! holds it to the [`crate::backend::reference`] backend.
//!
//! Files by op family: [`products`] (matrix products, and which kernel a product takes),
//! [`batched`] (the AVX-512 register tiles for products of a few to a few hundred rows),
//! [`attention`] (paged attention), [`simd`] (the AVX2 vector kernels with their scalar fallbacks),
//! [`peak`] (the machine's FMA throughput, for benchmarks); norms, elementwise ops and the cache
//! live here.

mod attention;
mod batched;
pub mod peak;
mod products;
mod q8;
pub(crate) mod simd;

use std::sync::OnceLock;

use rayon::prelude::*;

use super::q8::Q8Matrix;
use super::q8_cache::{q8_cache_dir, quantize_cached};
use super::{AttentionParams, Backend, Layout, Lookup, Matrix, StepLayout, WeightFormat};
use crate::error::{Error, Result};
use crate::io::weights::{DType, HostTensor, WeightData};
use crate::math;
use crate::model::config::Activation;

/// The CPU backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    /// Compute with matrices in this format, converting (or quantising) on first use when the
    /// checkpoint differs (None: as stored). Vectors (norms, biases) are always read as stored.
    pub weights: Option<WeightFormat>,
}

impl Cpu {
    /// A CPU backend that converts weight matrices to `dtype` (e.g. bf16 to halve the bytes each
    /// decoding step reads). The conversion happens the first time a weight is used, so weights a
    /// run never touches are never converted.
    pub fn with_weight_dtype(dtype: DType) -> Self {
        Cpu { weights: Some(WeightFormat::Float(dtype)) }
    }

    /// A CPU backend that computes with weight matrices in 8-bit blocks ([`crate::backend::q8`]),
    /// quantised the first time each is used.
    pub fn with_q8_weights() -> Self {
        Cpu { weights: Some(WeightFormat::Q8) }
    }
}

/// The CPU's KV storage: `[layer][slot][kv_width]` for keys and the same for values.
#[derive(Debug)]
pub struct CpuKv {
    keys: Vec<f32>,
    values: Vec<f32>,
    layers: usize,
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
    /// The dtype to compute with, when it differs from the stored one.
    convert_to: Option<DType>,
    converted: OnceLock<HostTensor>,
    layout: Layout,
    out_features: usize,
    in_features: usize,
    /// A vector's values widened to f32 once (norm weights, biases, head scales are read every step).
    vector: OnceLock<Vec<f32>>,
    /// Compute with 8-bit blocks, quantised on first use into `quantized`.
    quantize: bool,
    quantized: OnceLock<Q8Matrix>,
}

impl CpuWeight {
    fn data(&self) -> WeightData<'_> {
        match self.convert_to {
            Some(dtype) => self.converted.get_or_init(|| self.tensor.converted(dtype)).data(),
            None => self.tensor.data(),
        }
    }

    /// The 8-bit form, when this weight computes in it: quantised on first use, or read from the
    /// cache of an earlier run ([`crate::backend::q8_cache`]).
    fn q8(&self) -> Option<&Q8Matrix> {
        self.quantize.then(|| {
            self.quantized.get_or_init(|| {
                let dir = q8_cache_dir();
                quantize_cached(dir.as_deref(), &self.tensor, self.layout, self.out_features, self.in_features)
            })
        })
    }

    /// Bytes a full read of this weight touches.
    fn bytes(&self) -> usize {
        if self.quantize {
            let blocks = self.in_features.div_ceil(crate::backend::q8::BLOCK);
            return self.out_features * blocks * (crate::backend::q8::BLOCK + 2);
        }
        self.tensor.numel() * self.convert_to.unwrap_or(self.tensor.dtype()).size()
    }

    fn vector(&self) -> &[f32] {
        self.vector.get_or_init(|| self.data().to_f32_vec())
    }
}

fn mismatch(op: &str, why: String) -> Error {
    Error::invalid(format!("backend op {op}"), why)
}

fn same_shape(op: &str, x: &Matrix, y: &Matrix) -> Result<()> {
    if (x.rows, x.cols) != (y.rows, y.cols) {
        return Err(mismatch(op, format!("[{}, {}] vs [{}, {}]", x.rows, x.cols, y.rows, y.cols)));
    }
    Ok(())
}

impl Backend for Cpu {
    type Tensor = Matrix;
    type Weight = CpuWeight;
    type KvStore = CpuKv;
    type Step = StepLayout;

    fn name(&self) -> &'static str {
        "cpu"
    }

    /// The step runs on a thread of the pool while every other thread of the pool spins, taking
    /// the step's parallel work the moment it appears. A step makes about a hundred short parallel
    /// calls; each one made from a thread outside the pool would hand its work over and wait (1.4 ms
    /// per step measured on a 24-layer model with tiny matrices), and an idle worker that fell asleep
    /// in a serial stretch (norms, attention) makes the next product wait for it to wake: spinning
    /// made decoding 3-10% faster on 2 cores (A/B runs).
    fn run<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        use std::sync::atomic::{AtomicBool, Ordering};
        let done = AtomicBool::new(false);
        rayon::scope(|scope| {
            for _ in 1..rayon::current_num_threads() {
                scope.spawn(|_| {
                    while !done.load(Ordering::Acquire) {
                        if rayon::yield_now() != Some(rayon::Yield::Executed) {
                            std::hint::spin_loop();
                        }
                    }
                });
            }
            let result = work();
            done.store(true, Ordering::Release);
            result
        })
    }

    fn weight(&self, tensor: &HostTensor, layout: Layout) -> Result<CpuWeight> {
        let (out_features, in_features) = super::logical_shape(tensor, layout)?;
        let is_matrix = in_features > 1;
        let convert_to = self.weights.and_then(WeightFormat::dtype).filter(|&d| is_matrix && d != tensor.dtype());
        Ok(CpuWeight {
            tensor: tensor.clone(),
            convert_to,
            converted: OnceLock::new(),
            layout,
            out_features,
            in_features,
            vector: OnceLock::new(),
            quantize: is_matrix && self.weights == Some(WeightFormat::Q8),
            quantized: OnceLock::new(),
        })
    }

    fn weight_bytes(&self, w: &CpuWeight) -> usize {
        w.bytes()
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

    fn split_columns(&self, x: &Matrix, widths: &[usize]) -> Result<Vec<Matrix>> {
        if widths.iter().sum::<usize>() != x.cols {
            return Err(mismatch("split_columns", format!("widths {widths:?} do not cover {} columns", x.cols)));
        }
        let mut start = 0;
        Ok(widths
            .iter()
            .map(|&w| {
                let mut part = Matrix::zeros(x.rows, w);
                for (r, row) in part.rows_mut().enumerate() {
                    row.copy_from_slice(&x.row(r)[start..start + w]);
                }
                start += w;
                part
            })
            .collect())
    }

    fn gather_output_rows(&self, x: &Matrix, step: &StepLayout) -> Result<Matrix> {
        if let Some(&r) = step.output_rows.iter().find(|&&r| r as usize >= x.rows) {
            return Err(mismatch("gather_output_rows", format!("row {r} of {}", x.rows)));
        }
        let mut out = Matrix::zeros(step.output_rows.len(), x.cols);
        for (dst, &r) in out.rows_mut().zip(&step.output_rows) {
            dst.copy_from_slice(x.row(r as usize));
        }
        Ok(out)
    }

    fn concat_rows(&self, parts: &[&Matrix]) -> Result<Matrix> {
        let cols = parts.first().map_or(0, |p| p.cols);
        if parts.iter().any(|p| p.cols != cols) {
            return Err(mismatch("concat_rows", "parts of different widths".into()));
        }
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for part in parts {
            data.extend_from_slice(&part.data);
        }
        Ok(Matrix { rows: data.len() / cols.max(1), data, cols })
    }

    fn embed(&self, table: &CpuWeight, step: &StepLayout, lookup: Lookup) -> Result<Matrix> {
        // A table is [n, d] as nn.Embedding stores it.
        let index = match lookup {
            Lookup::Tokens => &step.ids,
            Lookup::Positions => &step.positions,
        };
        if let Some(&i) = index.iter().find(|&&i| i as usize >= table.out_features) {
            return Err(mismatch("embed", format!("row {i} of a table of {}", table.out_features)));
        }
        let d = table.in_features;
        let mut out = Matrix::zeros(index.len(), d);
        if let Some(q8) = table.q8() {
            // An 8-bit table gives its dequantised rows (a tied LM head quantises the embedding too).
            if table.layout == Layout::OutIn {
                for (row, &i) in out.rows_mut().zip(index) {
                    q8.dequantize_row(i as usize, row);
                }
                return Ok(out);
            }
        }
        let data = table.data();
        for (row, &i) in out.rows_mut().zip(index) {
            data.read_f32(i as usize * d, row);
        }
        Ok(out)
    }

    fn add_assign(&self, x: &mut Matrix, y: &Matrix) -> Result<()> {
        same_shape("add_assign", x, y)?;
        for (a, b) in x.data.iter_mut().zip(&y.data) {
            *a += b;
        }
        Ok(())
    }

    fn mul_assign(&self, x: &mut Matrix, y: &Matrix) -> Result<()> {
        same_shape("mul_assign", x, y)?;
        for (a, b) in x.data.iter_mut().zip(&y.data) {
            *a *= b;
        }
        Ok(())
    }

    fn layer_norm(&self, x: &Matrix, weight: &CpuWeight, bias: &CpuWeight, eps: f32) -> Result<Matrix> {
        let (w, b) = (weight.vector(), bias.vector());
        if w.len() != x.cols || b.len() != x.cols {
            return Err(mismatch("layer_norm", format!("weights of {} for rows of {}", w.len(), x.cols)));
        }
        let mut out = x.clone();
        out.rows_mut().for_each(|row| layer_norm_row(row, w, b, eps));
        Ok(out)
    }

    fn rms_norm(&self, x: &Matrix, weight: &CpuWeight, eps: f32) -> Result<Matrix> {
        let w = weight.vector();
        if w.len() != x.cols {
            return Err(mismatch("rms_norm", format!("weight of {} for rows of {}", w.len(), x.cols)));
        }
        let mut out = x.clone();
        out.rows_mut().for_each(|row| rms_norm_row(row, w, eps));
        Ok(out)
    }

    fn linear(&self, x: &Matrix, w: &CpuWeight, bias: Option<&CpuWeight>) -> Result<Matrix> {
        if x.cols != w.in_features {
            return Err(mismatch("linear", format!("input width {} for a weight of {}", x.cols, w.in_features)));
        }
        let mut out = products::product(x, w);
        if let Some(bias) = bias {
            let b = bias.vector();
            out.rows_mut().for_each(|row| {
                for (o, bv) in row.iter_mut().zip(b) {
                    *o += bv;
                }
            });
        }
        Ok(out)
    }

    fn activate(&self, x: &mut Matrix, act: Activation) -> Result<()> {
        if act == Activation::GeluTanh {
            x.data.par_chunks_mut(1 << 14).for_each(simd::gelu_tanh_in_place);
            return Ok(());
        }
        let f: fn(f32) -> f32 = match act {
            Activation::GeluTanh => math::gelu_tanh,
            Activation::Gelu => math::gelu_erf,
            Activation::Relu => |v| v.max(0.0),
            Activation::Silu => math::silu,
        };
        x.data.par_chunks_mut(1 << 14).for_each(|chunk| chunk.iter_mut().for_each(|v| *v = f(*v)));
        Ok(())
    }

    fn rope(&self, x: &mut Matrix, head_dim: usize, step: &StepLayout, theta: f32) -> Result<()> {
        if step.positions.len() != x.rows {
            return Err(mismatch("rope", format!("{} positions for {} rows", step.positions.len(), x.rows)));
        }
        let half = head_dim / 2;
        // Computed like transformers: inv_freq in f32 from theta^(2i/d), angle = position * inv_freq in f32.
        let inv_freq: Vec<f32> = (0..half).map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32)).collect();
        for (row, &pos) in x.rows_mut().zip(&step.positions) {
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
        Ok(())
    }

    fn scale_heads(&self, x: &mut Matrix, scales: &CpuWeight, head_dim: usize) -> Result<()> {
        let scales = scales.vector();
        for row in x.rows_mut() {
            for (head, &scale) in row.chunks_exact_mut(head_dim).zip(scales) {
                head.iter_mut().for_each(|v| *v *= scale);
            }
        }
        Ok(())
    }

    fn kv_store(&self, layers: usize, num_blocks: usize, block_size: usize, kv_width: usize) -> Result<CpuKv> {
        let slots_per_layer = num_blocks * block_size;
        let elements = super::kv_elements(layers, slots_per_layer, kv_width)?;
        // Zeroed allocations come from the OS lazily: untouched slots cost no resident memory.
        Ok(CpuKv {
            keys: vec![0.0; elements],
            values: vec![0.0; elements],
            layers,
            slots_per_layer,
            block_size,
            width: kv_width,
        })
    }

    fn kv_copy_blocks(&self, store: &mut CpuKv, step: &StepLayout) -> Result<()> {
        let span = store.block_size * store.width;
        for &(from, to) in &step.block_copies {
            for layer in 0..store.layers {
                let src = store.offset(layer, from as usize * store.block_size);
                let dst = store.offset(layer, to as usize * store.block_size);
                store.keys.copy_within(src..src + span, dst);
                store.values.copy_within(src..src + span, dst);
            }
        }
        Ok(())
    }

    fn kv_write(&self, store: &mut CpuKv, layer: usize, step: &StepLayout, k: &Matrix, v: &Matrix) -> Result<()> {
        if k.cols > store.width || layer >= store.layers || step.slots.len() != k.rows {
            return Err(mismatch("kv_write", format!("[{}, {}] rows into layer {layer}", k.rows, k.cols)));
        }
        for (row, &slot) in step.slots.iter().enumerate() {
            let at = store.offset(layer, slot as usize);
            // A block with pruned heads fills only the start of its rows.
            store.keys[at..at + k.cols].copy_from_slice(k.row(row));
            store.values[at..at + v.cols].copy_from_slice(v.row(row));
        }
        Ok(())
    }

    fn paged_attention(
        &self,
        q: &Matrix,
        store: &CpuKv,
        layer: usize,
        step: &StepLayout,
        params: &AttentionParams,
    ) -> Result<Matrix> {
        Ok(attention::paged_attention(q, store, layer, step, params))
    }

    fn attention_probs(
        &self,
        q: &Matrix,
        store: &CpuKv,
        layer: usize,
        step: &StepLayout,
        seq: usize,
        params: &AttentionParams,
    ) -> Result<Matrix> {
        Ok(attention::attention_probs(q, store, layer, step, seq, params))
    }

    fn contrast_acd(
        &self,
        upper: &Matrix,
        lower_features: &Matrix,
        lower_head: &CpuWeight,
        alpha: f32,
        min_candidates: usize,
    ) -> Result<Matrix> {
        let mut out = Matrix::zeros(upper.rows, upper.cols);
        if lower_head.layout == Layout::InOut {
            // A head stored [hidden, vocab] has no contiguous vocabulary rows to pick: compute it all.
            let lower = self.linear(lower_features, lower_head, None)?;
            for (r, row) in out.rows_mut().enumerate() {
                math::acd(upper.row(r), lower.row(r), alpha, min_candidates, row);
            }
            return Ok(out);
        }
        // Only the plausible tokens' rows of the lower head are read.
        let q8 = lower_head.q8();
        let (data, n_in) = (lower_head.data(), lower_head.in_features);
        let lower_logit = |features: &[f32], token: usize| match q8 {
            Some(q8) => q8.dot_row(features, token),
            None => simd::dot(features, data, token * n_in),
        };
        for (r, row) in out.rows_mut().enumerate() {
            let features = lower_features.row(r);
            math::acd_with(upper.row(r), alpha, min_candidates, row, |tokens, logits| {
                const TOKENS_PER_TASK: usize = 256;
                tokens.par_chunks(TOKENS_PER_TASK).zip(logits.par_chunks_mut(TOKENS_PER_TASK)).for_each(
                    |(tokens, logits)| {
                        for (logit, &token) in logits.iter_mut().zip(tokens) {
                            *logit = lower_logit(features, token as usize);
                        }
                    },
                );
            });
        }
        Ok(out)
    }

    fn argmax_rows(&self, x: &Matrix) -> Result<Vec<u32>> {
        math::checked_argmax_rows(&x.data, x.cols)
    }
}

/// LayerNorm of one row: biased variance, as torch computes it.
fn layer_norm_row(row: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, w), b) in row.iter_mut().zip(weight).zip(bias) {
        *v = (*v - mean) * inv * w + b;
    }
}

/// RMSNorm of one row (Llama): x / sqrt(mean(x^2) + eps) * weight.
fn rms_norm_row(row: &mut [f32], weight: &[f32], eps: f32) {
    let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    for (v, w) in row.iter_mut().zip(weight) {
        *v = w * (*v * inv);
    }
}

/// Reads every value of `values` once with the vectorised kernels (the dot product of the slice with
/// itself; the second read of each line comes from L1): the CPU's read loop, for bandwidth probes.
pub fn read_all(values: &[f32]) -> f32 {
    simd::dot_f32(values, values)
}
