//! The machine's arithmetic limits, for benchmarks to state results against: the f32 FMA throughput
//! of a loop of independent 256-bit vector FMAs (no memory traffic), on every thread at once. On
//! CPUs that execute 512-bit FMAs as two 256-bit halves (AMD Zen 4) this is the f32 peak; where
//! 512-bit units are wider (Intel server cores) a benchmark should also take a large product's
//! rate (the `gemm` crate uses AVX-512 there) and state the larger of the two.

use std::time::Instant;

use rayon::prelude::*;

/// Independent accumulators: enough to cover an FMA's latency (4-5 cycles) on two pipes.
const CHAINS: usize = 12;

/// f32 FLOP/s of vector FMAs on every thread of the pool (2 FLOP per lane per FMA): the best of a
/// few rounds of about 50 ms. 0 when the CPU lacks AVX2/FMA (the scalar peak is not measured).
pub fn fma_peak_flops() -> f64 {
    if !super::simd::has_avx2() {
        return 0.0;
    }
    let threads = rayon::current_num_threads();
    let iterations = 4_000_000u64;
    let flops_per_thread = (iterations * CHAINS as u64 * 8 * 2) as f64;
    let mut best = 0.0f64;
    for _ in 0..4 {
        let start = Instant::now();
        let sink: f32 = (0..threads).into_par_iter().map(|t| fma_loop(iterations, t as f32)).sum();
        std::hint::black_box(sink);
        best = best.max(flops_per_thread * threads as f64 / start.elapsed().as_secs_f64());
    }
    best
}

fn fma_loop(iterations: u64, seed: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: only reached when `has_avx2` found AVX2 and FMA on this CPU.
        unsafe { fma_loop_avx2(iterations, seed) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = iterations;
        seed
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_loop_avx2(iterations: u64, seed: f32) -> f32 {
    use std::arch::x86_64::*;
    // x <- x * a + b with |a| < 1 stays finite forever; twelve such chains are independent.
    let a = _mm256_set1_ps(0.999_999);
    let b = _mm256_set1_ps(1e-7);
    let mut acc = [_mm256_set1_ps(seed); CHAINS];
    for (i, x) in acc.iter_mut().enumerate() {
        *x = _mm256_add_ps(*x, _mm256_set1_ps(i as f32));
    }
    for _ in 0..iterations {
        for x in acc.iter_mut() {
            *x = _mm256_fmadd_ps(*x, a, b);
        }
    }
    let mut sum = _mm256_setzero_ps();
    for x in acc {
        sum = _mm256_add_ps(sum, x);
    }
    let mut lanes = [0.0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    lanes.iter().sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_fma_loop_computes_what_its_scalar_form_does() {
        if !super::super::simd::has_avx2() {
            return;
        }
        // Lane values of chain i after n steps of x <- 0.999999 x + 1e-7, summed over 8 lanes.
        let n = 1000;
        let expected: f32 = (0..super::CHAINS)
            .map(|i| {
                let mut x = 2.0 + i as f32;
                for _ in 0..n {
                    x = x.mul_add(0.999_999, 1e-7);
                }
                8.0 * x
            })
            .sum();
        let got = super::fma_loop(n, 2.0);
        assert!((got - expected).abs() <= 1e-4 * expected, "{got} vs {expected}");
    }
}
