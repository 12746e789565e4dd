//! Loading: where a checkpoint's files are (a local directory or a Hub id), its weights (safetensors
//! mapped in place, torch `.bin` archives converted once), and its tokenizer.
//!
//! Owns: files and bytes. Imports: `error` only.

pub mod source;
pub mod tokenizer;
pub mod torch_pickle;
pub mod weights;

use crate::error::Result;
use source::WeightFiles;
use weights::Weights;

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
