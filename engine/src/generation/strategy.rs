//! The interface every decoding strategy implements, step by step ([`Job`]), how a strategy makes
//! one ([`Decode`]), and what strategies share ([`Run`]): the options common to all, the logits
//! processors and EOS suppression applied in transformers' order, and the text stopping rules.
//!
//! A job never runs a step itself: it adds, forks, appends and releases decoder sequences and says
//! which of them it waits on; whoever drives it (the one-request loop [`super::generate`], or the
//! [`super::scheduler::Scheduler`] over many requests) runs the steps and hands each job the
//! outputs of its sequences. That is what lets one batched step serve many requests.

use super::options::GenerationOptions;
use super::processors::suppress;
use super::stopping::TextStops;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::tokenizer::Tokenizer;
use crate::runtime::{Decoder, SeqId, StepOutput};

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Eos,
    MaxNewTokens,
    /// A stop string was generated, or the braces were closed.
    StopText,
    /// The caller's callback asked to stop.
    Stopped,
}

impl FinishReason {
    /// The reason's name in output records (`eos`, `length`, `stop_text`, `stopped`).
    pub fn name(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::MaxNewTokens => "length",
            FinishReason::StopText => "stop_text",
            FinishReason::Stopped => "stopped",
        }
    }
}

/// What a strategy returns.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Generated ids of every returned sequence, best (or first) first.
    pub sequences: Vec<Vec<u32>>,
    pub finish: FinishReason,
}

/// A decoding strategy: makes the [`Job`] that generates from `prompt`.
pub trait Decode<B: Backend> {
    fn job<'t>(&self, prompt: &[u32], run: Run<'t>, decoder: &Decoder<'_, B>) -> Result<Box<dyn Job<B> + 't>>;
}

/// One request's generation in progress, advanced one step at a time by its driver (`Send`: a
/// driver may run steps on another thread, e.g. with Python's GIL released).
///
/// The driver calls [`Job::start`] once, then repeatedly runs a step that includes every sequence
/// of [`Job::waiting_on`] until none of them has a pending token, and hands their outputs to
/// [`Job::advance`]; once `advance` returns a reason (or the caller stops early), [`Job::finish`]
/// releases what the job holds and returns the result.
pub trait Job<B: Backend>: Send {
    /// Adds the job's first sequence(s) to the decoder. A reason if there is nothing to generate.
    fn start(&mut self, decoder: &mut Decoder<'_, B>) -> Result<Option<FinishReason>>;
    /// Every sequence the job holds in the decoder (what a preemption evicts).
    fn sequences(&self) -> Vec<SeqId>;
    /// The sequences whose outputs the job needs next.
    fn waiting_on(&self) -> Vec<SeqId>;
    /// Whether the next outputs must carry every score ([`SeqOutput::Full`]); else the best id of
    /// each is enough and only ids leave the backend.
    fn needs_scores(&self) -> bool;
    /// Sequences the job runs side by side at most (its slots in a batch).
    fn width(&self) -> usize;
    /// Takes the outputs of every sequence it waits on, chooses tokens (pushing those the caller
    /// sees, in order, on `stream`) and prepares the next step. A reason once the job is done.
    fn advance(
        &mut self,
        decoder: &mut Decoder<'_, B>,
        outputs: &mut JobOutputs,
        stream: &mut Vec<u32>,
    ) -> Result<Option<FinishReason>>;
    /// Releases every sequence the job holds and returns what it generated so far (complete when
    /// `advance` returned a reason). The driver sets the finish reason.
    fn finish(&mut self, decoder: &mut Decoder<'_, B>) -> Vec<Vec<u32>>;
}

/// What a step brought back for one sequence.
#[derive(Clone, Debug)]
pub enum SeqOutput {
    /// Only the best-scoring id (first among ties).
    Best(u32),
    /// Everything the step computed for it.
    Full(StepOutput),
}

/// The outputs of a job's sequences, gathered over the steps that completed them.
#[derive(Debug, Default)]
pub struct JobOutputs {
    outputs: Vec<(SeqId, SeqOutput)>,
}

impl JobOutputs {
    /// Adds the output of `seq` (replacing an older one).
    pub fn insert(&mut self, seq: SeqId, output: SeqOutput) {
        self.outputs.retain(|(s, _)| *s != seq);
        self.outputs.push((seq, output));
    }

    /// Whether an output of `seq` is here.
    pub fn has(&self, seq: SeqId) -> bool {
        self.outputs.iter().any(|(s, _)| *s == seq)
    }

    /// Forgets every output.
    pub fn clear(&mut self) {
        self.outputs.clear();
    }

    fn take(&mut self, seq: SeqId) -> Result<SeqOutput> {
        let at = self.outputs.iter().position(|(s, _)| *s == seq).ok_or_else(|| {
            Error::invalid("decoder", format!("a step returned no output for sequence {seq:?}, which a job waits on"))
        })?;
        Ok(self.outputs.swap_remove(at).1)
    }

    /// The best id of `seq`'s scores.
    pub fn best(&mut self, seq: SeqId) -> Result<u32> {
        Ok(match self.take(seq)? {
            SeqOutput::Best(id) => id,
            SeqOutput::Full(output) => crate::math::argmax(&output.logits),
        })
    }

    /// Everything the step computed for `seq`; an error if only its best id was brought back.
    pub fn full(&mut self, seq: SeqId) -> Result<StepOutput> {
        match self.take(seq)? {
            SeqOutput::Full(output) => Ok(output),
            SeqOutput::Best(_) => Err(Error::invalid("decoder", "a job that needs scores was handed only an id")),
        }
    }
}

/// One generation's shared context: the common options and the tokenizer for the text rules.
#[derive(Clone)]
pub struct Run<'t> {
    pub options: GenerationOptions,
    tokenizer: Option<&'t Tokenizer>,
}

impl<'t> Run<'t> {
    /// Checks the processors, and that the text rules have a tokenizer.
    pub fn new(options: GenerationOptions, tokenizer: Option<&'t Tokenizer>) -> Result<Self> {
        options.processors.validate()?;
        if tokenizer.is_none() && Self::needs_text(&options) {
            let field = if options.stop_strings.is_empty() { "brace_matching" } else { "stop_strings" };
            return Err(Error::invalid(field, "stopping on text needs the checkpoint's tokenizer, and it has none"));
        }
        Ok(Run { options, tokenizer })
    }

    fn needs_text(options: &GenerationOptions) -> bool {
        !options.stop_strings.is_empty() || options.brace_matching.is_some()
    }

    /// Fresh text stopping rules for one sequence (brace levels are per sequence), if any apply.
    pub fn text_stops(&self) -> Option<TextStops<'t>> {
        let options = &self.options;
        self.tokenizer
            .filter(|_| Self::needs_text(options))
            .map(|t| TextStops::new(t, &options.stop_strings, options.brace_matching))
    }

    /// Whether scores need the host-side processors at this point (else the best token can be picked
    /// where the scores are).
    pub fn processes(&self, generated: usize) -> bool {
        let o = &self.options;
        o.processors.is_active() || (generated < o.min_new_tokens && !o.eos_token_ids.is_empty())
    }

    /// The processors every strategy applies to a sequence's scores (`sequence`: prompt and
    /// generated tokens so far, `generated` of them new): repetition penalty, no-repeat n-grams, and
    /// EOS suppressed until `min_new_tokens`.
    pub fn process(&self, sequence: &[u32], generated: usize, scores: &mut [f32]) {
        self.options.processors.apply(sequence, scores);
        if generated < self.options.min_new_tokens {
            suppress(scores, &self.options.eos_token_ids);
        }
    }

    /// Whether `token` ends a sequence.
    pub fn is_eos(&self, token: u32) -> bool {
        self.options.eos_token_ids.contains(&token)
    }

    /// Why a sequence ends after `token` (`sequence`: prompt and generated so far, `token` last),
    /// if it does: EOS, a text rule, or the length.
    pub fn finished(
        &self,
        token: u32,
        sequence: &[u32],
        generated: usize,
        text_stops: Option<&mut TextStops<'_>>,
    ) -> Result<Option<FinishReason>> {
        if self.is_eos(token) {
            return Ok(Some(FinishReason::Eos));
        }
        if let Some(stops) = text_stops {
            if stops.should_stop(sequence)? {
                return Ok(Some(FinishReason::StopText));
            }
        }
        Ok((generated >= self.options.max_new_tokens).then_some(FinishReason::MaxNewTokens))
    }
}
