//! Matrix products for a few to a few hundred tokens (batched decoding, prefill of short prompts,
//! verifying drafted tokens) with AVX-512. The register tiles read the weight where it lies (no
//! packed copy), and the weight a tile will read next is prefetched into L2 while it computes, so
//! that reading the weight from memory overlaps the arithmetic:
//!
//! - `[in, out]` weights (GPT-2's Conv1D): a tile is up to 8 tokens x 48 output columns (24 zmm
//!   sums) over a block of [`K_BLOCK`] input features. Per feature it loads three weight vectors and
//!   broadcasts each token's input: 24 FMAs for 11 loads. Threads take ranges of columns; a range
//!   goes block by block, panel by panel, and the first tokens' tile of a panel prefetches the same
//!   columns of the next block's rows. (Packing the block first measured slower: the copy itself
//!   stalls, and the rows come from L2 anyway.)
//! - `[out, in]` weights (nn.Linear, heads): a tile is 3 weight rows x up to 8 tokens (24 zmm sums,
//!   each over 16 input features at a time, added across lanes at the end). Per 16 features it loads
//!   three weight vectors and each token's inputs: 24 FMAs for 11 loads. The rows stay in L1 for the
//!   next tokens, and every tile prefetches the rows of the next one.
//!
//! Weights may be f32, f16 or bf16, widened in registers; sums are f32, added in input-feature
//! order. The edges (columns, input features, tokens) are masked loads and stores or smaller tiles,
//! so any shape works. Chosen at run time when the CPU has AVX-512 F/BW/VL ([`available`]);
//! [`super::products`] decides from how many tokens on, and uses its AVX2 and scalar paths on other
//! CPUs. Its tests hold every path to the plain product computed in f64.
//!
//! Measured with `cargo bench --bench kernels -- linear_from_memory` (16 tokens, 24 distinct
//! 1024 x 4096 weights read from memory) and `layerwise bench --batch 16`: see the README.

use rayon::prelude::*;

use crate::backend::q8::{Q8Matrix, BLOCK};
use crate::backend::Matrix;
use crate::io::weights::WeightData;

/// Most tokens of one `[in, out]` tile.
const IN_OUT_TOKENS: usize = 8;
/// Output columns of one `[in, out]` tile: three 16-lane vectors.
const PANEL: usize = 48;
/// Input features (weight rows) per block of an `[in, out]` product: also how far ahead its tiles
/// prefetch (32 measured faster than 16, 24, 64 or 128).
const K_BLOCK: usize = 32;
/// Most output columns of one task of an `[in, out]` product (a block of its rows stays in L2).
const MAX_TASK_WIDTH: usize = 1536;
/// Tasks of an `[in, out]` product per thread: enough that the threads finish together however
/// the width divides into panels.
const TASKS_PER_THREAD: usize = 4;
/// Weight rows of one `[out, in]` tile.
const OUT_IN_ROWS: usize = 3;
/// Tokens of one `[out, in]` tile.
const OUT_IN_TOKENS: usize = 8;

/// True when this CPU runs the AVX-512 kernels.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A raw pointer to the output that tasks writing disjoint parts of it may share.
#[derive(Clone, Copy)]
struct Output(*mut f32);
// SAFETY: every task writes a range of columns no other task writes (see the callers).
unsafe impl Send for Output {}
unsafe impl Sync for Output {}

impl Output {
    /// The output `offset` elements on (a method, so that closures capture the whole `Output`).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// `x: [t, in]` times `w: [in, out]` (row `i` holds input feature `i`'s weight for every output)
/// -> `[t, out]`. Threads take ranges of output columns; each runs every token over [`K_BLOCK`]
/// rows of each 48-column panel at a time while the next rows are prefetched.
///
/// # Panics
/// When [`available`] is false or `w` holds fewer than `in * out` elements.
pub fn in_out(x: &Matrix, w: WeightData<'_>, n_out: usize) -> Matrix {
    assert!(available(), "batched::in_out needs AVX-512");
    let (t, n_in) = (x.rows, x.cols);
    assert!(w.len() >= n_in * n_out, "batched::in_out: the weight is smaller than [{n_in}, {n_out}]");
    let mut out = Matrix::zeros(t, n_out);
    if t == 0 || n_out == 0 || n_in == 0 {
        return out;
    }
    let task_width =
        n_out.div_ceil(TASKS_PER_THREAD * rayon::current_num_threads()).next_multiple_of(PANEL).min(MAX_TASK_WIDTH);
    let groups = t.div_ceil(IN_OUT_TOKENS);
    let dst = Output(out.data.as_mut_ptr());
    (0..n_out.div_ceil(task_width)).into_par_iter().for_each(|task| {
        let first = task * task_width;
        let width = task_width.min(n_out - first);
        let panels = width.div_ceil(PANEL);
        let mut inputs = vec![0.0f32; groups * K_BLOCK * IN_OUT_TOKENS];
        for k in (0..n_in).step_by(K_BLOCK) {
            let depth = K_BLOCK.min(n_in - k);
            // Each group's inputs for these rows, row after row (the tiles broadcast them in order).
            for (g, inputs) in inputs.chunks_exact_mut(K_BLOCK * IN_OUT_TOKENS).enumerate() {
                let tokens = IN_OUT_TOKENS.min(t - g * IN_OUT_TOKENS);
                for i in 0..depth {
                    for r in 0..tokens {
                        inputs[i * tokens + r] = x.data[(g * IN_OUT_TOKENS + r) * n_in + k + i];
                    }
                }
            }
            let next_depth = K_BLOCK.min(n_in - k - depth);
            for p in 0..panels {
                let column = first + p * PANEL;
                for (g, inputs) in inputs.chunks_exact(K_BLOCK * IN_OUT_TOKENS).enumerate() {
                    let tokens = IN_OUT_TOKENS.min(t - g * IN_OUT_TOKENS);
                    let tile = InOutTile {
                        inputs: inputs.as_ptr(),
                        w_offset: k * n_out + column,
                        w_stride: n_out,
                        depth,
                        out: dst.at(g * IN_OUT_TOKENS * n_out + column),
                        out_stride: n_out,
                        width: PANEL.min(first + width - column),
                        accumulate: k > 0,
                        // The first tokens fetch the next block (the other tokens find it in L2).
                        prefetch_rows: if g == 0 && next_depth == K_BLOCK { K_BLOCK } else { 0 },
                    };
                    // SAFETY: AVX-512 is present (asserted above); the tile reads depth * tokens
                    // inputs (inside `inputs`), weight rows k..k + depth at columns column..column +
                    // width (inside w: its size was checked above; prefetches never fault) and
                    // writes `tokens` rows of out at those columns: inside out, and only this task's.
                    unsafe { x86::in_out_tile(tile, tokens, w) };
                }
            }
        }
    });
    out
}

/// `x: [t, in]` times `w: [out, in]` (row `o` holds output `o`'s weights) -> `[t, out]`. Threads
/// take ranges of weight rows (output columns).
///
/// # Panics
/// When [`available`] is false or `w` holds fewer than `out * in` elements.
pub fn out_in(x: &Matrix, w: WeightData<'_>, n_out: usize) -> Matrix {
    assert!(available(), "batched::out_in needs AVX-512");
    let n_in = x.cols;
    assert!(w.len() >= n_in * n_out, "batched::out_in: the weight is smaller than [{n_out}, {n_in}]");
    out_in_tiles(x, n_out, n_in, |tile, tokens| {
        // SAFETY: AVX-512 is present (asserted above). The tile reads `tokens` rows of x (inside x),
        // weight rows row..row + rows (inside w: checked above; prefetches never fault), and writes
        // out's rows at columns row..row + rows: inside out, and columns only this task writes.
        unsafe { x86::out_in_tile(tile, tokens, w) }
    })
}

/// [`out_in`] for 8-bit weights: each 16 weights widened and scaled in registers.
///
/// # Panics
/// When [`available`] is false or `x` is not `[t, w.in_features]`.
pub fn out_in_q8(x: &Matrix, w: &Q8Matrix) -> Matrix {
    assert!(available(), "batched::out_in_q8 needs AVX-512");
    assert_eq!(x.cols, w.in_features, "batched::out_in_q8: inputs of another width");
    if w.in_features == 0 {
        return Matrix::zeros(x.rows, w.out_features);
    }
    let stride = w.blocks * BLOCK;
    out_in_tiles(x, w.out_features, stride, |tile, tokens| {
        // SAFETY: AVX-512 is present (asserted above). The tile reads `tokens` rows of x up to
        // in_features (masked), quant rows row..row + rows in whole 16-byte pieces (rows are padded
        // to whole blocks), their scales, and writes out as in `out_in`.
        unsafe { x86::out_in_q8_tile(tile, tokens, w) }
    })
}

/// The `[out, in]` products' driver: tasks of weight-row groups, each running its tiles over every
/// group of tokens; `w_stride` is the distance between weight rows in elements.
fn out_in_tiles(x: &Matrix, n_out: usize, w_stride: usize, run: impl Fn(OutInTile, usize) + Sync) -> Matrix {
    let (t, n_in) = (x.rows, x.cols);
    let mut out = Matrix::zeros(t, n_out);
    if t == 0 || n_out == 0 {
        return out;
    }
    let groups = n_out.div_ceil(OUT_IN_ROWS);
    let groups_per_task = groups.div_ceil(8 * rayon::current_num_threads()).clamp(1, 256);
    let dst = Output(out.data.as_mut_ptr());
    (0..groups.div_ceil(groups_per_task)).into_par_iter().for_each(|task| {
        let first = task * groups_per_task * OUT_IN_ROWS;
        let end = (first + groups_per_task * OUT_IN_ROWS).min(n_out);
        for row in (first..end).step_by(OUT_IN_ROWS) {
            let rows = OUT_IN_ROWS.min(end - row);
            for token in (0..t).step_by(OUT_IN_TOKENS) {
                let tokens = OUT_IN_TOKENS.min(t - token);
                let tile = OutInTile {
                    x: x.data[token * n_in..].as_ptr(),
                    x_stride: n_in,
                    w_offset: row * w_stride,
                    w_stride,
                    depth: n_in,
                    out: dst.at(token * n_out + row),
                    out_stride: n_out,
                    rows,
                };
                run(tile, tokens);
            }
        }
    });
    out
}

/// One `[in, out]` tile: for each of up to 8 tokens `r` and each column `j < width` (<= 48),
/// `out[r][j] (+)= Σ_{i < depth} inputs[i * tokens + r] * w[w_offset + i * w_stride + j]`.
#[derive(Clone, Copy)]
struct InOutTile {
    /// `[depth, tokens]`: the tokens' inputs, feature after feature.
    inputs: *const f32,
    /// Where the tile's first weight row starts, and the distance between rows (both in elements).
    w_offset: usize,
    w_stride: usize,
    depth: usize,
    out: *mut f32,
    out_stride: usize,
    width: usize,
    /// Add to what `out` holds (a later block of rows) instead of overwriting it.
    accumulate: bool,
    /// Prefetch the rows this many rows on (the next block's), 0 for none.
    prefetch_rows: usize,
}

/// One `[out, in]` tile: for each of up to 8 tokens `r` and `rows` (<= 3) weight rows `o`,
/// `out[r][o] = Σ_{i < depth} x[r][i] * w[w_offset + o * w_stride + i]`.
#[derive(Clone, Copy)]
struct OutInTile {
    x: *const f32,
    x_stride: usize,
    w_offset: usize,
    w_stride: usize,
    depth: usize,
    out: *mut f32,
    out_stride: usize,
    rows: usize,
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::{bf16, f16};

    use super::{InOutTile, OutInTile, Q8Matrix, BLOCK, OUT_IN_ROWS, OUT_IN_TOKENS, PANEL};

    use crate::io::weights::WeightData;

    /// The low `n` lanes of 16 (all of them from 16 on).
    #[inline]
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            0xFFFF
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }

    /// Sixteen f32 weights (lanes outside `mask` are zero and not read).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load_f32(p: *const f32, mask: __mmask16) -> __m512 {
        _mm512_maskz_loadu_ps(mask, p)
    }

    /// Sixteen f16 weights widened to f32 (lanes outside `mask` are zero and not read).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load_f16(p: *const f16, mask: __mmask16) -> __m512 {
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p.cast()))
    }

    /// Sixteen bf16 weights widened to f32 (the bits moved to the top half; lanes outside `mask`
    /// are zero and not read).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load_bf16(p: *const bf16, mask: __mmask16) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p.cast()))))
    }

    macro_rules! in_out_kernel {
        ($name:ident, $ty:ty, $load:ident) => {
            /// An [`InOutTile`] of `M` tokens over weights of this dtype: 3 x M sums in registers.
            ///
            /// # Safety
            /// AVX-512 F/BW/VL; the tile's reads and writes must lie inside its buffers.
            #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
            unsafe fn $name<const M: usize>(tile: InOutTile, w: *const $ty) {
                const V: usize = PANEL / 16;
                let masks: [__mmask16; V] = std::array::from_fn(|v| lanes(tile.width.saturating_sub(16 * v)));
                let mut sums = [[_mm512_setzero_ps(); V]; M];
                if tile.accumulate {
                    for (r, sums) in sums.iter_mut().enumerate() {
                        let at = tile.out.wrapping_add(r * tile.out_stride);
                        for (v, sum) in sums.iter_mut().enumerate() {
                            *sum = _mm512_maskz_loadu_ps(masks[v], at.wrapping_add(16 * v));
                        }
                    }
                }
                let mut row = w.wrapping_add(tile.w_offset);
                let mut inputs = tile.inputs;
                let ahead = tile.prefetch_rows * tile.w_stride;
                let row_bytes = PANEL * std::mem::size_of::<$ty>();
                for _ in 0..tile.depth {
                    if ahead > 0 {
                        // The same columns of the next block's rows, into L2 while this one computes.
                        let next = row.wrapping_add(ahead).cast::<i8>();
                        for byte in (0..row_bytes).step_by(64) {
                            _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(byte));
                        }
                    }
                    let weights: [__m512; V] = std::array::from_fn(|v| $load(row.wrapping_add(16 * v), masks[v]));
                    for (r, sums) in sums.iter_mut().enumerate() {
                        let input = _mm512_set1_ps(*inputs.add(r));
                        for (sum, weight) in sums.iter_mut().zip(weights) {
                            *sum = _mm512_fmadd_ps(input, weight, *sum);
                        }
                    }
                    row = row.wrapping_add(tile.w_stride);
                    inputs = inputs.add(M);
                }
                for (r, sums) in sums.iter().enumerate() {
                    let at = tile.out.wrapping_add(r * tile.out_stride);
                    for (v, sum) in sums.iter().enumerate() {
                        _mm512_mask_storeu_ps(at.wrapping_add(16 * v), masks[v], *sum);
                    }
                }
            }
        };
    }

    in_out_kernel!(in_out_f32, f32, load_f32);
    in_out_kernel!(in_out_f16, f16, load_f16);
    in_out_kernel!(in_out_bf16, bf16, load_bf16);

    macro_rules! out_in_kernel {
        ($name:ident, $ty:ty, $load:ident) => {
            /// An [`OutInTile`] of `M` tokens over weights of this dtype.
            ///
            /// # Safety
            /// AVX-512 F/BW/VL; the tile's reads and writes must lie inside x, w and out.
            #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
            unsafe fn $name<const M: usize>(tile: OutInTile, w: *const $ty) {
                // Missing rows (the last tile of a width not a multiple of 4) repeat the last one
                // and are not stored.
                let rows: [*const $ty; OUT_IN_ROWS] =
                    std::array::from_fn(|o| w.wrapping_add(tile.w_offset + o.min(tile.rows - 1) * tile.w_stride));
                let mut sums = [[_mm512_setzero_ps(); M]; OUT_IN_ROWS];
                let mut i = 0;
                while i < tile.depth {
                    let mask = lanes(tile.depth - i);
                    // The next tile's rows (the same columns), into L2 while this tile computes, so
                    // that reading the weight from memory overlaps the arithmetic.
                    let bytes = 16 * std::mem::size_of::<$ty>();
                    for o in 0..OUT_IN_ROWS {
                        let next = rows[o].wrapping_add(OUT_IN_ROWS * tile.w_stride + i).cast::<i8>();
                        for line in (0..bytes).step_by(64) {
                            _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(line));
                        }
                    }
                    let weights: [__m512; OUT_IN_ROWS] = std::array::from_fn(|o| $load(rows[o].wrapping_add(i), mask));
                    for r in 0..M {
                        let input = _mm512_maskz_loadu_ps(mask, tile.x.wrapping_add(r * tile.x_stride + i));
                        for (sums, weight) in sums.iter_mut().zip(weights) {
                            sums[r] = _mm512_fmadd_ps(weight, input, sums[r]);
                        }
                    }
                    i += 16;
                }
                for (o, sums) in sums.iter().enumerate().take(tile.rows) {
                    for (r, sum) in sums.iter().enumerate() {
                        *tile.out.add(r * tile.out_stride + o) = _mm512_reduce_add_ps(*sum);
                    }
                }
            }
        };
    }

    out_in_kernel!(out_in_f32, f32, load_f32);
    out_in_kernel!(out_in_f16, f16, load_f16);
    out_in_kernel!(out_in_bf16, bf16, load_bf16);

    /// Calls `$kernel::<M>` for the runtime token count `$tokens` (1..=max).
    macro_rules! by_tokens {
        ($tokens:expr, $kernel:ident, $tile:expr, $w:expr, [$($m:literal),*]) => {
            match $tokens {
                $($m => $kernel::<$m>($tile, $w),)*
                other => unreachable!("{other} tokens in one tile"),
            }
        };
    }

    /// Runs an [`InOutTile`] of `tokens` (1..=8) tokens.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL; the tile's reads and writes must lie inside its buffers.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn in_out_tile(tile: InOutTile, tokens: usize, w: WeightData<'_>) {
        match w {
            WeightData::F32(w) => by_tokens!(tokens, in_out_f32, tile, w.as_ptr(), [1, 2, 3, 4, 5, 6, 7, 8]),
            WeightData::F16(w) => by_tokens!(tokens, in_out_f16, tile, w.as_ptr(), [1, 2, 3, 4, 5, 6, 7, 8]),
            WeightData::BF16(w) => by_tokens!(tokens, in_out_bf16, tile, w.as_ptr(), [1, 2, 3, 4, 5, 6, 7, 8]),
        }
    }

    /// An [`OutInTile`] of `M` tokens over 8-bit weights: each 16 quants widened and multiplied by
    /// their block's scale as they are loaded.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL and F16C; the tile's rows must exist in `w` and its reads and writes
    /// lie inside x and out.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn out_in_q8<const M: usize>(tile: OutInTile, w: &Q8Matrix) {
        let first_row = tile.w_offset / tile.w_stride;
        let rows: [usize; OUT_IN_ROWS] = std::array::from_fn(|o| first_row + o.min(tile.rows - 1));
        let (quants, scales) = (w.quants.as_ptr(), w.scales.as_ptr());
        let mut sums = [[_mm512_setzero_ps(); M]; OUT_IN_ROWS];
        let mut i = 0;
        while i < tile.depth {
            let mask = lanes(tile.depth - i);
            let block = i / BLOCK;
            for row in rows {
                // The next tile's rows, into L2 (one line holds 64 quants).
                if i % 64 == 0 {
                    _mm_prefetch::<_MM_HINT_T1>(quants.wrapping_add((row + OUT_IN_ROWS) * tile.w_stride + i).cast());
                }
            }
            let weights: [__m512; OUT_IN_ROWS] = std::array::from_fn(|o| {
                let q = _mm_loadu_si128(quants.add(rows[o] * tile.w_stride + i).cast());
                let scale = super::super::q8::scale_f32((*scales.add(rows[o] * w.blocks + block)).to_bits());
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), _mm512_set1_ps(scale))
            });
            for r in 0..M {
                let input = _mm512_maskz_loadu_ps(mask, tile.x.wrapping_add(r * tile.x_stride + i));
                for (sums, weight) in sums.iter_mut().zip(weights) {
                    sums[r] = _mm512_fmadd_ps(weight, input, sums[r]);
                }
            }
            i += 16;
        }
        for (o, sums) in sums.iter().enumerate().take(tile.rows) {
            for (r, sum) in sums.iter().enumerate() {
                *tile.out.add(r * tile.out_stride + o) = _mm512_reduce_add_ps(*sum);
            }
        }
    }

    /// Runs an 8-bit [`OutInTile`] of `tokens` (1..=8) tokens.
    ///
    /// # Safety
    /// As [`out_in_q8`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub(super) unsafe fn out_in_q8_tile(tile: OutInTile, tokens: usize, w: &Q8Matrix) {
        by_tokens!(tokens, out_in_q8, tile, w, [1, 2, 3, 4, 5, 6, 7, 8])
    }

    /// Runs an [`OutInTile`] of `tokens` (1..=6) tokens.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL; the tile's reads and writes must lie inside x, w and out.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn out_in_tile(tile: OutInTile, tokens: usize, w: WeightData<'_>) {
        debug_assert!((1..=OUT_IN_TOKENS).contains(&tokens));
        match w {
            WeightData::F32(w) => by_tokens!(tokens, out_in_f32, tile, w.as_ptr(), [1, 2, 3, 4, 5, 6, 7, 8]),
            WeightData::F16(w) => by_tokens!(tokens, out_in_f16, tile, w.as_ptr(), [1, 2, 3, 4, 5, 6, 7, 8]),
            WeightData::BF16(w) => by_tokens!(tokens, out_in_bf16, tile, w.as_ptr(), [1, 2, 3, 4, 5, 6, 7, 8]),
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    use super::{InOutTile, OutInTile, Q8Matrix};
    use crate::io::weights::WeightData;

    pub(super) unsafe fn in_out_tile(_: InOutTile, _: usize, _: WeightData<'_>) {
        unreachable!("AVX-512 kernels called off x86_64")
    }

    pub(super) unsafe fn out_in_tile(_: OutInTile, _: usize, _: WeightData<'_>) {
        unreachable!("AVX-512 kernels called off x86_64")
    }

    pub(super) unsafe fn out_in_q8_tile(_: OutInTile, _: usize, _: &Q8Matrix) {
        unreachable!("AVX-512 kernels called off x86_64")
    }
}
