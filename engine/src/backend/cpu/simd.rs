//! The inner loops of decoding, vectorised: dot products and `y += a * w` against f32, f16 or bf16
//! weights. AVX2 + FMA (+ F16C for f16) are chosen at run time when the CPU has them; the scalar
//! versions are the fallback and the reference the vector versions are tested against.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::io::weights::WeightData;

/// True when the AVX2/FMA/F16C kernels can run on this CPU.
#[inline]
/// Whether the one-token kernels over f32 weights issue software prefetches for the rows they read
/// next. They help on AMD Zen and slow an Intel Xeon (Granite Rapids class) down by 3-5%, where the
/// L2 streamer already keeps up with one f32 token's pace (measured on decoding; 16-bit weights and
/// the few-token kernels still gain from them there, so they always prefetch). Chosen once from the
/// CPU vendor; `LAYERWISE_PREFETCH=0|1` overrides it.
pub fn software_prefetch() -> bool {
    static CHOICE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| match std::env::var("LAYERWISE_PREFETCH").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => cpu_vendor_is_amd(),
    })
}

fn cpu_vendor_is_amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // cpuid leaf 0 exists on every x86_64 CPU.
        let id = std::arch::x86_64::__cpuid(0);
        let vendor: Vec<u8> = [id.ebx, id.edx, id.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
        vendor == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

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

/// `y += Σ_r coeffs[r] * w[first + r * stride ..][..y.len()]`: several weight rows into one
/// accumulator per pass, so that the accumulator is loaded and stored once per four rows.
pub fn axpy_rows(y: &mut [f32], coeffs: &[f32], w: WeightData<'_>, first: usize, stride: usize) {
    let n = y.len();
    if coeffs.is_empty() {
        return;
    }
    let last = first + (coeffs.len() - 1) * stride + n;
    assert!(last <= w.len(), "axpy_rows reads past the weight");
    let groups = coeffs.len() / 4 * 4;
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && groups > 0 {
        // SAFETY: AVX2/FMA/F16C are present; every row `first + r * stride .. + n` for r < groups lies
        // inside `w` (checked above against the last row).
        unsafe {
            match w {
                WeightData::F32(w) => x86::axpy4_f32(y, &coeffs[..groups], w.as_ptr().add(first), stride),
                WeightData::F16(w) => x86::axpy4_f16(y, &coeffs[..groups], w.as_ptr().add(first), stride),
                WeightData::BF16(w) => x86::axpy4_bf16(y, &coeffs[..groups], w.as_ptr().add(first), stride),
            }
        }
        for (r, &c) in coeffs.iter().enumerate().skip(groups) {
            axpy(y, c, w, first + r * stride);
        }
        return;
    }
    for (r, &c) in coeffs.iter().enumerate() {
        axpy(y, c, w, first + r * stride);
    }
}

/// Most tokens [`axpy_rows_tokens`] takes.
pub const AXPY_TOKENS: usize = 4;

/// [`axpy_rows`] for up to four tokens at once: `ys[t] += Σ_r coeffs[t][r] * w[first + r * stride ..]`.
/// Each weight row is read once for all the tokens (small batches: beams, contrastive candidates).
pub fn axpy_rows_tokens(ys: &mut [&mut [f32]], coeffs: &[&[f32]], w: WeightData<'_>, first: usize, stride: usize) {
    let tokens = ys.len();
    assert!((1..=AXPY_TOKENS).contains(&tokens) && coeffs.len() == tokens, "axpy_rows_tokens takes one to four tokens");
    let (n, rows) = (ys[0].len(), coeffs[0].len());
    assert!(ys.iter().all(|y| y.len() == n) && coeffs.iter().all(|c| c.len() == rows), "ragged axpy_rows_tokens");
    if rows == 0 {
        return;
    }
    assert!(first + (rows - 1) * stride + n <= w.len(), "axpy_rows_tokens reads past the weight");
    #[cfg(target_arch = "x86_64")]
    let groups = rows / x86::TOKEN_ROWS * x86::TOKEN_ROWS;
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && groups > 0 {
        let last = tokens - 1;
        let a: [*const f32; AXPY_TOKENS] = std::array::from_fn(|t| coeffs[t.min(last)].as_ptr());
        let y: [*mut f32; AXPY_TOKENS] = std::array::from_fn(|t| ys[t.min(last)].as_mut_ptr());
        // SAFETY: AVX2/FMA/F16C are present; rows first + r * stride .. + n for r < groups lie inside
        // `w` (checked above); each coefficient row has `rows` >= groups elements and each y has n;
        // only the first `tokens` pointers are written (the others repeat the last one and are skipped).
        unsafe {
            match w {
                WeightData::F32(w) => x86::axpy4_tokens_f32(y, a, tokens, groups, w.as_ptr().add(first), stride, n),
                WeightData::F16(w) => x86::axpy4_tokens_f16(y, a, tokens, groups, w.as_ptr().add(first), stride, n),
                WeightData::BF16(w) => x86::axpy4_tokens_bf16(y, a, tokens, groups, w.as_ptr().add(first), stride, n),
            }
        }
        for (y, c) in ys.iter_mut().zip(coeffs) {
            for (r, &cr) in c.iter().enumerate().skip(groups) {
                axpy(y, cr, w, first + r * stride);
            }
        }
        return;
    }
    for (y, c) in ys.iter_mut().zip(coeffs) {
        for (r, &cr) in c.iter().enumerate() {
            axpy(y, cr, w, first + r * stride);
        }
    }
}

/// `out[r] = x · w[first + r * stride ..][..x.len()]` for up to four rows at a time, loading `x` once
/// per four rows (batched decoding reuses the rows for every token from the L1 cache).
pub fn dot_rows(x: &[f32], w: WeightData<'_>, first: usize, stride: usize, out: &mut [f32]) {
    let n = x.len();
    if out.is_empty() {
        return;
    }
    assert!(first + (out.len() - 1) * stride + n <= w.len(), "dot_rows reads past the weight");
    let mut r = 0;
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        while r + 4 <= out.len() {
            let start = first + r * stride;
            // SAFETY: AVX2/FMA/F16C are present; the four rows lie inside `w` (checked above).
            let dots = unsafe {
                match w {
                    WeightData::F32(w) => x86::dot4_f32(x, w.as_ptr().add(start), stride),
                    WeightData::F16(w) => x86::dot4_f16(x, w.as_ptr().add(start), stride),
                    WeightData::BF16(w) => x86::dot4_bf16(x, w.as_ptr().add(start), stride),
                }
            };
            out[r..r + 4].copy_from_slice(&dots);
            r += 4;
        }
    }
    while r < out.len() {
        out[r] = dot(x, w, first + r * stride);
        r += 1;
    }
}

/// A register-blocked tile of a matrix product against an `[out, in]` weight: for up to three rows
/// `first + r * stride` of `w` and up to four tokens `xs[c]`, `out[r][c] = w_row_r · xs[c]`. Each row
/// chunk and each token chunk is loaded once for the whole tile (seven loads per twelve FMAs).
pub fn dot_tile(xs: &[&[f32]], w: WeightData<'_>, first: usize, stride: usize, rows: usize) -> [[f32; 4]; 3] {
    let tokens = xs.len();
    assert!((1..=4).contains(&tokens) && (1..=3).contains(&rows), "dot_tile takes 1-3 rows and 1-4 tokens");
    let n = xs[0].len();
    assert!(xs.iter().all(|x| x.len() == n), "tokens of different widths");
    assert!(first + (rows - 1) * stride + n <= w.len(), "dot_tile reads past the weight");
    let mut out = [[0.0f32; 4]; 3];
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        let x4 = [xs[0], xs[1.min(tokens - 1)], xs[2.min(tokens - 1)], xs[3.min(tokens - 1)]];
        let row = |r: usize| first + r.min(rows - 1) * stride;
        // SAFETY: AVX2/FMA/F16C are present; rows row(r) .. + n lie inside `w` (checked above for the
        // last one) and every x has n elements.
        return unsafe {
            match w {
                WeightData::F32(w) => {
                    x86::tile_f32(x4, [w.as_ptr().add(row(0)), w.as_ptr().add(row(1)), w.as_ptr().add(row(2))], stride)
                }
                WeightData::F16(w) => {
                    x86::tile_f16(x4, [w.as_ptr().add(row(0)), w.as_ptr().add(row(1)), w.as_ptr().add(row(2))], stride)
                }
                WeightData::BF16(w) => {
                    x86::tile_bf16(x4, [w.as_ptr().add(row(0)), w.as_ptr().add(row(1)), w.as_ptr().add(row(2))], stride)
                }
            }
        };
    }
    for (r, out) in out.iter_mut().enumerate().take(rows) {
        for (c, x) in xs.iter().enumerate() {
            out[c] = dot(x, w, first + r * stride);
        }
    }
    out
}

/// Columns of one register-blocked strip in [`strips_packed`].
pub const STRIP: usize = 16;

/// Tokens one call of [`strips_packed`] handles at most.
pub const STRIP_TOKENS: usize = 6;

/// Copies `k` rows of the first `strips * STRIP` columns of an `[in, out]` weight (row `i` at
/// `first + i * stride`) into `packed` strip by strip, widened to f32: strip `s`'s row `i` lands at
/// `(s * k + i) * STRIP`. The rows are read front to back (streaming from memory), and every strip
/// then lies contiguous for [`strips_packed`], however wide the weight.
pub fn pack_strips(w: WeightData<'_>, first: usize, stride: usize, k: usize, strips: usize, packed: &mut [f32]) {
    let width = strips * STRIP;
    assert!(packed.len() >= k * width, "pack_strips: buffer too small");
    if k == 0 || strips == 0 {
        return;
    }
    assert!(first + (k - 1) * stride + width <= w.len(), "pack_strips reads past the weight");
    let mut wide = vec![0.0f32; if matches!(w, WeightData::F32(_)) { 0 } else { width }];
    for i in 0..k {
        let start = first + i * stride;
        let row: &[f32] = match w {
            WeightData::F32(w) => &w[start..start + width],
            WeightData::F16(w) => {
                w[start..start + width].convert_to_f32_slice(&mut wide);
                &wide
            }
            WeightData::BF16(w) => {
                w[start..start + width].convert_to_f32_slice(&mut wide);
                &wide
            }
        };
        for (s, chunk) in row.chunks_exact(STRIP).enumerate() {
            packed[(s * k + i) * STRIP..][..STRIP].copy_from_slice(chunk);
        }
    }
}

/// A register-blocked piece of a matrix product against packed weight strips (see [`pack_strips`]):
/// for up to six tokens `xs[r]` (each `k` inputs) and every column `j < strips * STRIP`:
/// `acc[r][j] += Σ_i xs[r][i] * strip(j / STRIP)[i][j % STRIP]`. Each strip row is loaded once for all
/// the tokens and the sums stay in registers.
pub fn strips_packed(xs: &[&[f32]], packed: &[f32], strips: usize, acc: &mut [&mut [f32]]) {
    let rows = xs.len();
    assert!((1..=STRIP_TOKENS).contains(&rows) && acc.len() == rows, "strips_packed takes one to six tokens");
    let k = xs[0].len();
    assert!(xs.iter().all(|x| x.len() == k), "tokens of different widths");
    assert!(acc.iter().all(|a| a.len() >= strips * STRIP), "accumulators narrower than the strips");
    assert!(packed.len() >= k * strips * STRIP, "strips_packed: packed weight too small");
    if k == 0 || strips == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        let last = rows - 1;
        let x6: [*const f32; STRIP_TOKENS] = std::array::from_fn(|r| xs[r.min(last)].as_ptr());
        // Missing tokens write into a scratch row, never into another token's sums.
        let mut scratch = vec![0.0f32; if rows < STRIP_TOKENS { strips * STRIP } else { 0 }];
        let mut a6 = [scratch.as_mut_ptr(); STRIP_TOKENS];
        for (slot, a) in a6.iter_mut().zip(acc.iter_mut()) {
            *slot = a.as_mut_ptr();
        }
        // SAFETY: AVX2/FMA are present; `packed` holds k * strips * STRIP floats (checked above); each
        // x has k elements and each accumulator (or the scratch row) strips * STRIP; the accumulators
        // are distinct.
        unsafe { x86::strips_packed_f32(x6, k, packed.as_ptr(), strips, a6) };
        return;
    }
    for (x, a) in xs.iter().zip(acc.iter_mut()) {
        for s in 0..strips {
            for (i, &xi) in x.iter().enumerate() {
                let row = &packed[(s * k + i) * STRIP..][..STRIP];
                for (aj, wj) in a[s * STRIP..][..STRIP].iter_mut().zip(row) {
                    *aj += xi * wj;
                }
            }
        }
    }
}

/// GELU, tanh approximation, in place (transformers' `NewGELUActivation`).
pub fn gelu_tanh_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { x86::gelu_tanh(x) };
        return;
    }
    x.iter_mut().for_each(|v| *v = scalar::gelu_tanh(*v));
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

    pub use crate::math::gelu_tanh;

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

    /// How far ahead (in elements) the streaming kernels prefetch.
    const PREFETCH_ELEMENTS: usize = 512;

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
                    _mm_prefetch::<_MM_HINT_T0>(pb.wrapping_add(i + PREFETCH_ELEMENTS).cast());
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

    macro_rules! axpy4_kernel {
        ($name:ident, $ty:ty, $load:ident) => {
            /// `y += Σ_r a[r] * w[r * stride ..][..y.len()]`, four rows per pass over `y`.
            ///
            /// # Safety
            /// The CPU must support AVX2, FMA and F16C; `a.len()` is a multiple of four and the rows
            /// `w + r * stride .. + y.len()` for `r < a.len()` must be readable.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(y: &mut [f32], a: &[f32], w: *const $ty, stride: usize) {
                let prefetch = super::software_prefetch() || std::mem::size_of::<$ty>() < 4;
                let n = y.len();
                let py = y.as_mut_ptr();
                for (g, a) in a.chunks_exact(4).enumerate() {
                    let (a0, a1, a2, a3) =
                        (_mm256_set1_ps(a[0]), _mm256_set1_ps(a[1]), _mm256_set1_ps(a[2]), _mm256_set1_ps(a[3]));
                    let w0 = w.add(4 * g * stride);
                    let (w1, w2, w3) = (w0.add(stride), w0.add(2 * stride), w0.add(3 * stride));
                    let mut i = 0;
                    while i + 8 <= n {
                        if prefetch && i % 32 == 0 {
                            // Ask early for what the next group reads: the same columns of the next
                            // four rows (prefetches never fault, so the last group may point past the end).
                            for row in [w0, w1, w2, w3] {
                                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(4 * stride + i).cast());
                            }
                        }
                        let mut acc = _mm256_loadu_ps(py.add(i));
                        acc = _mm256_fmadd_ps(a0, $load(w0.add(i)), acc);
                        acc = _mm256_fmadd_ps(a1, $load(w1.add(i)), acc);
                        acc = _mm256_fmadd_ps(a2, $load(w2.add(i)), acc);
                        acc = _mm256_fmadd_ps(a3, $load(w3.add(i)), acc);
                        _mm256_storeu_ps(py.add(i), acc);
                        i += 8;
                    }
                    while i < n {
                        let widen = |p: *const $ty| -> f32 { (*p).into_f32() };
                        *py.add(i) += a[0] * widen(w0.add(i))
                            + a[1] * widen(w1.add(i))
                            + a[2] * widen(w2.add(i))
                            + a[3] * widen(w3.add(i));
                        i += 1;
                    }
                }
            }
        };
    }

    /// Weight rows per pass of the few-token kernel: six rows' coefficients for a pair of tokens
    /// (twelve registers) leave room for the pair's two sums and one weight vector, and each sum
    /// is loaded and stored once per six rows.
    pub const TOKEN_ROWS: usize = 6;

    macro_rules! axpy4_tokens_kernel {
        ($name:ident, $ty:ty, $load:ident) => {
            /// For each of `tokens` tokens t: `y[t] += Σ_r a[t][r] * w[r * stride ..][..n]` over `rows`
            /// rows (a multiple of [`TOKEN_ROWS`]), that many weight rows per pass, streamed front to
            /// back: a 256-column chunk of them is swept once per pair of tokens (from L1 after the
            /// first), with the pair's coefficients in registers. (Chunks outside the row loop, which
            /// keep the sums in L1, measured slower: the weight is then read in page-sized pieces.)
            ///
            /// # Safety
            /// The CPU must support AVX2, FMA and F16C; `1 <= tokens <= 4`; for t < tokens, `y[t]` has
            /// `n` writable elements (distinct rows) and `a[t]` `rows` readable ones, and `a[t]` is
            /// readable for every t < 4; the rows `w + r * stride .. + n` for r < rows must be readable.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(
                y: [*mut f32; 4],
                a: [*const f32; 4],
                tokens: usize,
                rows: usize,
                w: *const $ty,
                stride: usize,
                n: usize,
            ) {
                const CHUNK: usize = 256;
                const R: usize = TOKEN_ROWS;
                for g in (0..rows).step_by(R) {
                    let w0 = w.add(g * stride);
                    let wr: [*const $ty; R] = std::array::from_fn(|r| w0.add(r * stride));
                    let full = n / 8 * 8;
                    for chunk in (0..full).step_by(CHUNK) {
                        let end = (chunk + CHUNK).min(full);
                        for pair in (0..tokens).step_by(2) {
                            let (t0, t1) = (pair, (pair + 1).min(tokens - 1));
                            let c0: [__m256; R] = std::array::from_fn(|r| _mm256_set1_ps(*a[t0].add(g + r)));
                            let c1: [__m256; R] = std::array::from_fn(|r| _mm256_set1_ps(*a[t1].add(g + r)));
                            let (y0, y1) = (y[t0], y[t1]);
                            let mut i = chunk;
                            while i < end {
                                if pair == 0 && i % 32 == 0 {
                                    // The same columns of the next group of rows, which the next pass reads.
                                    for row in wr {
                                        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(R * stride + i).cast());
                                    }
                                }
                                let mut acc0 = _mm256_loadu_ps(y0.add(i));
                                let mut acc1 = _mm256_loadu_ps(y1.add(i));
                                for r in 0..R {
                                    let wv = $load(wr[r].add(i));
                                    acc0 = _mm256_fmadd_ps(c0[r], wv, acc0);
                                    acc1 = _mm256_fmadd_ps(c1[r], wv, acc1);
                                }
                                _mm256_storeu_ps(y0.add(i), acc0);
                                if t1 != t0 {
                                    _mm256_storeu_ps(y1.add(i), acc1);
                                }
                                i += 8;
                            }
                        }
                    }
                    for i in full..n {
                        for t in 0..tokens {
                            let at = a[t].add(g);
                            let mut sum = 0.0f32;
                            for r in 0..R {
                                sum += *at.add(r) * (*wr[r].add(i)).into_f32();
                            }
                            *y[t].add(i) += sum;
                        }
                    }
                }
            }
        };
    }

    axpy4_tokens_kernel!(axpy4_tokens_f32, f32, load_f32);
    axpy4_tokens_kernel!(axpy4_tokens_f16, f16, load_f16);
    axpy4_tokens_kernel!(axpy4_tokens_bf16, bf16, load_bf16);

    trait IntoF32: Copy {
        fn into_f32(self) -> f32;
    }
    impl IntoF32 for f32 {
        fn into_f32(self) -> f32 {
            self
        }
    }
    impl IntoF32 for f16 {
        fn into_f32(self) -> f32 {
            self.to_f32()
        }
    }
    impl IntoF32 for bf16 {
        fn into_f32(self) -> f32 {
            self.to_f32()
        }
    }

    /// e^x for each lane (Cephes-style: x = n ln2 + r, e^r by a degree-6 polynomial, 2^n by the
    /// exponent bits); relative error about 2e-7 over the range GELU uses.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_set1_ps(88.0));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        // r = x - n ln2, with ln2 split in two for precision
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.166_666_66));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
        p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        _mm256_mul_ps(p, _mm256_castsi256_ps(bits))
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gelu_tanh(x: &mut [f32]) {
        let n = x.len();
        let p = x.as_mut_ptr();
        let (half, one, two) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0), _mm256_set1_ps(2.0));
        let (k, c) = (_mm256_set1_ps(0.797_884_6), _mm256_set1_ps(0.044715));
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_loadu_ps(p.add(i));
            let inner = _mm256_mul_ps(k, _mm256_fmadd_ps(_mm256_mul_ps(c, v), _mm256_mul_ps(v, v), v));
            // tanh(y) = 1 - 2 / (e^{2y} + 1), exact at both tails
            let e = exp(_mm256_mul_ps(two, inner));
            let tanh = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(e, one)));
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, tanh)));
            i += 8;
        }
        while i < n {
            x[i] = super::scalar::gelu_tanh(x[i]);
            i += 1;
        }
    }

    macro_rules! dot4_kernel {
        ($name:ident, $ty:ty, $load:ident) => {
            /// Dot products of `x` with the four rows at `w`, `w + stride`, `w + 2 stride`, `w + 3 stride`.
            ///
            /// # Safety
            /// The CPU must support AVX2, FMA and F16C; the four rows of `x.len()` elements must be readable.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(x: &[f32], w: *const $ty, stride: usize) -> [f32; 4] {
                let prefetch = super::software_prefetch() || std::mem::size_of::<$ty>() < 4;
                let n = x.len();
                let px = x.as_ptr();
                let rows = [w, w.add(stride), w.add(2 * stride), w.add(3 * stride)];
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut i = 0;
                while i + 8 <= n {
                    if prefetch && i % 32 == 0 {
                        // The same columns of the next four rows, which the next call reads.
                        for row in rows {
                            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(4 * stride + i).cast());
                        }
                    }
                    let xv = _mm256_loadu_ps(px.add(i));
                    for (acc, row) in acc.iter_mut().zip(rows) {
                        *acc = _mm256_fmadd_ps(xv, $load(row.add(i)), *acc);
                    }
                    i += 8;
                }
                let mut out = [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])];
                while i < n {
                    for (o, row) in out.iter_mut().zip(rows) {
                        *o += x[i] * (*row.add(i)).into_f32();
                    }
                    i += 1;
                }
                out
            }
        };
    }

    /// Six tokens times `strips` packed sixteen-column strips of `k` rows, added into six
    /// accumulator rows (twelve sums in registers, the strip read front to back).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `w` must hold `k * 16 * strips` floats; each `x` must have
    /// `k` readable elements and each `acc` `16 * strips` writable ones, the accumulators not overlapping.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn strips_packed_f32(x: [*const f32; 6], k: usize, w: *const f32, strips: usize, acc: [*mut f32; 6]) {
        for s in 0..strips {
            let col = s * 16;
            let strip = w.add(s * k * 16);
            let mut sums = [[_mm256_setzero_ps(); 2]; 6];
            for (sum, a) in sums.iter_mut().zip(acc) {
                *sum = [_mm256_loadu_ps(a.add(col)), _mm256_loadu_ps(a.add(col + 8))];
            }
            for i in 0..k {
                let row = strip.add(i * 16);
                let (w0, w1) = (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8)));
                for (sum, xr) in sums.iter_mut().zip(x) {
                    let xb = _mm256_broadcast_ss(&*xr.add(i));
                    sum[0] = _mm256_fmadd_ps(xb, w0, sum[0]);
                    sum[1] = _mm256_fmadd_ps(xb, w1, sum[1]);
                }
            }
            for (sum, a) in sums.iter().zip(acc) {
                _mm256_storeu_ps(a.add(col), sum[0]);
                _mm256_storeu_ps(a.add(col + 8), sum[1]);
            }
        }
    }

    macro_rules! tile_kernel {
        ($name:ident, $ty:ty, $load:ident) => {
            /// Dot products of three weight rows with four tokens. The same columns of the rows
            /// `3 * stride` further on (the next tile's) are prefetched.
            ///
            /// # Safety
            /// The CPU must support AVX2, FMA and F16C; each row must have `x[0].len()` readable
            /// elements and every x that length.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(x: [&[f32]; 4], rows: [*const $ty; 3], stride: usize) -> [[f32; 4]; 3] {
                let n = x[0].len();
                let px = [x[0].as_ptr(), x[1].as_ptr(), x[2].as_ptr(), x[3].as_ptr()];
                let mut acc = [[_mm256_setzero_ps(); 4]; 3];
                let mut i = 0;
                while i + 8 <= n {
                    if i % 32 == 0 {
                        for row in rows {
                            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(3 * stride + i).cast());
                        }
                    }
                    let w = [$load(rows[0].add(i)), $load(rows[1].add(i)), $load(rows[2].add(i))];
                    for (c, xp) in px.iter().enumerate() {
                        let xv = _mm256_loadu_ps(xp.add(i));
                        for (acc, w) in acc.iter_mut().zip(w) {
                            acc[c] = _mm256_fmadd_ps(w, xv, acc[c]);
                        }
                    }
                    i += 8;
                }
                let mut out = [[0.0f32; 4]; 3];
                for (r, (out, acc)) in out.iter_mut().zip(acc).enumerate() {
                    for (c, o) in out.iter_mut().enumerate() {
                        *o = hsum(acc[c]);
                        for k in i..n {
                            *o += x[c][k] * (*rows[r].add(k)).into_f32();
                        }
                    }
                }
                out
            }
        };
    }

    tile_kernel!(tile_f32, f32, load_f32);
    tile_kernel!(tile_f16, f16, load_f16);
    tile_kernel!(tile_bf16, bf16, load_bf16);

    dot4_kernel!(dot4_f32, f32, load_f32);
    dot4_kernel!(dot4_f16, f16, load_f16);
    dot4_kernel!(dot4_bf16, bf16, load_bf16);

    axpy4_kernel!(axpy4_f32, f32, load_f32);
    axpy4_kernel!(axpy4_f16, f16, load_f16);
    axpy4_kernel!(axpy4_bf16, bf16, load_bf16);

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
        // Four rows at a time equals four single-row passes.
        let w: Vec<f32> = data(7 * 40, 9);
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        for rows in [1usize, 3, 4, 5, 7] {
            let coeffs = data(rows, 11);
            for (weights, name) in [(WeightData::F32(&w), "f32"), (WeightData::BF16(&wb), "bf16")] {
                let mut fast = data(37, 12);
                let mut slow = fast.clone();
                axpy_rows(&mut fast, &coeffs, weights, 2, 40);
                for (r, &c) in coeffs.iter().enumerate() {
                    let row: Vec<f32> = (0..37).map(|i| weights.get(2 + r * 40 + i)).collect();
                    scalar::axpy_f32(&mut slow, c, &row);
                }
                assert!(fast.iter().zip(&slow).all(|(p, q)| (p - q).abs() < 1e-5), "axpy_rows {name} rows={rows}");
            }
        }
        // Several tokens at a time equal each token on its own.
        let wide: Vec<f32> = data(11 * 300, 14);
        let wide_bf: Vec<bf16> = wide.iter().map(|&v| bf16::from_f32(v)).collect();
        for tokens in 1..=AXPY_TOKENS {
            for rows in [3usize, 4, 9] {
                for n in [5usize, 37, 290] {
                    let coeffs: Vec<Vec<f32>> = (0..tokens).map(|t| data(rows, 60 + t as u32)).collect();
                    let refs: Vec<&[f32]> = coeffs.iter().map(Vec::as_slice).collect();
                    for (weights, name) in [(WeightData::F32(&wide), "f32"), (WeightData::BF16(&wide_bf), "bf16")] {
                        let mut fast: Vec<Vec<f32>> = (0..tokens).map(|t| data(n, 70 + t as u32)).collect();
                        let mut slow = fast.clone();
                        let mut ys: Vec<&mut [f32]> = fast.iter_mut().map(Vec::as_mut_slice).collect();
                        axpy_rows_tokens(&mut ys, &refs, weights, 2, 300);
                        for (y, c) in slow.iter_mut().zip(&coeffs) {
                            for (r, &cr) in c.iter().enumerate() {
                                let row: Vec<f32> = (0..n).map(|i| weights.get(2 + r * 300 + i)).collect();
                                scalar::axpy_f32(y, cr, &row);
                            }
                        }
                        for (f, s) in fast.iter().zip(&slow) {
                            assert!(
                                f.iter().zip(s).all(|(p, q)| (p - q).abs() < 1e-4),
                                "{name} t={tokens} rows={rows} n={n}"
                            );
                        }
                    }
                }
            }
        }
        // Four dot products at a time equal four single ones.
        for rows in [1usize, 4, 6] {
            let x = data(37, 13);
            let mut fast = vec![0.0f32; rows];
            dot_rows(&x, WeightData::BF16(&wb), 3, 40, &mut fast);
            for (r, f) in fast.iter().enumerate() {
                let row: Vec<f32> = (0..37).map(|i| wb[3 + r * 40 + i].to_f32()).collect();
                assert!((f - scalar::dot_f32(&x, &row)).abs() < 1e-5, "dot_rows rows={rows}");
            }
        }
        // Packed strips equal sixteen dot products per column and token, added to what was there.
        let (k_in, n_out) = (37usize, 40usize);
        let w: Vec<f32> = data(k_in * n_out, 21);
        let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let k = k_in - 1;
        let mut packed = vec![0.0f32; k * 2 * STRIP];
        pack_strips(WeightData::F16(&wh), 3, n_out, k, 2, &mut packed);
        for tokens in 1..=STRIP_TOKENS {
            let xs: Vec<Vec<f32>> = (0..tokens).map(|r| data(k, 30 + r as u32)).collect();
            let refs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
            let mut rows: Vec<Vec<f32>> = vec![vec![0.5f32; 2 * STRIP]; tokens];
            let mut acc: Vec<&mut [f32]> = rows.iter_mut().map(Vec::as_mut_slice).collect();
            strips_packed(&refs, &packed, 2, &mut acc);
            for (x, o) in xs.iter().zip(&rows) {
                for (j, v) in o.iter().enumerate() {
                    let sum: f32 = (0..k).map(|i| x[i] * wh[3 + i * n_out + j].to_f32()).sum();
                    assert!((v - 0.5 - sum).abs() < 1e-4, "strips tokens={tokens} column {j}: {v} vs {}", 0.5 + sum);
                }
            }
        }
        // The 3x4 tile equals its twelve dot products.
        for (rows, tokens) in [(1usize, 1usize), (3, 4), (2, 3)] {
            let xs: Vec<Vec<f32>> = (0..tokens).map(|c| data(37, 50 + c as u32)).collect();
            let refs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
            let tile = dot_tile(&refs, WeightData::BF16(&wb), 3, 40, rows);
            for r in 0..rows {
                for c in 0..tokens {
                    let row: Vec<f32> = (0..37).map(|i| wb[3 + r * 40 + i].to_f32()).collect();
                    assert!((tile[r][c] - scalar::dot_f32(&xs[c], &row)).abs() < 1e-5, "tile {rows}x{tokens}");
                }
            }
        }
        // GELU: the vector version stays within float rounding of the scalar one.
        let mut xs: Vec<f32> = (0..2001).map(|i| (i as f32 - 1000.0) / 100.0).collect();
        let reference: Vec<f32> = xs.iter().map(|&v| scalar::gelu_tanh(v)).collect();
        gelu_tanh_in_place(&mut xs);
        for (a, b) in xs.iter().zip(&reference) {
            assert!((a - b).abs() <= 2e-6 * (1.0 + b.abs()), "gelu {a} vs {b}");
        }
        // The reference for f16/bf16 is the widened f32 value.
        let b = data(64, 5);
        let a = data(64, 6);
        let bb16: Vec<bf16> = b.iter().map(|&v| bf16::from_f32(v)).collect();
        let widened: Vec<f32> = bb16.iter().map(|v| v.to_f32()).collect();
        assert!((dot_bf16(&a, &bb16) - scalar::dot_f32(&a, &widened)).abs() < 1e-4);
    }
}
