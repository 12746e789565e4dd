//! (IA)^3 merged at load: a module's learned vector `l` (peft's `ia3_l`) scales its outputs,
//! `y = (W x + b) * l` (shape `[out, 1]`: every output row of `W` and the bias), or, for a module
//! listed in `feedforward_modules`, its inputs, `y = W (x * l) + b` (shape `[1, in]`: every input
//! column of `W`).

use super::{target, Adapter};
use crate::error::Result;
use crate::io::weights::{HostTensor, Weights};
use crate::model::config::ModelSpec;

/// Merges every scaling vector into `weights`; returns the number of modules.
pub fn merge(adapter: &Adapter, weights: &mut Weights, spec: &ModelSpec, feedforward: &[String]) -> Result<usize> {
    let vectors = adapter.modules(".ia3_l");
    for (module, l) in &vectors {
        // peft's rule: a module is feed-forward when its name ends with a listed one.
        let is_feedforward = feedforward.iter().any(|f| module == f || module.ends_with(&format!(".{f}")));
        let t = target(adapter, weights, spec, module)?;
        let base = weights.get(&t.weight)?;
        let &[rows, cols] = base.shape() else {
            return Err(adapter.bad(format!("`{}` is not a matrix", t.weight)));
        };
        let (inputs, outputs) = if t.in_out { (rows, cols) } else { (cols, rows) };
        let expected = if is_feedforward { [1, inputs] } else { [outputs, 1] };
        if l.shape() != expected {
            return Err(adapter.bad(format!(
                "`{module}.ia3_l` has shape {:?}, expected {expected:?} for the checkpoint's `{}` {:?}{}",
                l.shape(),
                t.weight,
                base.shape(),
                if is_feedforward { " (a feed-forward module)" } else { "" }
            )));
        }
        let scale = l.data().to_f32_vec();
        let mut w = base.data().to_f32_vec();
        for (at, value) in w.iter_mut().enumerate() {
            let (row, col) = (at / cols, at % cols);
            let (input, output) = if t.in_out { (row, col) } else { (col, row) };
            *value *= scale[if is_feedforward { input } else { output }];
        }
        let shape = base.shape().to_vec();
        weights.replace(&t.weight, HostTensor::from_f32(w, shape));
        // Scaled outputs scale the bias as well.
        let bias_name = format!("{}.bias", t.weight.trim_end_matches(".weight"));
        if !is_feedforward && weights.contains(&bias_name) {
            let bias = weights.get(&bias_name)?;
            let scaled: Vec<f32> = bias.data().to_f32_vec().iter().zip(&scale).map(|(b, s)| b * s).collect();
            let shape = bias.shape().to_vec();
            weights.replace(&bias_name, HostTensor::from_f32(scaled, shape));
        }
    }
    adapter.check_all_used(&[".ia3_l"])?;
    Ok(vectors.len())
}
