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

pub mod backend;
pub mod beam;
pub mod config;
pub mod contrastive;
pub mod decoder;
pub mod dola;
pub mod error;
pub mod exits;
pub mod generate;
pub mod heads;
pub mod inspect;
pub mod kv;
pub mod lens;
pub mod model;
pub mod plot;
pub mod processors;
pub mod source;
pub mod stopping;
pub mod tokenizer;
pub mod torch_pickle;
pub mod weights;

pub use backend::{Backend, Cpu};
pub use config::{Architecture, ModelSpec};
pub use error::{Error, Result};
pub use model::{ForwardOutput, ForwardRequest, Model};
pub use source::{ModelFiles, TokenizerFiles, WeightFiles};
pub use tokenizer::Tokenizer;
pub use weights::{DType, Weights, WeightsSummary};

/// A checkpoint opened for inference: the model on its backend, its tokenizer, and where it came from.
pub struct LoadedModel<B: Backend = Cpu> {
    pub model: Model<B>,
    pub tokenizer: Option<Tokenizer>,
    pub files: ModelFiles,
    /// What the weight files hold (counts, bytes, dtypes).
    pub weights: WeightsSummary,
}

impl<B: Backend> LoadedModel<B> {
    /// Token ids of `text`; an error if the checkpoint ships no tokenizer.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer()?.encode(text)
    }

    /// Text of `ids`; an error if the checkpoint ships no tokenizer.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer()?.decode(ids)
    }

    fn tokenizer(&self) -> Result<&Tokenizer> {
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
pub fn load_on<B: Backend>(source: &str, backend: B) -> Result<LoadedModel<B>> {
    let files = ModelFiles::resolve(source)?;
    let spec = ModelSpec::from_file(&files.config)?;
    let weights = open_weights(&files.weights)?;
    let model = Model::load(spec, &weights, backend)?;
    let tokenizer = Tokenizer::load(&files.tokenizer)?;
    Ok(LoadedModel { model, tokenizer, files, weights: weights.summary() })
}

/// Maps a checkpoint's weight files, converting torch archives to safetensors once first.
pub fn open_weights(files: &WeightFiles) -> Result<Weights> {
    match files {
        WeightFiles::Safetensors(paths) => Weights::open(paths),
        WeightFiles::TorchBin(paths) => {
            let converted = paths.iter().map(|p| torch_pickle::converted_safetensors(p)).collect::<Result<Vec<_>>>()?;
            Weights::open(&converted)
        }
    }
}
