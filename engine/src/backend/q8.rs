//! 8-bit weights (`--dtype q8`): GGUF's Q8_0 format in its own layout. A weight matrix is stored as
//! `[out, in]` rows (GPT-2's `[in, out]` Conv1D weights are transposed when quantised), each row cut
//! into blocks of [`BLOCK`] input features with one f16 scale per block:
//! `d = max|w| / 127`, `q = round(w / d)` (half away from zero), and the block computes as `d * q`
//! (ggml's `quantize_row_q8_0_ref`, so a block quantises to the same bytes). Rows are padded with
//! zeros to a whole number of blocks. Activations stay f32: a product is `Σ_blocks d * Σ q x`.
//!
//! Owns the format (quantise, dequantise) and the plain products every fast path is tested against;
//! the CPU's vector kernels over it live in `cpu/q8.rs`, and the reference backend computes with the
//! dequantised weights.

use half::f16;
use rayon::prelude::*;

use crate::backend::Layout;
use crate::io::weights::WeightData;

/// Weights per block (one scale each).
pub const BLOCK: usize = 32;

/// A weight matrix in 8-bit blocks, `[out, in]`.
#[derive(Clone, Debug)]
pub struct Q8Matrix {
    pub out_features: usize,
    pub in_features: usize,
    /// Blocks per row: `ceil(in / BLOCK)`.
    pub blocks: usize,
    /// `[out, blocks * BLOCK]`: the quantised weights, zero past `in`.
    pub quants: Vec<i8>,
    /// `[out, blocks]`: each block's scale.
    pub scales: Vec<f16>,
}

impl Q8Matrix {
    /// Quantises `w` (logical `[out, in]`, stored in `layout`), rows in parallel.
    pub fn quantize(w: WeightData<'_>, layout: Layout, out_features: usize, in_features: usize) -> Q8Matrix {
        let blocks = in_features.div_ceil(BLOCK);
        let width = blocks * BLOCK;
        let mut quants = vec![0i8; out_features * width];
        let mut scales = vec![f16::ZERO; out_features * blocks];
        if width > 0 {
            quants.par_chunks_mut(width).zip(scales.par_chunks_mut(blocks)).enumerate().for_each_init(
                || vec![0.0f32; width],
                |row, (o, (quants, scales))| {
                    match layout {
                        Layout::OutIn => w.read_f32(o * in_features, &mut row[..in_features]),
                        Layout::InOut => {
                            for (i, v) in row[..in_features].iter_mut().enumerate() {
                                *v = w.get(i * out_features + o);
                            }
                        }
                    }
                    for (b, (scale, quants)) in scales.iter_mut().zip(quants.chunks_exact_mut(BLOCK)).enumerate() {
                        let (d, q) = quantize_block(&row[b * BLOCK..(b + 1) * BLOCK]);
                        *scale = d;
                        quants.copy_from_slice(&q);
                    }
                },
            );
        }
        Q8Matrix { out_features, in_features, blocks, quants, scales }
    }

    /// Bytes a full read touches (quants and scales).
    pub fn bytes(&self) -> usize {
        self.quants.len() + 2 * self.scales.len()
    }

    /// Row `o`'s quants (`blocks * BLOCK`, zero-padded) and scales.
    pub fn row(&self, o: usize) -> (&[i8], &[f16]) {
        let width = self.blocks * BLOCK;
        (&self.quants[o * width..(o + 1) * width], &self.scales[o * self.blocks..(o + 1) * self.blocks])
    }

    /// Row `o` as f32 weights (`out.len() == in_features`).
    pub fn dequantize_row(&self, o: usize, out: &mut [f32]) {
        let (quants, scales) = self.row(o);
        for (i, v) in out.iter_mut().enumerate().take(self.in_features) {
            *v = scales[i / BLOCK].to_f32() * quants[i] as f32;
        }
    }

    /// The whole matrix as f32, `[out, in]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.out_features * self.in_features];
        for (o, row) in out.chunks_exact_mut(self.in_features.max(1)).enumerate().take(self.out_features) {
            self.dequantize_row(o, row);
        }
        out
    }

    /// `x · row o`, block by block: `Σ_b d_b * Σ_j q_j x_j` (the plain form of the vector kernels).
    pub fn dot_row(&self, x: &[f32], o: usize) -> f32 {
        let (quants, scales) = self.row(o);
        let mut sum = 0.0f32;
        for (b, scale) in scales.iter().enumerate() {
            let start = b * BLOCK;
            let end = (start + BLOCK).min(x.len());
            let block: f32 = x[start..end].iter().zip(&quants[start..end]).map(|(x, &q)| x * q as f32).sum();
            sum += scale.to_f32() * block;
        }
        sum
    }
}

/// ggml's `quantize_row_q8_0_ref` for one block: the scale (as f16) and the quants.
pub fn quantize_block(values: &[f32]) -> (f16, [i8; BLOCK]) {
    let amax = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; BLOCK];
    for (q, &v) in q.iter_mut().zip(values) {
        // |v * inverse| <= 127 up to rounding; f32::round is C's roundf (half away from zero).
        *q = (v * inverse).round().clamp(-127.0, 127.0) as i8;
    }
    (f16::from_f32(d), q)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::test_values as values;
    use crate::io::weights::HostTensor;

    #[test]
    fn quantises_to_the_bytes_gguf_writes() {
        // Recorded by tools/scripts/make_q8_fixtures.py with llama.cpp's gguf-py quantiser: random
        // values, exact halves, a zero block, one-value blocks, tiny and large magnitudes.
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../../../tests/fixtures/q8/q8_0.json")).expect("fixture");
        let (rows, cols) =
            (fixture["rows"].as_u64().expect("rows") as usize, fixture["cols"].as_u64().expect("cols") as usize);
        let values: Vec<f32> =
            fixture["values"].as_array().expect("values").iter().map(|v| v.as_f64().expect("value") as f32).collect();
        let q = Q8Matrix::quantize(HostTensor::from_f32(values, vec![rows, cols]).data(), Layout::OutIn, rows, cols);
        for (r, expected) in fixture["expected"].as_array().expect("expected").iter().enumerate() {
            let (quants, scales) = q.row(r);
            let want_scales: Vec<u16> = expected["scales"]
                .as_array()
                .expect("scales")
                .iter()
                .map(|v| v.as_u64().expect("scale") as u16)
                .collect();
            let want_quants: Vec<i8> = expected["quants"]
                .as_array()
                .expect("quants")
                .iter()
                .map(|v| v.as_i64().expect("quant") as i8)
                .collect();
            assert_eq!(scales.iter().map(|s| s.to_bits()).collect::<Vec<_>>(), want_scales, "row {r} scales");
            assert_eq!(quants, &want_quants[..], "row {r} quants");
        }
    }

    #[test]
    fn both_layouts_quantise_to_the_same_rows_and_dequantise_within_a_step() {
        let (n_out, n_in) = (7usize, 45usize); // a partial last block
        let out_in = values(n_out * n_in, 3);
        let in_out: Vec<f32> = (0..n_in * n_out).map(|k| out_in[(k % n_out) * n_in + k / n_out]).collect();
        let a = HostTensor::from_f32(out_in.clone(), vec![n_out, n_in]);
        let b = HostTensor::from_f32(in_out, vec![n_in, n_out]);
        let qa = Q8Matrix::quantize(a.data(), Layout::OutIn, n_out, n_in);
        let qb = Q8Matrix::quantize(b.data(), Layout::InOut, n_out, n_in);
        assert_eq!((qa.quants.clone(), qa.scales.clone()), (qb.quants, qb.scales));
        assert_eq!(qa.blocks, 2);
        let back = qa.dequantize();
        for (o, row) in out_in.chunks(n_in).enumerate() {
            for (i, &w) in row.iter().enumerate() {
                // Half a step from rounding, plus up to 127 steps times the f16 scale's rounding (2^-11).
                let d = qa.scales[o * qa.blocks + i / BLOCK].to_f32();
                assert!((back[o * n_in + i] - w).abs() <= 0.5 * d + 127.0 * d / 2048.0, "row {o} col {i}");
            }
            // The padding past `in` is zero.
            assert!(qa.row(o).0[n_in..].iter().all(|&q| q == 0));
        }
        let x = values(n_in, 9);
        for o in 0..n_out {
            let plain: f32 = x.iter().zip(&back[o * n_in..(o + 1) * n_in]).map(|(x, w)| x * w).sum();
            assert!((qa.dot_row(&x, o) - plain).abs() <= 1e-4, "row {o}");
        }
    }
}
