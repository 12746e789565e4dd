//! `pytorch_model.bin` (torch.save zip archives) to safetensors.
//!
//! A torch archive is a zip holding `<prefix>/data.pkl`, a pickle of the state dict whose tensors
//! point at raw storages `<prefix>/data/<key>`. We run just enough of a pickle machine to rebuild that
//! dict (no code is ever executed: only the handful of torch and collections globals a state dict
//! uses are understood), then write the tensors as one safetensors file that is mapped like any other.
//! The conversion happens once per file; the result lives in a cache folder keyed by the source
//! file's path, size and modification time.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::weights::DType;
use crate::error::{Error, Result};

/// Returns a safetensors file with the tensors of the torch archive `bin`, converting it on first use.
pub fn converted_safetensors(bin: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(bin).map_err(|e| Error::io(bin, e))?;
    let canonical = bin.canonicalize().map_err(|e| Error::io(bin, e))?;
    let modified =
        meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    let key = fnv1a(format!("{}|{}|{}", canonical.display(), meta.len(), modified).as_bytes());
    let stem = bin.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    let dir = cache_dir();
    let target = dir.join(format!("{stem}-{key:016x}.safetensors"));
    if target.is_file() {
        return Ok(target);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let tensors = read_state_dict(bin)?;
    // Unique per process and call: threads of one process may convert the same archive at once.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let partial = dir.join(format!("{stem}-{key:016x}.{}-{call}.partial", std::process::id()));
    let views = tensors.iter().map(|(name, t)| (name.clone(), t));
    safetensors::serialize_to_file(views, None, &partial)
        .map_err(|e| Error::bad_file(&partial, format!("cannot write the converted weights: {e}")))?;
    std::fs::rename(&partial, &target).map_err(|e| Error::io(&target, e))?;
    Ok(target)
}

/// Where converted archives are kept: `$LAYERWISE_CACHE`, else `$XDG_CACHE_HOME/layerwise`, else
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

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// A tensor read from a torch archive, contiguous, little-endian.
pub struct LoadedTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl safetensors::View for &LoadedTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.to_safetensors()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Reads every floating-point tensor of a torch archive, sorted by name.
pub fn read_state_dict(bin: &Path) -> Result<Vec<(String, LoadedTensor)>> {
    let bad = |reason: String| Error::bad_file(bin, reason);
    let file = std::fs::File::open(bin).map_err(|e| Error::io(bin, e))?;
    let mut magic = [0u8; 4];
    (&file).read_exact(&mut magic).map_err(|e| Error::io(bin, e))?;
    if &magic[..2] != b"PK" {
        return Err(bad(
            "not a zip-format torch archive (files written by torch < 1.6 are not supported; re-save with a recent torch or convert to safetensors)".into(),
        ));
    }
    let file = std::fs::File::open(bin).map_err(|e| Error::io(bin, e))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| bad(format!("corrupt zip archive: {e}")))?;
    let pickle_name = archive
        .file_names()
        .find(|n| n.ends_with("data.pkl"))
        .map(str::to_string)
        .ok_or_else(|| bad("no data.pkl in the archive".into()))?;
    let prefix = pickle_name.trim_end_matches("data.pkl").to_string();
    let byteorder = format!("{prefix}byteorder");
    if let Ok(mut entry) = archive.by_name(&byteorder) {
        let mut order = String::new();
        entry.read_to_string(&mut order).map_err(|e| bad(format!("cannot read {byteorder}: {e}")))?;
        if order.trim() != "little" {
            return Err(bad(format!("tensors are stored {} endian; only little endian is supported", order.trim())));
        }
    }
    let mut pickle = Vec::new();
    archive
        .by_name(&pickle_name)
        .and_then(|mut f| f.read_to_end(&mut pickle).map_err(Into::into))
        .map_err(|e| bad(format!("cannot read {pickle_name}: {e}")))?;
    let root = Unpickler::new(&pickle).run().map_err(|e| bad(format!("{pickle_name}: {e}")))?;
    let entries =
        state_dict_entries(root).ok_or_else(|| bad("the archive does not hold a state dict of tensors".into()))?;

    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut tensors = Vec::new();
    for (name, t) in entries {
        let Some(dtype) = t.storage.dtype else {
            continue;
        };
        if !storages.contains_key(&t.storage.key) {
            let entry = format!("{prefix}data/{}", t.storage.key);
            let mut bytes = Vec::new();
            archive
                .by_name(&entry)
                .and_then(|mut f| f.read_to_end(&mut bytes).map_err(Into::into))
                .map_err(|e| bad(format!("cannot read storage {entry} of tensor `{name}`: {e}")))?;
            storages.insert(t.storage.key.clone(), bytes);
        }
        let data = gather(&storages[&t.storage.key], dtype.size(), &t)
            .ok_or_else(|| bad(format!("tensor `{name}` reaches outside its storage")))?;
        tensors.push((name, LoadedTensor { dtype, shape: t.shape, data }));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}

/// Copies a (possibly strided) tensor out of its storage into contiguous row-major bytes.
fn gather(storage: &[u8], elem: usize, t: &TensorRef) -> Option<Vec<u8>> {
    // A corrupt archive may claim any shape: bound it by the storage before allocating.
    let numel = t.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))?;
    if numel.checked_mul(elem)? > storage.len() {
        return None;
    }
    let mut out = Vec::with_capacity(numel * elem);
    if numel == 0 {
        return Some(out);
    }
    let mut index = vec![0usize; t.shape.len()];
    for _ in 0..numel {
        let offset =
            index.iter().zip(&t.stride).try_fold(t.offset, |acc, (i, s)| acc.checked_add(i.checked_mul(*s)?))?;
        let start = offset.checked_mul(elem)?;
        out.extend_from_slice(storage.get(start..start.checked_add(elem)?)?);
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < t.shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Some(out)
}

#[derive(Clone, Debug)]
struct StorageRef {
    key: String,
    /// None for storages of a type we do not load (integer buffers).
    dtype: Option<DType>,
}

#[derive(Clone, Debug)]
struct TensorRef {
    storage: StorageRef,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

#[derive(Clone, Debug)]
enum Value {
    None,
    /// A bool, float or bytes value: parsed, never needed for a state dict.
    Scalar,
    Int(i64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    Storage(StorageRef),
    Tensor(TensorRef),
    /// An object we do not interpret (kept so that the stack stays balanced).
    Opaque,
    Mark,
}

fn state_dict_entries(root: Value) -> Option<Vec<(String, TensorRef)>> {
    let Value::Dict(items) = root else {
        return None;
    };
    let mut out = Vec::new();
    let mut nested = None;
    for (key, value) in items {
        match (key, value) {
            (Value::Str(name), Value::Tensor(t)) => out.push((name, t)),
            // Some training scripts save {"state_dict": {...}} or {"model": {...}}.
            (Value::Str(name), dict @ Value::Dict(_)) if name == "state_dict" || name == "model" => nested = Some(dict),
            _ => {}
        }
    }
    match (out.is_empty(), nested) {
        (true, Some(dict)) => state_dict_entries(dict),
        (true, None) => None,
        (false, _) => Some(out),
    }
}

/// A minimal pickle virtual machine for torch state dicts (protocols 2-5).
struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Unpickler { data, pos: 0, stack: Vec::new(), memo: HashMap::new() }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or("truncated pickle")?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| "truncated pickle")?))
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.pos..];
        let end = rest.iter().position(|&b| b == b'\n').ok_or("truncated pickle")?;
        let text = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.pos += end + 1;
        Ok(text)
    }

    fn pop(&mut self) -> Result<Value, String> {
        self.stack.pop().ok_or_else(|| "pickle stack underflow".to_string())
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let mark = self.stack.iter().rposition(|v| matches!(v, Value::Mark)).ok_or("pickle MARK missing")?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top(&mut self) -> Result<&mut Value, String> {
        self.stack.last_mut().ok_or_else(|| "pickle stack underflow".to_string())
    }

    fn string(&mut self, len: usize) -> Result<Value, String> {
        let bytes = self.take(len)?;
        Ok(Value::Str(String::from_utf8_lossy(bytes).into_owned()))
    }

    fn run(mut self) -> Result<Value, String> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => return self.pop(), // STOP
                b'(' => self.stack.push(Value::Mark),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Scalar),
                0x89 => self.stack.push(Value::Scalar),
                b'K' => {
                    let v = self.u8()? as i64;
                    self.stack.push(Value::Int(v));
                }
                b'M' => {
                    let b = self.take(2)?;
                    self.stack.push(Value::Int(u16::from_le_bytes([b[0], b[1]]) as i64));
                }
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.stack.push(Value::Int(v));
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n bytes
                    let n = self.u8()? as usize;
                    let bytes = self.take(n)?;
                    if n > 8 {
                        return Err("integer too large".into());
                    }
                    let mut v: i64 = 0;
                    for (i, b) in bytes.iter().enumerate() {
                        v |= (*b as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.stack.push(Value::Int(v));
                }
                b'G' => {
                    self.take(8)?; // BINFLOAT
                    self.stack.push(Value::Scalar);
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| "truncated pickle")?) as usize;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    self.take(n)?;
                    self.stack.push(Value::Scalar);
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    self.take(n)?;
                    self.stack.push(Value::Scalar);
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = self.u32()?;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'h' | b'j' => {
                    let i = if op == b'h' { self.u8()? as u32 } else { self.u32()? };
                    let v = self.memo.get(&i).cloned().ok_or("pickle memo reference to nothing")?;
                    self.stack.push(v);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(module, name));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.stack.push(Value::Global(m, n)),
                        _ => return Err("STACK_GLOBAL on non-strings".into()),
                    }
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("pickle stack underflow".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(items)?;
                    self.stack.push(Value::Dict(pairs));
                }
                b'a' => {
                    let v = self.pop()?;
                    if let Value::List(list) = self.top()? {
                        list.push(v);
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    if let Value::List(list) = self.top()? {
                        list.extend(items);
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    if let Value::Dict(d) = self.top()? {
                        d.push((k, v));
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let new = pairs(items)?;
                    if let Value::Dict(d) = self.top()? {
                        d.extend(new);
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(persistent_load(pid)?);
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.stack.push(reduce(callable, args)?);
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args): nothing we need lives behind it
                    self.pop()?;
                    self.pop()?;
                    self.stack.push(Value::Opaque);
                }
                b'b' => {
                    self.pop()?; // BUILD: the state of an object (e.g. a state dict's _metadata); not needed
                }
                other => return Err(format!("unsupported pickle opcode 0x{other:02x} at byte {}", self.pos - 1)),
            }
        }
    }
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>, String> {
    if items.len() % 2 != 0 {
        return Err("odd number of items for a dict".into());
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

/// torch's persistent ids: `("storage", <class torch.FloatStorage>, key, location, numel)`.
fn persistent_load(pid: Value) -> Result<Value, String> {
    let Value::Tuple(items) = pid else {
        return Err("persistent id is not a tuple".into());
    };
    match items.as_slice() {
        [Value::Str(kind), Value::Global(_, class), Value::Str(key), ..] if kind == "storage" => {
            let dtype = match class.as_str() {
                "FloatStorage" => Some(DType::F32),
                "HalfStorage" => Some(DType::F16),
                "BFloat16Storage" => Some(DType::BF16),
                _ => None,
            };
            Ok(Value::Storage(StorageRef { key: key.clone(), dtype }))
        }
        _ => Err("unrecognised persistent id (expected a torch storage)".into()),
    }
}

fn reduce(callable: Value, args: Value) -> Result<Value, String> {
    let Value::Global(module, name) = &callable else {
        return Ok(Value::Opaque);
    };
    let args = match args {
        Value::Tuple(a) => a,
        _ => return Ok(Value::Opaque),
    };
    match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") => Ok(Value::Dict(Vec::new())),
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
            let [Value::Storage(storage), Value::Int(offset), Value::Tuple(size), Value::Tuple(stride), ..] =
                args.as_slice()
            else {
                return Err("malformed _rebuild_tensor arguments".into());
            };
            let dims = |v: &[Value]| -> Result<Vec<usize>, String> {
                v.iter()
                    .map(|d| match d {
                        Value::Int(n) if *n >= 0 => Ok(*n as usize),
                        _ => Err("tensor dimension is not a non-negative integer".to_string()),
                    })
                    .collect()
            };
            if *offset < 0 {
                return Err("negative storage offset".into());
            }
            Ok(Value::Tensor(TensorRef {
                storage: storage.clone(),
                offset: *offset as usize,
                shape: dims(size)?,
                stride: dims(stride)?,
            }))
        }
        ("torch._utils", "_rebuild_parameter") | ("torch._utils", "_rebuild_parameter_with_state") => {
            Ok(args.into_iter().next().unwrap_or(Value::Opaque))
        }
        _ => Ok(Value::Opaque),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_tensors_are_gathered_in_row_major_order() {
        // storage holds a 2x3 matrix; the tensor is its transpose (3x2, strides (1, 3)).
        let storage: Vec<u8> = (0u8..6).collect();
        let t = TensorRef {
            storage: StorageRef { key: "0".into(), dtype: None },
            offset: 0,
            shape: vec![3, 2],
            stride: vec![1, 3],
        };
        assert_eq!(gather(&storage, 1, &t), Some(vec![0, 3, 1, 4, 2, 5]));
        let out_of_bounds = TensorRef { offset: 1, ..t.clone() };
        assert_eq!(gather(&storage, 1, &out_of_bounds), None);
        let absurd = TensorRef { shape: vec![usize::MAX, 2], stride: vec![1, 1], ..t };
        assert_eq!(gather(&storage, 1, &absurd), None);
    }

    #[test]
    fn garbage_pickles_are_errors_not_panics() {
        for bytes in [&b""[..], b"\x80\x02}q\x00(", b"\xff", b"\x80\x02h\x05."] {
            assert!(Unpickler::new(bytes).run().is_err());
        }
    }
}
