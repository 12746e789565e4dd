//! Encoders and classifiers: a BERT checkpoint opened as an [`Encoder`], its tokenizer turning texts
//! and pairs into ids and token types, batched forward passes (hidden states, attention maps, head
//! masks) and `BertForSequenceClassification`'s labels and probabilities.
//!
//! Owns: [`Encoder`], [`LoadedEncoder`], [`EncoderInput`], [`EncoderRequest`], [`EncoderOutput`],
//! [`Classification`]. The forward pass itself is `model/bert.rs`. Imports: `model`, `backend`, `io`.
//!
//! ```
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/bert/bert-classifier");
//! let loaded = layerwise::encoder::load(dir)?;
//! let texts = [loaded.encode("i feel so happy today", None)?, loaded.encode("i hate this rain", None)?];
//! let results = loaded.encoder.classify(&texts)?;
//! assert_eq!(loaded.encoder.labels(), ["sadness", "joy", "anger"]);
//! assert_eq!(results[0].label, "joy");
//! assert!((results[1].probs.iter().sum::<f32>() - 1.0).abs() < 1e-5);
//! # Ok::<(), layerwise::Error>(())
//! ```

use crate::backend::{Backend, Cpu, Layout, StepLayout};
use crate::error::{Error, Result};
use crate::io;
use crate::io::source::ModelFiles;
use crate::io::tokenizer::Tokenizer;
use crate::model::bert::{Bert, EncoderStep, Watch};
use crate::model::config::{Architecture, Details, ModelSpec};
use crate::model::layers::Linear;
use crate::model::probes::HeadScales;
use crate::model::HeadMask;

/// transformers' tokenizers truncate BERT's inputs to 512 tokens (`model_max_length`); a checkpoint
/// with fewer positions truncates to those.
pub const MAX_INPUT_TOKENS: usize = 512;

/// One text (or pair of texts) as the encoder reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncoderInput {
    pub ids: Vec<u32>,
    /// The token type of each id: 0 for the first text, 1 for the second of a pair.
    pub types: Vec<u32>,
}

impl EncoderInput {
    /// Ids with every token of type 0.
    pub fn from_ids(ids: Vec<u32>) -> Self {
        let types = vec![0; ids.len()];
        EncoderInput { ids, types }
    }
}

/// What a forward pass should return besides the last hidden state.
#[derive(Clone, Debug, Default)]
pub struct EncoderRequest {
    /// Every hidden state (embeddings, then each block's output).
    pub hidden_states: bool,
    /// Every block's attention probabilities.
    pub attentions: bool,
    /// The classifier's logits.
    pub logits: bool,
    /// Heads to mask or scale (transformers' `head_mask`).
    pub head_mask: Option<HeadMask>,
}

/// What a forward pass returned for one input, on the host, row-major.
#[derive(Clone, Debug, Default)]
pub struct EncoderOutput {
    /// Tokens of the input.
    pub tokens: usize,
    /// `[layers + 1]` matrices `[tokens, hidden]` when requested (the last is `last_hidden_state`).
    pub hidden_states: Vec<Vec<f32>>,
    /// `[layers]` arrays `[heads, tokens, tokens]` when requested.
    pub attentions: Vec<Vec<f32>>,
    /// `[labels]` when requested.
    pub logits: Option<Vec<f32>>,
}

/// A classifier's verdict on one input.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Classification {
    /// The most probable label's name (`id2label`).
    pub label: String,
    /// Its index.
    pub index: usize,
    /// One probability per label: the softmax of the logits, or each label's sigmoid for a
    /// multi-label or one-label checkpoint (as transformers' text-classification pipeline).
    pub probs: Vec<f32>,
}

/// A loaded encoder: its spec, the body and, where the checkpoint has them, the classifier.
pub struct Encoder<B: Backend = Cpu> {
    spec: ModelSpec,
    backend: B,
    body: Bert<B>,
    classifier: Option<Linear<B>>,
    labels: Vec<String>,
    multi_label: bool,
}

/// An encoder checkpoint opened with its tokenizer.
pub struct LoadedEncoder<B: Backend = Cpu> {
    pub encoder: Encoder<B>,
    pub tokenizer: Option<Tokenizer>,
    pub files: ModelFiles,
}

/// Opens an encoder checkpoint (a directory or a Hub id) on the CPU.
pub fn load(source: &str) -> Result<LoadedEncoder<Cpu>> {
    load_on(source, Cpu::default())
}

/// Opens an encoder checkpoint on the given backend.
pub fn load_on<B: Backend>(source: &str, backend: B) -> Result<LoadedEncoder<B>> {
    let files = ModelFiles::resolve(source)?;
    let spec = ModelSpec::from_file(&files.config)?;
    let weights = io::open_weights(&files.weights)?;
    let multi_label = problem_is_multi_label(&files.config)?;
    let encoder = Encoder::load(spec, &weights, backend, multi_label)?;
    let tokenizer = Tokenizer::load(&files.tokenizer)?;
    Ok(LoadedEncoder { encoder, tokenizer, files })
}

/// `problem_type: multi_label_classification` in the config (read apart: only classifiers have it).
fn problem_is_multi_label(config: &std::path::Path) -> Result<bool> {
    let text = io::read_config_file(config)?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::bad_file(config, format!("not valid JSON: {e}")))?;
    Ok(value.get("problem_type").and_then(|v| v.as_str()) == Some("multi_label_classification"))
}

impl<B: Backend> LoadedEncoder<B> {
    /// The ids and token types of a text, or a pair, as the checkpoint's tokenizer makes them
    /// (`[CLS] first [SEP] second [SEP]`), truncated to the model's positions (at most
    /// [`MAX_INPUT_TOKENS`]), the longer part first.
    pub fn encode(&self, first: &str, second: Option<&str>) -> Result<EncoderInput> {
        let tokenizer = self.tokenizer.as_ref().ok_or_else(|| Error::MissingFile {
            path: self.files.dir.clone(),
            what: "the checkpoint has no tokenizer (tokenizer.json or vocab.txt)".into(),
        })?;
        let max = self.encoder.spec.max_positions.min(MAX_INPUT_TOKENS);
        let (ids, types) = tokenizer.encode_pair(first, second, max)?;
        Ok(EncoderInput { ids, types })
    }
}

impl<B: Backend> Encoder<B> {
    /// Builds the encoder described by `spec` from `weights`; `multi_label` scores labels with
    /// sigmoids instead of one softmax.
    pub fn load(spec: ModelSpec, weights: &io::weights::Weights, backend: B, multi_label: bool) -> Result<Self> {
        let Details::Bert { labels, .. } = &spec.details else {
            return Err(Error::invalid(
                "model",
                format!("{:?} is not an encoder; encoders are bert checkpoints", spec.architecture),
            ));
        };
        debug_assert_eq!(spec.architecture, Architecture::Bert);
        if !backend.bidirectional_attention() {
            return Err(Error::invalid(
                "device",
                format!(
                    "the {} backend has no bidirectional attention, which encoders need; use the CPU",
                    backend.name()
                ),
            ));
        }
        let body = Bert::load(&backend, weights, &spec)?;
        let (classifier, labels) = if weights.contains("classifier.weight") {
            let rows = weights.get("classifier.weight")?.shape().first().copied().unwrap_or(0);
            let names =
                if labels.is_empty() { (0..rows).map(|i| format!("LABEL_{i}")).collect() } else { labels.clone() };
            let classifier =
                Linear::load(&backend, weights, "classifier", (names.len(), spec.hidden_size), Layout::OutIn, true)?;
            (Some(classifier), names)
        } else {
            (None, labels.clone())
        };
        Ok(Encoder { spec, backend, body, classifier, labels, multi_label })
    }

    /// The checkpoint's dimensions and options.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The backend the encoder runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The classifier's labels in index order (`id2label`); empty without a classifier.
    pub fn labels(&self) -> &[String] {
        if self.classifier.is_some() {
            &self.labels
        } else {
            &[]
        }
    }

    fn check(&self, batch: &[EncoderInput]) -> Result<()> {
        let Details::Bert { type_vocab_size, .. } = self.spec.details else { unreachable!("an encoder's spec") };
        if batch.is_empty() {
            return Err(Error::invalid("inputs", "the batch is empty"));
        }
        for (i, input) in batch.iter().enumerate() {
            let what = format!("input {i}");
            if input.ids.is_empty() {
                return Err(Error::invalid(what, "has no tokens"));
            }
            if input.ids.len() != input.types.len() {
                return Err(Error::invalid(
                    what,
                    format!("{} ids but {} token types", input.ids.len(), input.types.len()),
                ));
            }
            if input.ids.len() > self.spec.max_positions {
                return Err(Error::invalid(
                    what,
                    format!("{} tokens exceed the model's {} positions", input.ids.len(), self.spec.max_positions),
                ));
            }
            if let Some(id) = input.ids.iter().find(|&&id| id as usize >= self.spec.vocab_size) {
                return Err(Error::invalid(
                    what,
                    format!("token id {id} is outside the vocabulary (size {})", self.spec.vocab_size),
                ));
            }
            if let Some(t) = input.types.iter().find(|&&t| t as usize >= type_vocab_size) {
                return Err(Error::invalid(what, format!("token type {t} is outside 0..{type_vocab_size}")));
            }
        }
        Ok(())
    }

    /// Runs `batch` through the encoder in one step and returns what `request` asks for, per input.
    /// Inputs are not padded: each sees only its own tokens, as under transformers' `attention_mask`.
    pub fn forward(&self, batch: &[EncoderInput], request: &EncoderRequest) -> Result<Vec<EncoderOutput>> {
        self.check(batch)?;
        if request.logits && self.classifier.is_none() {
            return Err(self.no_classifier());
        }
        let b = &self.backend;
        let spec = &self.spec;
        let layout = StepLayout::whole_sequences(batch.iter().map(|input| input.ids.as_slice()));
        let types =
            StepLayout { ids: batch.iter().flat_map(|input| input.types.iter().copied()).collect(), ..layout.clone() };
        let step = EncoderStep {
            tokens: b.upload_step(layout.clone())?,
            types: b.upload_step(types)?,
            sequences: batch.len(),
        };
        let mut kv = b.kv_store(spec.num_layers.max(1), batch.len(), layout.block_size, spec.hidden_size)?;
        let scales = request.head_mask.as_ref().map(|mask| HeadScales::new(b, mask, spec)).transpose()?;

        let mut outputs: Vec<EncoderOutput> =
            batch.iter().map(|input| EncoderOutput { tokens: input.ids.len(), ..Default::default() }).collect();
        let mut collect = Collect { backend: b, request, outputs: &mut outputs, hidden: spec.hidden_size };
        let last = self.body.forward(b, &step, &mut kv, scales.as_ref(), &mut collect)?;
        if request.logits {
            for (output, logits) in outputs.iter_mut().zip(self.logits(&last, &step)?) {
                output.logits = Some(logits);
            }
        }
        Ok(outputs)
    }

    /// The classifier's logits of each sequence of the step: `classifier(tanh(pooler(first token)))`.
    fn logits(&self, last: &B::Tensor, step: &EncoderStep<B>) -> Result<Vec<Vec<f32>>> {
        let b = &self.backend;
        let classifier = self.classifier.as_ref().ok_or_else(|| self.no_classifier())?;
        let pooled = self.body.pool(b, last, step)?.ok_or_else(|| {
            Error::invalid("model", "the checkpoint has a classifier but no pooler (bert.pooler.dense)")
        })?;
        // The pooled rows are one per input: the tanh runs on the host, where it is cheap.
        let (rows, cols) = b.shape(&pooled);
        let mut pooled = b.to_host(&pooled)?;
        pooled.iter_mut().for_each(|v| *v = v.tanh());
        let logits = b.to_host(&classifier.forward(b, &b.upload(pooled, rows, cols)?)?)?;
        Ok(logits.chunks_exact(self.labels.len()).map(<[f32]>::to_vec).collect())
    }

    /// Each input's label and probabilities.
    pub fn classify(&self, batch: &[EncoderInput]) -> Result<Vec<Classification>> {
        let request = EncoderRequest { logits: true, ..Default::default() };
        self.forward(batch, &request)?
            .into_iter()
            .map(|output| Ok(self.verdict(&output.logits.unwrap_or_default())))
            .collect()
    }

    /// Probabilities and the winning label of one row of logits.
    pub fn verdict(&self, logits: &[f32]) -> Classification {
        let probs = if self.multi_label || logits.len() == 1 {
            logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect()
        } else {
            let mut probs = logits.to_vec();
            crate::math::softmax_in_place(&mut probs);
            probs
        };
        let index = crate::math::argmax(&probs) as usize;
        Classification { label: self.labels[index].clone(), index, probs }
    }

    fn no_classifier(&self) -> Error {
        Error::invalid("model", "the checkpoint has no classification head (classifier.weight): it is a bare encoder")
    }
}

/// Copies what the request asks for off the backend as the forward pass goes.
struct Collect<'a, B: Backend> {
    backend: &'a B,
    request: &'a EncoderRequest,
    outputs: &'a mut [EncoderOutput],
    hidden: usize,
}

impl<B: Backend> Watch<B> for Collect<'_, B> {
    fn hidden(&mut self, _layer: usize, x: &B::Tensor) -> Result<()> {
        if self.request.hidden_states {
            let host = self.backend.to_host(x)?;
            let mut rows = host.chunks_exact(self.hidden);
            for output in self.outputs.iter_mut() {
                output.hidden_states.push(rows.by_ref().take(output.tokens).flatten().copied().collect());
            }
        }
        Ok(())
    }

    fn wants_attention(&self, _layer: usize) -> bool {
        self.request.attentions
    }

    fn attention(&mut self, _layer: usize, seq: usize, probs: Vec<f32>) {
        self.outputs[seq].attentions.push(probs);
    }
}
