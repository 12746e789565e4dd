//! One error type for the whole engine. Every variant names what was wrong (a file, a tensor, a config
//! field, an option) so that the caller can show it to a person without further context.

use std::path::PathBuf;

/// Result type of the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or mapping a file failed.
    // The I/O error is part of the message, not a separate `source`: a chain printer (anyhow's
    // `{:#}`) would repeat it.
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
    /// A file the model needs is absent; `what` says which, as a phrase ("config.json not found").
    #[error("{path}: {what}")]
    MissingFile { path: PathBuf, what: String },
    /// A file exists but its contents cannot be used (corrupt, truncated, wrong format).
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    /// config.json (or a sibling file) has a field that is missing, malformed or unsupported.
    #[error("{path}: field `{field}`: {reason}")]
    Config { path: PathBuf, field: String, reason: String },
    /// The checkpoint's `model_type` is not one the engine implements.
    #[error("{path}: unsupported model_type `{model_type}` (supported: gpt2, gpt_neo, llama)")]
    UnknownArchitecture { path: PathBuf, model_type: String },
    /// A tensor the architecture needs is absent from the checkpoint.
    #[error("tensor `{name}` not found in {files}")]
    MissingTensor { name: String, files: String },
    /// A tensor has the wrong shape or dtype.
    #[error("tensor `{name}` in {path}: {reason}")]
    BadTensor { name: String, path: PathBuf, reason: String },
    /// The caller asked for something the model or options cannot do (bad token id, exit the
    /// checkpoint lacks, prompt longer than the context, ...). `what` names the argument.
    #[error("{what}: {reason}")]
    InvalidArgument { what: String, reason: String },
    /// Resolving a Hugging Face Hub id failed.
    #[error("model `{repo}`: {reason}")]
    Hub { repo: String, reason: String },
    /// A backend's device or driver failed (an allocation, a copy, a kernel launch).
    #[error("{backend}: {reason}")]
    Backend { backend: String, reason: String },
    /// The tokenizer could not be loaded or failed on an input.
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    /// The model computed NaN or an infinity: `row` of a step's scores failed the finite check;
    /// `what` says so and, from the decoder, where the first non-finite value appeared.
    #[error("{what}")]
    NonFinite { row: usize, what: String },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), cause: source }
    }

    pub(crate) fn bad_file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::BadFile { path: path.into(), reason: reason.into() }
    }

    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { what: what.into(), reason: reason.into() }
    }
}
