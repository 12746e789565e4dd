//! Generation on top of the decoder: the loop ([`generate`]), its options, the logits processors
//! ([`processors`]), the text stopping rules ([`stopping`]) and the decoding strategies, each behind
//! [`Decode`]: greedy and sampling ([`search`]), beam search ([`beam`]), contrastive search
//! ([`contrastive`]) and DoLa ([`dola`]); self-speculative decoding, greedy and sampling ([`speculative`]).
//! transformers 4.48's semantics throughout.
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
pub mod scheduler;
pub mod search;
pub mod speculative;
pub mod stopping;
pub mod strategy;

use std::time::Instant;

use crate::backend::Backend;
use crate::error::Result;
use crate::io::tokenizer::Tokenizer;
use crate::runtime::{Decoder, SeqId};

pub use config::GenerationConfig;
pub use options::{
    BeamOptions, ContrastiveOptions, DolaLayers, DolaOptions, EarlyStopping, GenerationOptions, SampleOptions, Strategy,
};
pub use processors::{ProcessorOptions, SamplingOptions};
pub use scheduler::{Event, Request, RequestId, Scheduler, SchedulerOptions};
pub use search::Greedy;
pub use stopping::BraceMatching;
pub use strategy::{Decode, FinishReason, Job, JobOutputs, Outcome, Run, SeqOutput};

impl<B: Backend> Decode<B> for Strategy {
    fn job<'t>(&self, prompt: &[u32], run: Run<'t>, decoder: &Decoder<'_, B>) -> Result<Box<dyn Job<B> + 't>> {
        match self {
            Strategy::Greedy => Greedy.job(prompt, run, decoder),
            Strategy::Sample(options) => options.job(prompt, run, decoder),
            Strategy::Beam(options) => options.job(prompt, run, decoder),
            Strategy::Contrastive(options) => options.job(prompt, run, decoder),
            Strategy::Dola(options) => options.job(prompt, run, decoder),
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
    /// Seconds of the prompt's forward pass (to the first step's outputs).
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
    let run = Run::new(options.clone(), tokenizer)?;
    let mut job = strategy.job(prompt, run, decoder)?;
    let (outcome, prefill_s) = drive(decoder, job.as_mut(), &mut on_token)?;
    let total = start.elapsed().as_secs_f64();
    Ok(Generation {
        ids: outcome.sequences.first().cloned().unwrap_or_default(),
        sequences: outcome.sequences,
        finish: outcome.finish,
        prompt_tokens: prompt.len(),
        prefill_s,
        decode_s: total - prefill_s,
    })
}

/// Runs one job to its end on its own, one step per advance: its outcome and the seconds to its
/// first outputs. Whatever happens, the job's sequences are released.
pub(crate) fn drive<B: Backend>(
    decoder: &mut Decoder<'_, B>,
    job: &mut dyn Job<B>,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<(Outcome, f64)> {
    let start = Instant::now();
    let mut prefill_s = None;
    let result = (|| {
        if let Some(finish) = job.start(decoder)? {
            return Ok(finish);
        }
        let mut outputs = JobOutputs::default();
        let mut stream = Vec::new();
        loop {
            let waiting: Vec<(SeqId, usize)> = job.waiting_on().into_iter().map(|s| (s, usize::MAX)).collect();
            let step = decoder.run_step_for(&waiting)?;
            if job.needs_scores() {
                for output in step.into_outputs()? {
                    outputs.insert(output.seq, SeqOutput::Full(output));
                }
            } else {
                for (&seq, best) in step.sequences().iter().zip(step.argmax()?) {
                    outputs.insert(seq, SeqOutput::Best(best));
                }
            }
            prefill_s.get_or_insert_with(|| start.elapsed().as_secs_f64());
            let finish = job.advance(decoder, &mut outputs, &mut stream)?;
            outputs.clear();
            for token in stream.drain(..) {
                if !on_token(token) {
                    return Ok(FinishReason::Stopped);
                }
            }
            if let Some(finish) = finish {
                return Ok(finish);
            }
        }
    })();
    let sequences = job.finish(decoder);
    Ok((Outcome { sequences, finish: result? }, prefill_s.unwrap_or(0.0)))
}
