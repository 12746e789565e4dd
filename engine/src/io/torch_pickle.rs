//! `pytorch_model.bin` (torch.save zip archives) to safetensors.
//!
//! A torch archive is a zip holding `<prefix>/data.pkl`, a pickle of the state dict whose tensors
//! point at raw storages `<prefix>/data/<key>`. We run just enough of a pickle machine to rebuild that
//! dict (no code is ever executed: only the handful of torch and collections globals a state dict
//! uses are understood), then write the tensors as one safetensors file that is mapped like any other.
//! The conversion happens once per archive content; the result lives in a cache folder keyed by a
//! hash of the archive's zip index (names, sizes, CRC-32s) and is checked against it on use. The
//! reader is built for files from strangers: memo references are shared, not copied; nothing
//! recurses on the input's nesting; the pickle's size and the objects it makes are bounded.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::weights::DType;
use super::{cache_dir, fnv1a};
use crate::error::{Error, Result};

/// Returns a safetensors file with the tensors of the torch archive `bin`, converting it on first use.
///
/// The cache is keyed by the archive's content as its zip index describes it (every entry's name,
/// size and CRC-32), not by its path or time: a file replaced by another of the same size and time
/// is converted again. A cached file is used only if it parses and records that key; it is written
/// under a temporary name and renamed, so a reader never sees half of one.
pub fn converted_safetensors(bin: &Path) -> Result<PathBuf> {
    let key = archive_key(bin)?;
    let stem = bin.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    let dir = cache_dir();
    let target = dir.join(format!("{stem}-{key:016x}.safetensors"));
    if cached_conversion_matches(&target, key) {
        return Ok(target);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let state = read_state_dict(bin)?;
    // Unique per process and call: threads of one process may convert the same archive at once.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let partial = dir.join(format!("{stem}-{key:016x}.{}-{call}.partial", std::process::id()));
    let mut metadata = HashMap::from([
        (SOURCE_KEY.to_string(), format!("{key:016x}")),
        (crate::io::weights::SOURCE_PATH.to_string(), bin.display().to_string()),
    ]);
    for (name, reason) in &state.skipped {
        metadata.insert(format!("{}{name}", crate::io::weights::SKIPPED_PREFIX), reason.clone());
    }
    let views = state.tensors.iter().map(|(name, t)| (name.clone(), t));
    safetensors::serialize_to_file(views, Some(metadata), &partial)
        .map_err(|e| Error::bad_file(&partial, format!("cannot write the converted weights: {e}")))?;
    std::fs::rename(&partial, &target).map_err(|e| Error::io(&target, e))?;
    Ok(target)
}

/// The safetensors metadata entry recording which archive content a conversion came from.
const SOURCE_KEY: &str = "layerwise.source_key";

/// A hash of the archive's zip index: each entry's name, size and CRC-32 (read from the central
/// directory: no data is read), and the file's length.
fn archive_key(bin: &Path) -> Result<u64> {
    let file = std::fs::File::open(bin).map_err(|e| Error::io(bin, e))?;
    let length = file.metadata().map_err(|e| Error::io(bin, e))?.len();
    let mut archive = zip::ZipArchive::new(file).map_err(|e| Error::bad_file(bin, not_an_archive(e)))?;
    let mut index = format!("{length}\n").into_bytes();
    for i in 0..archive.len() {
        let entry = archive.by_index_raw(i).map_err(|e| Error::bad_file(bin, format!("corrupt zip archive: {e}")))?;
        index.extend(format!("{}\t{}\t{:08x}\n", entry.name(), entry.size(), entry.crc32()).bytes());
    }
    Ok(fnv1a(&index))
}

fn not_an_archive(e: zip::result::ZipError) -> String {
    format!("not a zip-format torch archive ({e}; files written by torch < 1.6 are not supported: re-save with a recent torch or convert to safetensors)")
}

/// True if `target` is a complete safetensors file converted from the archive with `key`.
fn cached_conversion_matches(target: &Path, key: u64) -> bool {
    let Ok(file) = std::fs::File::open(target) else { return false };
    // SAFETY: read-only, and only the header is read here (the tensors' bytes are not touched).
    let Ok(map) = (unsafe { memmap2::Mmap::map(&file) }) else { return false };
    let Ok((_, metadata)) = safetensors::SafeTensors::read_metadata(&map) else { return false };
    let recorded = metadata.metadata().as_ref().and_then(|m| m.get(SOURCE_KEY).cloned());
    // deserialize checks that every tensor lies inside the file: a truncated file is not used.
    recorded == Some(format!("{key:016x}")) && safetensors::SafeTensors::deserialize(&map).is_ok()
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

/// The largest `data.pkl` read (uncompressed): the index of a state dict, tens of bytes per tensor.
const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// What a torch archive holds: its floating-point tensors, sorted by name, and the entries that
/// are not converted, each with the reason (an integer or complex tensor, or not a tensor at all).
pub struct StateDict {
    pub tensors: Vec<(String, LoadedTensor)>,
    pub skipped: Vec<(String, String)>,
}

/// Reads every floating-point tensor of a torch archive, and names what it does not read.
pub fn read_state_dict(bin: &Path) -> Result<StateDict> {
    let bad = |reason: String| Error::bad_file(bin, reason);
    let file = std::fs::File::open(bin).map_err(|e| Error::io(bin, e))?;
    let mut magic = [0u8; 4];
    (&file).read_exact(&mut magic).map_err(|e| Error::io(bin, e))?;
    if &magic[..2] != b"PK" {
        return Err(bad(not_an_archive(zip::result::ZipError::InvalidArchive("no zip signature".into()))));
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
        .and_then(|f| f.take(MAX_PICKLE_BYTES + 1).read_to_end(&mut pickle).map_err(Into::into))
        .map_err(|e| bad(format!("cannot read {pickle_name}: {e}")))?;
    if pickle.len() as u64 > MAX_PICKLE_BYTES {
        return Err(bad(format!(
            "{pickle_name} is over {} MiB (a state dict's index is a few MB at most)",
            MAX_PICKLE_BYTES >> 20
        )));
    }
    let (root, arena) = Unpickler::new(&pickle).run().map_err(|e| bad(format!("{pickle_name}: {e}")))?;
    let (entries, not_tensors) = state_dict_entries(&arena, &root)
        .ok_or_else(|| bad("the archive does not hold a state dict of tensors".into()))?;

    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut tensors = Vec::new();
    let mut skipped: Vec<(String, String)> =
        not_tensors.into_iter().map(|name| (name, format!("is not a tensor in {}", bin.display()))).collect();
    for (name, t) in entries {
        let Some(dtype) = t.storage.dtype else {
            let reason = format!(
                "is stored in {} as {}: only FloatStorage, HalfStorage and BFloat16Storage tensors are converted",
                bin.display(),
                t.storage.class
            );
            skipped.push((name, reason));
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
    skipped.sort();
    Ok(StateDict { tensors, skipped })
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
    /// The storage's torch class (`FloatStorage`, `LongStorage`, ...).
    class: String,
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

/// A value of the pickle machine. Cloning one is O(1) (strings and tensors are shared, containers
/// are indices into the machine's arena), so a memo entry fetched a million times costs a million
/// words, not a million copies ("billion laughs"); and no value owns another, so nothing recurses
/// when a deeply nested one is dropped.
#[derive(Clone, Debug)]
enum Value {
    None,
    /// A bool, float or bytes value: parsed, never needed for a state dict.
    Scalar,
    Int(i64),
    Str(Rc<str>),
    Tuple(usize),
    List(usize),
    Dict(usize),
    Global(Rc<str>, Rc<str>),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
    /// An object we do not interpret (kept so that the stack stays balanced).
    Opaque,
    Mark,
}

/// What a container value holds: a tuple's or list's items, or a dict's pairs in insertion order.
enum Container {
    Items(Vec<Value>),
    Pairs(Vec<(Value, Value)>),
}

/// Values a pickle may create (each opcode creates at most one): a torch state dict needs about 20
/// per tensor, so this admits 200,000 tensors and bounds the machine's memory to a few hundred MB.
const MAX_PICKLE_OBJECTS: usize = 4_000_000;

/// Nested `{"state_dict": {...}}` / `{"model": {...}}` levels searched for the tensors.
const MAX_STATE_DICT_NESTING: usize = 4;

/// The state dict's `(name, tensor)` entries and the names of its other entries: the root dict's, or
/// those of a nested `state_dict` or `model` dict (some training scripts save those).
type Entries = (Vec<(String, TensorRef)>, Vec<String>);

fn state_dict_entries(arena: &[Container], root: &Value) -> Option<Entries> {
    let mut dict = root;
    for _ in 0..MAX_STATE_DICT_NESTING {
        let Value::Dict(node) = dict else { return None };
        let Container::Pairs(items) = &arena[*node] else { return None };
        let (mut out, mut others) = (Vec::new(), Vec::new());
        let mut nested = None;
        for (key, value) in items {
            match (key, value) {
                (Value::Str(name), Value::Tensor(t)) => out.push((name.to_string(), TensorRef::clone(t))),
                (Value::Str(name), inner @ Value::Dict(_)) if &**name == "state_dict" || &**name == "model" => {
                    nested = Some(inner)
                }
                (Value::Str(name), _) => others.push(name.to_string()),
                _ => {}
            }
        }
        match (out.is_empty(), nested) {
            (false, _) => return Some((out, others)),
            (true, Some(inner)) => dict = inner,
            (true, None) => return None,
        }
    }
    None
}

/// A minimal pickle virtual machine for torch state dicts (protocols 2-5). It never recurses on the
/// input's nesting and creates at most [`MAX_PICKLE_OBJECTS`] values.
struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    arena: Vec<Container>,
    objects: usize,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Unpickler { data, pos: 0, stack: Vec::new(), memo: HashMap::new(), arena: Vec::new(), objects: 0 }
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

    fn line(&mut self) -> Result<Rc<str>, String> {
        let rest = &self.data[self.pos..];
        let end = rest.iter().position(|&b| b == b'\n').ok_or("truncated pickle")?;
        let text: Rc<str> = String::from_utf8_lossy(&rest[..end]).into();
        self.pos += end + 1;
        Ok(text)
    }

    fn push(&mut self, v: Value) -> Result<(), String> {
        self.objects += 1;
        if self.objects > MAX_PICKLE_OBJECTS {
            return Err(format!(
                "the pickle makes more than {MAX_PICKLE_OBJECTS} objects (a state dict needs far fewer)"
            ));
        }
        self.stack.push(v);
        Ok(())
    }

    fn container(&mut self, c: Container) -> usize {
        self.arena.push(c);
        self.arena.len() - 1
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

    fn top(&self) -> Result<&Value, String> {
        self.stack.last().ok_or_else(|| "pickle stack underflow".to_string())
    }

    /// The container of the value on top of the stack, if it is a list (or dict, for `dict`).
    fn top_container(&mut self, dict: bool) -> Result<Option<&mut Container>, String> {
        let node = match (self.top()?, dict) {
            (Value::List(n), false) | (Value::Dict(n), true) => *n,
            _ => return Ok(None),
        };
        Ok(self.arena.get_mut(node))
    }

    fn string(&mut self, len: usize) -> Result<Value, String> {
        let bytes = self.take(len)?;
        Ok(Value::Str(String::from_utf8_lossy(bytes).into()))
    }

    fn run(mut self) -> Result<(Value, Vec<Container>), String> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => {
                    let root = self.pop()?; // STOP
                    return Ok((root, self.arena));
                }
                b'(' => self.push(Value::Mark)?,
                b'}' => {
                    let node = self.container(Container::Pairs(Vec::new()));
                    self.push(Value::Dict(node))?
                }
                b']' => {
                    let node = self.container(Container::Items(Vec::new()));
                    self.push(Value::List(node))?
                }
                b')' => {
                    let node = self.container(Container::Items(Vec::new()));
                    self.push(Value::Tuple(node))?
                }
                b'N' => self.push(Value::None)?,
                0x88 | 0x89 => self.push(Value::Scalar)?,
                b'K' => {
                    let v = self.u8()? as i64;
                    self.push(Value::Int(v))?;
                }
                b'M' => {
                    let b = self.take(2)?;
                    self.push(Value::Int(u16::from_le_bytes([b[0], b[1]]) as i64))?;
                }
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.push(Value::Int(v))?;
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
                    self.push(Value::Int(v))?;
                }
                b'G' => {
                    self.take(8)?; // BINFLOAT
                    self.push(Value::Scalar)?;
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.string(n)?;
                    self.push(v)?;
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.string(n)?;
                    self.push(v)?;
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| "truncated pickle")?);
                    let v = self.string(usize::try_from(n).map_err(|_| "truncated pickle")?)?;
                    self.push(v)?;
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    self.take(n)?;
                    self.push(Value::Scalar)?;
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    self.take(n)?;
                    self.push(Value::Scalar)?;
                }
                b'q' | b'r' | 0x94 => {
                    let i = match op {
                        b'q' => self.u8()? as u32,
                        b'r' => self.u32()?,
                        _ => self.memo.len() as u32,
                    };
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'h' | b'j' => {
                    let i = if op == b'h' { self.u8()? as u32 } else { self.u32()? };
                    let v = self.memo.get(&i).cloned().ok_or("pickle memo reference to nothing")?;
                    self.push(v)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Value::Global(module, name))?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.push(Value::Global(m, n))?,
                        _ => return Err("STACK_GLOBAL on non-strings".into()),
                    }
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let node = self.container(Container::Items(items));
                    self.push(Value::Tuple(node))?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("pickle stack underflow".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    let node = self.container(Container::Items(items));
                    self.push(Value::Tuple(node))?;
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let node = self.container(Container::Items(items));
                    self.push(Value::List(node))?;
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let node = self.container(Container::Pairs(pairs(items)?));
                    self.push(Value::Dict(node))?;
                }
                b'a' => {
                    let v = self.pop()?;
                    if let Some(Container::Items(list)) = self.top_container(false)? {
                        list.push(v);
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    if let Some(Container::Items(list)) = self.top_container(false)? {
                        list.extend(items);
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    if let Some(Container::Pairs(d)) = self.top_container(true)? {
                        d.push((k, v));
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let new = pairs(items)?;
                    if let Some(Container::Pairs(d)) = self.top_container(true)? {
                        d.extend(new);
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = persistent_load(&self.arena, pid)?;
                    self.push(v)?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.push(v)?;
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args): nothing we need lives behind it
                    self.pop()?;
                    self.pop()?;
                    self.push(Value::Opaque)?;
                }
                b'b' => {
                    self.pop()?; // BUILD: the state of an object (e.g. a state dict's _metadata); not needed
                }
                other => return Err(format!("unsupported pickle opcode 0x{other:02x} at byte {}", self.pos - 1)),
            }
        }
    }

    /// The items of a tuple value, or None.
    fn tuple(&self, v: &Value) -> Option<&[Value]> {
        match v {
            Value::Tuple(node) => match self.arena.get(*node)? {
                Container::Items(items) => Some(items),
                Container::Pairs(_) => None,
            },
            _ => None,
        }
    }

    fn reduce(&mut self, callable: Value, args: Value) -> Result<Value, String> {
        let Value::Global(module, name) = &callable else {
            return Ok(Value::Opaque);
        };
        let Some(args) = self.tuple(&args) else { return Ok(Value::Opaque) };
        match (&**module, &**name) {
            ("collections", "OrderedDict") => Ok(Value::Dict(self.container(Container::Pairs(Vec::new())))),
            ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
                let [Value::Storage(storage), Value::Int(offset), size, stride, ..] = args else {
                    return Err("malformed _rebuild_tensor arguments".into());
                };
                let dims = |v: &Value| -> Result<Vec<usize>, String> {
                    self.tuple(v)
                        .ok_or("tensor size or stride is not a tuple")?
                        .iter()
                        .map(|d| match d {
                            Value::Int(n) if *n >= 0 => Ok(*n as usize),
                            _ => Err("tensor dimension is not a non-negative integer".to_string()),
                        })
                        .collect()
                };
                if *offset < 0 {
                    return Err("negative storage offset".into());
                }
                Ok(Value::Tensor(Rc::new(TensorRef {
                    storage: StorageRef::clone(storage),
                    offset: *offset as usize,
                    shape: dims(size)?,
                    stride: dims(stride)?,
                })))
            }
            ("torch._utils", "_rebuild_parameter") | ("torch._utils", "_rebuild_parameter_with_state") => {
                Ok(args.first().cloned().unwrap_or(Value::Opaque))
            }
            _ => Ok(Value::Opaque),
        }
    }
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>, String> {
    if !items.len().is_multiple_of(2) {
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
fn persistent_load(arena: &[Container], pid: Value) -> Result<Value, String> {
    let items = match pid {
        Value::Tuple(node) => match arena.get(node) {
            Some(Container::Items(items)) => items.as_slice(),
            _ => return Err("persistent id is not a tuple".into()),
        },
        _ => return Err("persistent id is not a tuple".into()),
    };
    match items {
        [Value::Str(kind), Value::Global(_, class), Value::Str(key), ..] if &**kind == "storage" => {
            let dtype = match &**class {
                "FloatStorage" => Some(DType::F32),
                "HalfStorage" => Some(DType::F16),
                "BFloat16Storage" => Some(DType::BF16),
                _ => None,
            };
            Ok(Value::Storage(Rc::new(StorageRef { key: key.to_string(), class: class.to_string(), dtype })))
        }
        _ => Err("unrecognised persistent id (expected a torch storage)".into()),
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
            storage: StorageRef { key: "0".into(), class: "ByteStorage".into(), dtype: None },
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
    fn deep_nesting_neither_recurses_nor_overflows() {
        // A million tuples, each wrapping the last (TUPLE1), then a million MARKs closed one by one.
        let mut p = b"\x80\x02)".to_vec();
        p.resize(p.len() + 1_000_000, 0x85);
        p.push(b'.');
        let (root, arena) = Unpickler::new(&p).run().expect("a valid pickle");
        assert!(matches!(root, Value::Tuple(_)));
        drop(arena);
        let mut p = b"\x80\x02".to_vec();
        p.resize(p.len() + 1_000_000, b'(');
        p.resize(p.len() + 1_000_000, b't');
        p.push(b'.');
        assert!(Unpickler::new(&p).run().is_ok());
    }

    #[test]
    fn the_number_of_objects_is_bounded() {
        let mut p = b"\x80\x02".to_vec();
        p.resize(p.len() + MAX_PICKLE_OBJECTS + 1, b'N');
        p.push(b'.');
        let err = Unpickler::new(&p).run().err().expect("too many objects");
        assert!(err.contains("more than 4000000 objects"), "{err}");
    }

    #[test]
    fn a_state_dict_nested_in_itself_is_not_searched_forever() {
        // d = {}; d["state_dict"] = d
        let p = b"\x80\x02}q\x00X\x0a\x00\x00\x00state_dicth\x00s.";
        let (root, arena) = Unpickler::new(p).run().expect("a valid pickle");
        assert!(state_dict_entries(&arena, &root).is_none());
    }

    #[test]
    fn garbage_pickles_are_errors_not_panics() {
        for bytes in [&b""[..], b"\x80\x02}q\x00(", b"\xff", b"\x80\x02h\x05."] {
            assert!(Unpickler::new(bytes).run().is_err());
        }
    }
}
