//! The CPU backend: plain Rust, parallel over rows or heads with rayon. It is also the reference
//! every faster path is tested against, so clarity wins over cleverness here.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::{simd, AttentionParams, Backend, Layout, SeqSlice};
use crate::config::Activation;
use crate::error::{Error, Result};
use crate::weights::{DType, HostTensor, WeightData};

/// The CPU backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    /// Store matrices in this dtype, converting on first use when the checkpoint differs
    /// (None: as stored). Vectors (norms, biases) are always read as stored.
    pub weight_dtype: Option<DType>,
}

impl Cpu {
    /// A CPU backend that converts weight matrices to `dtype` (e.g. bf16 to halve the bytes each
    /// decoding step reads). The conversion happens the first time a weight is used, so weights a
    /// run never touches are never converted.
    pub fn with_weight_dtype(dtype: DType) -> Self {
        Cpu { weight_dtype: Some(dtype) }
    }
}

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
    /// The dtype to compute with, when it differs from the stored one.
    convert_to: Option<DType>,
    converted: OnceLock<HostTensor>,
    layout: Layout,
    out_features: usize,
    in_features: usize,
}

impl CpuWeight {
    fn data(&self) -> WeightData<'_> {
        match self.convert_to {
            Some(dtype) => self.converted.get_or_init(|| self.tensor.converted(dtype)).data(),
            None => self.tensor.data(),
        }
    }

    /// Bytes a full read of this weight touches.
    pub fn bytes(&self) -> usize {
        self.tensor.numel() * self.convert_to.unwrap_or(self.tensor.dtype()).size()
    }

    fn vector(&self) -> Vec<f32> {
        self.data().to_f32_vec()
    }
}

impl Backend for Cpu {
    type Tensor = Matrix;
    type Weight = CpuWeight;

    fn name(&self) -> &'static str {
        "cpu"
    }

    /// The step runs on a thread of the pool while every other thread of the pool spins, taking
    /// the step's parallel work the moment it appears. Left alone, an idle worker falls asleep in
    /// the serial stretches of a step (norms, attention) and each of the next product's halves then
    /// waits for it to wake: spinning made decoding 3-10% faster on 2 cores (A/B runs).
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

    fn weight_bytes(&self, w: &CpuWeight) -> usize {
        w.bytes()
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
        let is_matrix = in_features > 1;
        let convert_to = self.weight_dtype.filter(|&d| is_matrix && d != tensor.dtype());
        Ok(CpuWeight {
            tensor: tensor.clone(),
            convert_to,
            converted: OnceLock::new(),
            layout,
            out_features,
            in_features,
        })
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
        if act == Activation::GeluTanh {
            x.data.par_chunks_mut(1 << 14).for_each(simd::gelu_tanh_in_place);
            return;
        }
        let f: fn(f32) -> f32 = match act {
            Activation::GeluTanh => gelu_tanh,
            Activation::Gelu => gelu_erf,
            Activation::Relu => |v| v.max(0.0),
            Activation::Silu => silu,
        };
        x.data.par_chunks_mut(1 << 14).for_each(|chunk| chunk.iter_mut().for_each(|v| *v = f(*v)));
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
            // A block with pruned heads fills only the start of its rows.
            store.keys[at..at + k.cols].copy_from_slice(k.row(row));
            store.values[at..at + v.cols].copy_from_slice(v.row(row));
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
        // One task per (sequence, head); each returns its [len, d] slab.
        let tasks: Vec<(usize, usize)> =
            (0..sequences.len()).flat_map(|s| (0..p.num_heads).map(move |h| (s, h))).collect();
        // Split across threads unless the work is tiny (decoding steps keep the workers awake, so a
        // split costs little).
        let work: usize = sequences.iter().map(|s| s.len * (s.first_position + s.len)).sum::<usize>() * p.num_heads * d;
        let attend_head = |&(s, h): &(usize, usize)| {
            let seq = &sequences[s];
            let rows = cached_rows(store, layer, seq, h / (p.num_heads / p.num_kv_heads), d);
            if seq.len >= PREFILL_ATTENTION_ROWS {
                return attend_prefill(q, store, seq, &rows, h, p);
            }
            let mut out = vec![0.0f32; seq.len * d];
            let mut scores = vec![0.0f32; rows.len()];
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
        };
        let slabs: Vec<Vec<f32>> = if work < 1 << 14 {
            tasks.iter().map(attend_head).collect()
        } else {
            tasks.par_iter().map(attend_head).collect()
        };
        let mut out = Matrix::zeros(q.rows, p.num_heads * d);
        for (&(s, h), slab) in tasks.iter().zip(&slabs) {
            let seq = &sequences[s];
            for i in 0..seq.len {
                out.data[(seq.first_row + i) * out.cols + h * d..][..d].copy_from_slice(&slab[i * d..(i + 1) * d]);
            }
        }
        out
    }

    fn attention_probs(
        &self,
        q: &Matrix,
        store: &CpuKv,
        layer: usize,
        seq: &SeqSlice<'_>,
        p: &AttentionParams,
    ) -> Vec<f32> {
        let group = p.num_heads / p.num_kv_heads;
        (0..p.num_heads)
            .flat_map(|h| {
                let rows = cached_rows(store, layer, seq, h / group, p.head_dim);
                attention_scores(q, store, seq, &rows, h, p)
            })
            .collect()
    }

    fn scale_heads(&self, x: &mut Matrix, scales: &[f32], head_dim: usize) {
        for row in x.rows_mut() {
            for (head, &scale) in row.chunks_exact_mut(head_dim).zip(scales) {
                head.iter_mut().for_each(|v| *v *= scale);
            }
        }
    }

    fn gather_rows(&self, x: &Matrix, rows: &[usize]) -> Matrix {
        let mut out = Matrix::zeros(rows.len(), x.cols);
        for (dst, &r) in out.rows_mut().zip(rows) {
            dst.copy_from_slice(x.row(r));
        }
        out
    }

    fn contrast_acd(
        &self,
        upper: &Matrix,
        lower_features: &Matrix,
        lower_head: &CpuWeight,
        alpha: f32,
        min_candidates: usize,
    ) -> Matrix {
        let mut out = Matrix::zeros(upper.rows, upper.cols);
        if lower_head.layout == Layout::InOut {
            // A head stored [hidden, vocab] has no contiguous vocabulary rows to pick: compute it all.
            let lower = self.linear(lower_features, lower_head, None);
            for (r, row) in out.rows_mut().enumerate() {
                crate::exits::acd(upper.row(r), lower.row(r), alpha, min_candidates, row);
            }
            return out;
        }
        let (data, n_in) = (lower_head.data(), lower_head.in_features);
        for (r, row) in out.rows_mut().enumerate() {
            let features = lower_features.row(r);
            crate::exits::acd_with(upper.row(r), alpha, min_candidates, row, |tokens, logits| {
                const TOKENS_PER_TASK: usize = 256;
                tokens.par_chunks(TOKENS_PER_TASK).zip(logits.par_chunks_mut(TOKENS_PER_TASK)).for_each(
                    |(tokens, logits)| {
                        for (logit, &token) in logits.iter_mut().zip(tokens) {
                            *logit = simd::dot(features, data, token as usize * n_in);
                        }
                    },
                );
            });
        }
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

/// Below this many rows a product is a few matrix-vector products (decoding: bound by reading the
/// weight once); from it on, a cache-blocked GEMM (prefill, large batches: bound by arithmetic).
const GEMM_MIN_ROWS: usize = 64;

/// `x: [t, in]`, `w: [out, in]` stored row by row: each output feature is a dot product with one
/// weight row, so the weight streams through once for all tokens.
fn matmul_out_in(x: &Matrix, w: &CpuWeight) -> Matrix {
    let (t, n_in, n_out) = (x.rows, w.in_features, w.out_features);
    if t >= GEMM_MIN_ROWS {
        return gemm_weight(x, w);
    }
    let data = w.data();
    let chunk = rows_per_task(n_out);
    let mut out_t = vec![0.0f32; n_out * t]; // [out, t], transposed at the end when t > 1
    out_t.par_chunks_mut(t * chunk).enumerate().for_each(|(c, block)| {
        let first_row = c * chunk;
        let rows = block.len() / t;
        if t == 1 {
            // Four weight rows per pass, the token's input loaded once for them.
            let x0 = x.row(0);
            for group in (0..rows).step_by(4) {
                let width = 4.min(rows - group);
                simd::dot_rows(x0, data, (first_row + group) * n_in, n_in, &mut block[group..group + width]);
            }
            return;
        }
        // Three weight rows times four tokens per tile, all twelve sums in registers.
        for group in (0..rows).step_by(3) {
            let width = 3.min(rows - group);
            for tokens in (0..t).step_by(4) {
                let count = 4.min(t - tokens);
                let xs: [&[f32]; 4] = std::array::from_fn(|c| x.row(tokens + c.min(count - 1)));
                let tile = simd::dot_tile(&xs[..count], data, (first_row + group) * n_in, n_in, width);
                for (r, sums) in tile[..width].iter().enumerate() {
                    block[(group + r) * t + tokens..][..count].copy_from_slice(&sums[..count]);
                }
            }
        }
    });
    if t == 1 {
        return Matrix::from_vec(out_t, 1, n_out);
    }
    let mut out = Matrix::zeros(t, n_out);
    for (ti, row) in out.rows_mut().enumerate() {
        for (o, slot) in row.iter_mut().enumerate() {
            *slot = out_t[o * t + ti];
        }
    }
    out
}

/// `x: [t, in]`, `w: [in, out]` stored row by row (GPT-2's Conv1D): each input feature scales one
/// weight row into the outputs. Below GEMM size the input features are split among the threads, so
/// that each streams a contiguous part of the weight into its own sums, added at the end.
fn matmul_in_out(x: &Matrix, w: &CpuWeight) -> Matrix {
    let (t, n_in, n_out) = (x.rows, w.in_features, w.out_features);
    if t >= GEMM_MIN_ROWS {
        return gemm_weight(x, w);
    }
    let data = w.data();
    if t == 1 {
        return sum_over_input_ranges(1, n_in, n_out, |rows, acc| {
            simd::axpy_rows(acc, &x.row(0)[rows.clone()], data, rows.start * n_out, n_out);
        });
    }
    if t <= simd::AXPY_TOKENS {
        // A few tokens (beams, contrastive candidates): the weight streams as for one token, each
        // row scaled into every token's sums.
        return sum_over_input_ranges(t, n_in, n_out, |rows, acc| {
            let coeffs: Vec<&[f32]> = (0..t).map(|ti| &x.row(ti)[rows.clone()]).collect();
            let mut ys: Vec<&mut [f32]> = acc.chunks_exact_mut(n_out).collect();
            simd::axpy_rows_tokens(&mut ys, &coeffs, data, rows.start * n_out, n_out);
        });
    }
    // More tokens: sixteen weight rows at a time are packed strip by strip (widened to f32), then the
    // packed strips are swept for every six tokens with the sums in registers. The packed block stays
    // in L2 for all the tokens, and the sums [t, out] are touched once per block. (Narrower column
    // chunks or taller blocks measured slower.)
    const BLOCK_ROWS: usize = 16;
    let strips = n_out / simd::STRIP;
    sum_over_input_ranges(t, n_in, n_out, |rows, acc| {
        let mut packed = vec![0.0f32; BLOCK_ROWS * strips * simd::STRIP];
        for block in rows.clone().step_by(BLOCK_ROWS) {
            let block_end = (block + BLOCK_ROWS).min(rows.end);
            simd::pack_strips(data, block * n_out, n_out, block_end - block, strips, &mut packed);
            for (group, acc) in acc.chunks_mut(simd::STRIP_TOKENS * n_out).enumerate() {
                let tokens = group * simd::STRIP_TOKENS..((group + 1) * simd::STRIP_TOKENS).min(t);
                let xs: Vec<&[f32]> = tokens.map(|ti| &x.row(ti)[block..block_end]).collect();
                let mut rows_acc: Vec<&mut [f32]> = acc.chunks_exact_mut(n_out).collect();
                simd::strips_packed(&xs, &packed, strips, &mut rows_acc);
                // Columns past the last full strip (widths that are not a multiple of 16).
                for (xs, row) in xs.iter().zip(rows_acc) {
                    let first = block * n_out + strips * simd::STRIP;
                    simd::axpy_rows(&mut row[strips * simd::STRIP..], xs, data, first, n_out);
                }
            }
        }
    })
}

/// `[t, n_out]`: the input features `0..n_in` split into one contiguous range per thread; `part(range,
/// sums)` adds that range's contribution to zeroed sums of its own, and the sums are added up.
fn sum_over_input_ranges(
    t: usize,
    n_in: usize,
    n_out: usize,
    part: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
) -> Matrix {
    let parts = rayon::current_num_threads().clamp(1, n_in.max(1));
    let per_part = n_in.div_ceil(parts);
    let partials: Vec<Vec<f32>> = (0..parts)
        .into_par_iter()
        .map(|p| {
            let mut acc = vec![0.0f32; t * n_out];
            part(p * per_part..((p + 1) * per_part).min(n_in), &mut acc);
            acc
        })
        .collect();
    let mut partials = partials.into_iter();
    let mut sum = partials.next().unwrap_or_else(|| vec![0.0; t * n_out]);
    for partial in partials {
        simd::axpy_f32(&mut sum, 1.0, &partial);
    }
    Matrix::from_vec(sum, t, n_out)
}

/// Output rows per task in the matrix-vector products: enough tasks to balance the threads, few
/// enough to amortise each.
fn rows_per_task(n_out: usize) -> usize {
    (n_out / (8 * rayon::current_num_threads().max(1))).clamp(16, 1024)
}

/// `x: [t, in]` times the weight (either layout) with a cache-blocked GEMM. f32 weights are used in
/// place; f16/bf16 weights are widened one panel of output features at a time.
fn gemm_weight(x: &Matrix, w: &CpuWeight) -> Matrix {
    let (t, n_in, n_out) = (x.rows, w.in_features, w.out_features);
    let mut out = Matrix::zeros(t, n_out);
    let lhs = || Operand::rows(x.data.as_ptr(), n_in);
    // The weight seen as rhs [k = in, n = out], in either layout: [n_out, n_in] rows of output features
    // or [n_in, n_out] rows of input features.
    let as_rhs = |ptr: *const f32, width: usize| match w.layout {
        Layout::OutIn => Operand { ptr, row_stride: 1, col_stride: n_in as isize },
        Layout::InOut => Operand::rows(ptr, width),
    };
    match w.data() {
        // SAFETY: x is [t, n_in] row-major and the weight holds n_in * n_out elements in its layout
        // (shapes checked when the weight was created); out holds t * n_out.
        WeightData::F32(data) => unsafe {
            gemm_into(&mut out.data, (t, n_out, n_in), lhs(), as_rhs(data.as_ptr(), n_out), 1.0, true)
        },
        narrow => {
            const PANEL: usize = 256;
            let panels: Vec<(usize, Vec<f32>)> = (0..n_out.div_ceil(PANEL))
                .into_par_iter()
                .map(|p| {
                    let (o0, width) = (p * PANEL, PANEL.min(n_out - p * PANEL));
                    // The panel of output features o0.. widened to f32, in the weight's own layout.
                    let mut panel = vec![0.0f32; width * n_in];
                    match w.layout {
                        Layout::OutIn => narrow.read_f32(o0 * n_in, &mut panel),
                        Layout::InOut => {
                            for (i, row) in panel.chunks_exact_mut(width).enumerate() {
                                narrow.read_f32(i * n_out + o0, row);
                            }
                        }
                    }
                    let mut block = vec![0.0f32; t * width];
                    // SAFETY: x is [t, n_in]; panel holds the n_in * width elements of an [n_in, width]
                    // rhs in the weight's layout; block holds t * width.
                    unsafe {
                        gemm_into(&mut block, (t, width, n_in), lhs(), as_rhs(panel.as_ptr(), width), 1.0, false)
                    };
                    (o0, block)
                })
                .collect();
            for (o0, block) in panels {
                let width = block.len() / t;
                for (ti, row) in out.rows_mut().enumerate() {
                    row[o0..o0 + width].copy_from_slice(&block[ti * width..(ti + 1) * width]);
                }
            }
        }
    }
    out
}

/// A matrix operand in memory: element (r, c) is at `ptr + r * row_stride + c * col_stride`.
#[derive(Clone, Copy)]
struct Operand {
    ptr: *const f32,
    row_stride: isize,
    col_stride: isize,
}

impl Operand {
    /// A row-major matrix whose rows are `row_stride` elements apart.
    fn rows(ptr: *const f32, row_stride: usize) -> Self {
        Operand { ptr, row_stride: row_stride as isize, col_stride: 1 }
    }
}

/// `dst[m, n] = scale * lhs[m, k] · rhs[k, n]` with the `gemm` crate; `dst` is row-major, contiguous.
///
/// # Safety
/// `lhs` must address `m x k` and `rhs` `k x n` readable elements through their strides, and `dst` must
/// hold `m * n` elements.
unsafe fn gemm_into(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    lhs: Operand,
    rhs: Operand,
    scale: f32,
    parallel: bool,
) {
    debug_assert!(dst.len() >= m * n);
    let parallelism =
        if parallel { gemm::Parallelism::Rayon(rayon::current_num_threads()) } else { gemm::Parallelism::None };
    gemm::gemm(
        m,
        n,
        k,
        dst.as_mut_ptr(),
        1,
        n as isize,
        false,
        lhs.ptr,
        lhs.col_stride,
        lhs.row_stride,
        rhs.ptr,
        rhs.col_stride,
        rhs.row_stride,
        0.0,
        scale,
        false,
        false,
        false,
        parallelism,
    )
}

/// From this many new tokens on, a sequence's attention runs as two small matrix products per head.
const PREFILL_ATTENTION_ROWS: usize = 16;

/// Where each position `0..seq.first_position + seq.len` of a sequence keeps its key/value row for
/// `layer` and `kv_head`, as offsets into the store.
fn cached_rows(store: &CpuKv, layer: usize, seq: &SeqSlice<'_>, kv_head: usize, head_dim: usize) -> Vec<usize> {
    (0..seq.first_position + seq.len)
        .map(|pos| {
            let slot = seq.block_table[pos / store.block_size] as usize * store.block_size + pos % store.block_size;
            store.offset(layer, slot) + kv_head * head_dim
        })
        .collect()
}

/// The `width`-wide runs of `source` starting at each of `rows`, packed: `[rows.len(), width]`.
fn gathered(source: &[f32], rows: &[usize], width: usize) -> Vec<f32> {
    rows.iter().flat_map(|&at| &source[at..at + width]).copied().collect()
}

/// One head's attention probabilities for a sequence's new rows as a matrix product: gather its keys
/// (they sit in cache blocks), `S = scale * Q K^T`, the causal (and window) mask as zeros, row
/// softmax. Returns `[len, ctx]`.
fn attention_scores(
    q: &Matrix,
    store: &CpuKv,
    seq: &SeqSlice<'_>,
    rows: &[usize],
    h: usize,
    p: &AttentionParams,
) -> Vec<f32> {
    let d = p.head_dim;
    let (t, ctx) = (seq.len, rows.len());
    let keys = gathered(&store.keys, rows, d);
    let mut scores = vec![0.0f32; t * ctx];
    let queries = Operand::rows(q.data[seq.first_row * q.cols + h * d..].as_ptr(), q.cols);
    let keys_t = Operand { ptr: keys.as_ptr(), row_stride: 1, col_stride: d as isize };
    // SAFETY: the queries are t rows of q from row seq.first_row, column h * d, d wide; keys is
    // [ctx, d] row-major, read as its transpose [d, ctx]; scores holds t * ctx.
    unsafe { gemm_into(&mut scores, (t, ctx, d), queries, keys_t, p.scale, false) };
    for (i, row) in scores.chunks_exact_mut(ctx).enumerate() {
        let pos = seq.first_position + i;
        let first = p.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        row[..first].fill(0.0);
        row[pos + 1..].fill(0.0);
        softmax_in_place(&mut row[first..=pos]);
    }
    scores
}

/// One head of one sequence's attention as two matrix products: the probabilities
/// ([`attention_scores`]), then `O = P V`. Returns `[len, head_dim]`.
fn attend_prefill(
    q: &Matrix,
    store: &CpuKv,
    seq: &SeqSlice<'_>,
    rows: &[usize],
    h: usize,
    p: &AttentionParams,
) -> Vec<f32> {
    let d = p.head_dim;
    let (t, ctx) = (seq.len, rows.len());
    let scores = attention_scores(q, store, seq, rows, h, p);
    let values = gathered(&store.values, rows, d);
    let mut out = vec![0.0f32; t * d];
    // SAFETY: scores is [t, ctx] and values [ctx, d], both row-major; out holds t * d.
    unsafe {
        gemm_into(
            &mut out,
            (t, d, ctx),
            Operand::rows(scores.as_ptr(), ctx),
            Operand::rows(values.as_ptr(), d),
            1.0,
            false,
        )
    };
    out
}

/// Dot product of two f32 slices (vectorised where the CPU allows).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    simd::dot_f32(a, b)
}

/// `y += a * x` (vectorised where the CPU allows).
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    simd::axpy_f32(y, a, x)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        (0..n as u64)
            .map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed) >> 5) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// out[t][o] = Σ_i x[t][i] * w(o, i), in f64.
    fn naive(x: &Matrix, w: &CpuWeight) -> Vec<f64> {
        let data = w.data();
        let (n_in, n_out) = (w.in_features, w.out_features);
        let at = |o: usize, i: usize| match w.layout {
            Layout::OutIn => data.get(o * n_in + i),
            Layout::InOut => data.get(i * n_out + o),
        };
        let mut out = Vec::with_capacity(x.rows * n_out);
        for t in 0..x.rows {
            for o in 0..n_out {
                out.push((0..n_in).map(|i| x.row(t)[i] as f64 * at(o, i) as f64).sum());
            }
        }
        out
    }

    #[test]
    fn every_matrix_product_path_equals_the_naive_reference() {
        // Widths that are not multiples of the vector, strip or panel sizes; token counts that take the
        // matrix-vector, register-blocked and GEMM paths.
        let cpu = Cpu::default();
        for (n_in, n_out) in [(37usize, 53usize), (64, 300)] {
            for layout in [Layout::OutIn, Layout::InOut] {
                for dtype in [DType::F32, DType::F16, DType::BF16] {
                    let shape = match layout {
                        Layout::OutIn => vec![n_out, n_in],
                        Layout::InOut => vec![n_in, n_out],
                    };
                    let tensor = HostTensor::from_f32(values(n_in * n_out, 7), shape).converted(dtype);
                    let w = cpu.weight(&tensor, layout).expect("weight");
                    for rows in [1usize, 2, 3, 4, 5, 16, 33, 70] {
                        let x = Matrix::from_vec(values(rows * n_in, rows as u64), rows, n_in);
                        let got = cpu.linear(&x, &w, None);
                        for (g, r) in got.data.iter().zip(naive(&x, &w)) {
                            assert!(
                                (*g as f64 - r).abs() <= 1e-4 * (1.0 + r.abs()),
                                "{dtype} {layout:?} {n_in}x{n_out}, {rows} rows: {g} vs {r}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn weights_converted_on_first_use_compute_like_their_conversion() {
        let tensor = HostTensor::from_f32(values(40 * 24, 3), vec![40, 24]);
        let x = Matrix::from_vec(values(2 * 24, 4), 2, 24);
        let converted = Cpu::with_weight_dtype(DType::BF16).weight(&tensor, Layout::OutIn).expect("weight");
        let reference = Cpu::default().weight(&tensor.converted(DType::BF16), Layout::OutIn).expect("weight");
        assert_eq!(converted.bytes(), 40 * 24 * 2);
        let cpu = Cpu::default();
        assert_eq!(cpu.linear(&x, &converted, None), cpu.linear(&x, &reference, None));
    }
}
