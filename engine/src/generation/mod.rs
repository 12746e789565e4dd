//! Generation on top of the decoder: the loop ([`generate`]), its options, the logits processors
//! ([`processors`]), the text stopping rules ([`stopping`]) and the decoding strategies, each behind
//! [`Decode`]: greedy and sampling ([`search`]), beam search ([`beam`]), contrastive search
//! ([`contrastive`]) and DoLa ([`dola`]). transformers 4.48's semantics throughout.
//!
//! ```
//! use layerwise::generation::{generate, GenerationConfig, GenerationOptions, Strategy};
//! use layerwise::runtime::{Decoder, DecoderOptions};
//!
//! # fn main() -> layerwise::Result<()> {
//! # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/gpt2-sharded");
//! let loaded = layerwise::load(dir)?;
//! let options = GenerationOptions { max_new_tokens: 5, strategy: Strategy::Greedy, ..Default::default() };
//! let mut decoder = Decoder::new(&loaded.model, DecoderOptions::default())?;
//! let out = generate(&mut decoder, &[5, 17, 42], &options, None, |_| true)?;
//! assert_eq!(out.ids.len(), 5);
//! // The same, from transformers-style settings: the strategy is chosen as transformers chooses it.
//! let resolved = GenerationConfig { max_new_tokens: 5, ..Default::default() }.resolve()?;
//! assert_eq!(resolved.strategy, Strategy::Greedy);
//! # Ok(())
//! # }
//! ```
//!
//! Owns: what to generate and when to stop. Imports: `runtime` (the decoder), `math`, `io`
//! (tokenizer). The loop imports the strategies; the strategies import only [`strategy`]'s shared
//! context, never the loop.

pub mod beam;
pub mod config;
pub mod contrastive;
pub mod dola;
pub mod options;
pub mod processors;
pub mod search;
pub mod stopping;
pub mod strategy;

use std::time::Instant;

use crate::backend::Backend;
use crate::error::Result;
use crate::io::tokenizer::Tokenizer;
use crate::runtime::Decoder;

pub use config::GenerationConfig;
pub use options::{
    BeamOptions, ContrastiveOptions, DolaLayers, DolaOptions, EarlyStopping, GenerationOptions, SampleOptions, Strategy,
};
pub use processors::{ProcessorOptions, SamplingOptions};
pub use search::Greedy;
pub use stopping::BraceMatching;
pub use strategy::{Decode, FinishReason, Outcome, Run};

impl<B: Backend> Decode<B> for Strategy {
    fn decode(&self, decoder: &mut Decoder<'_, B>, prompt: &[u32], run: &mut Run<'_>) -> Result<Outcome> {
        match self {
            Strategy::Greedy => search::Greedy.decode(decoder, prompt, run),
            Strategy::Sample(options) => options.decode(decoder, prompt, run),
            Strategy::Beam(options) => options.decode(decoder, prompt, run),
            Strategy::Contrastive(options) => options.decode(decoder, prompt, run),
            Strategy::Dola(options) => options.decode(decoder, prompt, run),
        }
    }
}

/// The result of [`generate`].
#[derive(Clone, Debug)]
pub struct Generation {
    /// Generated ids only (the prompt is not repeated); the best sequence.
    pub ids: Vec<u32>,
    /// Every returned sequence, best (or first) first: `num_return_sequences` of them.
    pub sequences: Vec<Vec<u32>>,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    /// Seconds of the prompt's forward pass (to the first token's scores).
    pub prefill_s: f64,
    /// Seconds of the remaining steps.
    pub decode_s: f64,
}

/// Generates from `prompt` with `decoder` (whose plan decides the scores) under `options.strategy`,
/// calling `on_token` with each new id as it is chosen; `on_token` returns false to stop early.
/// Sequences are released at the end. `tokenizer` is needed only by the text stopping rules.
pub fn generate<B: Backend>(
    decoder: &mut Decoder<'_, B>,
    prompt: &[u32],
    options: &GenerationOptions,
    tokenizer: Option<&Tokenizer>,
    on_token: impl FnMut(u32) -> bool,
) -> Result<Generation> {
    generate_with(decoder, prompt, options, &options.strategy, tokenizer, on_token)
}

/// [`generate`] with a strategy of the caller's (any [`Decode`] implementation).
pub fn generate_with<B: Backend>(
    decoder: &mut Decoder<'_, B>,
    prompt: &[u32],
    options: &GenerationOptions,
    strategy: &dyn Decode<B>,
    tokenizer: Option<&Tokenizer>,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generation> {
    options.check(prompt.len(), decoder.model().spec())?;
    let start = Instant::now();
    let mut run = Run::new(options, tokenizer, &mut on_token)?;
    let outcome = strategy.decode(decoder, prompt, &mut run)?;
    let total = start.elapsed().as_secs_f64();
    let prefill_s = outcome.prefill_s.unwrap_or(0.0);
    Ok(Generation {
        ids: outcome.sequences.first().cloned().unwrap_or_default(),
        sequences: outcome.sequences,
        finish: outcome.finish,
        prompt_tokens: prompt.len(),
        prefill_s,
        decode_s: total - prefill_s,
    })
}
