//! Hostile inputs (issue #13): one case per class of bad input that once ended badly, each checked
//! for a clear error that names the culprit, a bounded footprint, or the right output. Torch archives
//! are written here by hand (a zip of `archive/data.pkl` and `archive/data/<key>`), as torch.save
//! lays them out.

use std::io::Write;
use std::path::{Path, PathBuf};

use layerwise::io::torch_pickle::{converted_safetensors, read_state_dict};
use layerwise::Weights;

/// A private conversion cache for this test binary (every test sets the same value).
fn private_cache() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("temp dir")).path();
    std::env::set_var("LAYERWISE_CACHE", dir);
    dir
}

/// Peak resident memory of this process so far, in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A torch archive at `dir/name` holding `pickle` and the given storages.
fn archive(dir: &Path, name: &str, pickle: &[u8], storages: &[(&str, &[u8])]) -> PathBuf {
    let path = dir.join(name);
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).expect("create"));
    let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", stored).expect("entry");
    zip.write_all(pickle).expect("write");
    zip.start_file("archive/byteorder", stored).expect("entry");
    zip.write_all(b"little").expect("write");
    for (key, bytes) in storages {
        zip.start_file(format!("archive/data/{key}"), stored).expect("entry");
        zip.write_all(bytes).expect("write");
    }
    zip.finish().expect("finish");
    path
}

fn short_string(text: &str) -> Vec<u8> {
    let mut out = vec![0x8c, text.len() as u8];
    out.extend(text.as_bytes());
    out
}

/// One state-dict entry: `name` -> a `rows x cols` tensor over storage `key` of torch class `class`.
fn tensor_entry(name: &str, class: &str, key: &str, rows: u8, cols: u8) -> Vec<u8> {
    let mut p = short_string(name);
    p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
    // the persistent id ("storage", class, key, "cpu", numel), then BINPERSID
    p.push(b'(');
    p.extend(short_string("storage"));
    p.extend(format!("ctorch\n{class}\n").bytes());
    p.extend(short_string(key));
    p.extend(short_string("cpu"));
    p.extend([b'K', rows * cols, b't', b'Q']);
    p.extend([b'K', 0, b'K', rows, b'K', cols, 0x86, b'K', cols, b'K', 1, 0x86, 0x89]);
    p.extend(b"ccollections\nOrderedDict\n)Rt");
    p.push(b'R');
    p
}

/// A state dict pickle: `{entries...}` (each entry's bytes push a key and a value).
fn state_dict(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut p = b"\x80\x02}(".to_vec();
    for e in entries {
        p.extend(e);
    }
    p.extend(b"u.");
    p
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Runs `test` again alone in a child process (so that its peak memory is its own, not that of the
/// tests beside it); true in the child, where the test's body runs.
fn alone_in_a_child(test: &str) -> bool {
    if std::env::var_os("LAYERWISE_HOSTILE_CHILD").is_some() {
        return true;
    }
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env("LAYERWISE_HOSTILE_CHILD", "1")
        .output()
        .expect("run the child");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprint!("{stderr}");
    assert!(out.status.success() && stdout.contains("1 passed"), "{test} in the child:\n{stdout}\n{stderr}");
    false
}

/// Reads a torch archive whose `data.pkl` is `pickle` (alone in a child process, so that the peak
/// memory is its own): asserts an error naming the file and saying `why`, and peak memory growth
/// under `bound_mib` (printed, for the README).
fn refused_in_bounded_memory(test: &str, what: &str, pickle: &[u8], why: &str, bound_mib: f64) {
    if !alone_in_a_child(test) {
        return;
    }
    private_cache();
    let dir = tempfile::tempdir().expect("temp dir");
    let bin = archive(dir.path(), "hostile.bin", pickle, &[]);
    let before = peak_rss_mib();
    let err = read_state_dict(&bin).err().expect("refused").to_string();
    let grew = peak_rss_mib() - before;
    eprintln!("hostile {what} ({} bytes of pickle): peak RSS grew {grew:.1} MiB", pickle.len());
    assert!(err.contains("hostile.bin") && err.contains(why), "{err}");
    assert!(grew < bound_mib, "peak RSS grew {grew} MiB");
}

#[test]
fn hostile_pickle_billion_laughs_is_refused_in_bounded_memory() {
    // 40 levels of lists of 10 references to the level below: 10^40 objects if copied.
    let mut p = b"\x80\x02]q\x00".to_vec();
    for level in 1u8..=40 {
        p.push(b'(');
        for _ in 0..10 {
            p.extend([b'h', level - 1]);
        }
        p.extend([b'l', b'q', level]);
    }
    p.push(b'.');
    let test = "hostile_pickle_billion_laughs_is_refused_in_bounded_memory";
    refused_in_bounded_memory(test, "billion laughs", &p, "does not hold a state dict", 64.0);
}

#[test]
fn hostile_pickle_nested_a_million_deep_is_an_error_not_a_crash() {
    let mut p = b"\x80\x02".to_vec();
    p.resize(p.len() + 1_000_000, b'(');
    p.resize(p.len() + 1_000_000, b'l');
    p.push(b'.');
    let test = "hostile_pickle_nested_a_million_deep_is_an_error_not_a_crash";
    refused_in_bounded_memory(test, "pickle nested 10^6 deep", &p, "does not hold a state dict", 256.0);
}

#[test]
fn hostile_pickle_with_millions_of_objects_is_refused_by_count() {
    let mut p = b"\x80\x02".to_vec();
    p.resize(p.len() + 5_000_000, b'N');
    p.push(b'.');
    let test = "hostile_pickle_with_millions_of_objects_is_refused_by_count";
    refused_in_bounded_memory(test, "pickle of 5 * 10^6 objects", &p, "more than 4000000 objects", 256.0);
}

#[test]
fn hostile_bin_replaced_by_one_of_the_same_size_and_time_is_converted_again() {
    private_cache();
    let dir = tempfile::tempdir().expect("temp dir");
    let pickle = state_dict(&[tensor_entry("w", "FloatStorage", "0", 2, 2)]);
    let first = archive(dir.path(), "model.bin", &pickle, &[("0", &f32_bytes(&[1.0, 2.0, 3.0, 4.0]))]);
    let time = std::fs::metadata(&first).expect("meta").modified().expect("mtime");
    let converted = converted_safetensors(&first).expect("convert");
    let weights = Weights::open(&[converted]).expect("open");
    assert_eq!(weights.get("w").expect("w").data().to_f32_vec(), [1.0, 2.0, 3.0, 4.0]);

    let again = archive(dir.path(), "model.bin", &pickle, &[("0", &f32_bytes(&[5.0, 6.0, 7.0, 8.0]))]);
    std::fs::File::options().write(true).open(&again).expect("open").set_modified(time).expect("set mtime");
    assert_eq!(std::fs::metadata(&again).expect("meta").len(), std::fs::metadata(&first).expect("meta").len());
    let converted = converted_safetensors(&again).expect("convert");
    let weights = Weights::open(&[converted]).expect("open");
    assert_eq!(weights.get("w").expect("w").data().to_f32_vec(), [5.0, 6.0, 7.0, 8.0], "the old conversion was served");
}

#[test]
fn hostile_bin_with_integer_or_non_tensor_entries_names_them() {
    private_cache();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut count = short_string("step");
    count.extend([b'K', 7]);
    let pickle = state_dict(&[
        tensor_entry("w", "FloatStorage", "0", 1, 2),
        tensor_entry("ids", "LongStorage", "1", 1, 2),
        count,
    ]);
    let bin = archive(dir.path(), "mixed.bin", &pickle, &[("0", &f32_bytes(&[1.0, 2.0])), ("1", &[0u8; 16])]);
    let weights = Weights::open(&[converted_safetensors(&bin).expect("convert")]).expect("open");
    assert_eq!(weights.get("w").expect("w").data().to_f32_vec(), [1.0, 2.0]);
    let err = weights.get("ids").expect_err("not converted").to_string();
    assert!(err.contains("ids") && err.contains("mixed.bin") && err.contains("LongStorage"), "{err}");
    let err = weights.get("step").expect_err("not a tensor").to_string();
    assert!(err.contains("step") && err.contains("is not a tensor"), "{err}");
}

/// A copy of the sharded GPT-2 fixture in `dir` with element 0 of `tensor` set to `value`.
fn fixture_with(dir: &Path, tensor: &str, value: f32) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/gpt2-sharded");
    let copy = dir.join("gpt2-poisoned");
    std::fs::create_dir_all(&copy).expect("dir");
    for entry in std::fs::read_dir(&source).expect("fixture") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), copy.join(entry.file_name())).expect("copy");
    }
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(copy.join("model.safetensors.index.json")).expect("index"))
            .expect("json");
    let shard = copy.join(index["weight_map"][tensor].as_str().expect("tensor in the index"));
    let mut bytes = std::fs::read(&shard).expect("shard");
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).expect("header");
    assert_eq!(header[tensor]["dtype"], "F32", "{tensor}");
    let start = 8 + header_len + header[tensor]["data_offsets"][0].as_u64().expect("offset") as usize;
    bytes[start..start + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(&shard, bytes).expect("write");
    copy
}

/// Greedy generation on a model with one poisoned weight: the error it must end with.
fn generation_error(dir: &Path, plan: layerwise::exits::PlanOptions) -> String {
    use layerwise::generation::{generate, GenerationOptions};
    use layerwise::runtime::{Decoder, DecoderOptions};
    let loaded = layerwise::load(dir.to_str().expect("utf-8 path")).expect("load");
    let options = GenerationOptions { max_new_tokens: 3, ..Default::default() };
    let mut decoder = Decoder::new(&loaded.model, DecoderOptions { plan, ..Default::default() }).expect("decoder");
    match generate(&mut decoder, &[5, 17, 42], &options, None, |_| true) {
        Ok(out) => panic!("generated {:?} from a model with a non-finite weight", out.sequences),
        Err(e) => {
            assert!(matches!(e, layerwise::Error::NonFinite { .. }), "{e:?}");
            e.to_string()
        }
    }
}

#[test]
fn hostile_nan_or_inf_in_a_weight_stops_generation_naming_where_it_appeared() {
    use layerwise::exits::{ExitPlan, PlanOptions};
    let dir = tempfile::tempdir().expect("temp dir");
    // NaN in block 2's MLP: finite through block 2's second norm, NaN from its MLP output on.
    let poisoned = fixture_with(dir.path(), "transformer.h.2.mlp.c_fc.weight", f32::NAN);
    let message = generation_error(&poisoned, PlanOptions::default());
    assert!(message.contains("NaN first appears at `h.2.mlp` (block 2's MLP output)"), "{message}");
    assert!(message.contains("sequence 0"), "{message}");
    // An exit below the poisoned block is not affected: it generates.
    let loaded = layerwise::load(poisoned.to_str().expect("utf-8 path")).expect("load");
    let plan = PlanOptions { plan: ExitPlan::Exit(2), ..Default::default() };
    let mut decoder = layerwise::runtime::Decoder::new(
        &loaded.model,
        layerwise::runtime::DecoderOptions { plan, ..Default::default() },
    )
    .expect("decoder");
    let options = layerwise::generation::GenerationOptions { max_new_tokens: 3, ..Default::default() };
    layerwise::generation::generate(&mut decoder, &[5, 17, 42], &options, None, |_| true).expect("exit 2 is finite");

    // +inf in an exit head: every block is finite, the head's logits are not.
    let dir = tempfile::tempdir().expect("temp dir");
    let poisoned = fixture_with(dir.path(), "name_to_lm_exit_head.lm_head_2.weight", f32::INFINITY);
    let message = generation_error(&poisoned, PlanOptions { plan: ExitPlan::Exit(2), ..Default::default() });
    assert!(
        message.contains("every block's values are finite")
            && message.contains("the exit head `name_to_lm_exit_head.lm_head_2.weight`"),
        "{message}"
    );
}

#[test]
fn hostile_tokenizer_json_that_panics_the_tokenizers_crate_is_an_error() {
    // Found by the tokenizer_files fuzzer: a decoder object with a non-string key makes tokenizers
    // 0.22 panic inside its deserializer (decoders/mod.rs). The first byte is the target's mode.
    let reproducer =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/artifacts/tokenizer_files/crash-decoder-key-not-a-string");
    let bytes = std::fs::read(reproducer).expect("the committed reproducer");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, &bytes[1..]).expect("write");
    let err = layerwise::Tokenizer::from_json_file(&path).err().expect("a malformed tokenizer.json");
    let message = err.to_string();
    assert!(message.contains("tokenizer.json") && message.contains("tokenizers library failed"), "{message}");
}
