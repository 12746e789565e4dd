//! The runtime: the paged cache's bookkeeping ([`kv`]) and the step-by-step [`Decoder`] that runs
//! many sequences over it, one batched forward per step. It knows nothing of decoding strategies:
//! strategies ask it for what they need per sequence ([`SeqRequest`]).
//!
//! Owns: sequences, block tables, step layouts. Imports: `backend`, `model`, `exits`.

mod decoder;
pub mod kv;

pub use decoder::{Decoder, DecoderOptions, DraftPick, SeqId, SeqRequest, Speculation, StepOutput, StepResult};
