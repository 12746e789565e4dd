//! Loading: where a checkpoint's files are (a local directory or a Hub id), its weights (safetensors
//! mapped in place, torch `.bin` archives converted once), and its tokenizer; text datasets and record datasets (rows of columns).
//!
//! Owns: files and bytes. Imports: `error` only.

pub mod documents;
pub mod records;
pub mod source;
pub mod tokenizer;
pub mod torch_pickle;
pub mod weights;

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use source::WeightFiles;
use weights::Weights;

/// The largest text file read whole (tokenizer files, `--texts`): the largest real tokenizer.json
/// is tens of MB.
pub const MAX_TEXT_FILE_BYTES: u64 = 256 << 20;

/// The largest JSON config read whole (config.json, generation_config.json, tokenizer_config.json,
/// shard indexes, head masks): real ones are kilobytes, a large model's index a few hundred.
pub const MAX_CONFIG_FILE_BYTES: u64 = 16 << 20;

/// Reads a text file of at most [`MAX_TEXT_FILE_BYTES`], so that a wrong path (`/dev/zero`, a
/// weights file) is an error naming it, not a read until memory runs out.
pub fn read_text(path: &Path) -> std::io::Result<String> {
    read_text_at_most(path, MAX_TEXT_FILE_BYTES, "not a text or tokenizer file")
}

/// Reads a JSON config of at most [`MAX_CONFIG_FILE_BYTES`] (see [`read_text`]).
pub fn read_config(path: &Path) -> std::io::Result<String> {
    read_text_at_most(path, MAX_CONFIG_FILE_BYTES, "not a JSON config")
}

/// The bytes of a file of at most `limit` bytes: a regular file's size is checked before reading; a
/// stream (a device, a pipe) is read up to the limit.
pub fn read_bytes_at_most(path: &Path, limit: u64, what: &str) -> std::io::Result<Vec<u8>> {
    let too_large =
        || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("larger than {} MiB: {what}", limit >> 20));
    let file = std::fs::File::open(path)?;
    if file.metadata().is_ok_and(|m| m.is_file() && m.len() > limit) {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(bytes)
}

fn read_text_at_most(path: &Path, limit: u64, what: &str) -> std::io::Result<String> {
    String::from_utf8(read_bytes_at_most(path, limit, what)?)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// [`read_config`] with the error naming `path`.
pub(crate) fn read_config_file(path: &Path) -> Result<String> {
    read_config(path).map_err(|e| Error::io(path, e))
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

/// Where derived files are kept (converted torch archives, 8-bit weights): `$LAYERWISE_CACHE`, else `$XDG_CACHE_HOME/layerwise`, else
/// `~/.cache/layerwise`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LAYERWISE_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("layerwise")
}

pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}
