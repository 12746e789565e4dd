//! The interface every decoding strategy implements ([`Decode`]), and what strategies share
//! ([`Run`]): the options common to all, the logits processors and EOS suppression applied in
//! transformers' order, the text stopping rules, and the caller's token callback.

use super::options::GenerationOptions;
use super::processors::suppress;
use super::stopping::TextStops;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::tokenizer::Tokenizer;
use crate::runtime::Decoder;

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

/// What a strategy returns.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Generated ids of every returned sequence, best (or first) first.
    pub sequences: Vec<Vec<u32>>,
    pub finish: FinishReason,
    /// Seconds to the first token's scores, where the strategy measured it.
    pub prefill_s: Option<f64>,
}

/// A decoding strategy: generates from `prompt` over the decoder's sequences, asking the decoder
/// per sequence for what it needs ([`crate::runtime::SeqRequest`]), and releases what it added.
pub trait Decode<B: Backend> {
    fn decode(&self, decoder: &mut Decoder<'_, B>, prompt: &[u32], run: &mut Run<'_>) -> Result<Outcome>;
}

/// One generation's shared state: the common options, the tokenizer for the text rules, and the
/// caller's callback.
pub struct Run<'a> {
    pub options: &'a GenerationOptions,
    tokenizer: Option<&'a Tokenizer>,
    on_token: &'a mut dyn FnMut(u32) -> bool,
    /// Tokens are no longer handed to the caller (sequences after the first, which was streamed).
    muted: bool,
}

impl<'a> Run<'a> {
    /// Checks that the text rules have a tokenizer.
    pub fn new(
        options: &'a GenerationOptions,
        tokenizer: Option<&'a Tokenizer>,
        on_token: &'a mut dyn FnMut(u32) -> bool,
    ) -> Result<Self> {
        options.processors.validate()?;
        if tokenizer.is_none() && Self::needs_text(options) {
            let field = if options.stop_strings.is_empty() { "brace_matching" } else { "stop_strings" };
            return Err(Error::invalid(field, "stopping on text needs the checkpoint's tokenizer, and it has none"));
        }
        Ok(Run { options, tokenizer, on_token, muted: false })
    }

    fn needs_text(options: &GenerationOptions) -> bool {
        !options.stop_strings.is_empty() || options.brace_matching.is_some()
    }

    /// Fresh text stopping rules for one sequence (brace levels are per sequence), if any apply.
    pub fn text_stops(&self) -> Option<TextStops<'a>> {
        let options = self.options;
        self.tokenizer
            .filter(|_| Self::needs_text(options))
            .map(|t| TextStops::new(t, &options.stop_strings, options.brace_matching))
    }

    /// Whether scores need the host-side processors at this point (else the best token can be picked
    /// where the scores are).
    pub fn processes(&self, generated: usize) -> bool {
        let o = self.options;
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

    /// Hands `token` to the caller; false if the caller asked to stop.
    pub fn emit(&mut self, token: u32) -> bool {
        self.muted || (self.on_token)(token)
    }

    /// Stops handing tokens to the caller (for sequences after the streamed one).
    pub fn mute(&mut self) {
        self.muted = true;
    }
}
