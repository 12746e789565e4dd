//! layerwise: an inference engine for multi-exit language models.
//!
//! Checkpoints with extra "exit heads" on intermediate layers (the format of IBM's
//! `autocontrastive-gen`: `lm_head_layer_indices` in config.json, tensors
//! `name_to_lm_exit_head.lm_head_{L}.weight`) can be read at any exit; plain GPT-2, GPT-Neo and Llama
//! checkpoints load too, as models without exits.
//!
//! ```
//! use layerwise::{load, ForwardRequest};
//!
//! # fn main() -> layerwise::Result<()> {
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/demo-gpt2-multiexit");
//! let loaded = load(dir)?;
//! let ids = loaded.encode("The benefits of bad advice")?;
//! let out = loaded.model.forward(&ids, &ForwardRequest { logits: true, exits: vec![2], ..Default::default() })?;
//! let vocab = loaded.model.spec().vocab_size;
//! assert_eq!(out.logits.unwrap().len(), ids.len() * vocab);
//! assert_eq!(out.exits[&2].len(), ids.len() * vocab);
//! # Ok(())
//! # }
//! ```
//!
//! The engine's parts, one folder each (a token flows CLI -> generation -> strategy -> decoder ->
//! model -> backend ops):
//!
//! | module | owns |
//! |---|---|
//! | [`io`] | checkpoint sources, safetensors and `.bin` weights, tokenizers |
//! | [`math`] | host-side numerics shared by everything (softmax, argmax, the ACD formula) |
//! | [`backend`] | the op interface, the reference backend, the conformance suite, the CPU backend |
//! | [`model`] | the architectures, their configs, shared layers, probes, heads, the forward runner |
//! | [`exits`] | exit plans: which layer to read, how to project and contrast |
//! | [`runtime`] | the paged cache's bookkeeping and the step-by-step decoder |
//! | [`generation`] | the generation loop, its options, processors, stopping rules and strategies |
//! | [`analysis`] | the logit lens and attention-head analysis |
//! | [`evaluation`] | language-modeling scores as lm-evaluation-harness computes them (rolling perplexity, last word, all heads in one pass) and SimCTG's generation metrics |
//! | [`encoder`] | encoders and classifiers (BERT): batched forward passes, labels and probabilities |
//! | [`adapters`] | PEFT adapters (LoRA, (IA)^3, prompt tuning) applied to the weights at load |
//! | [`training`] | the CPU backward pass, AdamW and the training loop (models from scratch, exit heads, conversion matrices) |

pub mod adapters;
pub mod analysis;
pub mod backend;
pub mod encoder;
mod error;
pub mod evaluation;
pub mod exits;
pub mod generation;
pub mod io;
pub mod math;
pub mod model;
pub mod runtime;
pub mod training;

pub use backend::{Backend, Cpu, Reference};
pub use error::{Error, Result};
pub use io::source::{ModelFiles, TokenizerFiles, WeightFiles};
pub use io::tokenizer::Tokenizer;
pub use io::weights::{DType, HostTensor, Weights, WeightsSummary};
pub use model::config::{Architecture, ModelSpec};
pub use model::{ForwardOutput, ForwardRequest, HeadMask, InspectRequest, Inspection, Model, Point};

/// A checkpoint opened for inference: the model on its backend, its tokenizer, and where it came from.
pub struct LoadedModel<B: Backend = Cpu> {
    pub model: Model<B>,
    pub tokenizer: Option<Tokenizer>,
    pub files: ModelFiles,
    /// What the weight files hold (counts, bytes, dtypes).
    pub weights: WeightsSummary,
    /// The PEFT adapter applied at load, described (see [`load_adapted`]).
    pub adapter: Option<String>,
}

impl<B: Backend> LoadedModel<B> {
    /// Token ids of `text`; an error if the checkpoint ships no tokenizer.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.require_tokenizer()?.encode(text)
    }

    /// Text of `ids`; an error if the checkpoint ships no tokenizer.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.require_tokenizer()?.decode(ids)
    }

    /// The checkpoint's tokenizer; an error naming the directory if it ships none.
    pub fn require_tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| Error::MissingFile {
            path: self.files.dir.clone(),
            what:
                "the checkpoint has no tokenizer (tokenizer.json, or vocab.json + merges.txt); give token ids instead"
                    .into(),
        })
    }
}

/// Opens a checkpoint (a local directory or a Hugging Face Hub id) on the CPU.
pub fn load(source: &str) -> Result<LoadedModel<Cpu>> {
    load_on(source, Cpu::default())
}

/// Opens a checkpoint on the given backend. Weight files are mapped, not read: this is fast and
/// memory grows only with the tensors a run touches.
///
/// ```
/// # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/gpt2-sharded");
/// // The reference backend: plain Rust, one function per op; what every other backend must equal.
/// let loaded = layerwise::load_on(dir, layerwise::Reference::default())?;
/// assert_eq!(loaded.model.backend().name(), "reference");
/// # use layerwise::Backend;
/// # Ok::<(), layerwise::Error>(())
/// ```
pub fn load_on<B: Backend>(source: &str, backend: B) -> Result<LoadedModel<B>> {
    load_with(source, None, backend)
}

/// Opens a checkpoint with a PEFT adapter folder applied (LoRA and (IA)^3 merged into the weights,
/// prompt tuning's virtual tokens put before every prompt the decoder runs). See [`adapters`].
pub fn load_adapted<B: Backend>(source: &str, adapter: &std::path::Path, backend: B) -> Result<LoadedModel<B>> {
    load_with(source, Some(adapter), backend)
}

fn load_with<B: Backend>(source: &str, adapter: Option<&std::path::Path>, backend: B) -> Result<LoadedModel<B>> {
    let files = ModelFiles::resolve(source)?;
    let mut spec = ModelSpec::from_file(&files.config)?;
    let mut weights = io::open_weights(&files.weights)?;
    let summary = weights.summary();
    let adapter = match adapter {
        Some(dir) => Some(adapters::Adapter::open(dir)?.apply(&mut weights, &mut spec)?),
        None => None,
    };
    let model = Model::load(spec, &weights, backend)?;
    let tokenizer = Tokenizer::load(&files.tokenizer)?;
    Ok(LoadedModel { model, tokenizer, files, weights: summary, adapter })
}
