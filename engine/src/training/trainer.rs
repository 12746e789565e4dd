//! The training loop: batches in the data's seeded order, one forward + backward per step, gradient
//! clipping, AdamW at the scheduled rate, a log record per step, held-out losses now and then, and
//! checkpoints a later run resumes from exactly (the same batches, moments and rates: the same loss
//! curve after a kill and restart).
//!
//! A checkpoint directory is a complete model in transformers' layout (`config.json` with
//! `lm_head_layer_indices`, `model.safetensors`, the tokenizer files) plus the training state:
//! `training-state.safetensors` (the f32 master weights `param.*`, AdamW's moments `adam_m.*` /
//! `adam_v.*` of the trainable tensors) and `training-state.json` (options, step, log).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::weights::{DType, HostTensor, Weights};
use crate::model::config::ModelSpec;

use super::checkpoint::{save_checkpoint, write_atomically, write_safetensors};
use super::data::Blocks;
use super::network::{Head, Network};
use super::optimizer::{clip_grad_norm, AdamW, AdamWConfig};

/// How to train.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// The heads whose losses are summed.
    pub heads: Vec<Head>,
    pub batch_size: usize,
    pub block_size: usize,
    pub epochs: usize,
    /// Stop after this many steps (the schedule ends here too).
    pub max_steps: Option<usize>,
    pub optimizer: AdamWConfig,
    pub seed: u64,
    /// Save a checkpoint every this many steps (0: at the end only).
    pub save_every: usize,
    /// Held-out losses every this many steps (0: at the end only).
    pub eval_every: usize,
    /// The dtype of `model.safetensors` (the training state stays f32).
    pub save_dtype: DType,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            heads: vec![Head::Original],
            batch_size: 16,
            block_size: 128,
            epochs: 1,
            max_steps: None,
            optimizer: AdamWConfig::default(),
            seed: 0,
            save_every: 0,
            eval_every: 0,
            save_dtype: DType::F32,
        }
    }
}

/// One step of the log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    /// 1-based: the number of updates done.
    pub step: usize,
    pub epoch: usize,
    pub learning_rate: f32,
    /// The summed loss that was differentiated (nats per token).
    pub loss: f64,
    /// Each head's loss, by name (`original`, `exit 2`).
    pub heads: BTreeMap<String, f64>,
    /// The gradient norm before clipping.
    pub grad_norm: f32,
    pub tokens: usize,
    pub seconds: f64,
    /// Held-out loss of each head, when evaluated at this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_out: Option<BTreeMap<String, f64>>,
}

impl LogRecord {
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
}

/// What `training-state.json` holds.
#[derive(Serialize, Deserialize)]
struct SavedState {
    options: TrainOptions,
    step: usize,
    trainable: Vec<String>,
    log: Vec<LogRecord>,
    #[serde(default)]
    initial_held_out: Option<BTreeMap<String, f64>>,
}

/// A training run.
pub struct Trainer {
    pub network: Network,
    pub optimizer: AdamW,
    pub options: TrainOptions,
    pub log: Vec<LogRecord>,
    /// Held-out loss of each head before the first step.
    pub initial_held_out: Option<BTreeMap<String, f64>>,
    train: Blocks,
    held_out: Option<Blocks>,
    /// config.json as it will be written (the source's, with the exit layers updated).
    config: Value,
    /// Files copied beside each checkpoint (tokenizer, generation config).
    companions: Vec<PathBuf>,
}

impl Trainer {
    /// A new run of `network` (its trainable flags set) on `train` blocks.
    pub fn new(
        network: Network,
        options: TrainOptions,
        train: Blocks,
        held_out: Option<Blocks>,
        config: Value,
        companions: Vec<PathBuf>,
    ) -> Result<Trainer> {
        check_options(&network, &options, &train)?;
        let optimizer = AdamW::new(options.optimizer.clone(), network.params.values.len());
        Ok(Trainer {
            network,
            optimizer,
            options,
            log: Vec::new(),
            initial_held_out: None,
            train,
            held_out,
            config,
            companions,
        })
    }

    /// Whether `dir` holds a training state to resume.
    pub fn can_resume(dir: &Path) -> bool {
        dir.join("training-state.json").is_file()
    }

    /// The run saved in `dir`, to go on with `train` (the same data as before: the order of
    /// batches is the saved seed's).
    pub fn resume(dir: &Path, train: Blocks, held_out: Option<Blocks>, companions: Vec<PathBuf>) -> Result<Trainer> {
        let state_path = dir.join("training-state.json");
        let text = crate::io::read_config(&state_path).map_err(|e| Error::io(&state_path, e))?;
        let saved: SavedState = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&state_path, format!("not a training state: {e}")))?;
        let config_path = dir.join("config.json");
        let config_text = crate::io::read_config(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config: Value =
            serde_json::from_str(&config_text).map_err(|e| Error::bad_file(&config_path, e.to_string()))?;
        let spec = ModelSpec::from_json(&config_text, &config_path)?;
        let tensors = Weights::open(&[dir.join("training-state.safetensors")])?;
        // The master weights, under their checkpoint names: the network is built from them alone.
        let masters = Weights::from_tensors(tensors.names().filter_map(|name| {
            let param = name.strip_prefix("param.")?;
            Some((param.to_string(), tensors.get(name).ok()?.clone()))
        }));
        let mut network = Network::new(&spec, Some(&masters), saved.options.seed, false)?;
        if network.params.params.len() != masters.names().count() {
            return Err(Error::bad_file(
                dir.join("training-state.safetensors"),
                "the master weights do not match config.json",
            ));
        }
        network.params.train_only(|name| saved.trainable.iter().any(|t| t == name));
        let mut optimizer = AdamW::new(saved.options.optimizer.clone(), network.params.values.len());
        optimizer.m = network.params.read_buffer(&tensors, "adam_m.")?;
        optimizer.v = network.params.read_buffer(&tensors, "adam_v.")?;
        optimizer.step = saved.step;
        check_options(&network, &saved.options, &train)?;
        Ok(Trainer {
            network,
            optimizer,
            options: saved.options,
            log: saved.log,
            initial_held_out: saved.initial_held_out,
            train,
            held_out,
            config,
            companions,
        })
    }

    /// Steps of the whole run.
    pub fn total_steps(&self) -> usize {
        let per_epoch = self.train.batches_per_epoch(self.options.batch_size);
        self.options.max_steps.unwrap_or(self.options.epochs * per_epoch)
    }

    /// Blocks of training data.
    pub fn train_blocks(&self) -> usize {
        self.train.len()
    }

    /// Updates done so far.
    pub fn step(&self) -> usize {
        self.optimizer.step
    }

    /// One update: returns its log record.
    pub fn train_step(&mut self) -> Result<LogRecord> {
        let started = Instant::now();
        let (o, step) = (&self.options, self.optimizer.step);
        let per_epoch = self.train.batches_per_epoch(o.batch_size);
        let (epoch, index) = (step / per_epoch, step % per_epoch);
        let batch = self.train.batch(o.seed, epoch, index, o.batch_size);
        let mut grads = vec![0.0f32; self.network.params.values.len()];
        let losses = self.network.forward_backward(&batch, &o.heads, Some(&mut grads))?;
        let grad_norm = clip_grad_norm(&mut grads, o.optimizer.max_grad_norm);
        if !grad_norm.is_finite() || !losses.total().is_finite() {
            return Err(Error::NonFinite {
                row: 0,
                what: format!(
                    "training diverged at step {}: loss {}, gradient norm {grad_norm}",
                    step + 1,
                    losses.total()
                ),
            });
        }
        let lr = o.optimizer.learning_rate_at(step, self.total_steps());
        self.optimizer.update(&mut self.network.params, &grads, lr);
        let record = LogRecord {
            step: step + 1,
            epoch,
            learning_rate: lr,
            loss: losses.total(),
            heads: losses.per_head.iter().map(|(h, l)| (h.to_string(), *l)).collect(),
            grad_norm,
            tokens: batch.tokens.len(),
            seconds: started.elapsed().as_secs_f64(),
            held_out: None,
        };
        self.log.push(record.clone());
        Ok(record)
    }

    /// Mean loss of each head over the held-out blocks (token-weighted), if there are any.
    pub fn held_out_losses(&self) -> Result<Option<BTreeMap<String, f64>>> {
        let Some(blocks) = &self.held_out else { return Ok(None) };
        let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        for batch in blocks.in_order(self.options.batch_size) {
            let losses = self.network.loss(&batch, &self.options.heads)?;
            for (head, loss) in losses.per_head {
                let e = sums.entry(head.to_string()).or_default();
                e.0 += loss * losses.scored as f64;
                e.1 += losses.scored;
            }
        }
        Ok(Some(sums.into_iter().map(|(k, (s, n))| (k, s / n.max(1) as f64)).collect()))
    }

    /// Runs to the end (or to step `stop_at`), saving to `dir` every `save_every` steps and at the
    /// end; `progress` sees every record.
    pub fn run(
        &mut self,
        dir: &Path,
        stop_at: Option<usize>,
        mut progress: impl FnMut(&LogRecord, usize),
    ) -> Result<()> {
        let total = self.total_steps();
        let end = stop_at.map_or(total, |s| s.min(total));
        if self.step() == 0 && self.initial_held_out.is_none() {
            self.initial_held_out = self.held_out_losses()?;
        }
        while self.step() < end {
            let mut record = self.train_step()?;
            let step = record.step;
            let eval_now = (self.options.eval_every > 0 && step % self.options.eval_every == 0) || step == total;
            if eval_now {
                record.held_out = self.held_out_losses()?;
                if let Some(last) = self.log.last_mut() {
                    last.held_out = record.held_out.clone();
                }
            }
            progress(&record, total);
            if (self.options.save_every > 0 && step % self.options.save_every == 0) || step == end {
                self.save(dir)?;
            }
        }
        Ok(())
    }

    /// Writes the checkpoint and the training state to `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let p = &self.network.params;
        save_checkpoint(dir, &self.network, &self.config, self.options.save_dtype, &self.companions)?;
        let mut state: Vec<(String, HostTensor)> =
            p.to_tensors(&p.values, DType::F32).into_iter().map(|(n, t)| (format!("param.{n}"), t)).collect();
        for (prefix, buffer) in [("adam_m.", &self.optimizer.m), ("adam_v.", &self.optimizer.v)] {
            let moments = p.to_tensors(buffer, DType::F32);
            state.extend(
                moments
                    .into_iter()
                    .zip(&p.params)
                    .filter(|(_, param)| param.trainable)
                    .map(|((n, t), _)| (format!("{prefix}{n}"), t)),
            );
        }
        write_safetensors(&dir.join("training-state.safetensors"), &state)?;
        let saved = SavedState {
            options: self.options.clone(),
            step: self.step(),
            trainable: p.params.iter().filter(|q| q.trainable).map(|q| q.name.clone()).collect(),
            log: self.log.clone(),
            initial_held_out: self.initial_held_out.clone(),
        };
        let json = serde_json::to_string(&saved).map_err(|e| Error::invalid("training state", e.to_string()))?;
        write_atomically(&dir.join("training-state.json"), json.as_bytes())
    }
}

fn check_options(network: &Network, o: &TrainOptions, train: &Blocks) -> Result<()> {
    if o.batch_size == 0 {
        return Err(Error::invalid("--batch-size", "must be at least 1"));
    }
    if train.block > network.spec.max_positions {
        return Err(Error::invalid(
            "--block-size",
            format!("{} tokens exceed the model's context of {}", train.block, network.spec.max_positions),
        ));
    }
    if o.heads.is_empty() {
        return Err(Error::invalid("heads", "nothing to train: no head's loss was chosen"));
    }
    for head in &o.heads {
        if let Head::Exit(layer) = head {
            if !network.exit_layers().contains(layer) {
                return Err(Error::invalid("--layers", format!("layer {layer} has no exit head")));
            }
        }
    }
    if network.params.trainable_count() == 0 {
        return Err(Error::invalid("parameters", "every parameter is frozen"));
    }
    Ok(())
}
