//! The fuzz targets' bodies: each hands bytes to one loader the way a user's file reaches it (written
//! to a file, opened through the public API) and may end only in an error, never a panic, a signal
//! or unbounded memory. `fuzz/fuzz_targets/*.rs` run them under libFuzzer (`cargo +nightly fuzz run
//! <target>`); `tests/tests/fuzz_corpus.rs` replays the committed corpus and every crash reproducer
//! through them on stable, in `cargo test`.

use std::io::Write;
use std::path::{Path, PathBuf};

use layerwise::generation::GenerationConfig;
use layerwise::{HeadMask, ModelSpec, Tokenizer, Weights};

/// A target's body: any bytes in, nothing out but its side effects.
pub type Target = fn(&[u8]);

/// The targets, by name (the fuzz crate's binaries and the corpus folders are named alike).
pub const TARGETS: [(&str, Target); 6] = [
    ("safetensors_header", safetensors_header),
    ("torch_pickle", torch_pickle),
    ("config_json", config_json),
    ("tokenizer_files", tokenizer_files),
    ("generation_config", generation_config),
    ("head_mask", head_mask),
];

/// A scratch folder for this process's files (on /dev/shm where there is one: fuzzing writes a
/// file per run).
fn scratch(name: &str) -> PathBuf {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() };
        dir.expect("a scratch folder")
    });
    dir.path().join(name)
}

fn write(name: &str, data: &[u8]) -> PathBuf {
    let path = scratch(name);
    std::fs::write(&path, data).expect("write the scratch file");
    path
}

/// A safetensors file: its header (offsets, dtypes, shapes, duplicates) and then every tensor read.
pub fn safetensors_header(data: &[u8]) {
    let path = write("model.safetensors", data);
    if let Ok(weights) = Weights::open(&[path]) {
        let names: Vec<String> = weights.names().map(str::to_string).collect();
        for name in names {
            if let Ok(tensor) = weights.get(&name) {
                let values = tensor.data();
                if !values.is_empty() {
                    let _ = values.get(values.len() - 1);
                }
            }
        }
    }
}

/// A torch archive (`pytorch_model.bin`) whose `data.pkl` is `data`, beside two small storages.
pub fn torch_pickle(data: &[u8]) {
    let path = scratch("pytorch_model.bin");
    let file = std::fs::File::create(&path).expect("create the archive");
    let mut zip = zip::ZipWriter::new(file);
    let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let storages: [(&str, Vec<u8>); 2] = [("0", (0..64u8).collect()), ("1", vec![0x3f; 256])];
    let entries = std::iter::once(("archive/data.pkl".to_string(), data.to_vec()))
        .chain(std::iter::once(("archive/byteorder".to_string(), b"little".to_vec())))
        .chain(storages.iter().map(|(key, bytes)| (format!("archive/data/{key}"), bytes.clone())));
    for (name, bytes) in entries {
        zip.start_file(name, stored).expect("zip entry");
        zip.write_all(&bytes).expect("zip write");
    }
    zip.finish().expect("zip finish");
    let _ = layerwise::io::torch_pickle::read_state_dict(&path);
}

/// A `config.json`, then what loading derives from it.
pub fn config_json(data: &[u8]) {
    let path = write("config.json", data);
    if let Ok(spec) = ModelSpec::from_file(&path) {
        let _ = spec.describe_exits();
        for layer in 0..spec.num_layers.min(64) {
            let _ = spec.kept_heads(layer);
        }
    }
}

/// A `tokenizer.json` (first byte even), or `vocab.json` and `merges.txt` split at the first NUL
/// byte (first byte odd); then an encode and a decode.
pub fn tokenizer_files(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let tokenizer = if mode % 2 == 0 {
        Tokenizer::from_json_file(&write("tokenizer.json", rest))
    } else {
        let at = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        let vocab = write("vocab.json", &rest[..at]);
        let merges = write("merges.txt", rest.get(at + 1..).unwrap_or_default());
        Tokenizer::from_vocab_merges(&vocab, &merges, None, None)
    };
    if let Ok(tokenizer) = tokenizer {
        if let Ok(ids) = tokenizer.encode("Hello world, \u{1d11e} ok.\n") {
            let _ = tokenizer.decode(&ids);
        }
        let _ = tokenizer.decode(&[0, 1, 2, u32::MAX]);
    }
}

fn gpt2_spec() -> ModelSpec {
    let text = include_str!("../fixtures/gpt2-sharded/config.json");
    ModelSpec::from_json(text, Path::new("config.json")).expect("the fixture's config")
}

/// A `generation_config.json` over the GPT-2 fixture's config, resolved to a strategy and checked
/// against the model.
pub fn generation_config(data: &[u8]) {
    let path = write("generation_config.json", data);
    let spec = gpt2_spec();
    if let Ok(config) = GenerationConfig::for_checkpoint(&spec, Some(&path)) {
        if let Ok(options) = config.resolve() {
            let _ = options.check(3, &spec);
        }
    }
}

/// A `--head-mask` JSON file, checked against the GPT-2 fixture's layers and heads.
pub fn head_mask(data: &[u8]) {
    let Ok(text) = layerwise::io::read_text(&write("head_mask.json", data)) else { return };
    let _ = HeadMask::from_json(&text, &gpt2_spec());
}
