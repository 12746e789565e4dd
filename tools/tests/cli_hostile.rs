//! Hostile sizes and files on the command line (issue #13): each is refused before anything is
//! sized by it, with an error naming the flag and the limit, inside a 4 GB address-space limit
//! (`ulimit -v`), so an attempt to allocate what was asked for would fail the test by a signal.

use std::process::Command;

const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/demo-gpt2-multiexit");

/// Peak resident memory a refusal may take: the demo checkpoint (10 MB) mapped and its tokenizer
/// built, nothing sized by the hostile value.
const REFUSAL_PEAK_MIB: f64 = 256.0;

/// Runs `layerwise args` under a 4 GB address-space limit; asserts a clean failure whose message
/// holds every part, within [`REFUSAL_PEAK_MIB`] of peak memory (printed, for the README's table).
fn refused_naming(args: &[&str], parts: &[&str]) {
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 4000000 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_layerwise"))
        .args(args)
        .env("LAYERWISE_PEAK_RSS", "1")
        .output()
        .expect("run layerwise");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: status {:?}, stderr {err}", out.status);
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    for part in parts {
        assert!(err.contains(part), "{args:?}: error {err:?} should mention {part:?}");
    }
    let peak: f64 = err
        .lines()
        .find_map(|l| l.strip_prefix("layerwise: peak RSS "))
        .and_then(|v| v.trim_end_matches(" MiB").parse().ok())
        .unwrap_or_else(|| panic!("{args:?}: no peak RSS report in {err}"));
    eprintln!("hostile {args:?}: refused, peak RSS {peak:.1} MiB");
    assert!(peak < REFUSAL_PEAK_MIB, "{args:?}: peak RSS {peak:.1} MiB");
}

#[test]
fn hostile_max_new_tokens_beyond_the_context_is_refused_before_the_cache_is_sized() {
    refused_naming(
        &["generate", "--model", DEMO, "--prompt", "Hello", "--max-new-tokens", "1000000000000"],
        &["--max-new-tokens", "context of 64 positions"],
    );
}

#[test]
fn hostile_beams_that_need_more_cache_than_memory_are_refused() {
    refused_naming(
        &["generate", "--model", DEMO, "--prompt", "Hello", "--max-new-tokens", "5", "--num-beams", "100000000"],
        &["--num-beams", "GB of keys and values", "memory"],
    );
}

#[test]
fn hostile_contrastive_top_k_beyond_the_vocabulary_is_refused() {
    refused_naming(
        &["generate", "--model", DEMO, "--prompt", "Hello", "--penalty-alpha", "0.6", "--top-k", "100000"],
        &["--top-k", "vocabulary of 50257 tokens"],
    );
}

#[test]
fn hostile_bench_batch_that_needs_more_cache_than_memory_is_refused() {
    refused_naming(
        &["bench", "--model", DEMO, "--batch", "100000000", "--prompt-len", "8", "--new-tokens", "8"],
        &["--batch", "GB of keys and values"],
    );
}

#[test]
fn hostile_endless_generation_config_is_refused_by_size() {
    refused_naming(
        &["generate", "--model", DEMO, "--prompt", "Hello", "--generation-config", "/dev/zero"],
        &["--generation-config", "/dev/zero", "larger than 16 MiB"],
    );
}

#[test]
fn hostile_weights_truncated_during_generation_end_with_a_message_not_a_silent_signal() {
    // The weights are mapped: a file that shrinks under a running generation raises SIGBUS at the
    // next read of a vanished page. The CLI reports it and exits with 135 (128 + SIGBUS).
    let tmp = tempfile::tempdir().expect("temp dir");
    for entry in std::fs::read_dir(DEMO).expect("demo") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).expect("copy");
    }
    let model = tmp.path().to_string_lossy().into_owned();
    // The reference backend at batch 2048: minutes of work, cut short by the truncation.
    let child = Command::new(env!("CARGO_BIN_EXE_layerwise"))
        .args(["bench", "--model", &model, "--device", "reference", "--batch", "2048", "--prompt-len", "4"])
        .args(["--new-tokens", "60"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run layerwise");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    std::fs::File::create(tmp.path().join("model.safetensors")).expect("truncate");
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(135), "status {:?}, stderr {err}", out.status);
    assert!(err.contains("a weights file shrank while in use"), "{err}");
}
