//! The options of generation, as data: what every strategy shares ([`GenerationOptions`]), the
//! strategy chosen ([`Strategy`]) and each strategy's own settings. The strategies' code imports
//! these; these import no strategy.

use super::processors::{ProcessorOptions, SamplingOptions};
use super::stopping::BraceMatching;
use crate::error::{Error, Result};
use crate::model::config::ModelSpec;

/// What to generate and when to stop: the options every strategy shares, and the strategy.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationOptions {
    pub max_new_tokens: usize,
    /// EOS is suppressed until this many tokens were generated.
    pub min_new_tokens: usize,
    /// Generation stops after any of these (the EOS token is part of the output, as in transformers).
    pub eos_token_ids: Vec<u32>,
    /// Repetition penalty and no-repeat n-grams (every strategy).
    pub processors: ProcessorOptions,
    /// Stop when one of these strings is generated (transformers' `stop_strings`; needs a tokenizer).
    pub stop_strings: Vec<String>,
    /// Stop when the braces opened in the generation are closed (needs a tokenizer).
    pub brace_matching: Option<BraceMatching>,
    pub strategy: Strategy,
}

impl Default for GenerationOptions {
    fn default() -> Self {
        GenerationOptions {
            max_new_tokens: 32,
            min_new_tokens: 0,
            eos_token_ids: Vec::new(),
            processors: ProcessorOptions::default(),
            stop_strings: Vec::new(),
            brace_matching: None,
            strategy: Strategy::Greedy,
        }
    }
}

impl GenerationOptions {
    /// Cache capacity (tokens) that generating from a prompt of `prompt_len` tokens needs (count a
    /// prompt-tuning adapter's virtual tokens in `prompt_len`).
    pub fn cache_tokens(&self, prompt_len: usize) -> usize {
        // Beams and contrastive-search candidates share their prefix, but in the worst case each
        // holds its own blocks, plus one partly-filled block copied on write. Saturating: absurd
        // options are refused by `check` and by the decoder's memory estimate, not by an overflow.
        self.strategy
            .parallel_sequences()
            .saturating_mul(prompt_len.saturating_add(self.max_new_tokens).saturating_add(16))
    }

    /// Checks the options against the model before anything is sized by them: the prompt and the
    /// new tokens fit the context; contrastive search's candidates fit the vocabulary (as
    /// transformers' `topk` requires). Errors name the field.
    pub fn check(&self, prompt_len: usize, spec: &ModelSpec) -> Result<()> {
        // A prompt-tuning adapter's virtual tokens take positions too.
        let prompt_len = prompt_len + spec.virtual_tokens;
        if prompt_len.saturating_add(self.max_new_tokens) > spec.max_positions {
            return Err(Error::invalid(
                "max_new_tokens",
                format!(
                    "{prompt_len} prompt tokens + {} new tokens exceed the model's context of {} positions",
                    self.max_new_tokens, spec.max_positions
                ),
            ));
        }
        if let Strategy::Contrastive(c) = &self.strategy {
            if c.top_k > spec.vocab_size {
                return Err(Error::invalid(
                    "top_k",
                    format!("{} candidates exceed the vocabulary of {} tokens", c.top_k, spec.vocab_size),
                ));
            }
        }
        Ok(())
    }
}

/// The decoding strategy and the options it reads.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum Strategy {
    /// The most likely token at every step.
    #[default]
    Greedy,
    /// Draws from the warped distribution; more sequences continue the same random stream.
    Sample(SampleOptions),
    /// Beam search (`num_beams` > 1).
    Beam(BeamOptions),
    /// Contrastive search.
    Contrastive(ContrastiveOptions),
    /// DoLa: the final layer contrasted with the most divergent premature layer.
    Dola(DolaOptions),
}

impl Strategy {
    /// How many sequences run side by side at most (beams, contrastive candidates plus the sequence).
    fn parallel_sequences(&self) -> usize {
        match self {
            Strategy::Beam(beam) => beam.num_beams.max(1),
            Strategy::Contrastive(c) => 1 + c.top_k,
            _ => 1,
        }
    }
}

/// Sampling with transformers' warpers, `num_return_sequences` draws from one seeded stream.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleOptions {
    pub sampling: SamplingOptions,
    pub num_return_sequences: usize,
}

/// When beam search ends (transformers' `early_stopping`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    /// As soon as `num_beams` hypotheses are finished (`True`).
    Always,
    /// When the best running beam, scored at the current length, cannot beat the worst finished
    /// hypothesis (`False`, the default heuristic).
    #[default]
    Heuristic,
    /// Only when no running beam can become better, even at the maximum length (`"never"`).
    Never,
}

impl std::str::FromStr for EarlyStopping {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "true" | "True" => Ok(EarlyStopping::Always),
            "false" | "False" => Ok(EarlyStopping::Heuristic),
            "never" => Ok(EarlyStopping::Never),
            other => Err(Error::invalid("early_stopping", format!("`{other}` is not true, false or never"))),
        }
    }
}

/// Beam search settings and the number of returned sequences, with transformers' names
/// (`num_beams` 1: no beam search).
#[derive(Clone, Debug, PartialEq)]
pub struct BeamOptions {
    pub num_beams: usize,
    /// Finished hypotheses are ranked by score / length ^ length_penalty.
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    /// Hypotheses returned, best first (at most `num_beams`).
    pub num_return_sequences: usize,
}

impl Default for BeamOptions {
    fn default() -> Self {
        BeamOptions {
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
            num_return_sequences: 1,
        }
    }
}

impl BeamOptions {
    /// Checks the options (`sampling`: whether tokens are sampled); errors name the flags.
    pub fn validate(&self, sampling: bool) -> Result<()> {
        if self.num_beams < 1 {
            return Err(Error::invalid("num_beams", "must be at least 1"));
        }
        if sampling && self.num_beams > 1 {
            return Err(Error::invalid(
                "num_beams",
                "beam sampling (do_sample with num_beams > 1) is not implemented yet; drop one of them",
            ));
        }
        if self.num_return_sequences < 1 || (!sampling && self.num_return_sequences > self.num_beams) {
            return Err(Error::invalid(
                "num_return_sequences",
                format!(
                    "{} must be between 1 and num_beams ({}) when not sampling",
                    self.num_return_sequences, self.num_beams
                ),
            ));
        }
        if !self.length_penalty.is_finite() {
            return Err(Error::invalid("length_penalty", "must be a finite number"));
        }
        Ok(())
    }
}

/// Contrastive search settings (transformers' `penalty_alpha` and `top_k`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ContrastiveOptions {
    pub penalty_alpha: f32,
    pub top_k: usize,
}

/// DoLa's settings: the candidate layers, and sampling (None: greedy) with the number of sequences.
#[derive(Clone, Debug, PartialEq)]
pub struct DolaOptions {
    pub layers: DolaLayers,
    pub sampling: Option<SamplingOptions>,
    pub num_return_sequences: usize,
}

/// Which layers DoLa may contrast with (transformers' `dola_layers`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DolaLayers {
    /// Even layers of the lower half.
    Low,
    /// Even layers of the upper half.
    High,
    /// These layers (those not below the top layer are dropped, as in transformers).
    List(Vec<usize>),
}

impl std::str::FromStr for DolaLayers {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "low" => Ok(DolaLayers::Low),
            "high" => Ok(DolaLayers::High),
            list => list
                .split(',')
                .map(|l| l.trim().parse::<usize>())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map(DolaLayers::List)
                .map_err(|_| Error::invalid("dola_layers", format!("`{list}` is not low, high or a list of layers"))),
        }
    }
}

impl DolaLayers {
    /// The candidate premature layers for a model (transformers' `_dola_decoding` selection).
    pub fn candidates(&self, spec: &ModelSpec) -> Result<Vec<usize>> {
        let n = spec.num_layers;
        let start = match (spec.tie_word_embeddings, n) {
            (false, _) => 0,
            (true, n) if n > 2 => 2,
            (true, 2) => 1,
            (true, _) => 0,
        };
        let layers: Vec<usize> = match self {
            DolaLayers::Low if start == n / 2 => vec![start],
            DolaLayers::Low if n <= 40 => (start..n / 2).step_by(2).collect(),
            DolaLayers::Low => (start..20).step_by(2).collect(),
            DolaLayers::High if n <= 40 => (n / 2..n).step_by(2).collect(),
            DolaLayers::High => (n - 20..n).step_by(2).collect(),
            DolaLayers::List(list) => list.iter().copied().filter(|&l| l < n).collect(),
        };
        if layers.is_empty() {
            return Err(Error::invalid("dola_layers", format!("no candidate layer below the model's {n} layers")));
        }
        Ok(layers)
    }
}
