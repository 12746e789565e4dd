//! The op conformance suite: every op of a backend against the [`Reference`] backend on edge shapes
//! (widths that are no multiple of any vector width, one row, page boundaries, grouped-query heads,
//! windows, vocabularies that are no multiple of a block, every weight dtype), within stated
//! tolerances. Each check is a function generic over the backend; [`conformance_tests!`] turns them
//! into `conformance_*` tests for a backend, so the next backend is held to the same suite:
//!
//! ```ignore
//! layerwise::conformance_tests!(cpu, layerwise::Cpu::default());
//! ```
//!
//! Tolerances: ops that move or scale values must match exactly; sums (norms, products, attention)
//! within `1e-5` of the largest reference magnitude per output (`1e-4` for products over f16/bf16
//! weights, whose values both sides read alike but sum in another order); ACD within `1e-5` in
//! log-probability on every token the reference keeps finite.

use super::{AttentionParams, Backend, Layout, Lookup, NormParams, Reference, SeqLayout, StepLayout};
use crate::error::{Error, Result};
use crate::io::weights::{DType, HostTensor};
use crate::model::config::Activation;

/// Generates one `#[test] fn conformance_<check>_<name>()` per check of the suite for `backend`.
#[macro_export]
macro_rules! conformance_tests {
    ($name:ident, $backend:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::conformance_tests!(@each $backend;
                embed, elementwise, norms, linear, linear_epilogues, norm_linear, activations, rope, scale_heads, rows_and_columns,
                paged_attention, attention_probs, contrast_acd, argmax_rows);
        }
    };
    (@each $backend:expr; $($check:ident),*) => {
        $(
            #[test]
            fn $check() {
                if let Err(e) = $crate::backend::conformance::$check(&$backend) {
                    panic!("conformance {}: {e}", stringify!($check));
                }
            }
        )*
    };
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let h = (i ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            ((h >> 40) % 2000) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn fail(what: String) -> Error {
    Error::invalid("conformance", what)
}

/// `got` equals `want` within `tolerance` of the largest |want| (exactly when 0).
fn compare(what: &str, got: &[f32], want: &[f32], tolerance: f32) -> Result<()> {
    if got.len() != want.len() {
        return Err(fail(format!("{what}: {} values, the reference has {}", got.len(), want.len())));
    }
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let bad =
            if tolerance == 0.0 { g.to_bits() != w.to_bits() && g != w } else { (g - w).abs() > tolerance * scale };
        if bad || g.is_nan() != w.is_nan() {
            return Err(fail(format!("{what}: value {i} is {g}, the reference has {w} (tolerance {tolerance})")));
        }
    }
    Ok(())
}

/// The same tensor on the backend under test and on the reference.
fn pair<B: Backend>(b: &B, data: &[f32], rows: usize, cols: usize) -> Result<(B::Tensor, super::Matrix)> {
    Ok((b.upload(data.to_vec(), rows, cols)?, Reference::default().upload(data.to_vec(), rows, cols)?))
}

fn weight_pair<B: Backend>(
    b: &B,
    tensor: &HostTensor,
    layout: Layout,
) -> Result<(B::Weight, super::reference::RefWeight)> {
    Ok((b.weight(tensor, layout)?, Reference::default().weight(tensor, layout)?))
}

fn vector(n: usize, seed: u64) -> HostTensor {
    HostTensor::from_f32(values(n, seed), vec![n])
}

/// `embed`: token and position lookups from tables of every dtype.
pub fn embed<B: Backend>(b: &B) -> Result<()> {
    let r = Reference::default();
    for dtype in DTYPES {
        let table = HostTensor::from_f32(values(11 * 13, 1), vec![11, 13]).converted(dtype);
        let (tw, rw) = weight_pair(b, &table, Layout::OutIn)?;
        let layout = StepLayout { ids: vec![10, 0, 3, 3], positions: vec![0, 1, 2, 9], ..Default::default() };
        let (bs, rs) = (b.upload_step(layout.clone())?, r.upload_step(layout)?);
        for lookup in [Lookup::Tokens, Lookup::Positions] {
            let got = b.to_host(&b.embed(&tw, &bs, lookup)?)?;
            compare(&format!("embed {dtype} {lookup:?}"), &got, &r.embed(&rw, &rs, lookup)?.data, 0.0)?;
        }
    }
    Ok(())
}

/// `add_assign`, `mul_assign`: one row and many, odd widths.
pub fn elementwise<B: Backend>(b: &B) -> Result<()> {
    let r = Reference::default();
    for (rows, cols) in [(1usize, 1usize), (1, 37), (5, 67)] {
        let (x, y) = (values(rows * cols, 2), values(rows * cols, 3));
        let (mut bx, mut rx) = pair(b, &x, rows, cols)?;
        let (by, ry) = pair(b, &y, rows, cols)?;
        b.add_assign(&mut bx, &by)?;
        r.add_assign(&mut rx, &ry)?;
        compare("add_assign", &b.to_host(&bx)?, &rx.data, 0.0)?;
        b.mul_assign(&mut bx, &by)?;
        r.mul_assign(&mut rx, &ry)?;
        compare("mul_assign", &b.to_host(&bx)?, &rx.data, 0.0)?;
    }
    Ok(())
}

/// `layer_norm`, `rms_norm`: widths 1, 7, 64, 1000, weights of every dtype.
pub fn norms<B: Backend>(b: &B) -> Result<()> {
    let r = Reference::default();
    for dtype in DTYPES {
        for (rows, d) in [(1usize, 1usize), (3, 7), (2, 64), (4, 1000)] {
            let x: Vec<f32> = values(rows * d, 4).iter().map(|v| v * 3.0 + 0.5).collect();
            let (bx, rx) = pair(b, &x, rows, d)?;
            let (bw, rw) = weight_pair(b, &vector(d, 5).converted(dtype), Layout::OutIn)?;
            let (bb, rb) = weight_pair(b, &vector(d, 6).converted(dtype), Layout::OutIn)?;
            let got = b.to_host(&b.layer_norm(&bx, &bw, &bb, 1e-5)?)?;
            compare(
                &format!("layer_norm {dtype} [{rows}, {d}]"),
                &got,
                &r.layer_norm(&rx, &rw, &rb, 1e-5)?.data,
                1e-5,
            )?;
            let got = b.to_host(&b.rms_norm(&bx, &bw, 1e-6)?)?;
            compare(&format!("rms_norm {dtype} [{rows}, {d}]"), &got, &r.rms_norm(&rx, &rw, 1e-6)?.data, 1e-5)?;
        }
    }
    Ok(())
}

/// `linear`: both layouts, every dtype, with and without bias, rows that take every product path
/// (one token, a few, register tiles, GEMM), widths that are no multiple of any vector or panel.
pub fn linear<B: Backend>(b: &B) -> Result<()> {
    let r = Reference::default();
    // (1024, 40): a decode product that a GPU splits over several warps per output.
    for (n_in, n_out) in [(1usize, 5usize), (37, 53), (64, 300), (1024, 40)] {
        for layout in [Layout::OutIn, Layout::InOut] {
            for dtype in DTYPES {
                let shape = match layout {
                    Layout::OutIn => vec![n_out, n_in],
                    Layout::InOut => vec![n_in, n_out],
                };
                let tensor = HostTensor::from_f32(values(n_in * n_out, 7), shape).converted(dtype);
                let (bw, rw) = weight_pair(b, &tensor, layout)?;
                let (bb, rb) = weight_pair(b, &vector(n_out, 8), Layout::OutIn)?;
                let tolerance = if dtype == DType::F32 { 1e-5 } else { 1e-4 };
                // The wide case only where a GPU decodes (<= 8 rows): emulated backends are slow.
                let rows_list: &[usize] = if n_in >= 1024 { &[1, 3, 8] } else { &[1, 2, 3, 4, 5, 7, 16, 33, 70] };
                for &rows in rows_list {
                    let (bx, rx) = pair(b, &values(rows * n_in, rows as u64), rows, n_in)?;
                    let what = format!("linear {dtype} {layout:?} {n_in}->{n_out}, {rows} rows");
                    compare(
                        &what,
                        &b.to_host(&b.linear(&bx, &bw, None)?)?,
                        &r.linear(&rx, &rw, None)?.data,
                        tolerance,
                    )?;
                    let got = b.to_host(&b.linear(&bx, &bw, Some(&bb))?)?;
                    compare(&format!("{what}, bias"), &got, &r.linear(&rx, &rw, Some(&rb))?.data, tolerance)?;
                }
            }
        }
    }
    Ok(())
}

/// `linear_act` and `linear_add_assign` against the reference's linear then activate / add_assign:
/// one decode row, a few, and a GEMM's worth, f32 and bf16 weights, with a bias.
pub fn linear_epilogues<B: Backend>(b: &B) -> Result<()> {
    let r = Reference::default();
    let (n_in, n_out) = (96usize, 130usize);
    for dtype in [DType::F32, DType::BF16] {
        let tensor = HostTensor::from_f32(values(n_in * n_out, 41), vec![n_out, n_in]).converted(dtype);
        let (bw, rw) = weight_pair(b, &tensor, Layout::OutIn)?;
        let (bb, rb) = weight_pair(b, &vector(n_out, 42), Layout::OutIn)?;
        let tolerance = if dtype == DType::F32 { 1e-5 } else { 1e-4 };
        for rows in [1usize, 3, 17] {
            let (bx, rx) = pair(b, &values(rows * n_in, 43 + rows as u64), rows, n_in)?;
            let linear = r.linear(&rx, &rw, Some(&rb))?;
            for act in [Activation::GeluTanh, Activation::Gelu, Activation::Relu, Activation::Silu] {
                let mut want = linear.clone();
                r.activate(&mut want, act)?;
                let got = b.to_host(&b.linear_act(&bx, &bw, Some(&bb), act)?)?;
                compare(&format!("linear_act {act:?} {dtype}, {rows} rows"), &got, &want.data, tolerance)?;
            }
            let stream = values(rows * n_out, 44);
            let (mut bs, mut rs) = pair(b, &stream, rows, n_out)?;
            r.add_assign(&mut rs, &linear)?;
            b.linear_add_assign(&mut bs, &bx, &bw, Some(&bb))?;
            compare(&format!("linear_add_assign {dtype}, {rows} rows"), &b.to_host(&bs)?, &rs.data, tolerance)?;
        }
    }
    Ok(())
}

/// `activate`: every activation, on lengths that are no multiple of a vector and on large values.
/// The final norm fused with a head, against the reference's norm then linear.
pub fn norm_linear<B: Backend>(b: &B) -> Result<()> {
    let r = Reference::default();
    for (d, vocab) in [(7usize, 5usize), (64, 300), (1024, 50)] {
        for dtype in DTYPES {
            let head = HostTensor::from_f32(values(vocab * d, 17), vec![vocab, d]).converted(dtype);
            let (bh, rh) = weight_pair(b, &head, Layout::OutIn)?;
            let (bw, rw) = weight_pair(b, &vector(d, 18), Layout::OutIn)?;
            let (bb, rb) = weight_pair(b, &vector(d, 19), Layout::OutIn)?;
            let tolerance = if dtype == DType::F32 { 1e-5 } else { 1e-4 };
            let rows_list: &[usize] = if d >= 1024 { &[1, 8] } else { &[1, 3, 8, 9] };
            for &rows in rows_list {
                let x: Vec<f32> = values(rows * d, rows as u64 + 20).iter().map(|v| v * 3.0 + 0.5).collect();
                let (bx, rx) = pair(b, &x, rows, d)?;
                let what = format!("norm_linear {dtype} [{rows}, {d}] -> {vocab}");
                let want = r.linear(&r.layer_norm(&rx, &rw, &rb, 1e-5)?, &rh, None)?.data;
                let layer_norm = NormParams { weight: &bw, bias: Some(&bb), eps: 1e-5 };
                compare(
                    &format!("{what} layer norm"),
                    &b.to_host(&b.norm_linear(&bx, layer_norm, &bh, None, None)?)?,
                    &want,
                    tolerance,
                )?;
                // With the product's bias and an activation (a block's norm and first product).
                let (bhb, rhb) = weight_pair(b, &vector(vocab, 21), Layout::OutIn)?;
                let mut want_act = r.linear(&r.layer_norm(&rx, &rw, &rb, 1e-5)?, &rh, Some(&rhb))?;
                r.activate(&mut want_act, Activation::GeluTanh)?;
                compare(
                    &format!("{what} layer norm, bias, GELU"),
                    &b.to_host(&b.norm_linear(&bx, layer_norm, &bh, Some(&bhb), Some(Activation::GeluTanh))?)?,
                    &want_act.data,
                    tolerance,
                )?;
                let want = r.linear(&r.rms_norm(&rx, &rw, 1e-6)?, &rh, None)?.data;
                let rms_norm = NormParams { weight: &bw, bias: None, eps: 1e-6 };
                compare(
                    &format!("{what} rms norm"),
                    &b.to_host(&b.norm_linear(&bx, rms_norm, &bh, None, None)?)?,
                    &want,
                    tolerance,
                )?;
            }
        }
    }
    Ok(())
}

pub fn activations<B: Backend>(b: &B) -> Result<()> {
    let r = Reference::default();
    for act in [Activation::GeluTanh, Activation::Gelu, Activation::Relu, Activation::Silu] {
        for (rows, cols) in [(1usize, 1usize), (3, 37), (2, 20000)] {
            let x: Vec<f32> = values(rows * cols, 9).iter().map(|v| v * 12.0).collect();
            let (mut bx, mut rx) = pair(b, &x, rows, cols)?;
            b.activate(&mut bx, act)?;
            r.activate(&mut rx, act)?;
            compare(&format!("activate {act:?} [{rows}, {cols}]"), &b.to_host(&bx)?, &rx.data, 1e-6)?;
        }
    }
    Ok(())
}

/// `rope`: several heads, far positions, two thetas.
pub fn rope<B: Backend>(b: &B) -> Result<()> {
    let r = Reference::default();
    for (head_dim, heads, theta) in [(8usize, 3usize, 10000.0f32), (64, 2, 500000.0)] {
        let positions = vec![0u32, 1, 17, 1023, 5];
        let rows = positions.len();
        let layout = StepLayout { ids: vec![0; rows], positions, ..Default::default() };
        let (bs, rs) = (b.upload_step(layout.clone())?, r.upload_step(layout)?);
        let (mut bx, mut rx) = pair(b, &values(rows * heads * head_dim, 10), rows, heads * head_dim)?;
        b.rope(&mut bx, head_dim, &bs, theta)?;
        r.rope(&mut rx, head_dim, &rs, theta)?;
        compare(&format!("rope d{head_dim} theta {theta}"), &b.to_host(&bx)?, &rx.data, 1e-6)?;
    }
    Ok(())
}

/// `scale_heads`: zero, fractional and unit factors.
pub fn scale_heads<B: Backend>(b: &B) -> Result<()> {
    let r = Reference::default();
    let scales = HostTensor::from_f32(vec![0.0, 0.5, 1.0], vec![3]);
    let (bw, rw) = weight_pair(b, &scales, Layout::OutIn)?;
    let (mut bx, mut rx) = pair(b, &values(4 * 15, 11), 4, 15)?;
    b.scale_heads(&mut bx, &bw, 5)?;
    r.scale_heads(&mut rx, &rw, 5)?;
    compare("scale_heads", &b.to_host(&bx)?, &rx.data, 0.0)
}

/// `split_columns`, `gather_output_rows`, `concat_rows`, `copy`, `upload`/`to_host`.
pub fn rows_and_columns<B: Backend>(b: &B) -> Result<()> {
    let r = Reference::default();
    let (bx, rx) = pair(b, &values(5 * 12, 12), 5, 12)?;
    compare("upload/to_host", &b.to_host(&bx)?, &rx.data, 0.0)?;
    compare("copy", &b.to_host(&b.copy(&bx)?)?, &rx.data, 0.0)?;
    let (bp, rp) = (b.split_columns(&bx, &[3, 1, 8])?, r.split_columns(&rx, &[3, 1, 8])?);
    for (i, (g, w)) in bp.iter().zip(&rp).enumerate() {
        compare(&format!("split_columns part {i}"), &b.to_host(g)?, &w.data, 0.0)?;
        if b.shape(g) != (w.rows, w.cols) {
            return Err(fail(format!("split_columns part {i}: shape {:?}", b.shape(g))));
        }
    }
    let layout = StepLayout { output_rows: vec![4, 0, 2], ..Default::default() };
    let (bs, rs) = (b.upload_step(layout.clone())?, r.upload_step(layout)?);
    let (bg, rg) = (b.gather_output_rows(&bx, &bs)?, r.gather_output_rows(&rx, &rs)?);
    compare("gather_output_rows", &b.to_host(&bg)?, &rg.data, 0.0)?;
    let (bc, rc) = (b.concat_rows(&[&bg, &bx, &bg])?, r.concat_rows(&[&rg, &rx, &rg])?);
    compare("concat_rows", &b.to_host(&bc)?, &rc.data, 0.0)?;
    if b.shape(&bc) != (11, 12) {
        return Err(fail(format!("concat_rows: shape {:?}", b.shape(&bc))));
    }
    Ok(())
}

/// Sequences for the attention checks: decoding rows past page boundaries, a prefill long enough
/// for the matrix-product path, forked tables that share blocks. Blocks below 256 (also the
/// kernels' emulated tests use it).
pub fn attention_layout(block_size: usize) -> StepLayout {
    // (first position, new rows, blocks)
    layout_of(
        block_size,
        vec![
            (0, 1, vec![7]),
            (block_size * 2, 1, vec![0, 1, 2]),
            (
                block_size - 1,
                3,
                [3].into_iter().chain(40..40 + (block_size + 2).div_ceil(block_size) as u32 - 1).collect(),
            ),
            (0, 19, (8..8 + 19usize.div_ceil(block_size) as u32).collect()),
        ],
    )
}

/// A decoding step: one row per sequence, past page boundaries, one with a context longer than 64
/// positions (the CUDA attention's split). Blocks below 256.
pub fn decode_layout(block_size: usize) -> StepLayout {
    layout_of(
        block_size,
        vec![
            (0, 1, vec![7]),
            (block_size * 2, 1, vec![0, 1, 2]),
            (block_size - 1, 1, vec![3]),
            (70, 1, (8..8 + 71usize.div_ceil(block_size) as u32).collect()),
        ],
    )
}

/// The step of sequences given as (first position, new rows, blocks).
fn layout_of(block_size: usize, sequences: Vec<(usize, usize, Vec<u32>)>) -> StepLayout {
    let mut layout = StepLayout { block_size, ..Default::default() };
    for (first_position, len, table) in sequences {
        let s = layout.sequences.len();
        layout.sequences.push(SeqLayout {
            first_row: layout.ids.len(),
            len,
            first_position,
            table_start: layout.block_tables.len(),
            table_len: table.len(),
        });
        layout.block_tables.extend_from_slice(&table);
        for i in 0..len {
            let pos = first_position + i;
            layout.ids.push(0);
            layout.positions.push(pos as u32);
            layout.slots.push(layout.slot_of(s, pos) as u32);
        }
        layout.output_rows.push(layout.ids.len() as u32 - 1);
    }
    layout
}

/// Fills every position a step's sequences read: earlier positions through a "history" step, then
/// the step's own rows through `kv_write`. Returns the two stores and the step.
#[allow(clippy::type_complexity)]
fn filled_caches<B: Backend>(
    b: &B,
    layout: &StepLayout,
    p: &AttentionParams,
    layers: usize,
    layer: usize,
) -> Result<(B::KvStore, super::reference::RefKv, B::Step, StepLayout)> {
    let r = Reference::default();
    let width = p.num_kv_heads * p.head_dim;
    let blocks = 256;
    let (mut bkv, mut rkv) =
        (b.kv_store(layers, blocks, layout.block_size, width)?, r.kv_store(layers, blocks, layout.block_size, width)?);
    let mut history = StepLayout { block_size: layout.block_size, ..layout.clone() };
    history.slots = (0..layout.sequences.len())
        .flat_map(|s| (0..layout.sequences[s].first_position).map(move |pos| (s, pos)))
        .map(|(s, pos)| layout.slot_of(s, pos) as u32)
        .collect();
    for (which, slots) in [history.slots.clone(), layout.slots.clone()].into_iter().enumerate() {
        let rows = slots.len();
        if rows == 0 {
            continue;
        }
        let step = StepLayout { slots, ..history.clone() };
        let (bs, rs) = (b.upload_step(step.clone())?, r.upload_step(step)?);
        let (bk, rk) = pair(b, &values(rows * width, 20 + which as u64), rows, width)?;
        let (bv, rv) = pair(b, &values(rows * width, 30 + which as u64), rows, width)?;
        b.kv_write(&mut bkv, layer, &bs, &bk, &bv)?;
        r.kv_write(&mut rkv, layer, &rs, &rk, &rv)?;
    }
    Ok((bkv, rkv, b.upload_step(layout.clone())?, layout.clone()))
}

fn attention_cases() -> Vec<(usize, AttentionParams)> {
    let params = |num_heads, num_kv_heads, head_dim: usize, window| AttentionParams {
        num_heads,
        num_kv_heads,
        head_dim,
        scale: 1.0 / (head_dim as f32).sqrt(),
        window,
        causal: true,
    };
    vec![
        (4, params(4, 4, 8, None)),
        (16, params(4, 2, 16, None)),  // grouped-query heads
        (3, params(2, 1, 5, Some(4))), // a local window, odd head size, one kv head
        (1, params(3, 3, 64, Some(1))),
        (5, AttentionParams { causal: false, ..params(4, 2, 8, None) }), // an encoder: every position seen
    ]
}

/// `kv_write`, `kv_copy_blocks`, `paged_attention` and `paged_attention_qkv`: several sequences at once, page boundaries,
/// grouped-query heads, windows, bidirectional (encoder) attention, decode and prefill rows.
pub fn paged_attention<B: Backend>(b: &B) -> Result<()> {
    let r = Reference::default();
    for (block_size, p) in attention_cases() {
        let layout = attention_layout(block_size);
        let rows = layout.rows();
        let (mut bkv, mut rkv, bs, rs) = filled_caches(b, &layout, &p, 2, 1)?;
        let (bq, rq) = pair(b, &values(rows * p.num_heads * p.head_dim, 40), rows, p.num_heads * p.head_dim)?;
        let what = format!("paged_attention block {block_size}, {p:?}");
        if !p.causal && !b.bidirectional_attention() {
            refuses_bidirectional(&what, b.paged_attention(&bq, &bkv, 1, &bs, &p).map(|_| ()))?;
            let (q_width, kv_width) = p.qkv_widths();
            let (bqkv, _) = pair(b, &values(rows * (q_width + 2 * kv_width), 50), rows, q_width + 2 * kv_width)?;
            refuses_bidirectional(&what, b.paged_attention_qkv(&bqkv, &mut bkv, 1, &bs, &p).map(|_| ()))?;
            continue;
        }
        let got = b.to_host(&b.paged_attention(&bq, &bkv, 1, &bs, &p)?)?;
        compare(&what, &got, &r.paged_attention(&rq, &rkv, 1, &rs, &p)?.data, 1e-5)?;
        // The same from a fused q|k|v projection: new keys and values for the step's rows, written
        // and attended over in one op.
        let (q_width, kv_width) = p.qkv_widths();
        let fused = values(rows * (q_width + 2 * kv_width), 50);
        let (bqkv, rqkv) = pair(b, &fused, rows, q_width + 2 * kv_width)?;
        let got = b.to_host(&b.paged_attention_qkv(&bqkv, &mut bkv, 1, &bs, &p)?)?;
        let [rq2, rk2, rv2]: [super::Matrix; 3] =
            r.split_columns(&rqkv, &[q_width, kv_width, kv_width])?.try_into().map_err(|_| fail("split".into()))?;
        r.kv_write(&mut rkv, 1, &rs, &rk2, &rv2)?;
        compare(&format!("{what} (fused q|k|v)"), &got, &r.paged_attention(&rq2, &rkv, 1, &rs, &p)?.data, 1e-5)?;
        // And in a decoding step (one row per sequence), where a backend may write the keys and
        // values as it attends; then the step's slots are read again through the plain op.
        let decode = decode_layout(block_size);
        let (mut dbkv, mut drkv, dbs, drs) = filled_caches(b, &decode, &p, 2, 1)?;
        let n = decode.rows();
        let (dqkv, drqkv) = pair(b, &values(n * (q_width + 2 * kv_width), 60), n, q_width + 2 * kv_width)?;
        let got = b.to_host(&b.paged_attention_qkv(&dqkv, &mut dbkv, 1, &dbs, &p)?)?;
        let [dq, dk, dv]: [super::Matrix; 3] =
            r.split_columns(&drqkv, &[q_width, kv_width, kv_width])?.try_into().map_err(|_| fail("split".into()))?;
        r.kv_write(&mut drkv, 1, &drs, &dk, &dv)?;
        let want = r.paged_attention(&dq, &drkv, 1, &drs, &p)?.data;
        compare(&format!("{what} (fused q|k|v, decoding)"), &got, &want, 1e-5)?;
        let (bq3, rq3) = pair(b, &values(n * q_width, 70), n, q_width)?;
        let got = b.to_host(&b.paged_attention(&bq3, &dbkv, 1, &dbs, &p)?)?;
        let want = r.paged_attention(&rq3, &drkv, 1, &drs, &p)?.data;
        compare(&format!("{what} (decoding: the cache it wrote)"), &got, &want, 1e-5)?;
        // Copy-on-write: the second sequence's blocks copied over the first's, then read again.
        let mut copied = layout.clone();
        copied.block_copies = vec![(0, 7), (1, 12)];
        let (bc, rc) = (b.upload_step(copied.clone())?, r.upload_step(copied)?);
        b.kv_copy_blocks(&mut bkv, &bc)?;
        r.kv_copy_blocks(&mut rkv, &rc)?;
        let got = b.to_host(&b.paged_attention(&bq, &bkv, 1, &bc, &p)?)?;
        compare(&format!("{what} after block copies"), &got, &r.paged_attention(&rq, &rkv, 1, &rc, &p)?.data, 1e-5)?;
    }
    Ok(())
}

/// A backend without bidirectional attention must refuse it with an error that says so.
fn refuses_bidirectional(what: &str, result: Result<()>) -> Result<()> {
    match result {
        Err(e) if e.to_string().contains("bidirectional") => Ok(()),
        Err(e) => Err(Error::invalid(what, format!("refused bidirectional attention without saying so: {e}"))),
        Ok(()) => Err(Error::invalid(what, "claims no bidirectional attention, yet computed it")),
    }
}

/// `attention_probs`: every sequence of the attention layouts.
pub fn attention_probs<B: Backend>(b: &B) -> Result<()> {
    let r = Reference::default();
    for (block_size, p) in attention_cases() {
        let layout = attention_layout(block_size);
        let rows = layout.rows();
        let (bkv, rkv, bs, rs) = filled_caches(b, &layout, &p, 1, 0)?;
        let (bq, rq) = pair(b, &values(rows * p.num_heads * p.head_dim, 41), rows, p.num_heads * p.head_dim)?;
        for seq in 0..layout.sequences.len() {
            if !p.causal && !b.bidirectional_attention() {
                let what = format!("attention_probs block {block_size}, {p:?}");
                refuses_bidirectional(&what, b.attention_probs(&bq, &bkv, 0, &bs, seq, &p).map(|_| ()))?;
                continue;
            }
            let got = b.to_host(&b.attention_probs(&bq, &bkv, 0, &bs, seq, &p)?)?;
            let want = r.attention_probs(&rq, &rkv, 0, &rs, seq, &p)?.data;
            compare(&format!("attention_probs block {block_size}, sequence {seq}, {p:?}"), &got, &want, 1e-5)?;
        }
    }
    Ok(())
}

/// `contrast_acd`: vocabularies that are no multiple of a block, a single plausible candidate, a
/// minimum of candidates, ties at the threshold, both head layouts and every dtype.
pub fn contrast_acd<B: Backend>(b: &B) -> Result<()> {
    let r = Reference::default();
    let (hidden, vocab) = (24usize, 301usize);
    let features = values(3 * hidden, 50);
    for dtype in DTYPES {
        for layout in [Layout::OutIn, Layout::InOut] {
            let shape = if layout == Layout::OutIn { vec![vocab, hidden] } else { vec![hidden, vocab] };
            let head = HostTensor::from_f32(values(vocab * hidden, 51), shape).converted(dtype);
            let (bh, rh) = weight_pair(b, &head, layout)?;
            let mut upper: Vec<f32> = values(3 * vocab, 52).iter().map(|v| v * 4.0).collect();
            upper[7] = 40.0; // row 0: one token dominates, a single plausible candidate
            upper[vocab + 3] = 9.0; // row 1: a tie at the top
            upper[vocab + 4] = 9.0;
            for v in &mut upper[2 * vocab..] {
                *v = (*v * 4.0).round() / 4.0; // row 2: many ties
            }
            let (bu, ru) = pair(b, &upper, 3, vocab)?;
            let (bf, rf) = pair(b, &features, 3, hidden)?;
            for (alpha, min_candidates) in [(0.1f32, 1usize), (0.5, 3), (1.0, 1), (0.0, 1), (0.1, vocab)] {
                let got = b.to_host(&b.contrast_acd(&bu, &bf, &bh, alpha, min_candidates)?)?;
                let want = r.contrast_acd(&ru, &rf, &rh, alpha, min_candidates)?.data;
                let what = format!("contrast_acd {dtype} {layout:?} alpha {alpha} min {min_candidates}");
                // Log-probabilities: compare in absolute terms.
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    if (g - w).abs() > 1e-5 * w.abs().max(1.0) {
                        return Err(fail(format!("{what}: token {} is {g}, the reference has {w}", i % vocab)));
                    }
                }
            }
        }
    }
    Ok(())
}

/// `argmax_rows`: the first index among ties, negative rows, one column, -inf scores beside finite
/// ones; and the finite check: a NaN, a +inf or a row of only -inf (in any row) is an error.
pub fn argmax_rows<B: Backend>(b: &B) -> Result<()> {
    let r = Reference::default();
    let data = vec![1.0, 3.0, 3.0, -1.0, -5.0, -2.0, -2.0, -9.0, 0.0, f32::NEG_INFINITY, 0.0, 0.0];
    for (rows, cols) in [(3usize, 4usize), (12, 1)] {
        if cols == 1 && rows == 12 {
            // One column: the -inf row is a row of only -inf; drop it.
            let finite: Vec<f32> = data.iter().copied().filter(|v| v.is_finite()).collect();
            let (bx, rx) = pair(b, &finite, 11, 1)?;
            let (got, want) = (b.argmax_rows(&bx)?, r.argmax_rows(&rx)?);
            if got != want {
                return Err(fail(format!("argmax_rows [11, 1]: {got:?}, the reference has {want:?}")));
            }
            continue;
        }
        let (bx, rx) = pair(b, &data, rows, cols)?;
        let (got, want) = (b.argmax_rows(&bx)?, r.argmax_rows(&rx)?);
        if got != want {
            return Err(fail(format!("argmax_rows [{rows}, {cols}]: {got:?}, the reference has {want:?}")));
        }
    }
    for (bad, what) in [(f32::NAN, "NaN"), (f32::INFINITY, "+inf")] {
        for row in [0usize, 2] {
            let mut data: Vec<f32> = values(3 * 300, 60);
            data[row * 300 + 211] = bad;
            let (bx, _) = pair(b, &data, 3, 300)?;
            match b.argmax_rows(&bx) {
                Err(Error::NonFinite { row: r, .. }) if r == row => {}
                other => return Err(fail(format!("argmax_rows with {what} in row {row}: {other:?}"))),
            }
        }
    }
    let mut data: Vec<f32> = values(2 * 300, 61);
    data[300..].fill(f32::NEG_INFINITY);
    let (bx, _) = pair(b, &data, 2, 300)?;
    match b.argmax_rows(&bx) {
        Err(Error::NonFinite { row: 1, .. }) => Ok(()),
        other => Err(fail(format!("argmax_rows with a row of only -inf: {other:?}"))),
    }
}
