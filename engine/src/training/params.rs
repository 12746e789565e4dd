//! Trainable parameters: every tensor of a model in one flat f32 buffer (the master weights), each
//! with its checkpoint name, its shape, and whether it trains. Linear weights are held `[out, in]`;
//! GPT-2's `Conv1D` weights, stored `[in, out]`, are transposed on the way in and out, so a saved
//! checkpoint has exactly the names and shapes transformers writes.

use std::collections::HashMap;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::io::weights::{DType, HostTensor, Weights};

/// Index of a parameter in its [`ParamSet`].
pub type ParamId = usize;

/// One named tensor of the set.
#[derive(Clone, Debug)]
pub struct Param {
    /// The checkpoint name (`transformer.h.0.attn.c_attn.weight`).
    pub name: String,
    /// Shape as the engine holds it (`[out, in]` for every linear weight).
    pub shape: Vec<usize>,
    pub offset: usize,
    /// Stored `[in, out]` in the checkpoint (GPT-2's `Conv1D`).
    pub transposed: bool,
    /// Updated by the optimizer; a frozen parameter's gradient is never formed.
    pub trainable: bool,
    /// Takes weight decay (matrices; not biases, norms or embeddings of positions, as is usual).
    pub decays: bool,
}

impl Param {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// How a new parameter starts when no checkpoint provides it.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    Zeros,
    Ones,
    /// N(0, std²).
    Normal(f32),
}

/// A model's parameters, in one buffer.
#[derive(Clone, Debug, Default)]
pub struct ParamSet {
    pub params: Vec<Param>,
    pub values: Vec<f32>,
    index: HashMap<String, ParamId>,
}

impl ParamSet {
    /// Adds `name` with `shape`, its values from `weights` when it is there (transposed back from
    /// `[in, out]` when `transposed`), else from `init` drawn with `rng`.
    pub fn add(
        &mut self,
        name: &str,
        shape: &[usize],
        transposed: bool,
        init: Init,
        weights: Option<&Weights>,
        rng: &mut Normal,
    ) -> Result<ParamId> {
        let numel: usize = shape.iter().product();
        let values = match weights.filter(|w| w.contains(name)) {
            Some(w) => {
                let stored: Vec<usize> =
                    if transposed { shape.iter().rev().copied().collect() } else { shape.to_vec() };
                let data = w.get_shaped(name, &stored)?.data().to_f32_vec();
                if transposed {
                    transpose(&data, stored[0], stored[1])
                } else {
                    data
                }
            }
            None => match init {
                Init::Zeros => vec![0.0; numel],
                Init::Ones => vec![1.0; numel],
                Init::Normal(std) => (0..numel).map(|_| rng.sample() * std).collect(),
            },
        };
        let id = self.params.len();
        let decays = shape.len() == 2;
        self.params.push(Param {
            name: name.to_string(),
            shape: shape.to_vec(),
            offset: self.values.len(),
            transposed,
            trainable: true,
            decays,
        });
        self.values.extend(values);
        self.index.insert(name.to_string(), id);
        Ok(id)
    }

    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.index.get(name).copied()
    }

    /// The values of parameter `id`.
    pub fn get(&self, id: ParamId) -> &[f32] {
        let p = &self.params[id];
        &self.values[p.offset..p.offset + p.numel()]
    }

    /// Parameter `id`'s part of a buffer laid out like `values` (a gradient, an optimizer moment).
    pub fn part<'a>(&self, buffer: &'a [f32], id: ParamId) -> &'a [f32] {
        let p = &self.params[id];
        &buffer[p.offset..p.offset + p.numel()]
    }

    /// Mutable [`ParamSet::part`], `None` when the parameter is frozen.
    pub fn grad_of<'a>(&self, buffer: &'a mut [f32], id: ParamId) -> Option<&'a mut [f32]> {
        let p = &self.params[id];
        p.trainable.then(|| &mut buffer[p.offset..p.offset + p.numel()])
    }

    /// Freezes every parameter, then unfreezes those `keep` accepts.
    pub fn train_only(&mut self, keep: impl Fn(&str) -> bool) {
        for p in &mut self.params {
            p.trainable = keep(&p.name);
        }
    }

    pub fn trainable_count(&self) -> usize {
        self.params.iter().filter(|p| p.trainable).map(Param::numel).sum()
    }

    /// Every tensor in the checkpoint's layout and `dtype`, under its checkpoint name.
    pub fn to_tensors(&self, values: &[f32], dtype: DType) -> Vec<(String, HostTensor)> {
        self.params
            .iter()
            .map(|p| {
                let data = &values[p.offset..p.offset + p.numel()];
                let (data, shape) = if p.transposed {
                    (transpose(data, p.shape[0], p.shape[1]), vec![p.shape[1], p.shape[0]])
                } else {
                    (data.to_vec(), p.shape.clone())
                };
                (p.name.clone(), HostTensor::from_f32(data, shape).converted(dtype))
            })
            .collect()
    }

    /// A buffer laid out like `values` (an optimizer moment) read back from tensors named as
    /// [`ParamSet::to_tensors`] writes them under `prefix`: the trainable parameters' parts; the
    /// frozen ones' stay 0.
    pub fn read_buffer(&self, weights: &Weights, prefix: &str) -> Result<Vec<f32>> {
        let mut out = vec![0.0; self.values.len()];
        for p in self.params.iter().filter(|p| p.trainable) {
            let name = format!("{prefix}{}", p.name);
            let stored: Vec<usize> =
                if p.transposed { p.shape.iter().rev().copied().collect() } else { p.shape.clone() };
            let data = weights.get_shaped(&name, &stored)?.data().to_f32_vec();
            let data = if p.transposed { transpose(&data, stored[0], stored[1]) } else { data };
            out[p.offset..p.offset + p.numel()].copy_from_slice(&data);
        }
        Ok(out)
    }

    /// An error naming `name` if it is not a parameter.
    pub fn require(&self, name: &str) -> Result<ParamId> {
        self.id(name).ok_or_else(|| Error::MissingTensor { name: name.to_string(), files: "the parameter set".into() })
    }
}

/// `[rows, cols]` -> `[cols, rows]`.
pub fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

/// Standard normal draws from a seeded ChaCha8 stream (Box–Muller), so that an initialisation is
/// the same on every machine.
pub struct Normal {
    rng: ChaCha8Rng,
    spare: Option<f32>,
}

impl Normal {
    pub fn new(seed: u64) -> Self {
        Normal { rng: ChaCha8Rng::seed_from_u64(seed), spare: None }
    }

    /// A uniform draw in (0, 1].
    pub fn uniform(&mut self) -> f64 {
        ((self.rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    pub fn sample(&mut self) -> f32 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
        self.spare = Some((r * s) as f32);
        (r * c) as f32
    }

    /// A uniform index below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.rng.next_u64() % n.max(1) as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposed_parameters_round_trip_through_the_checkpoint_layout() {
        let stored = HostTensor::from_f32((0..6).map(|v| v as f32).collect(), vec![2, 3]);
        let weights = Weights::from_tensors([("c.weight".to_string(), stored)]);
        let mut set = ParamSet::default();
        let id = set.add("c.weight", &[3, 2], true, Init::Zeros, Some(&weights), &mut Normal::new(0)).expect("add");
        // Held [out=3, in=2]: row o is column o of the stored [in, out].
        assert_eq!(set.get(id), &[0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        let back = set.to_tensors(&set.values, DType::F32);
        assert_eq!(back[0].1.shape(), &[2, 3]);
        assert_eq!(back[0].1.data().to_f32_vec(), (0..6).map(|v| v as f32).collect::<Vec<_>>());
    }

    #[test]
    fn normal_draws_have_unit_variance() {
        let mut n = Normal::new(7);
        let draws: Vec<f64> = (0..20000).map(|_| n.sample() as f64).collect();
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        let var = draws.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / draws.len() as f64;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "mean {mean}, var {var}");
    }
}
