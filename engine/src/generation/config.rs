//! transformers' `GenerationConfig`: the settings of every strategy side by side, read from
//! `generation_config.json` (and, in the CLI, flags), then resolved into [`GenerationOptions`] with
//! one [`Strategy`] as transformers chooses it.

use std::path::Path;

use serde_json::Value;

use super::options::{
    BeamOptions, ContrastiveOptions, DolaLayers, DolaOptions, EarlyStopping, GenerationOptions, SampleOptions, Strategy,
};
use super::processors::{ProcessorOptions, SamplingOptions};
use super::stopping::BraceMatching;
use crate::error::{Error, Result};
use crate::model::config::ModelSpec;

/// Generation settings with transformers' `GenerationConfig` names, as `generation_config.json` and
/// the command line give them: every strategy's fields side by side. [`GenerationConfig::resolve`]
/// picks the strategy as transformers does and checks the combination.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
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

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
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

impl GenerationConfig {
    /// Defaults for a checkpoint: EOS from config.json, then everything its `generation_config.json`
    /// sets (see [`GenerationConfig::apply_generation_config`]).
    pub fn for_checkpoint(spec: &ModelSpec, generation_config: Option<&Path>) -> Result<Self> {
        let mut options = GenerationConfig { eos_token_ids: spec.eos_token_ids.clone(), ..Default::default() };
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
        let text = crate::io::read_config_file(path)?;
        let json: Value =
            serde_json::from_str(&text).map_err(|e| Error::bad_file(path, format!("not valid JSON: {e}")))?;
        self.apply_fields(&json, &|field, why| Error::bad_file(path, format!("`{field}` {why}")))
    }

    /// [`GenerationConfig::apply_generation_config`] from a JSON object of transformers' field names
    /// (e.g. the keyword arguments of a `generate()` call), plus layerwise's `seed`; a field of the
    /// wrong type is an [`Error::InvalidArgument`] naming it.
    pub fn apply_json(&mut self, json: &Value) -> Result<()> {
        self.apply_fields(json, &|field, why| Error::invalid(field, why))
    }

    fn apply_fields(&mut self, json: &Value, bad: &dyn Fn(&str, &str) -> Error) -> Result<()> {
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
                if let Some(seed) = uint("seed")? {
                    sampling.seed = seed as u64;
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

    /// The strategy transformers would run with these settings (`_get_generation_mode`), with the
    /// options that strategy reads; an impossible combination is an error naming the fields.
    pub fn resolve(&self) -> Result<GenerationOptions> {
        if let Some(s) = &self.sampling {
            s.validate()?;
        }
        self.beam.validate(self.sampling.is_some())?;
        if self.beam.num_beams > 1 && (self.contrastive.is_some() || self.dola_layers.is_some()) {
            let other = if self.contrastive.is_some() { "penalty_alpha" } else { "dola_layers" };
            return Err(Error::invalid("num_beams", format!("beam search does not combine with {other}")));
        }
        if self.contrastive.is_some() && self.dola_layers.is_some() {
            return Err(Error::invalid("dola_layers", "DoLa does not combine with contrastive search (penalty_alpha)"));
        }
        if self.beam.num_beams > 1 && (!self.stop_strings.is_empty() || self.brace_matching.is_some()) {
            return Err(Error::invalid(
                "num_beams",
                "stop strings and brace matching apply to one sequence, not to beams",
            ));
        }
        self.processors.validate()?;
        let strategy = if self.beam.num_beams > 1 {
            Strategy::Beam(self.beam.clone())
        } else if let (Some(contrastive), None) = (self.contrastive, &self.sampling) {
            Strategy::Contrastive(contrastive)
        } else if let Some(layers) = &self.dola_layers {
            Strategy::Dola(DolaOptions {
                layers: layers.clone(),
                sampling: self.sampling.clone(),
                num_return_sequences: self.beam.num_return_sequences,
            })
        } else if let Some(sampling) = &self.sampling {
            Strategy::Sample(SampleOptions {
                sampling: sampling.clone(),
                num_return_sequences: self.beam.num_return_sequences,
            })
        } else {
            Strategy::Greedy
        };
        Ok(GenerationOptions {
            max_new_tokens: self.max_new_tokens,
            min_new_tokens: self.min_new_tokens,
            eos_token_ids: self.eos_token_ids.clone(),
            processors: self.processors.clone(),
            stop_strings: self.stop_strings.clone(),
            brace_matching: self.brace_matching,
            strategy,
        })
    }
}
