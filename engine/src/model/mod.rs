//! Models: one file per architecture, each a short forward pass written with the backend's ops,
//! and what all of them share: the registry that picks an architecture from its config
//! ([`Model::load`]), the shared layers ([`layers`]), the probes analysis reads through
//! ([`probes`]), the one forward runner ([`forward`]) and the heads that turn states into scores
//! ([`heads`]: LM head, exit heads, conversion matrices, plan outputs).
//!
//! Owns: [`Model`], [`ModelSpec`](config::ModelSpec), points and head masks. Imports: `backend`,
//! `io`, `exits` (plans), `math`.

pub(crate) mod bert;
pub mod config;
mod finite;
pub mod forward;
mod gpt2;
mod gpt_neo;
pub mod heads;
pub(crate) mod layers;
mod llama;
pub mod probes;

use std::collections::BTreeMap;

use crate::backend::{Backend, Layout};
use crate::error::{Error, Result};
use crate::io::weights::Weights;
use config::{Architecture, ModelSpec};
use layers::Norm;
use probes::Probe;

pub use forward::{ForwardOutput, ForwardRequest, InspectRequest, Inspection};
pub use probes::{BlockPart, HeadMask, Point, Site};

/// What an architecture file provides: the embedding, a block's two residual sub-layers, the final
/// norm. The runner in [`forward`] composes them.
pub(crate) trait Transformer<B: Backend>: Send + Sync {
    /// Token (and, where the architecture has them, position) embeddings of the step: `[t, hidden]`.
    fn embed(&self, b: &B, step: &B::Step) -> Result<B::Tensor>;
    /// `x + attention(norm_1(x))` of block `layer` (0-based) on the residual stream `x: [t, hidden]`;
    /// its keys and values go to the step's cache slots.
    fn attention_sublayer(
        &self,
        b: &B,
        layer: usize,
        x: B::Tensor,
        step: &B::Step,
        kv: &mut B::KvStore,
        probe: &mut dyn Probe<B>,
    ) -> Result<B::Tensor>;
    /// `x + mlp(norm_2(x))` of block `layer`.
    fn mlp_sublayer(&self, b: &B, layer: usize, x: B::Tensor, probe: &mut dyn Probe<B>) -> Result<B::Tensor>;
    /// The norm applied after the last block (`ln_f` / `norm`); exits reuse it.
    fn final_norm(&self) -> &Norm<B>;
    /// Bytes of weights block `layer` reads per step.
    fn block_bytes(&self, b: &B, layer: usize) -> usize;
    /// The checkpoint's module names, for naming points inside the forward pass.
    fn names(&self) -> &'static ModuleNames;
}

/// How a checkpoint names its modules (transformers' attribute names): `{blocks}.{i}.{norm_1}` etc.
#[derive(Debug)]
pub struct ModuleNames {
    pub blocks: &'static str,
    pub norm_1: &'static str,
    pub attention: &'static str,
    pub norm_2: &'static str,
    pub mlp: &'static str,
    pub final_norm: &'static str,
}

/// GPT-2 and GPT-Neo: `h.{i}.ln_1`, `h.{i}.attn`, `h.{i}.ln_2`, `h.{i}.mlp`, `ln_f`.
pub(crate) static GPT_NAMES: ModuleNames =
    ModuleNames { blocks: "h", norm_1: "ln_1", attention: "attn", norm_2: "ln_2", mlp: "mlp", final_norm: "ln_f" };

/// A loaded model: its spec, its architecture's weights, the LM head, exit heads and conversions.
pub struct Model<B: Backend> {
    spec: ModelSpec,
    backend: B,
    body: Box<dyn Transformer<B>>,
    lm_head: B::Weight,
    exit_heads: BTreeMap<usize, B::Weight>,
    /// `name_to_conv_matrix.{L}_to_{N}`: hidden -> hidden, for the converted projection.
    conversions: BTreeMap<usize, B::Weight>,
}

impl<B: Backend> Model<B> {
    /// Builds the model described by `spec` from `weights` (the registry: the architecture named in
    /// the config picks its file). Weights stay where they are (mapped files on the CPU); nothing is
    /// read beyond shapes.
    pub fn load(spec: ModelSpec, weights: &Weights, backend: B) -> Result<Self> {
        let body: Box<dyn Transformer<B>> = match spec.architecture {
            Architecture::Gpt2 => Box::new(gpt2::Gpt2::load(&backend, weights, &spec)?),
            Architecture::GptNeo => Box::new(gpt_neo::GptNeo::load(&backend, weights, &spec)?),
            Architecture::Llama => Box::new(llama::Llama::load(&backend, weights, &spec)?),
            Architecture::Bert => return Err(bert::not_a_decoder(&spec)),
        };
        let vocab_by_hidden = [spec.vocab_size, spec.hidden_size];
        let lm_head = if weights.contains("lm_head.weight") || !spec.tie_word_embeddings {
            weights.get_shaped("lm_head.weight", &vocab_by_hidden)?.clone()
        } else {
            // Tied: the embedding's vocabulary rows (virtual tokens of an adapter follow them).
            weights
                .get_shaped(embedding_name(&spec, weights), &[spec.embedding_rows(), spec.hidden_size])?
                .rows(spec.vocab_size)
        };
        let lm_head = backend.weight(&lm_head, Layout::OutIn)?;
        let mut exit_heads = BTreeMap::new();
        for &layer in &spec.exit_layers {
            let tensor = weights.get_shaped(&exit_head_name(layer), &vocab_by_hidden)?;
            exit_heads.insert(layer, backend.weight(tensor, Layout::OutIn)?);
        }
        let mut conversions = BTreeMap::new();
        for layer in 1..spec.num_layers {
            let name = conversion_name(layer, spec.num_layers);
            if weights.contains(&name) {
                let tensor = weights.get_shaped(&name, &[spec.hidden_size, spec.hidden_size])?;
                conversions.insert(layer, backend.weight(tensor, Layout::OutIn)?);
            }
        }
        Ok(Model { spec, backend, body, lm_head, exit_heads, conversions })
    }

    /// The checkpoint's dimensions and options.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Layers that have a conversion matrix to the top layer.
    pub fn conversion_layers(&self) -> Vec<usize> {
        self.conversions.keys().copied().collect()
    }

    /// The checkpoint's module names.
    pub fn module_names(&self) -> &'static ModuleNames {
        self.body.names()
    }

    /// Checks a token id against the vocabulary; `what` names the argument in the error.
    pub fn check_token(&self, id: u32, what: &str) -> Result<()> {
        if id as usize >= self.spec.vocab_size {
            return Err(Error::invalid(
                what,
                format!("token id {id} is outside the vocabulary (size {})", self.spec.vocab_size),
            ));
        }
        Ok(())
    }

    /// Checks token ids against the vocabulary and the length against the context.
    pub fn check_prompt(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::invalid("prompt", "is empty"));
        }
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= self.spec.vocab_size) {
            return Err(Error::invalid(
                "prompt",
                format!("token id {id} at position {i} is outside the vocabulary (size {})", self.spec.vocab_size),
            ));
        }
        if ids.len() + self.spec.virtual_tokens > self.spec.max_positions {
            let virtual_tokens = match self.spec.virtual_tokens {
                0 => String::new(),
                n => format!(" (with the adapter's {n} virtual tokens)"),
            };
            return Err(Error::invalid(
                "prompt",
                format!(
                    "{} tokens{virtual_tokens} exceed the model's context of {} positions",
                    ids.len() + self.spec.virtual_tokens,
                    self.spec.max_positions
                ),
            ));
        }
        Ok(())
    }

    /// The ids of a prompt-tuning adapter's virtual tokens (empty without one): the decoder puts
    /// them before every prompt.
    pub fn virtual_prefix(&self) -> Vec<u32> {
        (self.spec.vocab_size..self.spec.embedding_rows()).map(|id| id as u32).collect()
    }
}

/// The checkpoint name of the exit head at `layer` (upstream autocontrastive-gen format).
pub fn exit_head_name(layer: usize) -> String {
    format!("name_to_lm_exit_head.lm_head_{layer}.weight")
}

/// The checkpoint name of the conversion matrix from `layer` to the top layer `num_layers`.
pub fn conversion_name(layer: usize, num_layers: usize) -> String {
    format!("name_to_conv_matrix.{layer}_to_{num_layers}.weight")
}

pub(crate) fn embedding_name(spec: &ModelSpec, weights: &Weights) -> &'static str {
    let candidates: &[&'static str] = match spec.architecture {
        Architecture::Gpt2 | Architecture::GptNeo => &["transformer.wte.weight", "wte.weight"],
        Architecture::Llama => &["model.embed_tokens.weight", "embed_tokens.weight"],
        Architecture::Bert => &["bert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight"],
    };
    candidates.iter().copied().find(|name| weights.contains(name)).unwrap_or(candidates[0])
}

/// The prefix under which a base model's tensors live: checkpoints saved from `*LMHeadModel` use
/// `transformer.` / `model.`, those saved from the bare model (e.g. the original `gpt2`) use none.
pub(crate) fn base_prefix(weights: &Weights, with_prefix: &'static str, probe: &str) -> &'static str {
    if weights.contains(&format!("{with_prefix}{probe}")) || !weights.contains(probe) {
        with_prefix
    } else {
        ""
    }
}
