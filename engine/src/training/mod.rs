//! Training on the CPU: a backward pass for every supported architecture, AdamW, and the loop that
//! trains exit heads (upstream's `run_training.py`) or a whole model from scratch.
//!
//! | module | owns |
//! |---|---|
//! | [`ops`] | each op's forward beside its backward, checked against finite differences |
//! | [`params`] | the parameters in one f32 buffer under their checkpoint names; initialisation |
//! | [`network`] | GPT-2 / GPT-Neo / Llama forward with tapes, and the backward in reverse |
//! | [`bert`] | a BERT classifier's loss and its gradient with respect to a head mask |
//! | [`head_mask`] | a loss's gradient with respect to a head mask, and head importance from it |
//! | [`optimizer`] | AdamW, learning-rate schedules, gradient clipping |
//! | [`data`] | text, JSON Lines and Parquet columns into token chunks, batches in a seeded order |
//! | [`trainer`] | the loop: steps, logs, checkpoints and exact resumption |
//! | [`checkpoint`] | a network written as transformers' checkpoint |
//! | [`conversions`] | conversion matrices fitted by least squares |
//!
//! Imports: `model` (configs, names), `io` (weights, tokenizers), `math`, `encoder` (a classifier's
//! tokenised inputs).
//!
//! ```
//! use layerwise::training::{data::Blocks, AdamWConfig, Network, TrainOptions, Trainer};
//! use layerwise::{io, ModelFiles, ModelSpec};
//!
//! # fn main() -> layerwise::Result<()> {
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/gpt2-sharded");
//! let files = ModelFiles::from_dir(std::path::Path::new(dir))?;
//! let spec = ModelSpec::from_file(&files.config)?;
//! let network = Network::new(&spec, Some(&io::open_weights(&files.weights)?), 0, false)?;
//! // A repeating token stream in blocks of 16: easy to learn.
//! let data = Blocks::from_tokens((0..512u32).map(|i| i % 7).collect(), 16, "data")?;
//! let optimizer = AdamWConfig { learning_rate: 1e-2, ..Default::default() };
//! let options = TrainOptions { batch_size: 4, block_size: 16, max_steps: Some(10), optimizer, ..Default::default() };
//! let mut trainer = Trainer::new(network, options, data, None, serde_json::json!({}), Vec::new())?;
//! let first = trainer.train_step()?.loss;
//! while trainer.step() < 10 {
//!     trainer.train_step()?;
//! }
//! assert!(trainer.log[9].loss < first);
//! # Ok(())
//! # }
//! ```

pub mod bert;
pub mod checkpoint;
pub mod conversions;
pub mod data;
pub mod head_mask;
pub mod network;
pub mod ops;
pub mod optimizer;
pub mod params;
pub mod trainer;

pub use head_mask::HeadMaskGradient;
pub use network::{Batch, Head, Network, StepLosses};
pub use optimizer::{AdamW, AdamWConfig, Schedule};
pub use trainer::{TrainOptions, Trainer};
