//! Checkpoint tensors, memory-mapped and looked up by their Hugging Face names.
//!
//! Opening a checkpoint maps its safetensors files and parses their headers; no tensor data is read
//! or copied. A page of a weight is brought into memory by the OS only when an op first touches it, so
//! resident memory grows with the tensors a run actually uses (an early exit never touches the upper
//! blocks). `pytorch_model.bin` archives are converted once to safetensors in a cache folder (see
//! [`crate::torch_pickle`]) and then mapped like any other file.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::SafeTensors;

use crate::error::{Error, Result};

/// Element type of a stored weight. Compute is always f32; narrower weights are widened as they are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    pub(crate) fn from_safetensors(dtype: safetensors::Dtype) -> Option<DType> {
        match dtype {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::F16 => Some(DType::F16),
            safetensors::Dtype::BF16 => Some(DType::BF16),
            _ => None,
        }
    }

    pub(crate) fn to_safetensors(self) -> safetensors::Dtype {
        match self {
            DType::F32 => safetensors::Dtype::F32,
            DType::F16 => safetensors::Dtype::F16,
            DType::BF16 => safetensors::Dtype::BF16,
        }
    }

    /// Parses `f32`, `f16` or `bf16` (also the torch spellings `float32`, `float16`, `bfloat16`).
    pub fn parse(text: &str) -> Option<DType> {
        match text {
            "f32" | "float32" | "float" => Some(DType::F32),
            "f16" | "float16" | "half" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        })
    }
}

/// Bytes that outlive the checkpoint handle: a mapped file or, rarely, an owned aligned copy.
enum Backing {
    /// A mapped file, and a hash of which file it is (path, length, modification time): what
    /// [`HostTensor::content_key`] builds on.
    Mapped { map: Mmap, identity: u64 },
    /// Stored as u32 so that f32/f16/bf16 views are always aligned.
    Owned(Vec<u32>),
    /// Owned, made only from mapped tensors (stacked rows): `key` is built from theirs, so caches of
    /// derived work still find it.
    Derived { words: Vec<u32>, key: u64 },
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mapped { map, .. } => map,
            Backing::Owned(words) | Backing::Derived { words, .. } => bytemuck::cast_slice(words),
        }
    }
}

/// Typed, borrowed view of a weight's elements.
#[derive(Clone, Copy, Debug)]
pub enum WeightData<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl WeightData<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            WeightData::F32(v) => v.len(),
            WeightData::F16(v) => v.len(),
            WeightData::BF16(v) => v.len(),
        }
    }

    /// True when the view holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Widens `self[start..start + out.len()]` into `out`.
    pub fn read_f32(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            WeightData::F32(v) => out.copy_from_slice(&v[start..end]),
            WeightData::F16(v) => v[start..end].convert_to_f32_slice(out),
            WeightData::BF16(v) => v[start..end].convert_to_f32_slice(out),
        }
    }

    /// Element `i` widened to f32.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            WeightData::F32(v) => v[i],
            WeightData::F16(v) => v[i].to_f32(),
            WeightData::BF16(v) => v[i].to_f32(),
        }
    }

    /// All elements widened to f32 (an owned copy).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.read_f32(0, &mut out);
        out
    }
}

/// One stored tensor: a shared handle on its bytes plus dtype and shape. Cloning it copies no data.
#[derive(Clone)]
pub struct HostTensor {
    backing: Arc<Backing>,
    start: usize,
    len: usize,
    dtype: DType,
    shape: Vec<usize>,
}

impl HostTensor {
    /// Element type as stored in the checkpoint.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Shape as stored in the checkpoint.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.backing.bytes()[self.start..self.start + self.len]
    }

    /// Typed view of the elements (no copy).
    pub fn data(&self) -> WeightData<'_> {
        let bytes = self.bytes();
        // Alignment was checked (or fixed by copying) when the tensor was opened.
        match self.dtype {
            DType::F32 => WeightData::F32(bytemuck::cast_slice(bytes)),
            DType::F16 => WeightData::F16(bytemuck::cast_slice(bytes)),
            DType::BF16 => WeightData::BF16(bytemuck::cast_slice(bytes)),
        }
    }

    /// A key for this tensor's content that is cheap to make: which file it was mapped from (path,
    /// length, modification time), where in it, its dtype and shape. `None` for tensors held in
    /// memory (built, converted, merged with an adapter): their content has no such name. Caches of
    /// work derived from a tensor (8-bit weights) are keyed by it.
    pub fn content_key(&self) -> Option<u64> {
        let identity = match *self.backing {
            Backing::Mapped { identity, .. } => format!("{identity:016x}"),
            Backing::Derived { key, .. } => format!("derived {key:016x}"),
            Backing::Owned(_) => return None,
        };
        let described = format!("{identity} {} {} {} {:?}", self.start, self.len, self.dtype, self.shape);
        Some(crate::io::fnv1a(described.as_bytes()))
    }

    /// `parts` (`[rows_i, cols]` each, one dtype) stacked into `[Σ rows_i, cols]`: an owned copy (a
    /// fused q|k|v projection made of three). Its content key is derived from the parts' when they
    /// all have one. None when the parts differ in dtype, rank or width.
    pub fn stack_rows(parts: &[&HostTensor]) -> Option<HostTensor> {
        let first = parts.first()?;
        let [_, cols] = *first.shape() else { return None };
        let mut rows = 0;
        for part in parts {
            let [r, c] = *part.shape() else { return None };
            if c != cols || part.dtype() != first.dtype() {
                return None;
            }
            rows += r;
        }
        let len = rows * cols * first.dtype().size();
        let mut words = vec![0u32; len.div_ceil(4)];
        let bytes = &mut bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..len];
        let mut at = 0;
        for part in parts {
            bytes[at..at + part.bytes().len()].copy_from_slice(part.bytes());
            at += part.bytes().len();
        }
        let keys: Option<Vec<u64>> = parts.iter().map(|p| p.content_key()).collect();
        let backing = match keys {
            Some(keys) => {
                let described: Vec<String> = keys.iter().map(|k| format!("{k:016x}")).collect();
                Backing::Derived { words, key: crate::io::fnv1a(described.join(" ").as_bytes()) }
            }
            None => Backing::Owned(words),
        };
        Some(HostTensor { backing: Arc::new(backing), start: 0, len, dtype: first.dtype(), shape: vec![rows, cols] })
    }

    /// The first `n` rows of a tensor (its leading dimension), sharing its bytes.
    pub fn rows(&self, n: usize) -> HostTensor {
        let row: usize = self.shape.iter().skip(1).product();
        let n = n.min(self.shape.first().copied().unwrap_or(0));
        let mut shape = self.shape.clone();
        if let Some(first) = shape.first_mut() {
            *first = n;
        }
        let len = n * row * self.dtype.size();
        HostTensor { backing: self.backing.clone(), start: self.start, len, dtype: self.dtype, shape }
    }

    /// A tensor over an owned f32 buffer (for weights built in memory: tests, conversions).
    pub fn from_f32(values: Vec<f32>, shape: Vec<usize>) -> Self {
        assert_eq!(values.len(), shape.iter().product::<usize>(), "shape does not match data");
        let len = values.len() * 4;
        let words: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
        HostTensor { backing: Arc::new(Backing::Owned(words)), start: 0, len, dtype: DType::F32, shape }
    }

    /// A tensor over owned little-endian bytes of `dtype` (for tensors cut from others, e.g. pruning).
    pub fn from_bytes(bytes: Vec<u8>, dtype: DType, shape: Vec<usize>) -> Self {
        let len = bytes.len();
        assert_eq!(len, shape.iter().product::<usize>() * dtype.size(), "shape does not match data");
        let mut words = vec![0u32; len.div_ceil(4)];
        bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..len].copy_from_slice(&bytes);
        HostTensor { backing: Arc::new(Backing::Owned(words)), start: 0, len, dtype, shape }
    }

    /// This tensor converted to `dtype` (an owned copy; returns a cheap clone when it already is).
    pub fn converted(&self, dtype: DType) -> HostTensor {
        if dtype == self.dtype {
            return self.clone();
        }
        let values = self.data().to_f32_vec();
        let words: Vec<u32> = match dtype {
            DType::F32 => values.iter().map(|v| v.to_bits()).collect(),
            DType::F16 => pack_halves(values.iter().map(|&x| f16::from_f32(x).to_bits())),
            DType::BF16 => pack_halves(values.iter().map(|&x| bf16::from_f32(x).to_bits())),
        };
        HostTensor {
            backing: Arc::new(Backing::Owned(words)),
            start: 0,
            len: self.numel() * dtype.size(),
            dtype,
            shape: self.shape.clone(),
        }
    }
}

/// A hash naming the file at `path` as it is now: its canonical path, length and modification time
/// (a file rewritten in place gets a new one).
fn file_identity(path: &Path, file: &std::fs::File) -> u64 {
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let (length, modified) = file
        .metadata()
        .map(|m| {
            let since = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            (m.len(), since.map_or(0, |d| d.as_nanos()))
        })
        .unwrap_or((0, 0));
    crate::io::fnv1a(format!("{}\n{length}\n{modified}", canonical.display()).as_bytes())
}

fn pack_halves(bits: impl Iterator<Item = u16>) -> Vec<u32> {
    let bits: Vec<u16> = bits.collect();
    let mut words = vec![0u32; bits.len().div_ceil(2)];
    bytemuck::cast_slice_mut::<u32, u16>(&mut words)[..bits.len()].copy_from_slice(&bits);
    words
}

impl fmt::Debug for HostTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostTensor({}, {:?})", self.dtype, self.shape)
    }
}

/// What a checkpoint holds, in numbers.
#[derive(Clone, Debug, Default)]
pub struct WeightsSummary {
    pub files: usize,
    pub tensors: usize,
    pub parameters: usize,
    pub bytes: usize,
    /// Parameters per stored dtype (`f32`, `f16`, `bf16`).
    pub by_dtype: std::collections::BTreeMap<String, usize>,
}

struct Entry {
    tensor: HostTensor,
    file: usize,
}

/// All tensors of a checkpoint, from one or several safetensors files, by name.
pub struct Weights {
    files: Vec<PathBuf>,
    tensors: HashMap<String, Entry>,
    /// Tensors present with a dtype the engine does not compute with (integer buffers and the like),
    /// or left out of a converted torch archive: the file and the reason.
    skipped: HashMap<String, (usize, String)>,
}

/// The safetensors metadata entry naming the torch archive a converted file came from.
pub const SOURCE_PATH: &str = "layerwise.source";
/// Metadata entries `layerwise.skipped.<tensor>`: why a converted archive's entry is not in the file.
pub const SKIPPED_PREFIX: &str = "layerwise.skipped.";

impl Weights {
    /// Maps the given safetensors files. Reads only their headers.
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        let mut weights = Weights { files: Vec::new(), tensors: HashMap::new(), skipped: HashMap::new() };
        for path in files {
            weights.add_file(path)?;
        }
        Ok(weights)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only. Like every mmap-based loader we rely on the checkpoint not being
        // truncated or rewritten while it is open; safetensors' header check bounds every tensor.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let identity = file_identity(path, &file);
        let backing = Arc::new(Backing::Mapped { map, identity });
        let base = backing.bytes().as_ptr() as usize;
        if let Some(fault) = header_fault(backing.bytes()) {
            return Err(Error::bad_file(path, fault));
        }
        let parsed = SafeTensors::deserialize(backing.bytes())
            .map_err(|e| Error::bad_file(path, format!("not a valid safetensors file: {e}")))?;
        let file_index = self.files.len();
        // A converted torch archive names its source (messages blame it, not the cache file) and the
        // entries the conversion left out, with the reason.
        let metadata = SafeTensors::read_metadata(backing.bytes())
            .ok()
            .and_then(|(_, m)| m.metadata().clone())
            .unwrap_or_default();
        let shown = metadata.get(SOURCE_PATH).map_or_else(|| path.to_path_buf(), PathBuf::from);
        for (key, reason) in &metadata {
            if let Some(name) = key.strip_prefix(SKIPPED_PREFIX) {
                self.skipped.insert(name.to_string(), (file_index, reason.clone()));
            }
        }
        let mut unaligned = Vec::new();
        for (name, view) in parsed.tensors() {
            let Some(dtype) = DType::from_safetensors(view.dtype()) else {
                let reason = format!("dtype {:?} is not supported (expected F32, F16 or BF16)", view.dtype());
                self.skipped.insert(name, (file_index, reason));
                continue;
            };
            let start = view.data().as_ptr() as usize - base;
            let tensor = HostTensor {
                backing: backing.clone(),
                start,
                len: view.data().len(),
                dtype,
                shape: view.shape().to_vec(),
            };
            if !start.is_multiple_of(dtype.size()) {
                unaligned.push(name.clone());
            }
            self.tensors.insert(name, Entry { tensor, file: file_index });
        }
        // Writers pad headers so that data is aligned; a file that is not gets an aligned copy of the
        // affected tensors rather than an unaligned (undefined) view.
        for name in unaligned {
            if let Some(entry) = self.tensors.get_mut(&name) {
                let bytes = entry.tensor.bytes();
                let mut words = vec![0u32; bytes.len().div_ceil(4)];
                bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
                entry.tensor.backing = Arc::new(Backing::Owned(words));
                entry.tensor.start = 0;
            }
        }
        drop(parsed);
        self.files.push(shown);
        Ok(())
    }

    /// Builds a store from in-memory tensors (tests and tools).
    pub fn from_tensors(tensors: impl IntoIterator<Item = (String, HostTensor)>) -> Self {
        Weights {
            files: vec![PathBuf::from("<memory>")],
            tensors: tensors.into_iter().map(|(name, tensor)| (name, Entry { tensor, file: 0 })).collect(),
            skipped: HashMap::new(),
        }
    }

    /// Puts `tensor` under `name`, in place of any tensor of that name (an adapter's merged weights).
    pub fn replace(&mut self, name: &str, tensor: HostTensor) {
        let file = self.tensors.get(name).map_or(0, |e| e.file);
        self.tensors.insert(name.to_string(), Entry { tensor, file });
    }

    /// True if a floating-point tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Names of all floating-point tensors.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Result<&HostTensor> {
        if let Some(entry) = self.tensors.get(name) {
            return Ok(&entry.tensor);
        }
        if let Some((file, reason)) = self.skipped.get(name) {
            return Err(Error::BadTensor {
                name: name.to_string(),
                path: self.files[*file].clone(),
                reason: reason.clone(),
            });
        }
        Err(Error::MissingTensor { name: name.to_string(), files: self.describe_files() })
    }

    /// The tensor called `name`, which must have exactly `shape`.
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<&HostTensor> {
        let tensor = self.get(name)?;
        if tensor.shape() != shape {
            return Err(Error::BadTensor {
                name: name.to_string(),
                path: self.path_of(name),
                reason: format!("shape {:?}, expected {:?}", tensor.shape(), shape),
            });
        }
        Ok(tensor)
    }

    /// Counts of what the checkpoint holds.
    pub fn summary(&self) -> WeightsSummary {
        let mut summary = WeightsSummary { files: self.files.len(), ..Default::default() };
        for entry in self.tensors.values() {
            summary.tensors += 1;
            summary.parameters += entry.tensor.numel();
            summary.bytes += entry.tensor.len;
            *summary.by_dtype.entry(entry.tensor.dtype.to_string()).or_default() += entry.tensor.numel();
        }
        summary
    }

    /// The file a tensor lives in.
    pub fn path_of(&self, name: &str) -> PathBuf {
        self.tensors
            .get(name)
            .map(|entry| self.files[entry.file].clone())
            .unwrap_or_else(|| PathBuf::from(self.describe_files()))
    }

    fn describe_files(&self) -> String {
        match self.files.as_slice() {
            [one] => one.display().to_string(),
            many => format!(
                "{} files ({}, ...)",
                many.len(),
                many.first().map(|p| p.display().to_string()).unwrap_or_default()
            ),
        }
    }
}

/// What is wrong with a safetensors header, naming the tensor at fault, or None when nothing is
/// (or when it is not JSON: the parser says what is wrong then). Checked before the parser, whose
/// own messages can blame another tensor (the next in offset order) or miss a repeated name (it
/// keeps the later entry).
fn header_fault(file: &[u8]) -> Option<String> {
    use serde::de::{Deserializer, MapAccess, Visitor};
    struct Entries;
    impl<'de> Visitor<'de> for Entries {
        type Value = Vec<(String, serde_json::Value)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
            let mut entries = Vec::new();
            while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
                entries.push(entry);
            }
            Ok(entries)
        }
    }
    let n = usize::try_from(u64::from_le_bytes(file.get(..8)?.try_into().ok()?)).ok()?;
    let header = file.get(8..8usize.checked_add(n)?)?;
    let data_len = (file.len() - 8 - n) as u64;
    let entries = serde_json::Deserializer::from_slice(header).deserialize_map(Entries).ok()?;
    let mut seen = std::collections::HashSet::new();
    for (name, info) in &entries {
        if !seen.insert(name.as_str()) {
            return Some(format!("the header names tensor `{name}` twice"));
        }
        if name == "__metadata__" {
            continue;
        }
        let offsets: Option<Vec<u64>> =
            info.get("data_offsets").and_then(|o| o.as_array()).map(|a| a.iter().filter_map(|v| v.as_u64()).collect());
        let Some([begin, end]) = offsets.as_deref().and_then(|o| <[u64; 2]>::try_from(o).ok()) else { continue };
        if begin > end || end > data_len {
            return Some(format!(
                "tensor `{name}`: data_offsets [{begin}, {end}] lie outside the file's {data_len} bytes of data"
            ));
        }
        let shape: Option<Vec<u64>> =
            info.get("shape").and_then(|s| s.as_array()).map(|a| a.iter().filter_map(|v| v.as_u64()).collect());
        let size = match info.get("dtype").and_then(|d| d.as_str()) {
            Some("F64" | "I64" | "U64") => 8,
            Some("F32" | "I32" | "U32") => 4,
            Some("F16" | "BF16" | "I16" | "U16") => 2,
            Some("I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2") => 1,
            _ => continue,
        };
        let bytes = shape.and_then(|s| s.iter().try_fold(size as u64, |n, &d| n.checked_mul(d)));
        if bytes != Some(end - begin) {
            return Some(format!(
                "tensor `{name}`: its shape and dtype need {} bytes, its data_offsets [{begin}, {end}] hold {}",
                bytes.map_or("more than 2^64".to_string(), |b| b.to_string()),
                end - begin
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacked_rows_keep_the_bytes_in_order_and_a_key_from_mapped_parts() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("model.safetensors");
        let (q, k) = (vec![1.0f32, 2.0, 3.0, 4.0], vec![5.0f32, 6.0]);
        let views = [
            ("q", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 2], bytemuck::cast_slice(&q))),
            ("k", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 2], bytemuck::cast_slice(&k))),
        ];
        let views: Vec<_> = views.into_iter().map(|(n, v)| (n, v.expect("view"))).collect();
        safetensors::serialize_to_file(views, None, &path).expect("write");
        let weights = Weights::open(&[path]).expect("open");
        let (wq, wk) = (weights.get("q").expect("q"), weights.get("k").expect("k"));
        let stacked = HostTensor::stack_rows(&[wq, wk]).expect("stack");
        assert_eq!(stacked.shape(), [3, 2]);
        assert_eq!(stacked.data().to_f32_vec(), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let key = stacked.content_key().expect("a key derived from mapped parts");
        assert_ne!(Some(key), wq.content_key());
        assert_eq!(HostTensor::stack_rows(&[wq, wk]).and_then(|t| t.content_key()), Some(key));
        // Parts held in memory have no key; parts of another width or dtype do not stack.
        let owned = HostTensor::from_f32(vec![7.0, 8.0], vec![1, 2]);
        assert_eq!(HostTensor::stack_rows(&[wq, &owned]).expect("stack").content_key(), None);
        assert!(HostTensor::stack_rows(&[wq, &HostTensor::from_f32(vec![0.0; 3], vec![1, 3])]).is_none());
        assert!(HostTensor::stack_rows(&[wq, &owned.converted(DType::F16)]).is_none());
    }
}
