//! Matrix products on the CPU: `x: [t, in]` times a weight in either stored layout and any dtype.
//! One token streams the weight once (bound by memory bandwidth); a few tokens share that stream
//! with their sums in registers ([`batched`]'s AVX-512 tiles where the CPU has them, else the AVX2
//! tiles of [`simd`]); many tokens use a cache-blocked GEMM (bound by arithmetic). Which path a
//! product takes is [`path`]'s choice. Checked against the plain product in the tests below and
//! against the reference backend by the conformance suite.

use rayon::prelude::*;

use super::{batched, simd, CpuWeight};
use crate::backend::{Layout, Matrix};
use crate::io::weights::WeightData;

/// `x: [t, in]` times `w` (`[out, in]` whatever its stored layout) -> `[t, out]`.
pub(super) fn product(x: &Matrix, w: &CpuWeight) -> Matrix {
    if let Some(q8) = w.q8() {
        return super::q8::product(x, q8);
    }
    product_by(path(x.rows, w.layout), x, w)
}

/// [`product`] along a given path (the tests take every one).
fn product_by(path: Path, x: &Matrix, w: &CpuWeight) -> Matrix {
    match (path, w.layout) {
        (Path::Gemm, _) => gemm_weight(x, w),
        (Path::Batched, Layout::OutIn) => batched::out_in(x, w.data(), w.out_features),
        (Path::Batched, Layout::InOut) => batched::in_out(x, w.data(), w.out_features),
        (Path::Stream, Layout::OutIn) => matmul_out_in(x, w),
        (Path::Stream, Layout::InOut) => matmul_in_out(x, w),
    }
}

/// How a product of `t` rows runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// Matrix-vector products, or the AVX2 few-token tiles: the weight streams once.
    Stream,
    /// [`batched`]'s AVX-512 register tiles.
    Batched,
    /// The cache-blocked GEMM of the `gemm` crate.
    Gemm,
}

/// Below this many rows a product is a few matrix-vector products (decoding: bound by reading the
/// weight once); from it on, a cache-blocked GEMM (prefill, large batches: bound by arithmetic).
const GEMM_MIN_ROWS: usize = 64;

/// With AVX-512, the rows from which the GEMM beats [`batched`]'s tiles, by stored layout. Measured
/// on 24 distinct 1024 x 4096 weights read from memory (`cargo bench --bench kernels --
/// linear_from_memory`, AMD EPYC Zen 4, 2 threads): `[out, in]` tiles 169 vs GEMM 90 GFLOP/s at
/// 128 rows and even at 512; `[in, out]` tiles 155 vs 146 at 64 rows, 150 vs 186 at 128.
const BATCHED_BELOW_OUT_IN: usize = 512;
const BATCHED_BELOW_IN_OUT: usize = 96;

fn path(t: usize, layout: Layout) -> Path {
    let batched_below = match layout {
        Layout::OutIn => BATCHED_BELOW_OUT_IN,
        Layout::InOut => BATCHED_BELOW_IN_OUT,
    };
    match t {
        0 | 1 => Path::Stream,
        _ if batched::available() => {
            if t < batched_below {
                Path::Batched
            } else {
                Path::Gemm
            }
        }
        _ if t < GEMM_MIN_ROWS => Path::Stream,
        _ => Path::Gemm,
    }
}

/// `x: [t, in]`, `w: [out, in]` stored row by row: each output feature is a dot product with one
/// weight row, so the weight streams through once for all tokens.
fn matmul_out_in(x: &Matrix, w: &CpuWeight) -> Matrix {
    let (t, n_in, n_out) = (x.rows, w.in_features, w.out_features);
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
        return Matrix { data: out_t, rows: 1, cols: n_out };
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
    Matrix { data: sum, rows: t, cols: n_out }
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
pub(super) struct Operand {
    pub ptr: *const f32,
    pub row_stride: isize,
    pub col_stride: isize,
}

impl Operand {
    /// A row-major matrix whose rows are `row_stride` elements apart.
    pub fn rows(ptr: *const f32, row_stride: usize) -> Self {
        Operand { ptr, row_stride: row_stride as isize, col_stride: 1 }
    }
}

/// `dst[m, n] = scale * lhs[m, k] · rhs[k, n]` with the `gemm` crate; `dst` is row-major, contiguous.
///
/// # Safety
/// `lhs` must address `m x k` and `rhs` `k x n` readable elements through their strides, and `dst` must
/// hold `m * n` elements.
pub(super) unsafe fn gemm_into(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::test_values as values;
    use crate::backend::Backend;
    use crate::io::weights::{DType, HostTensor};
    use crate::Cpu;

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
        // Widths that are not multiples of the vector, strip, panel or block sizes; token counts that
        // fill tiles, leave partial tiles, and take every path; each path taken whatever this CPU
        // would choose (the AVX-512 tiles where it has AVX-512).
        let cpu = Cpu::default();
        let mut paths = vec![Path::Stream, Path::Gemm];
        if batched::available() {
            paths.push(Path::Batched);
        }
        for (n_in, n_out) in [(37usize, 53usize), (64, 300), (100, 97)] {
            for layout in [Layout::OutIn, Layout::InOut] {
                for dtype in [DType::F32, DType::F16, DType::BF16] {
                    let shape = match layout {
                        Layout::OutIn => vec![n_out, n_in],
                        Layout::InOut => vec![n_in, n_out],
                    };
                    let tensor = HostTensor::from_f32(values(n_in * n_out, 7), shape).converted(dtype);
                    let w = cpu.weight(&tensor, layout).expect("weight");
                    for rows in [1usize, 2, 3, 4, 5, 8, 9, 16, 17, 33, 70, 130] {
                        let x = Matrix::new(values(rows * n_in, rows as u64), rows, n_in).expect("shape");
                        let expected = naive(&x, &w);
                        let chosen = cpu.linear(&x, &w, None).expect("linear");
                        assert_eq!(chosen, product_by(path(rows, layout), &x, &w));
                        for &path in &paths {
                            let got = product_by(path, &x, &w);
                            assert_eq!((got.rows, got.cols), (rows, n_out));
                            for (g, r) in got.data.iter().zip(&expected) {
                                assert!(
                                    (*g as f64 - r).abs() <= 1e-4 * (1.0 + r.abs()),
                                    "{path:?} {dtype} {layout:?} {n_in}x{n_out}, {rows} rows: {g} vs {r}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn weights_converted_on_first_use_compute_like_their_conversion() {
        let tensor = HostTensor::from_f32(values(40 * 24, 3), vec![40, 24]);
        let x = Matrix::new(values(2 * 24, 4), 2, 24).expect("shape");
        let converted = Cpu::with_weight_dtype(DType::BF16).weight(&tensor, Layout::OutIn).expect("weight");
        let reference = Cpu::default().weight(&tensor.converted(DType::BF16), Layout::OutIn).expect("weight");
        assert_eq!(converted.bytes(), 40 * 24 * 2);
        let cpu = Cpu::default();
        assert_eq!(
            cpu.linear(&x, &converted, None).expect("linear"),
            cpu.linear(&x, &reference, None).expect("linear")
        );
    }
}
