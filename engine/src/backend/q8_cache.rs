//! The on-disk cache of 8-bit weights: a weight quantised once (`--dtype q8`) is kept beside the
//! converted torch archives (`$LAYERWISE_CACHE/q8/`, see [`crate::io::cache_dir`]), one small
//! safetensors file per matrix (`quants` I8 `[out, blocks * 32]`, `scales` F16 `[out, blocks]`),
//! and read back instead of quantised on the next load.
//!
//! The key is [`HostTensor::content_key`] (which file, where in it, dtype and shape: no weight byte
//! is read to make it) with the layout and the format's version; a file rewritten in place has a new
//! modification time and so a new key. A cached file is used only if it parses, records that key
//! and has the matrix's shapes; anything else is quantised again and rewritten. Tensors held in
//! memory (merged with an adapter, converted) have no key and are never cached. Files are written
//! under a temporary name and renamed, so a reader never sees half of one; a cache that cannot be
//! written costs only the time. `LAYERWISE_Q8_CACHE=0` turns the cache off; deleting the folder is
//! always safe.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::f16;

use super::q8::{Q8Matrix, BLOCK};
use super::Layout;
use crate::io::weights::HostTensor;

/// Bumped whenever the quantisation or the file's layout changes (old files are then not found).
const FORMAT_VERSION: u32 = 1;
/// The metadata entry recording the key a file was written for.
const KEY_ENTRY: &str = "layerwise.q8_key";

/// The cache folder, unless turned off with `LAYERWISE_Q8_CACHE=0`.
pub fn q8_cache_dir() -> Option<PathBuf> {
    let off = std::env::var_os("LAYERWISE_Q8_CACHE").is_some_and(|v| v == "0");
    (!off).then(|| crate::io::cache_dir().join("q8"))
}

/// `tensor` (logical `[out, in]`, stored in `layout`) in 8-bit blocks: read from the cache in `dir`
/// when it holds this tensor, else quantised (and then stored there).
pub fn quantize_cached(
    dir: Option<&Path>,
    tensor: &HostTensor,
    layout: Layout,
    out_features: usize,
    in_features: usize,
) -> Q8Matrix {
    let quantize = || Q8Matrix::quantize(tensor.data(), layout, out_features, in_features);
    let (Some(dir), Some(content)) = (dir, tensor.content_key()) else { return quantize() };
    let described = format!("{content:016x} {layout:?} {out_features} {in_features} v{FORMAT_VERSION}");
    let key = format!("{:016x}", crate::io::fnv1a(described.as_bytes()));
    let path = dir.join(format!("{key}.safetensors"));
    if let Some(cached) = read(&path, &key, out_features, in_features) {
        return cached;
    }
    let matrix = quantize();
    // Best effort: a cache that cannot be written only costs the quantisation next time.
    let _ = write(dir, &path, &key, &matrix);
    matrix
}

/// The matrix cached at `path`, if it is a complete file for `key` with the expected shapes.
fn read(path: &Path, key: &str, out_features: usize, in_features: usize) -> Option<Q8Matrix> {
    let bytes = std::fs::read(path).ok()?;
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
    if metadata.metadata().as_ref().and_then(|m| m.get(KEY_ENTRY)).map(String::as_str) != Some(key) {
        return None;
    }
    // Checks that every tensor lies inside the file: a truncated file is not used.
    let file = safetensors::SafeTensors::deserialize(&bytes).ok()?;
    let blocks = in_features.div_ceil(BLOCK);
    let quants = file.tensor("quants").ok()?;
    let scales = file.tensor("scales").ok()?;
    let shapes_match = quants.dtype() == safetensors::Dtype::I8
        && quants.shape() == [out_features, blocks * BLOCK]
        && scales.dtype() == safetensors::Dtype::F16
        && scales.shape() == [out_features, blocks];
    if !shapes_match {
        return None;
    }
    let quants: Vec<i8> = quants.data().iter().map(|&b| b as i8).collect();
    let scales: Vec<f16> = scales.data().chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect();
    Some(Q8Matrix { out_features, in_features, blocks, quants, scales })
}

/// Writes `matrix` to `path` (through a temporary file in `dir`).
fn write(dir: &Path, path: &Path, key: &str, matrix: &Q8Matrix) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let quants: Vec<u8> = matrix.quants.iter().map(|&q| q as u8).collect();
    let scales: Vec<u8> = matrix.scales.iter().flat_map(|s| s.to_le_bytes()).collect();
    let width = matrix.blocks * BLOCK;
    let views = [
        (
            "quants",
            safetensors::tensor::TensorView::new(safetensors::Dtype::I8, vec![matrix.out_features, width], &quants)?,
        ),
        (
            "scales",
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F16,
                vec![matrix.out_features, matrix.blocks],
                &scales,
            )?,
        ),
    ];
    // Unique per process and call: threads quantise different weights at once.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let partial = dir.join(format!("{key}.{}-{call}.partial", std::process::id()));
    let metadata = HashMap::from([(KEY_ENTRY.to_string(), key.to_string())]);
    let written = safetensors::serialize_to_file(views, Some(metadata), &partial)
        .map_err(|e| e.into())
        .and_then(|()| std::fs::rename(&partial, path).map_err(|e| e.into()));
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::test_values;
    use crate::io::weights::{DType, Weights};

    /// A checkpoint file with one `[in, out]` f32 matrix, opened.
    fn checkpoint(dir: &Path, values: &[f32], shape: [usize; 2]) -> Weights {
        let tensor = HostTensor::from_f32(values.to_vec(), shape.to_vec());
        let path = dir.join("model.safetensors");
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), tensor.bytes())
            .expect("view");
        safetensors::serialize_to_file([("w", view)], None, &path).expect("write");
        Weights::open(&[path]).expect("open")
    }

    fn same(a: &Q8Matrix, b: &Q8Matrix) -> bool {
        (a.out_features, a.in_features, a.blocks) == (b.out_features, b.in_features, b.blocks)
            && a.quants == b.quants
            && a.scales == b.scales
    }

    fn cached_files(dir: &Path) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        let mut files: Vec<PathBuf> = entries.map(|e| e.expect("entry").path()).collect();
        files.sort();
        files
    }

    #[test]
    fn a_quantised_weight_is_read_back_from_the_cache() {
        let root = tempfile::tempdir().expect("tempdir");
        let cache = root.path().join("q8");
        let (inputs, outputs) = (70, 5); // a partial last block
        let weights = checkpoint(root.path(), &test_values(inputs * outputs, 3), [inputs, outputs]);
        let tensor = weights.get("w").expect("w");
        let plain = Q8Matrix::quantize(tensor.data(), Layout::InOut, outputs, inputs);
        let first = quantize_cached(Some(&cache), tensor, Layout::InOut, outputs, inputs);
        assert!(same(&first, &plain));
        let files = cached_files(&cache);
        assert_eq!(files.len(), 1, "one file per matrix, no partial file left: {files:?}");
        // The second load reads the file: a quant changed in it comes back (safetensors puts the
        // I8 tensor last, after the F16 one).
        let mut bytes = std::fs::read(&files[0]).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&files[0], &bytes).expect("write");
        let second = quantize_cached(Some(&cache), tensor, Layout::InOut, outputs, inputs);
        assert_eq!(second.scales, plain.scales);
        assert_ne!(second.quants, plain.quants, "read from the file, not quantised again");
        // Another layout is another entry.
        quantize_cached(Some(&cache), tensor, Layout::OutIn, inputs, outputs);
        assert_eq!(cached_files(&cache).len(), 2);
    }

    #[test]
    fn a_damaged_or_stale_cache_file_is_quantised_again() {
        let root = tempfile::tempdir().expect("tempdir");
        let cache = root.path().join("q8");
        let weights = checkpoint(root.path(), &test_values(64 * 8, 1), [64, 8]);
        let tensor = weights.get("w").expect("w");
        let plain = Q8Matrix::quantize(tensor.data(), Layout::InOut, 8, 64);
        quantize_cached(Some(&cache), tensor, Layout::InOut, 8, 64);
        let file = cached_files(&cache).remove(0);
        // Truncated: not used, rewritten.
        let bytes = std::fs::read(&file).expect("read");
        std::fs::write(&file, &bytes[..bytes.len() - 10]).expect("truncate");
        assert!(same(&quantize_cached(Some(&cache), tensor, Layout::InOut, 8, 64), &plain));
        assert_eq!(std::fs::read(&file).expect("read").len(), bytes.len(), "rewritten whole");
        // Written for another key (a copy under this name): not used.
        let mut foreign = std::fs::read(&file).expect("read");
        let key_at = foreign.windows(16).position(|w| w.iter().all(u8::is_ascii_hexdigit)).expect("the key");
        foreign[key_at] = if foreign[key_at] == b'0' { b'1' } else { b'0' };
        std::fs::write(&file, &foreign).expect("write");
        assert!(same(&quantize_cached(Some(&cache), tensor, Layout::InOut, 8, 64), &plain));
        // The checkpoint rewritten with other values: a new key, the new weights quantised.
        drop(weights);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let changed = checkpoint(root.path(), &test_values(64 * 8, 2), [64, 8]);
        let tensor = changed.get("w").expect("w");
        let fresh = quantize_cached(Some(&cache), tensor, Layout::InOut, 8, 64);
        assert!(same(&fresh, &Q8Matrix::quantize(tensor.data(), Layout::InOut, 8, 64)));
        assert!(!same(&fresh, &plain));
        assert_eq!(cached_files(&cache).len(), 2);
    }

    #[test]
    fn tensors_held_in_memory_are_not_cached() {
        let root = tempfile::tempdir().expect("tempdir");
        let tensor = HostTensor::from_f32(test_values(32 * 4, 5), vec![4, 32]).converted(DType::F16);
        let q = quantize_cached(Some(root.path()), &tensor, Layout::OutIn, 4, 32);
        assert!(same(&q, &Q8Matrix::quantize(tensor.data(), Layout::OutIn, 4, 32)));
        assert!(cached_files(root.path()).is_empty());
    }
}
