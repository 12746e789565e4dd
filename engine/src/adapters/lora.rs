//! LoRA merged at load: for every target module, `W += scaling * B A` with `A: [r, in]` and
//! `B: [out, r]` (peft's `lora_A.weight` and `lora_B.weight`), in f32, transposed for a matrix
//! stored `[in, out]` (GPT-2's Conv1D, peft's `fan_in_fan_out`). What peft's unmerged forward
//! computes, `W x + scaling * B (A x)`, up to the rounding of the merged sum.

use std::collections::HashMap;

use super::{target, Adapter};
use crate::error::Result;
use crate::io::weights::{HostTensor, Weights};
use crate::model::config::ModelSpec;

/// Merges every LoRA pair into `weights`; returns the number of modules.
pub fn merge(adapter: &Adapter, weights: &mut Weights, spec: &ModelSpec, scaling: f32) -> Result<usize> {
    let b_of: HashMap<String, &HostTensor> = adapter.modules(".lora_B.weight").into_iter().collect();
    let pairs = adapter.modules(".lora_A.weight");
    for (module, a) in &pairs {
        let b = b_of.get(module).ok_or_else(|| adapter.bad(format!("`{module}` has lora_A but no lora_B")))?;
        let (&[r, inputs], &[outputs, rb]) = (a.shape(), b.shape()) else {
            return Err(adapter.bad(format!(
                "`{module}`: lora_A {:?} and lora_B {:?} are not matrices",
                a.shape(),
                b.shape()
            )));
        };
        if r != rb {
            return Err(adapter.bad(format!("`{module}`: lora_A has rank {r}, lora_B {rb}")));
        }
        let t = target(adapter, weights, spec, module)?;
        let base = weights.get(&t.weight)?;
        let expected = if t.in_out { [inputs, outputs] } else { [outputs, inputs] };
        if base.shape() != expected {
            return Err(adapter.bad(format!(
                "`{module}`: lora_A {:?} and lora_B {:?} do not fit the checkpoint's `{}` {:?}",
                a.shape(),
                b.shape(),
                t.weight,
                base.shape()
            )));
        }
        let (a, b) = (a.data().to_f32_vec(), b.data().to_f32_vec());
        let mut w = base.data().to_f32_vec();
        for o in 0..outputs {
            for k in 0..r {
                let bk = scaling * b[o * r + k];
                let a_row = &a[k * inputs..(k + 1) * inputs];
                for (i, &a_ki) in a_row.iter().enumerate() {
                    let at = if t.in_out { i * outputs + o } else { o * inputs + i };
                    w[at] += bk * a_ki;
                }
            }
        }
        let shape = base.shape().to_vec();
        weights.replace(&t.weight, HostTensor::from_f32(w, shape));
    }
    adapter.check_all_used(&[".lora_A.weight", ".lora_B.weight"])?;
    Ok(pairs.len())
}
