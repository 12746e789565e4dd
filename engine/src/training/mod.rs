//! Training on the CPU: a backward pass for every supported architecture, AdamW, and the loop that
//! trains exit heads (upstream's `run_training.py`) or a whole model from scratch.
//!
//! | module | owns |
//! |---|---|
//! | [`ops`] | each op's forward beside its backward, checked against finite differences |
//! | [`params`] | the parameters in one f32 buffer under their checkpoint names; initialisation |
//! | [`network`] | GPT-2 / GPT-Neo / Llama forward with tapes, and the backward in reverse |
//! | [`optimizer`] | AdamW, learning-rate schedules, gradient clipping |
//! | [`data`] | text, JSON Lines and Parquet columns into token chunks, batches in a seeded order |
//! | [`trainer`] | the loop: steps, logs, checkpoints and exact resumption |
//! | [`checkpoint`] | a network written as transformers' checkpoint |
//! | [`conversions`] | conversion matrices fitted by least squares |
//!
//! Imports: `model` (configs, names), `io` (weights, tokenizers), `math`.

pub mod checkpoint;
pub mod conversions;
pub mod data;
pub mod network;
pub mod ops;
pub mod optimizer;
pub mod params;
pub mod trainer;

pub use network::{Batch, Head, Network, StepLosses};
pub use optimizer::{AdamW, AdamWConfig, Schedule};
pub use trainer::{TrainOptions, Trainer};
