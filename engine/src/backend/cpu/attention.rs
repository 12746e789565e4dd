//! Attention over the paged cache on the CPU. Decoding rows (a few per sequence) walk their
//! sequence's cached keys and values with vectorised dot products and axpys; from
//! [`PREFILL_ATTENTION_ROWS`] rows on, a sequence's heads run as two small GEMMs each (`Q K^T`, then
//! `P V`). One task per (sequence, head), split across threads unless the work is tiny.

use rayon::prelude::*;

use super::products::{gemm_into, Operand};
use super::{simd, CpuKv};
use crate::backend::{AttentionParams, Matrix, SeqLayout, StepLayout};
use crate::math::softmax_in_place;

/// From this many new tokens on, a sequence's attention runs as two small matrix products per head.
const PREFILL_ATTENTION_ROWS: usize = 16;

/// `q: [t, heads * head_dim]` -> `[t, heads * head_dim]`.
pub(super) fn paged_attention(
    q: &Matrix,
    store: &CpuKv,
    layer: usize,
    step: &StepLayout,
    p: &AttentionParams,
) -> Matrix {
    let d = p.head_dim;
    let sequences = &step.sequences;
    // One task per (sequence, head); each returns its [len, d] slab.
    let tasks: Vec<(usize, usize)> = (0..sequences.len()).flat_map(|s| (0..p.num_heads).map(move |h| (s, h))).collect();
    // Split across threads unless the work is tiny (decoding steps keep the workers awake, so a
    // split costs little).
    let work: usize = sequences.iter().map(|s| s.len * (s.first_position + s.len)).sum::<usize>() * p.num_heads * d;
    let attend_head = |&(s, h): &(usize, usize)| {
        let seq = &sequences[s];
        let rows = cached_rows(store, layer, step, s, h / (p.num_heads / p.num_kv_heads), d);
        if seq.len >= PREFILL_ATTENTION_ROWS {
            return attend_prefill(q, store, seq, &rows, h, p);
        }
        let mut out = vec![0.0f32; seq.len * d];
        let mut scores = vec![0.0f32; rows.len()];
        for i in 0..seq.len {
            let pos = seq.first_position + i;
            let seen = p.visible(pos, rows.len());
            let qi = &q.row(seq.first_row + i)[h * d..(h + 1) * d];
            let visible = &mut scores[seen.clone()];
            for (score, &at) in visible.iter_mut().zip(&rows[seen.clone()]) {
                *score = simd::dot_f32(qi, &store.keys[at..at + d]) * p.scale;
            }
            softmax_in_place(visible);
            let oi = &mut out[i * d..(i + 1) * d];
            for (&weight, &at) in visible.iter().zip(&rows[seen]) {
                simd::axpy_f32(oi, weight, &store.values[at..at + d]);
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

/// Sequence `s`'s probabilities, `[heads * len, first_position + len]`, head-major.
pub(super) fn attention_probs(
    q: &Matrix,
    store: &CpuKv,
    layer: usize,
    step: &StepLayout,
    s: usize,
    p: &AttentionParams,
) -> Matrix {
    let group = p.num_heads / p.num_kv_heads;
    let seq = &step.sequences[s];
    let data = (0..p.num_heads)
        .flat_map(|h| {
            let rows = cached_rows(store, layer, step, s, h / group, p.head_dim);
            attention_scores(q, store, seq, &rows, h, p)
        })
        .collect();
    Matrix { data, rows: p.num_heads * seq.len, cols: seq.first_position + seq.len }
}

/// Where each position `0..first_position + len` of sequence `s` keeps its key/value row for
/// `layer` and `kv_head`, as offsets into the store.
fn cached_rows(
    store: &CpuKv,
    layer: usize,
    step: &StepLayout,
    s: usize,
    kv_head: usize,
    head_dim: usize,
) -> Vec<usize> {
    let seq = &step.sequences[s];
    let (table, block_size) = (step.table(s), step.block_size);
    (0..seq.first_position + seq.len)
        .map(|pos| {
            let slot = table[pos / block_size] as usize * block_size + pos % block_size;
            store.offset(layer, slot) + kv_head * head_dim
        })
        .collect()
}

/// The `width`-wide runs of `source` starting at each of `rows`, packed: `[rows.len(), width]`.
fn gathered(source: &[f32], rows: &[usize], width: usize) -> Vec<f32> {
    rows.iter().flat_map(|&at| &source[at..at + width]).copied().collect()
}

/// One head's attention probabilities for a sequence's new rows as a matrix product: gather its keys
/// (they sit in cache blocks), `S = scale * Q K^T`, the causal (and window) mask, if any, as zeros, row
/// softmax. Returns `[len, ctx]`.
fn attention_scores(
    q: &Matrix,
    store: &CpuKv,
    seq: &SeqLayout,
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
        let seen = p.visible(pos, ctx);
        row[..seen.start].fill(0.0);
        row[seen.end..].fill(0.0);
        softmax_in_place(&mut row[seen]);
    }
    scores
}

/// One head of one sequence's attention as two matrix products: the probabilities
/// ([`attention_scores`]), then `O = P V`. Returns `[len, head_dim]`.
fn attend_prefill(
    q: &Matrix,
    store: &CpuKv,
    seq: &SeqLayout,
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
