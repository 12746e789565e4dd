//! The training ops: each forward beside its backward, on plain row-major f32 slices (llm.c's
//! layout: `[rows, cols]`, rows = batch x time). A backward *adds* into its gradient buffers, so a
//! value read by two consumers (a residual, a tied embedding) collects both contributions.
//!
//! The forward math is the inference engine's (`math::gelu_tanh`, the reference backend's rotary
//! angles, LayerNorm's two-pass statistics); the tests check every backward against central finite
//! differences of its own forward, in f64 where the forward allows.

use rayon::prelude::*;

use crate::math;
use crate::model::config::Activation;

/// `dst[m, n] (+)= a[m, k] · b[k, n]`, where `a` is stored `[k, m]` when `a_t` and `b` is stored
/// `[n, k]` when `b_t`; `accumulate` adds to `dst` instead of overwriting it. The `gemm` crate, on
/// every core.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    a_t: bool,
    b: &[f32],
    b_t: bool,
    accumulate: bool,
) {
    assert!(dst.len() >= m * n && a.len() >= m * k && b.len() >= k * n, "matmul operand sizes");
    if m == 0 || n == 0 {
        return;
    }
    // Strides (column, row) of each operand as gemm reads it.
    let (a_cs, a_rs) = if a_t { (m as isize, 1) } else { (1, k as isize) };
    let (b_cs, b_rs) = if b_t { (k as isize, 1) } else { (1, n as isize) };
    let threads = rayon::current_num_threads();
    let parallelism =
        if m * n * k > 1 << 15 && threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the assert above bounds every index gemm forms from (m, n, k) and these strides: a is
    // m x k (or its transpose), b is k x n (or its transpose), dst is m x n, all contiguous.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// `y[n, out] = x[n, in] · wᵀ + b` with `w: [out, in]`.
pub fn linear_forward(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    (rows, n_in, n_out): (usize, usize, usize),
) {
    matmul(y, (rows, n_out, n_in), x, false, w, true, false);
    if let Some(b) = b {
        y.par_chunks_mut(n_out).for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b));
    }
}

/// Gradients of [`linear_forward`]: `dx += dy · w`, `dw += dyᵀ · x`, `db += Σ_rows dy`; each only when
/// asked for (a frozen weight's gradient is never formed).
pub fn linear_backward(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    (rows, n_in, n_out): (usize, usize, usize),
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
) {
    if let Some(dx) = dx {
        matmul(dx, (rows, n_in, n_out), dy, false, w, false, true);
    }
    if let Some(dw) = dw {
        matmul(dw, (n_out, n_in, rows), dy, true, x, false, true);
    }
    if let Some(db) = db {
        for row in dy.chunks(n_out) {
            db.iter_mut().zip(row).for_each(|(d, g)| *d += g);
        }
    }
}

/// Which normalisation a layer uses, and its statistics per row for the backward.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NormKind {
    /// `(x - mean) / sqrt(var + eps) * w + b` (GPT-2, GPT-Neo).
    Layer,
    /// `x / sqrt(mean(x²) + eps) * w` (Llama).
    Rms,
}

/// Normalises each row of `x: [rows, d]` into `y`; records `mean` (0 for RMS) and `rstd` per row.
#[allow(clippy::too_many_arguments)]
pub fn norm_forward(
    kind: NormKind,
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    eps: f32,
) {
    let d = w.len();
    y.par_chunks_mut(d).zip(x.par_chunks(d)).zip(mean.par_iter_mut().zip(rstd.par_iter_mut())).for_each(
        |((y, x), (m, r))| {
            let mu = match kind {
                NormKind::Layer => x.iter().sum::<f32>() / d as f32,
                NormKind::Rms => 0.0,
            };
            let var = x.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / d as f32;
            let s = 1.0 / (var + eps).sqrt();
            for (i, (y, x)) in y.iter_mut().zip(x).enumerate() {
                *y = (x - mu) * s * w[i] + b.map_or(0.0, |b| b[i]);
            }
            (*m, *r) = (mu, s);
        },
    );
}

/// Gradients of [`norm_forward`]: with `x̂ = (x - mean)·rstd` and `g = dy·w`,
/// LayerNorm `dx = rstd·(g - mean(g) - x̂·mean(g·x̂))`, RMSNorm `dx = rstd·(g - x̂·mean(g·x̂))`;
/// `dw += dy·x̂`, `db += dy`.
#[allow(clippy::too_many_arguments)]
pub fn norm_backward(
    kind: NormKind,
    dy: &[f32],
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    w: &[f32],
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
) {
    let d = w.len();
    if let Some(dx) = dx {
        dx.par_chunks_mut(d).zip(dy.par_chunks(d)).zip(x.par_chunks(d)).zip(mean.par_iter().zip(rstd)).for_each(
            |(((dx, dy), x), (&mu, &s))| {
                let (mut mean_g, mut mean_gx) = (0.0f32, 0.0f32);
                for i in 0..d {
                    let g = dy[i] * w[i];
                    mean_g += g;
                    mean_gx += g * (x[i] - mu) * s;
                }
                mean_g = if kind == NormKind::Layer { mean_g / d as f32 } else { 0.0 };
                mean_gx /= d as f32;
                for i in 0..d {
                    let xhat = (x[i] - mu) * s;
                    dx[i] += s * (dy[i] * w[i] - mean_g - xhat * mean_gx);
                }
            },
        );
    }
    if let Some(dw) = dw {
        for ((dy, x), (&mu, &s)) in dy.chunks(d).zip(x.chunks(d)).zip(mean.iter().zip(rstd)) {
            for i in 0..d {
                dw[i] += dy[i] * (x[i] - mu) * s;
            }
        }
    }
    if let Some(db) = db {
        for dy in dy.chunks(d) {
            db.iter_mut().zip(dy).for_each(|(d, g)| *d += g);
        }
    }
}

/// The activation's derivative at `x` (the forward is `backend`'s, through [`activate`]).
fn activation_derivative(act: Activation, x: f32) -> f32 {
    match act {
        Activation::GeluTanh => {
            // d/dx 0.5·x·(1 + tanh(u)), u = c·(x + 0.044715·x³).
            const C: f32 = 0.797_884_6;
            let u = C * (x + 0.044715 * x * x * x);
            let t = u.tanh();
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * C * (1.0 + 3.0 * 0.044715 * x * x)
        }
        Activation::Gelu => {
            let cdf = 0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f32::consts::PI).sqrt();
            cdf + x * pdf
        }
        Activation::Relu => f32::from(x > 0.0),
        Activation::Silu => {
            let s = 1.0 / (1.0 + (-x).exp());
            s * (1.0 + x * (1.0 - s))
        }
    }
}

/// The activation at `x`, as inference computes it.
pub fn activate(act: Activation, x: f32) -> f32 {
    match act {
        Activation::GeluTanh => math::gelu_tanh(x),
        Activation::Gelu => math::gelu_erf(x),
        Activation::Relu => x.max(0.0),
        Activation::Silu => math::silu(x),
    }
}

/// `y = act(x)` elementwise.
pub fn activation_forward(act: Activation, y: &mut [f32], x: &[f32]) {
    y.par_iter_mut().zip(x).for_each(|(y, &x)| *y = activate(act, x));
}

/// `dx += dy · act'(x)`.
pub fn activation_backward(act: Activation, dx: &mut [f32], dy: &[f32], x: &[f32]) {
    dx.par_iter_mut().zip(dy).zip(x).for_each(|((dx, &dy), &x)| *dx += dy * activation_derivative(act, x));
}

/// Llama's gated MLP input: `y = act(gate) · up`.
pub fn gate_forward(act: Activation, y: &mut [f32], gate: &[f32], up: &[f32]) {
    y.par_iter_mut().zip(gate).zip(up).for_each(|((y, &g), &u)| *y = activate(act, g) * u);
}

/// Gradients of [`gate_forward`]: `dgate += dy·up·act'(gate)`, `dup += dy·act(gate)`.
pub fn gate_backward(act: Activation, dgate: &mut [f32], dup: &mut [f32], dy: &[f32], gate: &[f32], up: &[f32]) {
    dgate.par_iter_mut().zip(dup.par_iter_mut()).zip(dy.par_iter().zip(gate).zip(up)).for_each(
        |((dg, du), ((&dy, &g), &u))| {
            *dg += dy * u * activation_derivative(act, g);
            *du += dy * activate(act, g);
        },
    );
}

/// Rotates each head's halves (`x[j]`, `x[j + d/2]`) of `x: [rows, heads·d]` by `sign ·
/// position · θ^(-2j/d)`, the reference backend's rotary embedding (`sign = 1`). The backward of a
/// rotation is the rotation by the opposite angle (`sign = -1`) of the gradient.
pub fn rope(x: &mut [f32], positions: &[usize], head_dim: usize, theta: f32, sign: f32) {
    let width = x.len() / positions.len().max(1);
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half).map(|j| 1.0 / theta.powf((2 * j) as f32 / head_dim as f32)).collect();
    x.par_chunks_mut(width).zip(positions).for_each(|(row, &pos)| {
        for head in row.chunks_mut(head_dim) {
            for j in 0..half {
                let (sin, cos) = (pos as f32 * inv_freq[j]).sin_cos();
                let sin = sign * sin;
                let (a, b) = (head[j], head[half + j]);
                head[j] = a * cos - b * sin;
                head[half + j] = b * cos + a * sin;
            }
        }
    });
}

/// Shape of a batch of causal self-attention: `batch` sequences of `time` positions, query heads
/// sharing `kv_heads` key/value heads in groups, an optional window (the query's own position
/// included) and the score scale.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub batch: usize,
    pub time: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub window: Option<usize>,
    /// False for an encoder: every query sees every position.
    pub causal: bool,
}

impl AttentionShape {
    /// The key positions query `i` sees.
    fn visible(&self, i: usize) -> std::ops::Range<usize> {
        if !self.causal {
            return 0..self.time;
        }
        self.window.map_or(0, |w| (i + 1).saturating_sub(w))..i + 1
    }
}

/// Self-attention (causal unless the shape says otherwise): `probs[b, h, i, j] = softmax_j(scale · q_i·k_j)` over the visible keys (0
/// elsewhere), `out_i = Σ_j probs_ij v_j`. `q, out: [batch·time, heads·d]`, `k, v: [batch·time,
/// kv_heads·d]`, `probs: [batch, heads, time, time]` (kept for the backward). Each (sequence, head)
/// is two matrix products on the head's gathered rows; masked scores are exactly 0 after the softmax,
/// so the full products equal the causal sums.
pub fn attention_forward(out: &mut [f32], probs: &mut [f32], q: &[f32], k: &[f32], v: &[f32], s: AttentionShape) {
    let (t, d) = (s.time, s.head_dim);
    let (qw, kw) = (s.heads * d, s.kv_heads * d);
    let group = s.heads / s.kv_heads;
    out.par_chunks_mut(t * qw).zip(probs.par_chunks_mut(s.heads * t * t)).enumerate().for_each(|(b, (out, probs))| {
        let (q, k, v) = (&q[b * t * qw..][..t * qw], &k[b * t * kw..][..t * kw], &v[b * t * kw..][..t * kw]);
        let mut head_out = vec![0.0f32; t * d];
        for h in 0..s.heads {
            let kv = h / group;
            let (qh, kh, vh) = (gather(q, qw, h * d, d), gather(k, kw, kv * d, d), gather(v, kw, kv * d, d));
            let p = &mut probs[h * t * t..][..t * t];
            // S = Q·Kᵀ, then a masked, scaled softmax per row.
            matmul(p, (t, t, d), &qh, false, &kh, true, false);
            for i in 0..t {
                let row = &mut p[i * t..][..t];
                let seen = s.visible(i);
                let max = row[seen.clone()].iter().fold(f32::NEG_INFINITY, |m, &x| m.max(s.scale * x));
                let mut sum = 0.0;
                for x in &mut row[seen.clone()] {
                    *x = (s.scale * *x - max).exp();
                    sum += *x;
                }
                row[seen.clone()].iter_mut().for_each(|x| *x /= sum);
                row[..seen.start].fill(0.0);
                row[seen.end..].fill(0.0);
            }
            // O = P·V
            matmul(&mut head_out, (t, d, t), p, false, &vh, false, false);
            scatter(out, qw, h * d, d, &head_out, false);
        }
    });
}

/// Gradients of [`attention_forward`]: `dV = Pᵀ·dO`, `dP = dO·Vᵀ`,
/// `dS = scale · P ∘ (dP - rowsum(P ∘ dP))`, `dQ = dS·K`, `dK = dSᵀ·Q` (summed over a group's heads).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    probs: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttentionShape,
) {
    let (t, d) = (s.time, s.head_dim);
    let (qw, kw) = (s.heads * d, s.kv_heads * d);
    let group = s.heads / s.kv_heads;
    dq.par_chunks_mut(t * qw).zip(dk.par_chunks_mut(t * kw).zip(dv.par_chunks_mut(t * kw))).enumerate().for_each(
        |(b, (dq, (dk, dv)))| {
            let (q, k, v) = (&q[b * t * qw..][..t * qw], &k[b * t * kw..][..t * kw], &v[b * t * kw..][..t * kw]);
            let dout = &dout[b * t * qw..][..t * qw];
            let probs = &probs[b * s.heads * t * t..][..s.heads * t * t];
            let (mut ds, mut grad) = (vec![0.0f32; t * t], vec![0.0f32; t * d]);
            for h in 0..s.heads {
                let kv = h / group;
                let (qh, kh, vh) = (gather(q, qw, h * d, d), gather(k, kw, kv * d, d), gather(v, kw, kv * d, d));
                let doh = gather(dout, qw, h * d, d);
                let p = &probs[h * t * t..][..t * t];
                // dV += Pᵀ·dO
                matmul(&mut grad, (t, d, t), p, true, &doh, false, false);
                scatter(dv, kw, kv * d, d, &grad, true);
                // dP = dO·Vᵀ, then the softmax's backward in place.
                matmul(&mut ds, (t, t, d), &doh, false, &vh, true, false);
                for (row, p) in ds.chunks_mut(t).zip(p.chunks(t)) {
                    let dot: f32 = row.iter().zip(p).map(|(g, p)| g * p).sum();
                    row.iter_mut().zip(p).for_each(|(g, &p)| *g = s.scale * p * (*g - dot));
                }
                // dQ = dS·K, dK += dSᵀ·Q
                matmul(&mut grad, (t, d, t), &ds, false, &kh, false, false);
                scatter(dq, qw, h * d, d, &grad, true);
                matmul(&mut grad, (t, d, t), &ds, true, &qh, false, false);
                scatter(dk, kw, kv * d, d, &grad, true);
            }
        },
    );
}

/// Columns `[start, start + width)` of every row of `x` (rows `stride` wide), contiguous.
fn gather(x: &[f32], stride: usize, start: usize, width: usize) -> Vec<f32> {
    x.chunks(stride).flat_map(|row| row[start..start + width].iter().copied()).collect()
}

/// Writes (or adds, when `add`) `part`'s rows into columns `[start, start + width)` of `x`.
fn scatter(x: &mut [f32], stride: usize, start: usize, width: usize, part: &[f32], add: bool) {
    for (row, src) in x.chunks_mut(stride).zip(part.chunks(width)) {
        let dst = &mut row[start..start + width];
        if add {
            dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
        } else {
            dst.copy_from_slice(src);
        }
    }
}

/// Cross-entropy of each row of `logits: [rows, vocab]` against `targets` (`None`: not scored),
/// averaged over the scored rows as `torch.nn.CrossEntropyLoss` does. Overwrites `logits` with
/// `weight · d(mean loss)/d(logits)` and returns the mean loss (f64) and the number of scored rows.
pub fn cross_entropy(logits: &mut [f32], targets: &[Option<u32>], weight: f32) -> (f64, usize) {
    let vocab = logits.len() / targets.len().max(1);
    let scored = targets.iter().filter(|t| t.is_some()).count();
    if scored == 0 {
        logits.fill(0.0);
        return (0.0, 0);
    }
    let scale = weight / scored as f32;
    // Row losses in parallel, summed in order: the same total on every run (resumption is exact).
    let losses: Vec<f64> = logits
        .par_chunks_mut(vocab)
        .zip(targets)
        .map(|(row, target)| {
            let Some(target) = *target else {
                row.fill(0.0);
                return 0.0;
            };
            // f32 exponentials (the vocabulary is the widest row of training), an f64 sum.
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let sum: f64 = row.iter().map(|&x| (x - max).exp() as f64).sum();
            let log_z = max as f64 + sum.ln();
            let loss = log_z - row[target as usize] as f64;
            let log_z = log_z as f32;
            for v in row.iter_mut() {
                *v = (*v - log_z).exp() * scale;
            }
            row[target as usize] -= scale;
            loss
        })
        .collect();
    let total: f64 = losses.iter().sum();
    (total / scored as f64, scored)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Checks `analytic` (the gradient of `Σ upstream · f(x)` w.r.t. `x`) against central
    /// differences of `f`.
    fn check(name: &str, x: &[f32], upstream: &[f32], analytic: &[f32], f: impl Fn(&[f32]) -> Vec<f32>) {
        let objective = |x: &[f32]| -> f64 { f(x).iter().zip(upstream).map(|(a, b)| *a as f64 * *b as f64).sum() };
        let h = 1e-2f32;
        for i in 0..x.len() {
            let (mut plus, mut minus) = (x.to_vec(), x.to_vec());
            plus[i] += h;
            minus[i] -= h;
            let numeric = (objective(&plus) - objective(&minus)) / (2.0 * h as f64);
            let tolerance = 2e-3 * (1.0 + numeric.abs());
            assert!(
                (analytic[i] as f64 - numeric).abs() <= tolerance,
                "{name}[{i}]: analytic {} vs numeric {numeric}",
                analytic[i]
            );
        }
    }

    #[test]
    fn linear_gradients_match_finite_differences() {
        let (rows, n_in, n_out) = (3, 5, 4);
        let (x, w, b, dy) =
            (values(rows * n_in, 1), values(n_out * n_in, 2), values(n_out, 3), values(rows * n_out, 4));
        let (mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; w.len()], vec![0.0; b.len()]);
        linear_backward(&dy, &x, &w, (rows, n_in, n_out), Some(&mut dx), Some(&mut dw), Some(&mut db));
        let run = |x: &[f32], w: &[f32], b: &[f32]| {
            let mut y = vec![0.0; rows * n_out];
            linear_forward(&mut y, x, w, Some(b), (rows, n_in, n_out));
            y
        };
        check("dx", &x, &dy, &dx, |x| run(x, &w, &b));
        check("dw", &w, &dy, &dw, |w| run(&x, w, &b));
        check("db", &b, &dy, &db, |b| run(&x, &w, b));
    }

    #[test]
    fn norm_gradients_match_finite_differences() {
        let (rows, d) = (3, 6);
        for kind in [NormKind::Layer, NormKind::Rms] {
            let x: Vec<f32> = values(rows * d, 5).iter().map(|v| v * 2.0 + 0.3).collect();
            let (w, b, dy) = (values(d, 6), values(d, 7), values(rows * d, 8));
            let run = |x: &[f32], w: &[f32], b: &[f32]| {
                let (mut y, mut m, mut r) = (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows]);
                norm_forward(kind, &mut y, &mut m, &mut r, x, w, (kind == NormKind::Layer).then_some(b), 1e-5);
                (y, m, r)
            };
            let (_, m, r) = run(&x, &w, &b);
            let (mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; d], vec![0.0; d]);
            norm_backward(kind, &dy, &x, &m, &r, &w, Some(&mut dx), Some(&mut dw), Some(&mut db));
            check("dx", &x, &dy, &dx, |x| run(x, &w, &b).0);
            check("dw", &w, &dy, &dw, |w| run(&x, w, &b).0);
            if kind == NormKind::Layer {
                check("db", &b, &dy, &db, |b| run(&x, &w, b).0);
            }
        }
    }

    #[test]
    fn activation_and_gate_gradients_match_finite_differences() {
        let x: Vec<f32> = values(40, 9).iter().map(|v| v * 3.0).collect();
        let dy = values(40, 10);
        for act in [Activation::GeluTanh, Activation::Gelu, Activation::Silu, Activation::Relu] {
            // ReLU's kink: keep the points away from 0 for the difference quotient.
            let x: Vec<f32> =
                if act == Activation::Relu { x.iter().map(|v| v + v.signum() * 0.05).collect() } else { x.clone() };
            let mut dx = vec![0.0; 40];
            activation_backward(act, &mut dx, &dy, &x);
            check(&format!("{act:?}"), &x, &dy, &dx, |x| x.iter().map(|&v| activate(act, v)).collect());
            let up = values(40, 11);
            let (mut dg, mut du) = (vec![0.0; 40], vec![0.0; 40]);
            gate_backward(act, &mut dg, &mut du, &dy, &x, &up);
            let gated = |g: &[f32], u: &[f32]| {
                let mut y = vec![0.0; 40];
                gate_forward(act, &mut y, g, u);
                y
            };
            check("dgate", &x, &dy, &dg, |g| gated(g, &up));
            check("dup", &up, &dy, &du, |u| gated(&x, u));
        }
    }

    #[test]
    fn rope_backward_is_the_transposed_rotation() {
        let (rows, hd) = (3, 8);
        let positions = [0usize, 5, 17];
        let x = values(rows * 2 * hd, 12);
        let dy = values(rows * 2 * hd, 13);
        let mut dx = dy.clone();
        rope(&mut dx, &positions, hd, 10000.0, -1.0);
        check("rope", &x, &dy, &dx, |x| {
            let mut y = x.to_vec();
            rope(&mut y, &positions, hd, 10000.0, 1.0);
            y
        });
    }

    #[test]
    fn attention_gradients_match_finite_differences() {
        for (heads, kv_heads, window, causal) in
            [(2, 2, None, true), (4, 2, None, true), (2, 1, Some(2), true), (2, 2, None, false)]
        {
            let s = AttentionShape { batch: 2, time: 4, heads, kv_heads, head_dim: 3, scale: 0.7, window, causal };
            let rows = s.batch * s.time;
            let (qw, kw) = (heads * 3, kv_heads * 3);
            let (q, k, v) = (values(rows * qw, 14), values(rows * kw, 15), values(rows * kw, 16));
            let dout = values(rows * qw, 17);
            let run = |q: &[f32], k: &[f32], v: &[f32]| {
                let (mut out, mut probs) = (vec![0.0; rows * qw], vec![0.0; s.batch * heads * 16]);
                attention_forward(&mut out, &mut probs, q, k, v, s);
                (out, probs)
            };
            let (_, probs) = run(&q, &k, &v);
            if !causal {
                assert!(probs[1] > 0.0, "query 0 sees key 1");
            }
            if let Some(w) = window {
                // Query 3 sees keys 2 and 3 only.
                assert_eq!(probs[3 * 4], 0.0);
                assert_eq!(probs[3 * 4 + 1], 0.0);
                assert!(w == 2 && probs[3 * 4 + 2] > 0.0);
            }
            let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
            attention_backward(&mut dq, &mut dk, &mut dv, &dout, &probs, &q, &k, &v, s);
            check("dq", &q, &dout, &dq, |q| run(q, &k, &v).0);
            check("dk", &k, &dout, &dk, |k| run(&q, k, &v).0);
            check("dv", &v, &dout, &dv, |v| run(&q, &k, v).0);
        }
    }

    #[test]
    fn cross_entropy_gradient_matches_finite_differences_and_skips_unscored_rows() {
        let logits: Vec<f32> = values(3 * 5, 18).iter().map(|v| v * 4.0).collect();
        let targets = [Some(2u32), None, Some(4)];
        let mut grad = logits.clone();
        let (loss, scored) = cross_entropy(&mut grad, &targets, 1.5);
        assert_eq!(scored, 2);
        let objective = |l: &[f32]| -> Vec<f32> {
            let mut scratch = l.to_vec();
            vec![1.5 * cross_entropy(&mut scratch, &targets, 1.0).0 as f32]
        };
        assert!((objective(&logits)[0] as f64 - 1.5 * loss).abs() < 1e-5);
        check("dlogits", &logits, &[1.0], &grad, objective);
        assert!(grad[5..10].iter().all(|&g| g == 0.0));
    }
}
