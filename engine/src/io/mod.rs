//! Loading: where a checkpoint's files are (a local directory or a Hub id), its weights (safetensors
//! mapped in place, torch `.bin` archives converted once), and its tokenizer.
//!
//! Owns: files and bytes. Imports: `error` only.

pub mod source;
pub mod tokenizer;
pub mod torch_pickle;
pub mod weights;

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};
use source::WeightFiles;
use weights::Weights;

/// The largest JSON or text file read whole (configs, tokenizer files, generation configs, head
/// masks, shard indexes): the largest real tokenizer.json is tens of MB.
pub const MAX_TEXT_FILE_BYTES: u64 = 256 << 20;

/// Reads a text file of at most [`MAX_TEXT_FILE_BYTES`], so that a wrong path (`/dev/zero`, a
/// weights file) is an error naming it, not a read until memory runs out.
pub fn read_text(path: &Path) -> std::io::Result<String> {
    let file = std::fs::File::open(path)?;
    let mut text = String::new();
    file.take(MAX_TEXT_FILE_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_TEXT_FILE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {} MiB: not a config or tokenizer file", MAX_TEXT_FILE_BYTES >> 20),
        ));
    }
    Ok(text)
}

/// [`read_text`] with the error naming `path`.
pub(crate) fn read_text_file(path: &Path) -> Result<String> {
    read_text(path).map_err(|e| Error::io(path, e))
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
