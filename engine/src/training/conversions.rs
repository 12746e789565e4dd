//! Conversion matrices: for an exit layer L, the linear map `C` that best carries the layer's
//! normed states to the top layer's, `min_C Σ_t ‖C·norm(h_L,t) − norm(h_N,t)‖²` over every position
//! of the data, so that `lm_head(C·norm(h_L))` reads layer L through the model's own head (the
//! engine's `--converted` projection). Solved exactly by the normal equations: `Cᵀ = (XᵀX)⁻¹ XᵀY`,
//! the d×d Gram matrices summed in f64, then a Cholesky solve.

use crate::error::{Error, Result};
use crate::model::conversion_name;

use super::network::{Batch, Network};

/// Fits the conversion matrix of each of `layers` on `batches` and stores it in `network` as the
/// frozen parameter `name_to_conv_matrix.{L}_to_{N}.weight` (`[d, d]`, `y = C·x`). Returns each
/// fit's residual as a fraction of the top states' energy, `Σ‖Cx − y‖² / Σ‖y‖²`.
pub fn fit_conversions(
    network: &mut Network,
    batches: impl Iterator<Item = Batch>,
    layers: &[usize],
) -> Result<Vec<(usize, f64)>> {
    let (d, top) = (network.spec.hidden_size, network.spec.num_layers);
    if let Some(&bad) = layers.iter().find(|&&l| l == 0 || l >= top) {
        return Err(Error::invalid(
            "--layers",
            format!("layer {bad}: conversions map layers 1..{top} to the top layer {top}"),
        ));
    }
    let mut reads: Vec<usize> = layers.to_vec();
    reads.push(top);
    // Per layer: XᵀX and XᵀY; and YᵀY for the residual.
    let mut gram = vec![vec![0.0f64; d * d]; layers.len()];
    let mut cross = vec![vec![0.0f64; d * d]; layers.len()];
    let mut energy = 0.0f64;
    let mut count = 0usize;
    for batch in batches {
        let states = network.normed_states(&batch, &reads)?;
        let y = &states[layers.len()];
        count += batch.batch * batch.time;
        energy += y.iter().map(|&v| v as f64 * v as f64).sum::<f64>();
        for (i, x) in states[..layers.len()].iter().enumerate() {
            accumulate(&mut gram[i], x, x, d);
            accumulate(&mut cross[i], x, y, d);
        }
    }
    if count < d {
        return Err(Error::invalid(
            "--data",
            format!("{count} positions cannot determine a {d} x {d} map: give at least {d}"),
        ));
    }
    let mut residuals = Vec::new();
    for (i, &layer) in layers.iter().enumerate() {
        let factor = cholesky(&gram[i], d).ok_or_else(|| {
            Error::invalid(
                "--data",
                format!("layer {layer}'s states span fewer than {d} dimensions: give more varied text"),
            )
        })?;
        // Z = Cᵀ solves G·Z = XᵀY column by column; C's row o is Z's column o.
        let mut c = vec![0.0f64; d * d];
        for o in 0..d {
            let column: Vec<f64> = (0..d).map(|r| cross[i][r * d + o]).collect();
            for (r, v) in solve(&factor, &column, d).into_iter().enumerate() {
                c[o * d + r] = v;
            }
        }
        // Σ‖Cx − y‖² = Σ‖y‖² − 2 tr(C·XᵀY) + tr(C·XᵀX·Cᵀ); at the optimum the last two terms
        // meet at −tr(C·XᵀY).
        let explained: f64 = (0..d).map(|o| (0..d).map(|r| c[o * d + r] * cross[i][r * d + o]).sum::<f64>()).sum();
        residuals.push((layer, ((energy - explained) / energy.max(f64::MIN_POSITIVE)).max(0.0)));
        network.set_parameter(&conversion_name(layer, top), &[d, d], c.iter().map(|&v| v as f32).collect())?;
    }
    Ok(residuals)
}

/// `acc += aᵀ·b` for row-major `a, b: [rows, d]`.
fn accumulate(acc: &mut [f64], a: &[f32], b: &[f32], d: usize) {
    use rayon::prelude::*;
    acc.par_chunks_mut(d).enumerate().for_each(|(r, row)| {
        for (ra, rb) in a.chunks(d).zip(b.chunks(d)) {
            let x = ra[r] as f64;
            row.iter_mut().zip(rb).for_each(|(acc, &y)| *acc += x * y as f64);
        }
    });
}

/// The lower Cholesky factor of a symmetric positive-definite `[d, d]` matrix, if it is one.
fn cholesky(a: &[f64], d: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0f64; d * d];
    for i in 0..d {
        for j in 0..=i {
            let sum: f64 = (0..j).map(|k| l[i * d + k] * l[j * d + k]).sum();
            if i == j {
                let v = a[i * d + i] - sum;
                if v <= 1e-12 * a[i * d + i].abs().max(1e-300) {
                    return None;
                }
                l[i * d + i] = v.sqrt();
            } else {
                l[i * d + j] = (a[i * d + j] - sum) / l[j * d + j];
            }
        }
    }
    Some(l)
}

/// Solves `L·Lᵀ·z = b`.
fn solve(l: &[f64], b: &[f64], d: usize) -> Vec<f64> {
    let mut y = vec![0.0; d];
    for i in 0..d {
        y[i] = (b[i] - (0..i).map(|k| l[i * d + k] * y[k]).sum::<f64>()) / l[i * d + i];
    }
    let mut z = vec![0.0; d];
    for i in (0..d).rev() {
        z[i] = (y[i] - (i + 1..d).map(|k| l[k * d + i] * z[k]).sum::<f64>()) / l[i * d + i];
    }
    z
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_solves_a_symmetric_system() {
        let a = [4.0, 2.0, 2.0, 3.0];
        let l = cholesky(&a, 2).expect("positive definite");
        let z = solve(&l, &[2.0, 1.0], 2);
        assert!((4.0 * z[0] + 2.0 * z[1] - 2.0).abs() < 1e-12 && (2.0 * z[0] + 3.0 * z[1] - 1.0).abs() < 1e-12);
        assert!(cholesky(&[1.0, 1.0, 1.0, 1.0], 2).is_none());
    }
}
