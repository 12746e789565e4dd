//! The inner loops of decoding, vectorised: dot products and `y += a * w` against f32, f16 or bf16
//! weights. AVX2 + FMA (+ F16C for f16) are chosen at run time when the CPU has them; the scalar
//! versions are the fallback and the reference the vector versions are tested against.

use half::{bf16, f16};

use crate::weights::WeightData;

/// True when the AVX2/FMA/F16C kernels can run on this CPU.
#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x · w[start .. start + x.len()]`.
#[inline]
pub fn dot(x: &[f32], w: WeightData<'_>, start: usize) -> f32 {
    let n = x.len();
    match w {
        WeightData::F32(w) => dot_f32(x, &w[start..start + n]),
        WeightData::F16(w) => dot_f16(x, &w[start..start + n]),
        WeightData::BF16(w) => dot_bf16(x, &w[start..start + n]),
    }
}

/// `y += a * w[start .. start + y.len()]`.
#[inline]
pub fn axpy(y: &mut [f32], a: f32, w: WeightData<'_>, start: usize) {
    let n = y.len();
    match w {
        WeightData::F32(w) => axpy_f32(y, a, &w[start..start + n]),
        WeightData::F16(w) => axpy_f16(y, a, &w[start..start + n]),
        WeightData::BF16(w) => axpy_bf16(y, a, &w[start..start + n]),
    }
}

macro_rules! dispatch {
    ($avx:ident, $scalar:ident, $($arg:expr),*) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx2() {
                // SAFETY: the CPU supports AVX2, FMA and F16C (checked just above).
                return unsafe { x86::$avx($($arg),*) };
            }
        }
        scalar::$scalar($($arg),*)
    }};
}

/// `a · b` for f32 slices of equal length.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    dispatch!(dot_f32, dot_f32, a, b)
}

/// `a · b` with f16 weights.
#[inline]
pub fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    dispatch!(dot_f16, dot_f16, a, b)
}

/// `a · b` with bf16 weights.
#[inline]
pub fn dot_bf16(a: &[f32], b: &[bf16]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    dispatch!(dot_bf16, dot_bf16, a, b)
}

/// `y += a * x` for f32 slices of equal length.
#[inline]
pub fn axpy_f32(y: &mut [f32], a: f32, x: &[f32]) {
    debug_assert_eq!(y.len(), x.len());
    dispatch!(axpy_f32, axpy_f32, y, a, x)
}

/// `y += a * x` with f16 weights.
#[inline]
pub fn axpy_f16(y: &mut [f32], a: f32, x: &[f16]) {
    debug_assert_eq!(y.len(), x.len());
    dispatch!(axpy_f16, axpy_f16, y, a, x)
}

/// `y += a * x` with bf16 weights.
#[inline]
pub fn axpy_bf16(y: &mut [f32], a: f32, x: &[bf16]) {
    debug_assert_eq!(y.len(), x.len());
    dispatch!(axpy_bf16, axpy_bf16, y, a, x)
}

/// The portable reference kernels.
pub mod scalar {
    use half::{bf16, f16};

    /// Eight partial sums, so that the order of additions matches the vector kernels' lanes closely.
    pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        dot_with(a, b.len(), |i| b[i])
    }

    pub fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
        dot_with(a, b.len(), |i| b[i].to_f32())
    }

    pub fn dot_bf16(a: &[f32], b: &[bf16]) -> f32 {
        dot_with(a, b.len(), |i| b[i].to_f32())
    }

    fn dot_with(a: &[f32], n: usize, b: impl Fn(usize) -> f32) -> f32 {
        let mut acc = [0.0f32; 8];
        let full = n / 8 * 8;
        for base in (0..full).step_by(8) {
            for k in 0..8 {
                acc[k] += a[base + k] * b(base + k);
            }
        }
        let tail: f32 = (full..n).map(|i| a[i] * b(i)).sum();
        acc.iter().sum::<f32>() + tail
    }

    pub fn axpy_f32(y: &mut [f32], a: f32, x: &[f32]) {
        y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
    }

    pub fn axpy_f16(y: &mut [f32], a: f32, x: &[f16]) {
        y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x.to_f32());
    }

    pub fn axpy_bf16(y: &mut [f32], a: f32, x: &[bf16]) {
        y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x.to_f32());
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::{bf16, f16};

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let low = _mm256_castps256_ps128(v);
        let high = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(low, high);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Eight f16 at `p` widened to f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f16(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }

    /// Eight bf16 at `p` widened to f32 (a bf16 is the upper half of an f32).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_bf16(p: *const bf16) -> __m256 {
        let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))
    }

    macro_rules! dot_kernel {
        ($name:ident, $ty:ty, $load:ident, $widen:expr) => {
            /// # Safety
            /// The CPU must support AVX2, FMA and F16C; `a` and `b` have the same length.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(a: &[f32], b: &[$ty]) -> f32 {
                let n = a.len().min(b.len());
                let (pa, pb) = (a.as_ptr(), b.as_ptr());
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut i = 0;
                while i + 32 <= n {
                    for (k, acc) in acc.iter_mut().enumerate() {
                        let off = i + 8 * k;
                        *acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(off)), $load(pb.add(off)), *acc);
                    }
                    i += 32;
                }
                while i + 8 <= n {
                    acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), $load(pb.add(i)), acc[0]);
                    i += 8;
                }
                let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
                let mut total = hsum(sum);
                let widen = $widen;
                while i < n {
                    total += a[i] * widen(b[i]);
                    i += 1;
                }
                total
            }
        };
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_f32(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }

    dot_kernel!(dot_f32, f32, load_f32, |x: f32| x);
    dot_kernel!(dot_f16, f16, load_f16, |x: f16| x.to_f32());
    dot_kernel!(dot_bf16, bf16, load_bf16, |x: bf16| x.to_f32());

    macro_rules! axpy_kernel {
        ($name:ident, $ty:ty, $load:ident, $widen:expr) => {
            /// # Safety
            /// The CPU must support AVX2, FMA and F16C; `y` and `x` have the same length.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(y: &mut [f32], a: f32, x: &[$ty]) {
                let n = y.len().min(x.len());
                let (py, px) = (y.as_mut_ptr(), x.as_ptr());
                let va = _mm256_set1_ps(a);
                let mut i = 0;
                while i + 16 <= n {
                    let y0 = _mm256_fmadd_ps(va, $load(px.add(i)), _mm256_loadu_ps(py.add(i)));
                    let y1 = _mm256_fmadd_ps(va, $load(px.add(i + 8)), _mm256_loadu_ps(py.add(i + 8)));
                    _mm256_storeu_ps(py.add(i), y0);
                    _mm256_storeu_ps(py.add(i + 8), y1);
                    i += 16;
                }
                while i + 8 <= n {
                    _mm256_storeu_ps(py.add(i), _mm256_fmadd_ps(va, $load(px.add(i)), _mm256_loadu_ps(py.add(i))));
                    i += 8;
                }
                let widen = $widen;
                while i < n {
                    y[i] += a * widen(x[i]);
                    i += 1;
                }
            }
        };
    }

    axpy_kernel!(axpy_f32, f32, load_f32, |x: f32| x);
    axpy_kernel!(axpy_f16, f16, load_f16, |x: f16| x.to_f32());
    axpy_kernel!(axpy_bf16, bf16, load_bf16, |x: bf16| x.to_f32());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2000) as f32 / 1000.0 - 1.0)
            .collect()
    }

    #[test]
    fn vector_kernels_match_the_scalar_reference() {
        for n in [0usize, 1, 7, 8, 9, 31, 32, 33, 100, 1024, 1027] {
            let (a, b) = (data(n, 1), data(n, 2));
            let b16: Vec<f16> = b.iter().map(|&v| f16::from_f32(v)).collect();
            let bb16: Vec<bf16> = b.iter().map(|&v| bf16::from_f32(v)).collect();
            let close = |x: f32, y: f32| (x - y).abs() <= 1e-4 * (1.0 + y.abs());
            assert!(close(dot_f32(&a, &b), scalar::dot_f32(&a, &b)), "dot_f32 n={n}");
            assert!(close(dot_f16(&a, &b16), scalar::dot_f16(&a, &b16)), "dot_f16 n={n}");
            assert!(close(dot_bf16(&a, &bb16), scalar::dot_bf16(&a, &bb16)), "dot_bf16 n={n}");
            let check_axpy = |fast: &dyn Fn(&mut [f32]), slow: &dyn Fn(&mut [f32])| {
                let (mut y1, mut y2) = (a.clone(), a.clone());
                fast(&mut y1);
                slow(&mut y2);
                assert!(y1.iter().zip(&y2).all(|(p, q)| close(*p, *q)), "axpy n={n}");
            };
            check_axpy(&|y| axpy_f32(y, 0.7, &b), &|y| scalar::axpy_f32(y, 0.7, &b));
            check_axpy(&|y| axpy_f16(y, 0.7, &b16), &|y| scalar::axpy_f16(y, 0.7, &b16));
            check_axpy(&|y| axpy_bf16(y, 0.7, &bb16), &|y| scalar::axpy_bf16(y, 0.7, &bb16));
        }
        // The reference for f16/bf16 is the widened f32 value.
        let b = data(64, 5);
        let a = data(64, 6);
        let bb16: Vec<bf16> = b.iter().map(|&v| bf16::from_f32(v)).collect();
        let widened: Vec<f32> = bb16.iter().map(|v| v.to_f32()).collect();
        assert!((dot_bf16(&a, &bb16) - scalar::dot_f32(&a, &widened)).abs() < 1e-4);
    }
}
