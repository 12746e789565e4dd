//! Products with 8-bit weights ([`crate::backend::q8`]) on the CPU. Activations stay f32; each
//! 16 or 8 weights are sign-extended and converted to f32 in registers, so that a step reads one
//! byte per weight (plus a 2-byte scale per 32):
//!
//! - one token: four rows at a time against the token's input (AVX2: eight lanes; the sums of a
//!   block are scaled once at its end), rows split across threads;
//! - 2 to 511 tokens with AVX-512: [`super::batched`]'s `[out, in]` tile shape (3 rows x up to 8
//!   tokens, 24 zmm sums), each 16 weights scaled as they are widened;
//! - otherwise (more tokens, or no AVX-512): 64 rows at a time dequantised to f32 and multiplied with
//!   the `gemm` crate.
//!
//! Every path equals [`Q8Matrix::dot_row`]'s plain sums up to f32 rounding (tests below).

use rayon::prelude::*;

use super::batched;
use super::products::{gemm_into, Operand};
use crate::backend::q8::{Q8Matrix, BLOCK};
use crate::backend::Matrix;

/// Tokens from which the dequantise-and-GEMM path takes over from the AVX-512 tiles.
const TILES_BELOW: usize = 512;
/// Rows dequantised at a time on the GEMM path.
const GEMM_ROWS: usize = 64;

/// `x: [t, in]` times the 8-bit `[out, in]` weight -> `[t, out]`.
pub(super) fn product(x: &Matrix, w: &Q8Matrix) -> Matrix {
    let t = x.rows;
    if t == 1 {
        return one_token(x.row(0), w);
    }
    if t < TILES_BELOW && batched::available() {
        return batched::out_in_q8(x, w);
    }
    dequantize_and_multiply(x, w)
}

/// One token: four rows per pass, the rows split among the threads.
fn one_token(x: &[f32], w: &Q8Matrix) -> Matrix {
    let n_out = w.out_features;
    let chunk = (n_out / (8 * rayon::current_num_threads().max(1))).clamp(16, 1024);
    let mut out = vec![0.0f32; n_out];
    out.par_chunks_mut(chunk).enumerate().for_each(|(c, sums)| {
        let first = c * chunk;
        let mut r = 0;
        #[cfg(target_arch = "x86_64")]
        if super::simd::has_avx2() {
            while r + 4 <= sums.len() {
                // SAFETY: AVX2/FMA/F16C are present; rows first + r .. + 4 exist (sums has a slot for each).
                let dots = unsafe { x86::dot4(x, w, first + r) };
                sums[r..r + 4].copy_from_slice(&dots);
                r += 4;
            }
        }
        for (i, sum) in sums.iter_mut().enumerate().skip(r) {
            *sum = w.dot_row(x, first + i);
        }
    });
    Matrix { data: out, rows: 1, cols: n_out }
}

/// [`GEMM_ROWS`] rows at a time widened to f32 and multiplied with the `gemm` crate.
fn dequantize_and_multiply(x: &Matrix, w: &Q8Matrix) -> Matrix {
    let (t, n_in, n_out) = (x.rows, w.in_features, w.out_features);
    let panels: Vec<(usize, Vec<f32>)> = (0..n_out.div_ceil(GEMM_ROWS))
        .into_par_iter()
        .map(|p| {
            let (o0, width) = (p * GEMM_ROWS, GEMM_ROWS.min(n_out - p * GEMM_ROWS));
            let mut panel = vec![0.0f32; width * n_in];
            for (r, row) in panel.chunks_exact_mut(n_in.max(1)).enumerate().take(width) {
                w.dequantize_row(o0 + r, row);
            }
            let mut block = vec![0.0f32; t * width];
            // SAFETY: x is [t, n_in]; panel holds width rows of n_in (an [n_in, width] rhs read with
            // a column stride of n_in); block holds t * width.
            unsafe {
                gemm_into(
                    &mut block,
                    (t, width, n_in),
                    Operand::rows(x.data.as_ptr(), n_in),
                    Operand { ptr: panel.as_ptr(), row_stride: 1, col_stride: n_in as isize },
                    1.0,
                    false,
                )
            };
            (o0, block)
        })
        .collect();
    let mut out = Matrix::zeros(t, n_out);
    for (o0, block) in panels {
        let width = block.len() / t.max(1);
        for (ti, row) in out.rows_mut().enumerate() {
            row[o0..o0 + width].copy_from_slice(&block[ti * width..(ti + 1) * width]);
        }
    }
    out
}

/// A block's f16 scale as f32, with F16C (the `half` crate's conversion is not inlined into the
/// kernels).
///
/// # Safety
/// The CPU must support F16C.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "f16c")]
pub(super) unsafe fn scale_f32(bits: u16) -> f32 {
    use std::arch::x86_64::*;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{scale_f32, Q8Matrix, BLOCK};

    /// Eight quants at `q` as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn widen8(q: *const i8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(q.cast())))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    /// `x ·` rows `first .. first + 4` of `w`: per block, eight-lane sums of `q x` scaled by the
    /// block's scale into the row's total.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; rows `first .. first + 4` must exist; `x.len() == w.in_features`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot4(x: &[f32], w: &Q8Matrix, first: usize) -> [f32; 4] {
        let rows: [(&[i8], &[half::f16]); 4] = std::array::from_fn(|r| w.row(first + r));
        let n = x.len();
        let mut totals = [_mm256_setzero_ps(); 4];
        let full_blocks = n / BLOCK;
        let stride = w.blocks * BLOCK;
        for b in 0..full_blocks {
            if b % 2 == 0 {
                // The same columns of the next four rows (the next call's), one line of 64 quants
                // each: the hardware prefetchers alone leave decoding at half the bandwidth.
                for (quants, _) in &rows {
                    _mm_prefetch::<_MM_HINT_T0>(quants.as_ptr().wrapping_add(4 * stride + b * BLOCK).cast());
                }
            }
            let mut block = [_mm256_setzero_ps(); 4];
            for part in 0..BLOCK / 8 {
                let i = b * BLOCK + part * 8;
                let xv = _mm256_loadu_ps(x.as_ptr().add(i));
                for (sum, (quants, _)) in block.iter_mut().zip(&rows) {
                    *sum = _mm256_fmadd_ps(widen8(quants.as_ptr().add(i)), xv, *sum);
                }
            }
            for ((total, sum), (_, scales)) in totals.iter_mut().zip(block).zip(&rows) {
                let scale = scale_f32(scales[b].to_bits());
                *total = _mm256_fmadd_ps(sum, _mm256_set1_ps(scale), *total);
            }
        }
        let mut out = [hsum(totals[0]), hsum(totals[1]), hsum(totals[2]), hsum(totals[3])];
        if full_blocks * BLOCK < n {
            // The partial last block, in the plain order.
            let start = full_blocks * BLOCK;
            for (o, (quants, scales)) in out.iter_mut().zip(&rows) {
                let block: f32 = x[start..].iter().zip(&quants[start..n]).map(|(x, &q)| x * q as f32).sum();
                *o += scales[full_blocks].to_f32() * block;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::test_values as values;
    use crate::backend::Layout;
    use crate::io::weights::HostTensor;

    #[test]
    fn every_q8_path_equals_the_plain_block_sums() {
        // Widths with and without a partial block; token counts for each path.
        for (n_in, n_out) in [(64usize, 37usize), (45, 50), (100, 9)] {
            let tensor = HostTensor::from_f32(values(n_in * n_out, 5), vec![n_out, n_in]);
            let w = Q8Matrix::quantize(tensor.data(), Layout::OutIn, n_out, n_in);
            for t in [1usize, 2, 7, 8, 9, 17, 600] {
                let x = Matrix::new(values(t * n_in, t as u64), t, n_in).expect("shape");
                let mut paths = vec![("chosen", product(&x, &w)), ("gemm", dequantize_and_multiply(&x, &w))];
                if t == 1 {
                    paths.push(("one token", one_token(x.row(0), &w)));
                }
                if batched::available() {
                    paths.push(("tiles", batched::out_in_q8(&x, &w)));
                }
                for (name, got) in paths {
                    assert_eq!((got.rows, got.cols), (t, n_out), "{name}");
                    for r in 0..t {
                        for o in 0..n_out {
                            let expected = w.dot_row(x.row(r), o);
                            let g = got.row(r)[o];
                            assert!(
                                (g - expected).abs() <= 1e-4 * (1.0 + expected.abs()),
                                "{name} {n_in}x{n_out} t={t} [{r}][{o}]: {g} vs {expected}"
                            );
                        }
                    }
                }
            }
        }
    }
}
