//! Generation on top of the decoder: greedy and sampled decoding with transformers' semantics for
//! `max_new_tokens`, `min_new_tokens`, EOS, the logits processors of [`crate::processors`] and the
//! text stopping rules of [`crate::stopping`].

use std::path::Path;
use std::time::Instant;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use crate::backend::Backend;
use crate::beam::{beam_search, BeamOptions, EarlyStopping};
use crate::config::ModelSpec;
use crate::contrastive::{contrastive_search, ContrastiveOptions};
use crate::decoder::Decoder;
use crate::decoder::StepExtras;
use crate::dola::DolaLayers;
use crate::error::{Error, Result};
use crate::processors::suppress;
pub use crate::processors::{softmax, ProcessorOptions, SamplingOptions};
use crate::stopping::{BraceMatching, TextStops};
use crate::tokenizer::Tokenizer;

/// What to generate and when to stop.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationOptions {
    pub max_new_tokens: usize,
    /// EOS is suppressed until this many tokens were generated.
    pub min_new_tokens: usize,
    /// Generation stops after any of these (the EOS token is part of the output, as in transformers).
    pub eos_token_ids: Vec<u32>,
    /// Repetition penalty and no-repeat n-grams (every strategy).
    pub processors: ProcessorOptions,
    /// None: greedy.
    pub sampling: Option<SamplingOptions>,
    /// Stop when one of these strings is generated (transformers' `stop_strings`; needs a tokenizer).
    pub stop_strings: Vec<String>,
    /// Stop when the braces opened in the generation are closed (needs a tokenizer).
    pub brace_matching: Option<BraceMatching>,
    /// Beam search (`num_beams` > 1) and how many sequences to return.
    pub beam: BeamOptions,
    /// Contrastive search (transformers runs it when `penalty_alpha` > 0 and `top_k` > 1 without
    /// sampling).
    pub contrastive: Option<ContrastiveOptions>,
    /// DoLa: contrast the final layer with a premature one picked among these.
    pub dola_layers: Option<DolaLayers>,
}

impl Default for GenerationOptions {
    fn default() -> Self {
        GenerationOptions {
            max_new_tokens: 32,
            min_new_tokens: 0,
            eos_token_ids: Vec::new(),
            processors: ProcessorOptions::default(),
            sampling: None,
            stop_strings: Vec::new(),
            brace_matching: None,
            beam: BeamOptions::default(),
            contrastive: None,
            dola_layers: None,
        }
    }
}

impl GenerationOptions {
    /// Defaults for a checkpoint: EOS from config.json, then everything its `generation_config.json`
    /// sets (see [`GenerationOptions::apply_generation_config`]).
    pub fn for_checkpoint(spec: &ModelSpec, generation_config: Option<&Path>) -> Result<Self> {
        let mut options = GenerationOptions { eos_token_ids: spec.eos_token_ids.clone(), ..Default::default() };
        if let Some(path) = generation_config {
            options.apply_generation_config(path)?;
        }
        Ok(options)
    }

    /// Reads a transformers `generation_config.json` over these options: `eos_token_id`,
    /// `max_new_tokens`, `min_new_tokens`, `do_sample`, `temperature`, `top_k`, `top_p`, `min_p`,
    /// `typical_p`, `repetition_penalty`, `no_repeat_ngram_size`, `stop_strings`, `num_beams`,
    /// `num_return_sequences`, `length_penalty`, `early_stopping`, `penalty_alpha` (with `top_k`) and
    /// `dola_layers`. A field of the wrong type is an error naming it and the file.
    pub fn apply_generation_config(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: Value =
            serde_json::from_str(&text).map_err(|e| Error::bad_file(path, format!("not valid JSON: {e}")))?;
        let bad = |field: &str, why: &str| Error::bad_file(path, format!("`{field}` {why}"));
        let uint = |field: &str| -> Result<Option<usize>> {
            match json.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_u64().map(|v| Some(v as usize)).ok_or_else(|| bad(field, "must be a whole number")),
            }
        };
        let float = |field: &str| -> Result<Option<f32>> {
            match json.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_f64().map(|v| Some(v as f32)).ok_or_else(|| bad(field, "must be a number")),
            }
        };
        // Read every field first, so that a wrong type is reported even where it would not apply.
        let (temperature, top_k, top_p) = (float("temperature")?, uint("top_k")?, float("top_p")?);
        let (min_p, typical_p, penalty_alpha) = (float("min_p")?, float("typical_p")?, float("penalty_alpha")?);
        match json.get("eos_token_id") {
            Some(Value::Number(n)) => self.eos_token_ids = n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(Value::Array(list)) => {
                self.eos_token_ids = list.iter().filter_map(|v| v.as_u64().map(|v| v as u32)).collect()
            }
            _ => {}
        }
        if let Some(n) = uint("num_beams")? {
            self.beam.num_beams = n;
        }
        if let Some(n) = uint("num_return_sequences")? {
            self.beam.num_return_sequences = n;
        }
        if let Some(p) = float("length_penalty")? {
            self.beam.length_penalty = p;
        }
        match json.get("early_stopping") {
            Some(Value::Bool(true)) => self.beam.early_stopping = EarlyStopping::Always,
            Some(Value::Bool(false)) => self.beam.early_stopping = EarlyStopping::Heuristic,
            Some(Value::String(s)) if s == "never" => self.beam.early_stopping = EarlyStopping::Never,
            None | Some(Value::Null) => {}
            Some(_) => return Err(bad("early_stopping", "must be true, false or \"never\"")),
        }
        match json.get("dola_layers") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => {
                self.dola_layers = Some(s.parse().map_err(|_| bad("dola_layers", "must be low, high or a list"))?)
            }
            Some(Value::Array(list)) => {
                let layers = list.iter().map(|v| v.as_u64().map(|l| l as usize)).collect::<Option<Vec<_>>>();
                self.dola_layers =
                    Some(DolaLayers::List(layers.ok_or_else(|| bad("dola_layers", "must hold layers"))?));
            }
            Some(_) => return Err(bad("dola_layers", "must be low, high or a list of layers")),
        }
        if let Some(n) = uint("max_new_tokens")? {
            self.max_new_tokens = n;
        }
        if let Some(n) = uint("min_new_tokens")? {
            self.min_new_tokens = n;
        }
        if let Some(p) = float("repetition_penalty")? {
            self.processors.repetition_penalty = p;
        }
        if let Some(n) = uint("no_repeat_ngram_size")? {
            self.processors.no_repeat_ngram_size = n;
        }
        match json.get("stop_strings") {
            Some(Value::String(s)) => self.stop_strings = vec![s.clone()],
            Some(Value::Array(list)) => {
                self.stop_strings = list
                    .iter()
                    .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| bad("stop_strings", "must hold strings")))
                    .collect::<Result<_>>()?
            }
            _ => {}
        }
        let do_sample = match json.get("do_sample") {
            Some(Value::Bool(b)) => Some(*b),
            None | Some(Value::Null) => None,
            Some(_) => return Err(bad("do_sample", "must be true or false")),
        };
        match do_sample {
            Some(false) => self.sampling = None,
            Some(true) => {
                let mut sampling = self.sampling.take().unwrap_or_default();
                if let Some(t) = temperature {
                    sampling.temperature = t;
                }
                if let Some(k) = top_k {
                    sampling.top_k = k;
                }
                if let Some(p) = top_p {
                    sampling.top_p = p;
                }
                if let Some(p) = min_p {
                    sampling.min_p = Some(p);
                }
                if let Some(p) = typical_p {
                    sampling.typical_p = p;
                }
                self.sampling = Some(sampling);
            }
            None => {}
        }
        // transformers' choice: contrastive search when penalty_alpha > 0 and top_k > 1, not sampling.
        if let Some(alpha) = penalty_alpha.filter(|&a| a > 0.0) {
            let top_k = top_k.unwrap_or(50);
            self.contrastive = (top_k > 1).then_some(ContrastiveOptions { penalty_alpha: alpha, top_k });
        }
        Ok(())
    }

    /// Checks the options; errors name the option.
    pub fn validate(&self) -> Result<()> {
        if let Some(s) = &self.sampling {
            s.validate()?;
        }
        self.beam.validate(self.sampling.is_some())?;
        if self.beam.num_beams > 1 && (self.contrastive.is_some() || self.dola_layers.is_some()) {
            let other = if self.contrastive.is_some() { "--penalty-alpha" } else { "--dola-layers" };
            return Err(Error::invalid("num-beams", format!("beam search does not combine with {other}")));
        }
        if self.contrastive.is_some() && self.dola_layers.is_some() {
            return Err(Error::invalid(
                "dola-layers",
                "DoLa does not combine with contrastive search (--penalty-alpha)",
            ));
        }
        if self.beam.num_beams > 1 && (!self.stop_strings.is_empty() || self.brace_matching.is_some()) {
            return Err(Error::invalid(
                "num-beams",
                "stop strings and brace matching apply to one sequence, not to beams",
            ));
        }
        self.processors.validate()
    }

    /// Cache capacity (tokens) that generating from a prompt of `prompt_len` tokens needs.
    pub fn cache_tokens(&self, prompt_len: usize) -> usize {
        // Beams and contrastive-search candidates share their prefix, but in the worst case each
        // holds its own blocks, plus one partly-filled block copied on write.
        let sequences = self.beam.num_beams.max(1) + self.contrastive.map_or(0, |c| c.top_k);
        sequences * (prompt_len + self.max_new_tokens + 16)
    }
}

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

/// Generates from `prompt` with `decoder` (whose plan decides the scores), calling `on_token` with
/// each new id as it is chosen; `on_token` returns false to stop early. The sequence is released at
/// the end. `tokenizer` is needed only by the text stopping rules (stop strings, brace matching).
pub fn generate<B: Backend>(
    decoder: &mut Decoder<'_, B>,
    prompt: &[u32],
    options: &GenerationOptions,
    tokenizer: Option<&Tokenizer>,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generation> {
    options.validate()?;
    let needs_text = !options.stop_strings.is_empty() || options.brace_matching.is_some();
    if needs_text && tokenizer.is_none() {
        let flag = if options.stop_strings.is_empty() { "brace-matching" } else { "stop" };
        return Err(Error::invalid(flag, "stopping on text needs the checkpoint's tokenizer, and it has none"));
    }
    // Each sequence gets its own text rules (brace levels are per sequence).
    let text_stops =
        || tokenizer.filter(|_| needs_text).map(|t| TextStops::new(t, &options.stop_strings, options.brace_matching));
    let spec = decoder.model().spec();
    if prompt.len() + options.max_new_tokens > spec.max_positions {
        return Err(Error::invalid(
            "max-new-tokens",
            format!(
                "{} prompt tokens + {} new tokens exceed the model's context of {} positions",
                prompt.len(),
                options.max_new_tokens,
                spec.max_positions
            ),
        ));
    }
    let start = Instant::now();
    if options.beam.num_beams > 1 {
        let hypotheses = beam_search(decoder, prompt, options, &options.beam)?;
        let sequences: Vec<Vec<u32>> = hypotheses.into_iter().map(|h| h.ids).collect();
        let ids = sequences.first().cloned().unwrap_or_default();
        let mut finish = match ids.last() {
            Some(last) if options.eos_token_ids.contains(last) => FinishReason::Eos,
            _ => FinishReason::MaxNewTokens,
        };
        for &token in &ids {
            if !on_token(token) {
                finish = FinishReason::Stopped;
                break;
            }
        }
        let total = start.elapsed().as_secs_f64();
        return Ok(Generation { ids, sequences, finish, prompt_tokens: prompt.len(), prefill_s: 0.0, decode_s: total });
    }
    if let (Some(settings), None) = (options.contrastive, &options.sampling) {
        let (ids, finish) = contrastive_search(decoder, prompt, options, settings, &mut on_token)?;
        let total = start.elapsed().as_secs_f64();
        let sequences = vec![ids.clone()];
        return Ok(Generation { ids, sequences, finish, prompt_tokens: prompt.len(), prefill_s: 0.0, decode_s: total });
    }
    if let Some(layers) = &options.dola_layers {
        let premature_layers = layers.candidates(decoder.model().spec())?;
        decoder.set_extras(StepExtras { premature_layers, ..Default::default() })?;
    }
    let mut rng = options.sampling.as_ref().map(|s| ChaCha8Rng::seed_from_u64(s.seed));
    let result = (|| {
        let (ids, finish, prefill_s) =
            one_sequence(decoder, prompt, options, text_stops().as_mut(), rng.as_mut(), &mut on_token)?;
        let mut sequences = vec![ids.clone()];
        // More samples continue the same random stream; only the first is streamed.
        for _ in 1..options.beam.num_return_sequences {
            sequences
                .push(one_sequence(decoder, prompt, options, text_stops().as_mut(), rng.as_mut(), &mut |_| true)?.0);
        }
        Ok::<_, Error>((ids, finish, prefill_s, sequences))
    })();
    if options.dola_layers.is_some() {
        decoder.set_extras(StepExtras::default())?;
    }
    let (ids, finish, prefill_s, sequences) = result?;
    let total = start.elapsed().as_secs_f64();
    Ok(Generation { ids, sequences, finish, prompt_tokens: prompt.len(), prefill_s, decode_s: total - prefill_s })
}

/// Greedy or sampled decoding of one sequence: its ids, why it ended, and the prefill seconds.
fn one_sequence<B: Backend>(
    decoder: &mut Decoder<'_, B>,
    prompt: &[u32],
    options: &GenerationOptions,
    mut text_stops: Option<&mut TextStops<'_>>,
    mut rng: Option<&mut ChaCha8Rng>,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<(Vec<u32>, FinishReason, f64)> {
    let seq = decoder.add_sequence(prompt)?;
    let mut ids = Vec::with_capacity(options.max_new_tokens);
    // The whole sequence, as transformers' processors and stopping criteria see it.
    let mut sequence = prompt.to_vec();
    let mut finish = FinishReason::MaxNewTokens;
    let start = Instant::now();
    let mut prefill_s = 0.0;
    let result = (|| {
        while ids.len() < options.max_new_tokens {
            // Other sequences of the decoder may step along; only ours is read.
            let outputs = decoder.step()?;
            let output = outputs
                .into_iter()
                .find(|o| o.seq == seq)
                .ok_or_else(|| Error::invalid("decoder", "a step returned no scores for the generated sequence"))?;
            let mut scores = match options.dola_layers {
                Some(_) => crate::dola::contrast(&output.logits, &output.premature).0,
                None => output.logits,
            };
            if ids.is_empty() {
                prefill_s = start.elapsed().as_secs_f64();
            }
            options.processors.apply(&sequence, &mut scores);
            if ids.len() < options.min_new_tokens {
                suppress(&mut scores, &options.eos_token_ids);
            }
            let next = match (&options.sampling, rng.as_deref_mut()) {
                (Some(sampling), Some(rng)) => {
                    sampling.warp(&mut scores, 1);
                    sample(&scores, rng)
                }
                _ => argmax(&scores),
            };
            ids.push(next);
            sequence.push(next);
            if !on_token(next) {
                finish = FinishReason::Stopped;
                break;
            }
            if options.eos_token_ids.contains(&next) {
                finish = FinishReason::Eos;
                break;
            }
            if let Some(stops) = text_stops.as_deref_mut() {
                if stops.should_stop(&sequence)? {
                    finish = FinishReason::StopText;
                    break;
                }
            }
            if ids.len() < options.max_new_tokens {
                decoder.append(seq, next)?;
            }
        }
        Ok::<_, Error>(())
    })();
    decoder.release(seq)?;
    result?;
    Ok((ids, finish, prefill_s))
}

/// The first index of the largest score (torch.argmax's choice among ties).
pub fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws an index from softmax(scores).
fn sample(scores: &[f32], rng: &mut ChaCha8Rng) -> u32 {
    let probs = softmax(scores);
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let mut cumulative = 0.0f64;
    let mut fallback = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            fallback = i;
            cumulative += p as f64;
            if u < cumulative {
                return i as u32;
            }
        }
    }
    fallback as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_follow_the_warped_distribution() {
        // Pearson's chi-square over many seeded draws from a top-p-and-min-p-filtered distribution:
        // removed tokens are never drawn, the kept ones in proportion.
        let logits: Vec<f32> = (0..12).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.4).collect();
        let options = SamplingOptions { top_k: 0, top_p: 0.9, min_p: Some(0.05), ..Default::default() };
        let mut scores = logits.clone();
        options.warp(&mut scores, 1);
        let probs = softmax(&scores);
        let kept = probs.iter().filter(|&&p| p > 0.0).count();
        assert!(kept > 3 && kept < logits.len(), "the filters keep some tokens and drop others");
        let draws = 40_000;
        let mut counts = vec![0usize; logits.len()];
        let mut rng = ChaCha8Rng::seed_from_u64(1234);
        for _ in 0..draws {
            counts[sample(&scores, &mut rng) as usize] += 1;
        }
        let mut chi2 = 0.0f64;
        for (&c, &p) in counts.iter().zip(&probs) {
            if p == 0.0 {
                assert_eq!(c, 0, "a removed token was drawn");
                continue;
            }
            let expected = draws as f64 * p as f64;
            chi2 += (c as f64 - expected).powi(2) / expected;
        }
        // Critical value of chi-square at p = 0.001 for up to 11 degrees of freedom.
        assert!(chi2 < 31.26, "chi-square {chi2} over {} degrees of freedom", kept - 1);
    }
}
