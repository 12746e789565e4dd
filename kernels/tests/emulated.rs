//! Every kernel, built for the CPU from the same CUDA sources, against the reference backend, on
//! edge shapes, with each block's threads run first to last and last to first; and the emulator's
//! own guarantees (a missing barrier shows, a deadlock is reported, part-warp shuffles and votes).

use std::ffi::c_void;

use layerwise::backend::{Backend, Layout, Matrix};
use layerwise::model::config::Activation;
use layerwise::{HostTensor, Reference};
use layerwise_kernels::emulated::{arg, launch, use_portable_fibers, Kernel, Launch};

/// Deterministic values in [-scale, scale).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let h = (i ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            (((h >> 40) % 2000) as f32 / 1000.0 - 1.0) * scale
        })
        .collect()
}

fn matrix(data: &[f32], rows: usize, cols: usize) -> Matrix {
    Matrix::new(data.to_vec(), rows, cols).expect("shape")
}

fn vector(data: &[f32]) -> layerwise::backend::reference::RefWeight {
    Reference::default().weight(&HostTensor::from_f32(data.to_vec(), vec![data.len()]), Layout::OutIn).expect("weight")
}

/// `got` within `tolerance` of the largest |want|.
fn assert_close(what: &str, got: &[f32], want: &[f32], tolerance: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tolerance * scale, "{what}: value {i} is {g}, the reference has {w}");
    }
}

/// Both thread orders of `config`.
/// `lw_column_parts` of kernels/cuda/memory.cu, passed by value.
#[repr(C)]
struct ColumnParts {
    out: [*mut f32; 4],
    start: [i32; 4],
    width: [i32; 4],
}

fn orders(config: Launch) -> [Launch; 2] {
    [config, config.reversed()]
}

/// lw_layer_norm over the rows of `x` (`cols` wide; eps 1e-5), one block per row.
fn layer_norm(x: &[f32], w: &[f32], b: &[f32], cols: usize, config: Launch) -> Vec<f32> {
    assert!(w.len() == cols && b.len() == cols && x.len() == config.grid[0] as usize * cols);
    let mut out = vec![f32::NAN; x.len()];
    let (mut o, mut xp, mut wp, mut bp) = (out.as_mut_ptr(), x.as_ptr(), w.as_ptr(), b.as_ptr());
    let (mut c, mut eps) = (cols as i32, 1e-5f32);
    let mut params: [*mut c_void; 6] =
        [arg(&mut o), arg(&mut xp), arg(&mut wp), arg(&mut bp), arg(&mut c), arg(&mut eps)];
    // SAFETY: lw_layer_norm(out, x, w, b, cols, eps) touches rows * cols floats of out and x and
    // cols of w and b, one block per row (asserted above).
    unsafe { launch(Kernel::LayerNorm, config, &mut params) }.expect("launch");
    out
}

#[test]
fn emulated_layer_norm_and_rms_norm_equal_the_reference() {
    let r = Reference::default();
    for (rows, cols) in [(1usize, 1usize), (3, 7), (2, 64), (4, 1000), (2, 4099)] {
        let x = values(rows * cols, 1, 3.0);
        let (w, b) = (values(cols, 2, 1.0), values(cols, 3, 1.0));
        let want_ln = r.layer_norm(&matrix(&x, rows, cols), &vector(&w), &vector(&b), 1e-5).expect("reference").data;
        let want_rms = r.rms_norm(&matrix(&x, rows, cols), &vector(&w), 1e-6).expect("reference").data;
        for threads in [32u32, 256] {
            for config in orders(Launch::grid_1d(rows as u32, threads)) {
                let out = layer_norm(&x, &w, &b, cols, config);
                assert_close(&format!("layer_norm [{rows}, {cols}] {config:?}"), &out, &want_ln, 1e-5);

                let mut out = vec![f32::NAN; rows * cols];
                let (mut o, mut xp, mut wp) = (out.as_mut_ptr(), x.as_ptr(), w.as_ptr());
                let (mut c, mut eps) = (cols as i32, 1e-6f32);
                let mut params: [*mut c_void; 5] =
                    [arg(&mut o), arg(&mut xp), arg(&mut wp), arg(&mut c), arg(&mut eps)];
                // SAFETY: lw_rms_norm(out, x, w, cols, eps), as above.
                unsafe { launch(Kernel::RmsNorm, config, &mut params) }.expect("launch");
                assert_close(&format!("rms_norm [{rows}, {cols}] {config:?}"), &out, &want_rms, 1e-5);
            }
        }
    }
}

#[test]
fn emulated_elementwise_ops_equal_the_reference() {
    let r = Reference::default();
    for n in [1usize, 31, 1000, 70_001] {
        let (x, y) = (values(n, 4, 8.0), values(n, 5, 2.0));
        // Grids smaller and larger than the data, so that the grid-stride loops are exercised.
        for config in [Launch::grid_1d(2, 64), Launch::grid_1d(n.div_ceil(256) as u32, 256)] {
            for config in orders(config) {
                for kernel in [Kernel::Add, Kernel::Mul] {
                    let mut got = x.clone();
                    let (mut gp, mut yp, mut len) = (got.as_mut_ptr(), y.as_ptr(), n as u64);
                    let mut params: [*mut c_void; 3] = [arg(&mut gp), arg(&mut yp), arg(&mut len)];
                    // SAFETY: lw_add / lw_mul(x, y, n) touch n floats of each.
                    unsafe { launch(kernel, config, &mut params) }.expect("launch");
                    let mut want = matrix(&x, 1, n);
                    let yy = matrix(&y, 1, n);
                    match kernel {
                        Kernel::Add => r.add_assign(&mut want, &yy),
                        _ => r.mul_assign(&mut want, &yy),
                    }
                    .expect("reference");
                    assert_close(&format!("{kernel:?} n={n}"), &got, &want.data, 0.0);
                }
                for (kernel, act, tolerance) in [
                    (Kernel::GeluTanh, Activation::GeluTanh, 1e-6),
                    (Kernel::GeluErf, Activation::Gelu, 1e-6),
                    (Kernel::Silu, Activation::Silu, 1e-6),
                    (Kernel::Relu, Activation::Relu, 0.0),
                ] {
                    let mut got = x.clone();
                    let (mut gp, mut len) = (got.as_mut_ptr(), n as u64);
                    let mut params: [*mut c_void; 2] = [arg(&mut gp), arg(&mut len)];
                    // SAFETY: the activations (x, n) touch n floats.
                    unsafe { launch(kernel, config, &mut params) }.expect("launch");
                    let mut want = matrix(&x, 1, n);
                    r.activate(&mut want, act).expect("reference");
                    assert_close(&format!("{kernel:?} n={n}"), &got, &want.data, tolerance);
                }
            }
        }
    }
    // scale_heads: rows of 3 heads of 5.
    let (rows, cols, head_dim) = (4usize, 15usize, 5i32);
    let scales = [0.0f32, 0.5, 1.0];
    let x = values(rows * cols, 6, 1.0);
    let mut want = matrix(&x, rows, cols);
    r.scale_heads(&mut want, &vector(&scales), head_dim as usize).expect("reference");
    for config in orders(Launch::grid_1d(1, 32)) {
        let mut got = x.clone();
        let (mut gp, mut sp, mut n, mut c, mut d) =
            (got.as_mut_ptr(), scales.as_ptr(), (rows * cols) as u64, cols as i32, head_dim);
        let mut params: [*mut c_void; 5] = [arg(&mut gp), arg(&mut sp), arg(&mut n), arg(&mut c), arg(&mut d)];
        // SAFETY: lw_scale_heads(x, scales, n, cols, head_dim) touches n floats of x and 3 scales.
        unsafe { launch(Kernel::ScaleHeads, config, &mut params) }.expect("launch");
        assert_close("scale_heads", &got, &want.data, 0.0);
    }
}

#[test]
fn emulated_argmax_takes_the_first_of_equal_maxima() {
    let r = Reference::default();
    let mut cases: Vec<(usize, usize, Vec<f32>)> = vec![
        (3, 4, vec![1.0, 3.0, 3.0, -1.0, -5.0, -2.0, -2.0, -9.0, 0.0, 0.0, 0.0, 0.0]),
        (12, 1, values(12, 7, 1.0)),
        (2, 3, vec![f32::NEG_INFINITY; 6]),
        (2, 3, vec![1.0, f32::NEG_INFINITY, 0.5, 2.0, f32::NAN, 1.0]),
        (3, 2, vec![f32::INFINITY, 1.0, 0.0, 1.0, f32::NEG_INFINITY, 3.0]),
    ];
    // Vocabulary-sized rows with the maximum repeated far apart (different threads and warps), and
    // one NaN far from the maximum (another warp's).
    let mut wide = values(3 * 3001, 8, 1.0);
    for (row, at) in [(0usize, [17usize, 2900]), (1, [2999, 3000])] {
        for a in at {
            wide[row * 3001 + a] = 5.0;
        }
    }
    wide[2 * 3001 + 2500] = f32::NAN;
    cases.push((3, 3001, wide));
    for (rows, cols, data) in cases {
        // The reference's ids, and u32::MAX (LW_NON_FINITE_ROW) for each row it refuses.
        let want: Vec<u32> = data
            .chunks_exact(cols)
            .map(|row| r.argmax_rows(&matrix(row, 1, cols)).map_or(u32::MAX, |ids| ids[0]))
            .collect();
        for threads in [32u32, 256] {
            for config in orders(Launch::grid_1d(rows as u32, threads)) {
                let mut got = vec![u32::MAX; rows];
                let (mut o, mut x, mut c) = (got.as_mut_ptr(), data.as_ptr(), cols as i32);
                let mut params: [*mut c_void; 3] = [arg(&mut o), arg(&mut x), arg(&mut c)];
                // SAFETY: lw_argmax_rows(out, x, cols) writes rows ids and reads rows * cols floats.
                unsafe { launch(Kernel::ArgmaxRows, config, &mut params) }.expect("launch");
                assert_eq!(got, want, "argmax [{rows}, {cols}] {config:?}");
            }
        }
    }
}

#[test]
fn emulated_threads_in_two_orders_reveal_a_missing_barrier() {
    let run = |with_barrier: i32, config: Launch| {
        let mut out = vec![0i32; 64];
        let (mut o, mut b) = (out.as_mut_ptr(), with_barrier);
        let mut params: [*mut c_void; 2] = [arg(&mut o), arg(&mut b)];
        // SAFETY: lw_test_neighbour(out, with_barrier) writes one int per thread.
        unsafe { launch(Kernel::TestNeighbour, config, &mut params) }.expect("launch");
        out
    };
    let config = Launch::grid_1d(1, 64);
    let expected: Vec<i32> = (0..64).map(|t| (t + 1) % 64).collect();
    assert_eq!(run(1, config), expected);
    assert_eq!(run(1, config.reversed()), expected);
    // Without the barriers, forward order reads neighbours that have not written yet.
    assert_ne!(run(0, config), run(0, config.reversed()));
}

#[test]
fn emulated_deadlocks_are_reported_not_hung() {
    let mut out = vec![0f32; 32];
    let mut o = out.as_mut_ptr();
    let mut params: [*mut c_void; 1] = [arg(&mut o)];
    // SAFETY: lw_test_deadlock(out) writes one float per thread (if it ever got there).
    let err = unsafe { launch(Kernel::TestDeadlock, Launch::grid_1d(1, 32), &mut params) }.expect_err("deadlock");
    assert!(err.contains("lane") || err.contains("deadlock"), "{err}");
    // A block of 2000 threads is refused by name.
    let err = unsafe { launch(Kernel::Relu, Launch::grid_1d(1, 2000), &mut params) }.expect_err("too many threads");
    assert!(err.contains("1 to 1024 threads"), "{err}");
}

#[test]
fn emulated_launches_fail_when_a_thread_returns_before_awaiting_its_inputs() {
    let mut out = vec![0i32; 64];
    let run = |early: i32, out: &mut Vec<i32>| {
        let (mut o, mut e) = (out.as_mut_ptr(), early);
        let mut params: [*mut c_void; 2] = [arg(&mut o), arg(&mut e)];
        // SAFETY: lw_test_exit_before_wait(out, early) writes one int per thread of one 64-thread block.
        unsafe { launch(Kernel::TestExitBeforeWait, Launch::grid_1d(1, 64), &mut params) }
    };
    run(-1, &mut out).expect("every thread awaits its inputs");
    assert!(out.iter().all(|&v| v == 1));
    let err = run(37, &mut out).expect_err("thread 37 returns first");
    assert!(err.contains("thread 37 returned without lw_await_inputs"), "{err}");
}

#[test]
fn emulated_fiber_switches_agree() {
    // The emulator's own stack switch (x86-64) and glibc's ucontext run the same schedule: the same
    // bits from an order-dependent kernel (no barrier) and from a norm full of shuffles and
    // barriers, the same error texts. Other tests running meanwhile just run slower.
    let run_all = || {
        let mut results = Vec::new();
        for config in orders(Launch::grid_1d(2, 64)) {
            let mut out = vec![0i32; 128];
            let (mut o, mut b) = (out.as_mut_ptr(), 0i32);
            let mut params: [*mut c_void; 2] = [arg(&mut o), arg(&mut b)];
            // SAFETY: lw_test_neighbour(out, with_barrier) writes one int per thread.
            unsafe { launch(Kernel::TestNeighbour, config, &mut params) }.expect("launch");
            results.push(format!("{out:?}"));
        }
        let (rows, cols) = (3usize, 1500usize);
        let (x, w, b) = (values(rows * cols, 7, 2.0), values(cols, 8, 1.0), values(cols, 9, 1.0));
        for config in orders(Launch::grid_1d(rows as u32, 256)) {
            let out = layer_norm(&x, &w, &b, cols, config);
            results.push(format!("{:?}", out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()));
        }
        let mut out = vec![0f32; 32];
        let mut o = out.as_mut_ptr();
        let mut params: [*mut c_void; 1] = [arg(&mut o)];
        // SAFETY: lw_test_deadlock(out) writes one float per thread (if it ever got there).
        results
            .push(unsafe { launch(Kernel::TestDeadlock, Launch::grid_1d(1, 32), &mut params) }.expect_err("deadlock"));
        results
    };
    use_portable_fibers(true);
    let portable = run_all();
    use_portable_fibers(false);
    let own = run_all();
    assert_eq!(portable.len(), 5);
    assert_ne!(portable[0], portable[1], "without a barrier the two orders differ");
    assert!(portable[4].contains("deadlock"), "{}", portable[4]);
    assert_eq!(own, portable);
}

#[test]
fn emulated_shuffles_and_votes_meet_only_the_lanes_of_their_mask() {
    for config in orders(Launch::grid_1d(1, 32)) {
        let mut out = vec![-1f32; 32];
        let mut ballot = 0u32;
        let (mut o, mut b) = (out.as_mut_ptr(), &mut ballot as *mut u32);
        let mut params: [*mut c_void; 2] = [arg(&mut o), arg(&mut b)];
        // SAFETY: lw_test_half_warp(out, ballot) writes 16 floats and one unsigned.
        unsafe { launch(Kernel::TestHalfWarp, config, &mut params) }.expect("launch");
        // Lane 0 holds the sum 0 + 1 + ... + 15; lanes 16-31 exited before writing.
        assert_eq!(out[0], 120.0);
        assert!(out[16..].iter().all(|&v| v == -1.0));
        assert_eq!(ballot, 0xaaaa, "the odd lanes among 0-15");
    }
}

/// Where the lower logits of ACD come from: a head's rows (the weight kernel of its dtype) or
/// precomputed logits.
enum Lower<'a> {
    Head { kernel: Kernel, head: &'a [u8], features: &'a [f32], hidden: usize },
    Logits(&'a [f32]),
}

/// lw_acd_select, the lower kernel, lw_acd_finish on `rows` rows of `upper`, several blocks per row;
/// the blocks, and the threads of each, run in the order of `reverse`.
fn emulated_acd(
    upper: &[f32],
    rows: usize,
    lower: &Lower,
    alpha: f32,
    k: usize,
    threads: u32,
    reverse: bool,
) -> Vec<f32> {
    let vocab = upper.len() / rows;
    let order = |l: Launch| if reverse { l.reversed() } else { l };
    // Several blocks per row in each kernel (slices of the vocabulary that meet through a ticket).
    let (select_blocks, lower_blocks, finish_blocks) = (3u32, 4u32, 2u32);
    let grid = |blocks: u32, threads: u32, shared: usize| {
        order(Launch { grid: [blocks, rows as u32, 1], block: [threads, 1, 1], shared_bytes: shared, reverse: 0 })
    };
    let mut out = vec![f32::NAN; rows * vocab];
    let mut stats = vec![f32::NAN; 3 * rows];
    let mut partial = vec![f32::NAN; 3 * rows * 4];
    let mut counters = vec![0u32; rows];
    let (mut o, mut u, mut st, mut pa, mut c) =
        (out.as_mut_ptr(), upper.as_ptr(), stats.as_mut_ptr(), partial.as_mut_ptr(), counters.as_mut_ptr());
    let (mut v, mut a, mut kk) = (vocab as i32, alpha, k as i32);
    let mut params: [*mut c_void; 7] =
        [arg(&mut st), arg(&mut pa), arg(&mut c), arg(&mut u), arg(&mut v), arg(&mut a), arg(&mut kk)];
    // SAFETY: lw_acd_select(stats, partial, counters, upper, vocab, alpha, k) reads rows x vocab floats,
    // writes 3 x rows stats and 3 x rows x blocks partial floats, counts in rows counters.
    unsafe { launch(Kernel::AcdSelect, grid(select_blocks, threads, 256 * 4), &mut params) }.expect("select");
    assert!(counters.iter().all(|&c| c == 0), "select left its counters at {counters:?}");
    match *lower {
        Lower::Head { kernel, head, features, hidden } => {
            let (mut f, mut h, mut d) = (features.as_ptr(), head.as_ptr(), hidden as i32);
            let mut params: [*mut c_void; 9] = [
                arg(&mut o),
                arg(&mut st),
                arg(&mut pa),
                arg(&mut c),
                arg(&mut u),
                arg(&mut f),
                arg(&mut h),
                arg(&mut v),
                arg(&mut d),
            ];
            // SAFETY: lw_acd_lower_*(out, stats, partial, counters, upper, features, head, vocab,
            // hidden) reads what select wrote, rows x hidden features and vocab x hidden head values
            // in the dtype's storage, and writes rows x vocab outputs, the stats and partial states.
            unsafe { launch(kernel, grid(lower_blocks, threads, hidden * 4), &mut params) }.expect("lower");
        }
        Lower::Logits(logits) => {
            let mut l = logits.as_ptr();
            let mut params: [*mut c_void; 7] =
                [arg(&mut o), arg(&mut st), arg(&mut pa), arg(&mut c), arg(&mut u), arg(&mut l), arg(&mut v)];
            // SAFETY: lw_acd_lower_from_logits(out, stats, partial, counters, upper, lower, vocab) reads
            // what select wrote and rows x vocab floats, and writes rows x vocab outputs and the stats.
            unsafe { launch(Kernel::AcdLowerFromLogits, grid(lower_blocks, 32, 0), &mut params) }.expect("lower");
        }
    }
    assert!(counters.iter().all(|&c| c == 0), "lower left its counters at {counters:?}");
    let mut params: [*mut c_void; 4] = [arg(&mut o), arg(&mut u), arg(&mut st), arg(&mut v)];
    // SAFETY: lw_acd_finish(out, upper, stats, vocab) reads rows x vocab floats of upper, the stats,
    // and reads and writes rows x vocab outputs.
    unsafe { launch(Kernel::AcdFinish, grid(finish_blocks, threads, 0), &mut params) }.expect("finish");
    out
}

#[test]
fn emulated_acd_equals_the_reference_contrast() {
    use layerwise::DType;
    let r = Reference::default();
    for (vocab, hidden) in [(301usize, 24usize), (3001, 64)] {
        let rows = 3;
        let features = values(rows * hidden, 50, 1.0);
        let mut upper: Vec<f32> = values(rows * vocab, 52, 4.0);
        upper[7] = 40.0; // row 0: one token dominates, a single plausible candidate
        upper[vocab + 3] = 9.0; // row 1: a tie at the top
        upper[vocab + 4] = 9.0;
        for v in &mut upper[2 * vocab..] {
            *v = (*v * 4.0).round() / 4.0; // row 2: many ties
        }
        let head_f32 = values(vocab * hidden, 51, 1.0);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let tensor = HostTensor::from_f32(head_f32.clone(), vec![vocab, hidden]).converted(dtype);
            let head = r.weight(&tensor, Layout::OutIn).expect("weight");
            let (upper_m, features_m) = (matrix(&upper, rows, vocab), matrix(&features, rows, hidden));
            let kernel = match dtype {
                DType::F32 => Kernel::AcdLowerF32,
                DType::F16 => Kernel::AcdLowerF16,
                DType::BF16 => Kernel::AcdLowerBf16,
            };
            let lower = Lower::Head { kernel, head: tensor.bytes(), features: &features, hidden };
            for (alpha, min_candidates) in [(0.1f32, 1usize), (0.5, 3), (1.0, 1), (0.0, 1), (0.1, vocab), (0.1, 40)] {
                let want = r.contrast_acd(&upper_m, &features_m, &head, alpha, min_candidates).expect("reference").data;
                // One warp, and three (the block reductions across warps, a count that is no power of
                // two; 256 threads cost the emulation, above all under AddressSanitizer, 8x the fibers).
                for threads in [32u32, 96] {
                    for reverse in [false, true] {
                        let out = emulated_acd(&upper, rows, &lower, alpha, min_candidates, threads, reverse);
                        for (i, (g, w)) in out.iter().zip(&want).enumerate() {
                            assert!(
                                (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                                "{kernel:?} vocab {vocab} alpha {alpha} k {min_candidates} threads {threads} reverse {reverse}: token {} of row {} is {g}, the reference has {w}",
                                i % vocab,
                                i / vocab
                            );
                        }
                    }
                }
                if dtype == DType::F32 {
                    // The same from precomputed lower logits (a head stored [hidden, vocab]).
                    let logits = r.linear(&features_m, &head, None).expect("reference").data;
                    for reverse in [false, true] {
                        let out =
                            emulated_acd(&upper, rows, &Lower::Logits(&logits), alpha, min_candidates, 128, reverse);
                        assert_close(&format!("acd from logits alpha {alpha} k {min_candidates}"), &out, &want, 1e-5);
                    }
                }
            }
        }
    }
}

/// The kernels of one weight dtype in products.cu: (matvec, gemm, norm_head).
fn product_kernels(dtype: layerwise::DType) -> (Kernel, Kernel, Kernel) {
    use layerwise::DType;
    match dtype {
        DType::F32 => (Kernel::MatvecF32, Kernel::GemmF32, Kernel::NormHeadF32),
        DType::F16 => (Kernel::MatvecF16, Kernel::GemmF16, Kernel::NormHeadF16),
        DType::BF16 => (Kernel::MatvecBf16, Kernel::GemmBf16, Kernel::NormHeadBf16),
    }
}

/// The one-row matvec of a dtype (`lw_matvec1_*`, the same source for t = 1).
fn one_row_matvec(dtype: layerwise::DType) -> Kernel {
    use layerwise::DType;
    match dtype {
        DType::F32 => Kernel::Matvec1F32,
        DType::F16 => Kernel::Matvec1F16,
        DType::BF16 => Kernel::Matvec1Bf16,
    }
}

#[test]
fn emulated_products_equal_the_reference_linear() {
    use layerwise::DType;
    let r = Reference::default();
    // (8192, 24): rows of 32 KiB (f32) that the host splits over 8 warps per output.
    for (n_in, n_out) in [(1usize, 5usize), (37, 53), (64, 300), (1024, 40), (8192, 24)] {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let tensor = HostTensor::from_f32(values(n_in * n_out, 7, 1.0), vec![n_out, n_in]).converted(dtype);
            let weight = r.weight(&tensor, Layout::OutIn).expect("weight");
            let bias_values = values(n_out, 8, 1.0);
            let bias = vector(&bias_values);
            let tolerance = if dtype == DType::F32 { 1e-5 } else { 1e-4 };
            let (matvec, gemm, _) = product_kernels(dtype);
            // The wide rows (full rounds of 16-byte loads, split warps) at fewer row counts: the
            // emulation, above all under AddressSanitizer, is slow.
            let ts: &[usize] = match n_in {
                8192 => &[1, 3],
                1024 => &[1, 8, 9],
                _ => &[1, 2, 3, 8, 9, 33],
            };
            for &t in ts {
                let x = values(t * n_in, t as u64, 1.0);
                let xm = matrix(&x, t, n_in);
                for with_bias in [false, true] {
                    let want = r.linear(&xm, &weight, with_bias.then_some(&bias)).expect("reference").data;
                    // (kernel, launch, warps per output feature: the matvec's `split`, unused by gemm)
                    let mut configs = vec![(gemm, Launch::grid_1d(n_out.div_ceil(16) as u32, 256), 1)];
                    configs[0].1.grid[1] = t.div_ceil(16) as u32;
                    if t <= 8 {
                        // Every split for one wide row, one more for eight (the emulation is slow: not all).
                        let splits: &[usize] = match (t, n_in) {
                            (1, 1024) => &[1, 2, 4, 8],
                            (8, 1024) => &[1, 4],
                            (_, 8192) => &[8],
                            (1, 37) => &[1, 2], // slices that end inside a 16-byte load
                            _ => &[1],
                        };
                        for &split in splits {
                            let kernel = if t == 1 { one_row_matvec(dtype) } else { matvec };
                            configs.push((kernel, Launch::grid_1d(n_out.div_ceil(8 / split) as u32, 256), split));
                        }
                        if t == 1 {
                            // The eight-row kernel on one row too (the batch path's).
                            configs.push((matvec, Launch::grid_1d(n_out.div_ceil(8) as u32, 256), 1));
                        }
                    }
                    for (kernel, config, split) in configs {
                        for config in orders(config) {
                            let mut out = vec![f32::NAN; t * n_out];
                            let (mut o, mut xp, mut w) = (out.as_mut_ptr(), x.as_ptr(), tensor.bytes().as_ptr());
                            let mut b = if with_bias { bias_values.as_ptr() } else { std::ptr::null() };
                            let (mut tt, mut ni, mut no, mut sp) = (t as i32, n_in as i32, n_out as i32, split as i32);
                            let mut store = 0i32; // LW_EPILOGUE_STORE
                            let mut params: Vec<*mut c_void> =
                                vec![arg(&mut o), arg(&mut xp), arg(&mut w), arg(&mut b), arg(&mut tt), arg(&mut ni)];
                            params.push(arg(&mut no));
                            if kernel != gemm {
                                params.push(arg(&mut sp));
                            }
                            params.push(arg(&mut store));
                            // SAFETY: (out, x, w, bias, t, n_in, n_out, [split,] epilogue): out t x n_out,
                            // x t x n_in, w n_out x n_in in the dtype's storage, bias n_out or null.
                            unsafe { launch(kernel, config, &mut params) }.expect("launch");
                            let what = format!(
                                "{kernel:?} split {split} {n_in}->{n_out}, {t} rows, bias {with_bias}, {config:?}"
                            );
                            assert_close(&what, &out, &want, tolerance);
                        }
                    }
                }
            }
        }
    }
}

/// The products' epilogues (common.cuh, `lw_epilogue`): the output added to what is there (a
/// residual branch) or activated as it is stored, against the reference's linear then add_assign or
/// activate, through the matvec (one and several warps per output) and the GEMM.
#[test]
fn emulated_product_epilogues_equal_linear_then_add_or_activate() {
    use layerwise::DType;
    let r = Reference::default();
    let (n_in, n_out) = (96usize, 130usize);
    // (code, activation): 1 adds; 2.. activate (kernels/src/cuda/mod.rs, `Epilogue::code`).
    let epilogues = [
        (1i32, None),
        (2, Some(Activation::GeluTanh)),
        (3, Some(Activation::Gelu)),
        (4, Some(Activation::Relu)),
        (5, Some(Activation::Silu)),
    ];
    for dtype in [DType::F32, DType::BF16] {
        let tensor = HostTensor::from_f32(values(n_in * n_out, 31, 1.0), vec![n_out, n_in]).converted(dtype);
        let weight = r.weight(&tensor, Layout::OutIn).expect("weight");
        let bias_values = values(n_out, 32, 1.0);
        let bias = vector(&bias_values);
        let (matvec, gemm, _) = product_kernels(dtype);
        for t in [1usize, 3, 9] {
            let x = values(t * n_in, 33 + t as u64, 2.0);
            let linear = r.linear(&matrix(&x, t, n_in), &weight, Some(&bias)).expect("reference");
            let before = values(t * n_out, 40, 3.0);
            for (code, act) in epilogues {
                let want = match act {
                    None => {
                        let mut sum = matrix(&before, t, n_out);
                        r.add_assign(&mut sum, &linear).expect("add");
                        sum.data
                    }
                    Some(act) => {
                        let mut y = linear.clone();
                        r.activate(&mut y, act).expect("activate");
                        y.data
                    }
                };
                let mut gemm_launch = Launch::grid_1d(n_out.div_ceil(16) as u32, 256);
                gemm_launch.grid[1] = t.div_ceil(16) as u32;
                let mut configs = vec![(gemm, gemm_launch, 1usize)];
                if t <= 8 {
                    let kernel = if t == 1 { one_row_matvec(dtype) } else { matvec };
                    configs.push((kernel, Launch::grid_1d(n_out.div_ceil(8) as u32, 256), 1));
                    configs.push((kernel, Launch::grid_1d(n_out.div_ceil(4) as u32, 256), 2));
                }
                for (kernel, config, split) in configs {
                    let mut out = before.clone();
                    let (mut o, mut xp, mut w) = (out.as_mut_ptr(), x.as_ptr(), tensor.bytes().as_ptr());
                    let mut b = bias_values.as_ptr();
                    let (mut tt, mut ni, mut no, mut sp, mut e) =
                        (t as i32, n_in as i32, n_out as i32, split as i32, code);
                    let mut params: Vec<*mut c_void> =
                        vec![arg(&mut o), arg(&mut xp), arg(&mut w), arg(&mut b), arg(&mut tt), arg(&mut ni)];
                    params.push(arg(&mut no));
                    if kernel != gemm {
                        params.push(arg(&mut sp));
                    }
                    params.push(arg(&mut e));
                    // SAFETY: (out, x, w, bias, t, n_in, n_out, [split,] epilogue): out t x n_out,
                    // x t x n_in, w n_out x n_in in the dtype's storage, bias n_out.
                    unsafe { launch(kernel, config, &mut params) }.expect("launch");
                    assert_close(&format!("{kernel:?} split {split} epilogue {code}, {t} rows"), &out, &want, 1e-5);
                }
            }
        }
    }
}

/// The one-row fused norm + product of a dtype (`lw_norm_head1_*`).
fn one_row_norm_head(dtype: layerwise::DType) -> Kernel {
    use layerwise::DType;
    match dtype {
        DType::F32 => Kernel::NormHead1F32,
        DType::F16 => Kernel::NormHead1F16,
        DType::BF16 => Kernel::NormHead1Bf16,
    }
}

#[test]
fn emulated_norm_fused_with_heads_equals_norm_then_linear() {
    use layerwise::DType;
    let r = Reference::default();
    let (hidden, vocab) = (96usize, 301usize);
    let product_bias = values(vocab, 73, 1.0);
    for dtype in [DType::F32, DType::BF16] {
        let (_, _, many_rows) = product_kernels(dtype);
        // (heads, rows, with the product's bias and a GELU epilogue: a block's norm and first product)
        for (heads, t, block) in [(1usize, 1usize, false), (1, 1, true), (3, 2, false), (2, 4, false), (1, 3, true)] {
            let kernels = if t == 1 { vec![one_row_norm_head(dtype), many_rows] } else { vec![many_rows] };
            let tensors: Vec<HostTensor> = (0..heads)
                .map(|h| {
                    HostTensor::from_f32(values(vocab * hidden, 60 + h as u64, 1.0), vec![vocab, hidden])
                        .converted(dtype)
                })
                .collect();
            let states = values(heads * t * hidden, 70, 2.0);
            let (w, b) = (values(hidden, 71, 1.0), values(hidden, 72, 1.0));
            for rms in [false, true] {
                let mut want = Vec::new();
                for (h, tensor) in tensors.iter().enumerate() {
                    let x = matrix(&states[h * t * hidden..(h + 1) * t * hidden], t, hidden);
                    let normed = if rms {
                        r.rms_norm(&x, &vector(&w), 1e-6).expect("reference")
                    } else {
                        r.layer_norm(&x, &vector(&w), &vector(&b), 1e-5).expect("reference")
                    };
                    let head = r.weight(tensor, Layout::OutIn).expect("weight");
                    let bias = vector(&product_bias);
                    let mut y = r.linear(&normed, &head, block.then_some(&bias)).expect("reference");
                    if block {
                        r.activate(&mut y, Activation::GeluTanh).expect("reference");
                    }
                    want.extend(y.data);
                }
                let mut config =
                    Launch { shared_bytes: t * hidden * 4 + 256, ..Launch::grid_1d(vocab.div_ceil(8) as u32, 256) };
                config.grid[1] = heads as u32;
                for kernel in &kernels {
                    for config in orders(config) {
                        let mut out = vec![f32::NAN; heads * t * vocab];
                        let head_ptrs: Vec<*const u8> = tensors.iter().map(|t| t.bytes().as_ptr()).collect();
                        let (mut o, mut s, mut wp) = (out.as_mut_ptr(), states.as_ptr(), w.as_ptr());
                        let mut bp = if rms { std::ptr::null() } else { b.as_ptr() };
                        let mut hp = head_ptrs.as_ptr();
                        let mut pb = if block { product_bias.as_ptr() } else { std::ptr::null() };
                        let (mut tt, mut d, mut v, mut eps) =
                            (t as i32, hidden as i32, vocab as i32, if rms { 1e-6f32 } else { 1e-5 });
                        let mut epilogue = if block { 2i32 } else { 0 }; // GELU (tanh) or store
                        let mut params: [*mut c_void; 11] = [
                            arg(&mut o),
                            arg(&mut s),
                            arg(&mut wp),
                            arg(&mut bp),
                            arg(&mut hp),
                            arg(&mut pb),
                            arg(&mut tt),
                            arg(&mut d),
                            arg(&mut v),
                            arg(&mut eps),
                            arg(&mut epilogue),
                        ];
                        // SAFETY: (out, states, norm_w, norm_b, heads, bias, t, hidden, vocab, eps,
                        // epilogue): out heads x t x vocab, states heads x t x hidden, norm vectors of
                        // hidden, `heads` head pointers of vocab x hidden values in the dtype's storage,
                        // bias vocab or null.
                        unsafe { launch(*kernel, config, &mut params) }.expect("launch");
                        let tolerance = if dtype == DType::F32 { 1e-5 } else { 1e-4 };
                        assert_close(
                            &format!("{kernel:?} heads {heads} t {t} rms {rms} block {block} {config:?}"),
                            &out,
                            &want,
                            tolerance,
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn emulated_data_movement_equals_the_reference() {
    use layerwise::backend::{Lookup, StepLayout};
    use layerwise::DType;
    let r = Reference::default();
    // Embedding lookups in every dtype.
    let (n, d) = (11usize, 13usize);
    for (dtype, kernel) in
        [(DType::F32, Kernel::EmbedF32), (DType::F16, Kernel::EmbedF16), (DType::BF16, Kernel::EmbedBf16)]
    {
        let table = HostTensor::from_f32(values(n * d, 1, 1.0), vec![n, d]).converted(dtype);
        let ids = vec![10u32, 0, 3, 3];
        let step = StepLayout { ids: ids.clone(), positions: vec![0, 1, 2, 3], ..Default::default() };
        let want =
            r.embed(&r.weight(&table, Layout::OutIn).expect("weight"), &step, Lookup::Tokens).expect("reference").data;
        let mut out = vec![f32::NAN; ids.len() * d];
        let (mut o, mut t, mut i, mut dd) = (out.as_mut_ptr(), table.bytes().as_ptr(), ids.as_ptr(), d as i32);
        let mut params: [*mut c_void; 4] = [arg(&mut o), arg(&mut t), arg(&mut i), arg(&mut dd)];
        // SAFETY: lw_embed_*(out, table, index, d): 4 rows of d out, 11 x d table, 4 indices.
        unsafe { launch(kernel, Launch::grid_1d(ids.len() as u32, 32), &mut params) }.expect("launch");
        assert_close(&format!("{kernel:?}"), &out, &want, 0.0);
    }
    // Row gathers and column blocks.
    let x = values(5 * 12, 2, 1.0);
    let rows = [4u32, 0, 2];
    let step = StepLayout { output_rows: rows.to_vec(), ..Default::default() };
    let want = r.gather_output_rows(&matrix(&x, 5, 12), &step).expect("reference").data;
    let mut out = vec![f32::NAN; 3 * 12];
    let (mut o, mut xp, mut rp, mut c) = (out.as_mut_ptr(), x.as_ptr(), rows.as_ptr(), 12i32);
    let mut params: [*mut c_void; 4] = [arg(&mut o), arg(&mut xp), arg(&mut rp), arg(&mut c)];
    // SAFETY: lw_gather_rows(out, x, rows, cols): 3 rows out of 5, 12 wide.
    unsafe { launch(Kernel::GatherRows, Launch::grid_1d(3, 32), &mut params) }.expect("launch");
    assert_close("gather_rows", &out, &want, 0.0);
    // Three column blocks in one launch (grid (rows, parts)), the fourth slot unused.
    let parts = r.split_columns(&matrix(&x, 5, 12), &[3, 1, 8]).expect("reference");
    let mut outs: Vec<Vec<f32>> = parts.iter().map(|p| vec![f32::NAN; 5 * p.cols]).collect();
    let mut args = ColumnParts { out: [std::ptr::null_mut(); 4], start: [0; 4], width: [0; 4] };
    let mut start = 0;
    for (p, (part, out)) in parts.iter().zip(&mut outs).enumerate() {
        (args.out[p], args.start[p], args.width[p]) = (out.as_mut_ptr(), start, part.cols as i32);
        start += part.cols as i32;
    }
    let (mut xp, mut c) = (x.as_ptr(), 12i32);
    let mut params: [*mut c_void; 3] = [arg(&mut args), arg(&mut xp), arg(&mut c)];
    let mut config = Launch::grid_1d(5, 32);
    config.grid[1] = parts.len() as u32;
    // SAFETY: lw_split_columns(parts, x, cols): 5 rows of 12 columns, three parts of 5 rows each.
    unsafe { launch(Kernel::SplitColumns, config, &mut params) }.expect("launch");
    for (part, out) in parts.iter().zip(&outs) {
        assert_close("split_columns", out, &part.data, 0.0);
    }
    // Rotary embeddings at far positions.
    for (head_dim, heads, theta) in [(8usize, 3usize, 10000.0f32), (64, 2, 500000.0)] {
        let positions = vec![0u32, 1, 17, 1023, 5];
        let t = positions.len();
        let x = values(t * heads * head_dim, 10, 1.0);
        let step = StepLayout { ids: vec![0; t], positions: positions.clone(), ..Default::default() };
        let mut want = matrix(&x, t, heads * head_dim);
        r.rope(&mut want, head_dim, &step, theta).expect("reference");
        for config in orders(Launch::grid_1d(2, 64)) {
            let mut got = x.clone();
            let (mut g, mut p, mut tt, mut c, mut d, mut th) =
                (got.as_mut_ptr(), positions.as_ptr(), t as i32, (heads * head_dim) as i32, head_dim as i32, theta);
            let mut params: [*mut c_void; 6] =
                [arg(&mut g), arg(&mut p), arg(&mut tt), arg(&mut c), arg(&mut d), arg(&mut th)];
            // SAFETY: lw_rope(x, positions, t, cols, head_dim, theta): t x cols floats, t positions.
            unsafe { launch(Kernel::Rope, config, &mut params) }.expect("launch");
            assert_close(&format!("rope d{head_dim}"), &got, &want.data, 1e-6);
        }
    }
    // The cache: writes into slots, then copy-on-write of blocks, read back through attention below;
    // here the raw layout: keys[layer][slot][width].
    let (layers, blocks, block_size, width) = (2usize, 6usize, 4usize, 10usize);
    let slots_per_layer = blocks * block_size;
    let mut keys = vec![0f32; layers * slots_per_layer * width];
    let mut vals = vec![0f32; layers * slots_per_layer * width];
    // Keys and values as column blocks of fused rows (16 floats a row: 2 others, 7 keys, 7 values),
    // read in place through the row stride.
    let fused = values(3 * 16, 20, 1.0);
    let slots = [5u32, 0, 23];
    let (mut kp, mut vp, mut kk, mut vv, mut sp) =
        (keys.as_mut_ptr(), vals.as_mut_ptr(), fused[2..].as_ptr(), fused[9..].as_ptr(), slots.as_ptr());
    let (mut cols, mut stride, mut w, mut layer, mut spl) = (7i32, 16i32, width as i32, 1i32, slots_per_layer as u64);
    let mut params: [*mut c_void; 10] = [
        arg(&mut kp),
        arg(&mut vp),
        arg(&mut kk),
        arg(&mut vv),
        arg(&mut sp),
        arg(&mut cols),
        arg(&mut stride),
        arg(&mut w),
        arg(&mut layer),
        arg(&mut spl),
    ];
    // SAFETY: lw_kv_write(keys, values, k, v, slots, cols, stride, width, layer, slots_per_layer): 3
    // rows of 7, 16 apart, into slots of a [2][24][10] store.
    unsafe { launch(Kernel::KvWrite, Launch::grid_1d(3, 32), &mut params) }.expect("launch");
    for (row, &slot) in slots.iter().enumerate() {
        let at = (slots_per_layer + slot as usize) * width;
        assert_eq!(&keys[at..at + 7], &fused[row * 16 + 2..row * 16 + 9]);
        assert_eq!(&vals[at..at + 7], &fused[row * 16 + 9..row * 16 + 16]);
    }
    let pairs = [1u32, 4, 5, 2]; // block 1 -> 4, block 5 -> 2
    let before = keys.clone();
    let (mut kp, mut vp, mut pp, mut bs, mut w, mut spl) =
        (keys.as_mut_ptr(), vals.as_mut_ptr(), pairs.as_ptr(), block_size as i32, width as i32, slots_per_layer as u64);
    let mut params: [*mut c_void; 6] =
        [arg(&mut kp), arg(&mut vp), arg(&mut pp), arg(&mut bs), arg(&mut w), arg(&mut spl)];
    let mut config = Launch::grid_1d(2, 64);
    config.grid[1] = layers as u32;
    // SAFETY: lw_copy_blocks(keys, values, pairs, block_size, width, slots_per_layer): 2 pairs, 2 layers.
    unsafe { launch(Kernel::CopyBlocks, config, &mut params) }.expect("launch");
    let span = block_size * width;
    for layer in 0..layers {
        for (from, to) in [(1usize, 4usize), (5, 2)] {
            let base = layer * slots_per_layer * width;
            assert_eq!(
                &keys[base + to * span..base + (to + 1) * span],
                &before[base + from * span..base + (from + 1) * span]
            );
        }
    }
}

#[test]
fn emulated_paged_attention_equals_the_reference() {
    use layerwise::backend::conformance::{attention_layout, decode_layout};
    use layerwise::backend::{AttentionParams, StepLayout};
    use layerwise_kernels::emulated::AttentionArgs;
    let r = Reference::default();
    // (heads, kv heads, head_dim, window, block size)
    for ((heads, kv_heads, head_dim, window, block_size), decoding) in
        [(4usize, 4usize, 8usize, 0usize, 4usize), (4, 2, 16, 0, 16), (2, 1, 5, 4, 3), (3, 3, 64, 1, 1)]
            .into_iter()
            .flat_map(|case| [(case, false), (case, true)])
    {
        // Decode rows past page boundaries and a prefill (the conformance suite's layout); or only
        // decode rows (one per sequence), whose keys and values the kernel writes itself.
        let layout = if decoding { decode_layout(block_size) } else { attention_layout(block_size) };
        let rows = layout.rows();
        let width = kv_heads * head_dim;
        let (layers, num_blocks) = (2usize, 256usize);
        let slots_per_layer = num_blocks * block_size;
        // Every slot any sequence reads, with its key and value rows, written to both caches.
        let mut fill = StepLayout { block_size, ..layout.clone() };
        fill.slots = (0..layout.sequences.len())
            .flat_map(|s| {
                let seq = layout.sequences[s];
                (0..seq.first_position + seq.len).map(move |p| (s, p))
            })
            .map(|(s, p)| layout.slot_of(s, p) as u32)
            .collect();
        fill.slots.sort_unstable();
        fill.slots.dedup();
        let n = fill.slots.len();
        let (k, v) = (values(n * width, 30, 1.0), values(n * width, 31, 1.0));
        let mut store = r.kv_store(layers, num_blocks, block_size, width).expect("store");
        r.kv_write(&mut store, 1, &fill, &matrix(&k, n, width), &matrix(&v, n, width)).expect("reference");
        let mut keys = vec![0f32; layers * slots_per_layer * width];
        let mut vals = vec![0f32; layers * slots_per_layer * width];
        for (i, &slot) in fill.slots.iter().enumerate() {
            let at = (slots_per_layer + slot as usize) * width;
            keys[at..at + width].copy_from_slice(&k[i * width..(i + 1) * width]);
            vals[at..at + width].copy_from_slice(&v[i * width..(i + 1) * width]);
        }
        let q = values(rows * heads * head_dim, 40, 1.0);
        // The queries also as the first column block of a fused q|k|v row (3 extra columns here),
        // read in place through the row stride.
        let q_stride = heads * head_dim + 3;
        let mut fused = vec![f32::NAN; rows * q_stride];
        for r in 0..rows {
            fused[r * q_stride..r * q_stride + heads * head_dim]
                .copy_from_slice(&q[r * heads * head_dim..(r + 1) * heads * head_dim]);
        }
        let params = AttentionParams {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window: (window > 0).then_some(window),
            causal: true,
        };
        let want = r
            .paged_attention(&matrix(&q, rows, heads * head_dim), &store, 1, &layout, &params)
            .expect("reference")
            .data;
        let row_seq: Vec<u32> =
            layout.sequences.iter().enumerate().flat_map(|(s, seq)| std::iter::repeat_n(s as u32, seq.len)).collect();
        let table_start: Vec<u32> = layout.sequences.iter().map(|s| s.table_start as u32).collect();
        // A decoding step's own keys and values: the kernel writes them into copies of the caches
        // whose own slots are set to NaN before each launch.
        let own: Vec<usize> =
            layout.slots.iter().map(|&slot| fill.slots.binary_search(&slot).expect("filled")).collect();
        let new_k: Vec<f32> = own.iter().flat_map(|&i| k[i * width..(i + 1) * width].to_vec()).collect();
        let new_v: Vec<f32> = own.iter().flat_map(|&i| v[i * width..(i + 1) * width].to_vec()).collect();
        let (mut decode_keys, mut decode_vals) = (keys.clone(), vals.clone());
        let args = AttentionArgs {
            q: q.as_ptr(),
            keys: keys.as_mut_ptr(),
            values: vals.as_mut_ptr(),
            new_k: std::ptr::null(),
            new_v: std::ptr::null(),
            kv_stride: 0,
            positions: layout.positions.as_ptr(),
            row_seq: row_seq.as_ptr(),
            table_start: table_start.as_ptr(),
            block_tables: layout.block_tables.as_ptr(),
            block_size: block_size as i32,
            layer: 1,
            heads: heads as i32,
            kv_heads: kv_heads as i32,
            head_dim: head_dim as i32,
            window: window as i32,
            slots_per_layer: slots_per_layer as u64,
            width: width as i32,
            q_stride: (heads * head_dim) as i32,
            scale: params.scale,
        };
        let longest = layout.positions.iter().map(|&p| p as usize + 1).max().unwrap_or(1);
        for (chunk, threads, strided) in
            [(longest, 32usize, false), (7, 32, false), (2, 32, true), (longest, 96, true), (7, 96, false)]
        {
            let splits = longest.div_ceil(chunk);
            let mut args =
                if strided { AttentionArgs { q: fused.as_ptr(), q_stride: q_stride as i32, ..args } } else { args };
            if decoding {
                args = AttentionArgs {
                    keys: decode_keys.as_mut_ptr(),
                    values: decode_vals.as_mut_ptr(),
                    new_k: new_k.as_ptr(),
                    new_v: new_v.as_ptr(),
                    kv_stride: width as i32,
                    ..args
                };
            }
            let mut partial = vec![f32::NAN; rows * heads * splits * (head_dim + 2)];
            let mut counters = vec![0u32; rows * heads];
            let shared_bytes = chunk * 8 + (head_dim + chunk + threads / 32 * head_dim) * 4;
            let mut config = Launch { shared_bytes, ..Launch::grid_1d(heads as u32, threads as u32) };
            config.grid[1] = rows as u32;
            config.grid[2] = splits as u32;
            // Forward and reverse: a different split of each (row, head) finishes last and merges.
            for config in orders(config) {
                for &slot in layout.slots.iter().filter(|_| decoding) {
                    let at = (slots_per_layer + slot as usize) * width;
                    decode_keys[at..at + width].fill(f32::NAN);
                    decode_vals[at..at + width].fill(f32::NAN);
                }
                let mut out = vec![f32::NAN; rows * heads * head_dim];
                let (mut o, mut pp, mut cp, mut a, mut c) =
                    (out.as_mut_ptr(), partial.as_mut_ptr(), counters.as_mut_ptr(), args, chunk as i32);
                let mut p: [*mut c_void; 5] = [arg(&mut o), arg(&mut pp), arg(&mut cp), arg(&mut a), arg(&mut c)];
                // SAFETY: lw_attention(out, partial, counters, args, chunk): the args point at the arrays
                // above; out holds rows x heads x head_dim, partial rows x heads x splits x (head_dim + 2),
                // counters rows x heads (zero).
                unsafe { launch(Kernel::Attention, config, &mut p) }.expect("launch");
                let what = format!("paged attention {params:?} chunk {chunk} strided {strided} {config:?}");
                assert_close(&what, &out, &want, 1e-5);
                // The last block of each (row, head) leaves its counter at zero for the next launch.
                assert!(counters.iter().all(|&c| c == 0), "{what}: counters left {counters:?}");
                if decoding {
                    assert_eq!(decode_keys, keys, "{what}: the step's keys in the cache");
                    assert_eq!(decode_vals, vals, "{what}: the step's values in the cache");
                }
            }
        }
        // The probabilities of every sequence.
        for (s, seq) in layout.sequences.iter().enumerate() {
            let ctx = seq.first_position + seq.len;
            let want = r
                .attention_probs(&matrix(&q, rows, heads * head_dim), &store, 1, &layout, s, &params)
                .expect("reference")
                .data;
            let mut out = vec![f32::NAN; heads * seq.len * ctx];
            let mut config = Launch { shared_bytes: (head_dim + ctx) * 4, ..Launch::grid_1d(heads as u32, 64) };
            config.grid[1] = seq.len as u32;
            let (mut o, mut a, mut fr, mut c) = (out.as_mut_ptr(), args, seq.first_row as i32, ctx as i32);
            let mut p: [*mut c_void; 4] = [arg(&mut o), arg(&mut a), arg(&mut fr), arg(&mut c)];
            // SAFETY: lw_attention_probs(out, args, first_row, context): heads x len x ctx out.
            unsafe { launch(Kernel::AttentionProbs, config, &mut p) }.expect("launch");
            assert_close(&format!("attention probs {params:?} sequence {s}"), &out, &want, 1e-5);
        }
    }
}
