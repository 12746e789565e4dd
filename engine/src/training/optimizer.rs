//! AdamW as `torch.optim.AdamW` computes it (decoupled weight decay, bias-corrected moments), the
//! learning-rate schedules of transformers' `get_{linear,cosine}_schedule_with_warmup`, and
//! `torch.nn.utils.clip_grad_norm_`.

use rayon::prelude::*;

use super::params::ParamSet;

/// The optimizer's settings (transformers' `TrainingArguments` defaults where it has them).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub learning_rate: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f32,
    pub warmup_steps: usize,
    pub schedule: Schedule,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            learning_rate: 5e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            warmup_steps: 0,
            schedule: Schedule::Linear,
        }
    }
}

/// How the learning rate falls after the warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Linearly to 0 at the last step.
    Linear,
    /// Half a cosine to 0 at the last step.
    Cosine,
    Constant,
}

impl AdamWConfig {
    /// The learning rate of optimizer step `step` (0-based) of `total`: warm-up from 0, then the schedule.
    pub fn learning_rate_at(&self, step: usize, total: usize) -> f32 {
        let lr = self.learning_rate;
        if step < self.warmup_steps {
            return lr * step as f32 / self.warmup_steps.max(1) as f32;
        }
        let rest = total.saturating_sub(self.warmup_steps).max(1) as f32;
        let progress = (step - self.warmup_steps) as f32 / rest;
        match self.schedule {
            Schedule::Linear => lr * ((total.saturating_sub(step)) as f32 / rest).max(0.0),
            Schedule::Cosine => lr * (0.5 * (1.0 + (std::f32::consts::PI * progress).cos())).max(0.0),
            Schedule::Constant => lr,
        }
    }
}

/// Scales `grads` so that their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f32) -> f32 {
    // Fixed chunks summed in order: the same norm on every run (resumption is exact).
    let partial: Vec<f64> = grads.par_chunks(1 << 16).map(|c| c.iter().map(|&g| g as f64 * g as f64).sum()).collect();
    let norm = partial.iter().sum::<f64>().sqrt() as f32;
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            grads.par_iter_mut().for_each(|g| *g *= coef);
        }
    }
    norm
}

/// The moments of AdamW, laid out like the parameter values.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    pub config: AdamWConfig,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Optimizer steps taken.
    pub step: usize,
}

impl AdamW {
    pub fn new(config: AdamWConfig, len: usize) -> Self {
        AdamW { config, m: vec![0.0; len], v: vec![0.0; len], step: 0 }
    }

    /// One update of every trainable parameter of `set` with `grads` at learning rate `lr`.
    pub fn update(&mut self, set: &mut ParamSet, grads: &[f32], lr: f32) {
        self.step += 1;
        let c = &self.config;
        let bias1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - c.beta2.powi(self.step as i32)).sqrt();
        let step_size = lr / bias1;
        for p in set.params.iter().filter(|p| p.trainable) {
            let range = p.offset..p.offset + p.numel();
            let decay = if p.decays { 1.0 - lr * c.weight_decay } else { 1.0 };
            set.values[range.clone()]
                .par_iter_mut()
                .zip(&mut self.m[range.clone()])
                .zip(&mut self.v[range.clone()])
                .zip(&grads[range])
                .for_each(|(((w, m), v), &g)| {
                    *w *= decay;
                    *m = c.beta1 * *m + (1.0 - c.beta1) * g;
                    *v = c.beta2 * *v + (1.0 - c.beta2) * g * g;
                    let denom = v.sqrt() / bias2_sqrt + c.eps;
                    *w -= step_size * *m / denom;
                });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_transformers_lambdas() {
        let c = AdamWConfig { learning_rate: 1.0, warmup_steps: 10, ..Default::default() };
        // get_linear_schedule_with_warmup(warmup=10, total=110): step/10, then (110 - step)/100.
        assert_eq!(c.learning_rate_at(0, 110), 0.0);
        assert_eq!(c.learning_rate_at(5, 110), 0.5);
        assert_eq!(c.learning_rate_at(10, 110), 1.0);
        assert!((c.learning_rate_at(60, 110) - 0.5).abs() < 1e-6);
        let cos = AdamWConfig { schedule: Schedule::Cosine, ..c };
        assert!((cos.learning_rate_at(60, 110) - 0.5).abs() < 1e-6);
        assert!(cos.learning_rate_at(109, 110) < 0.001);
    }

    #[test]
    fn clipping_scales_to_the_maximum_norm() {
        let mut g = vec![3.0, 4.0];
        assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
        assert!((g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5);
    }
}
