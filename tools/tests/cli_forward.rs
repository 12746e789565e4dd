//! The `layerwise forward` contract: tensor names, shapes and values in the output file, and clear
//! errors (naming the flag or file) for bad invocations.

mod common;

use std::path::Path;

use common::{assert_fails_naming, layerwise, stderr};
use layerwise_tests::{assert_close, expected, expected_ids, fixture_str, read_safetensors};

#[test]
fn forward_writes_logits_exits_and_hidden_states() {
    let tmp = tempfile::tempdir().expect("tmp");
    let file = tmp.path().join("out.safetensors");
    let recorded = expected("gpt2-sharded");
    let ids: Vec<String> = expected_ids(&recorded).iter().map(u32::to_string).collect();
    let out = layerwise(&[
        "forward",
        "--model",
        &fixture_str("gpt2-sharded"),
        "--prompt-ids",
        &ids.join(","),
        "--out",
        &file.to_string_lossy(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let written = read_safetensors(&file);
    let mut names: Vec<&str> = written.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["exit.1", "exit.2", "exit.4", "hidden.0", "hidden.1", "hidden.2", "hidden.3", "hidden.4", "logits"]
    );
    let t = ids.len();
    for (name, tensor) in &written {
        let width = if name.starts_with("hidden.") { 32 } else { 96 };
        assert_eq!(tensor.shape, vec![t, width], "{name}");
        let values: Vec<f32> = tensor.values.iter().map(|&v| v as f32).collect();
        assert_close(name, &values, &recorded[name], 1e-4);
    }
}

#[test]
fn forward_tokenizes_text_prompts() {
    let tmp = tempfile::tempdir().expect("tmp");
    let file = tmp.path().join("demo.safetensors");
    let demo = fixture_str("demo-gpt2-multiexit");
    let out = layerwise(&[
        "forward",
        "--model",
        &demo,
        "--prompt",
        "The benefits of bad advice",
        "--out",
        &file.to_string_lossy(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The random demo fixture's recorded prompt is this text.
    let recorded = expected("demo-gpt2-multiexit");
    let written = read_safetensors(&file);
    let logits: Vec<f32> = written["logits"].values.iter().map(|&v| v as f32).collect();
    assert_eq!(written["logits"].shape[0], expected_ids(&recorded).len());
    assert_close("demo logits", &logits, &recorded["logits"], 1e-4);
}

#[test]
fn forward_errors_name_what_is_wrong() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out_file = tmp.path().join("x.safetensors");
    let out_file = out_file.to_string_lossy();
    let tiny = fixture_str("gpt2-sharded");
    assert_fails_naming(
        &["forward", "--model", &tiny, "--prompt-ids", "1,x", "--out", &out_file],
        &["--prompt-ids", "`x`"],
    );
    assert_fails_naming(
        &["forward", "--model", &tiny, "--prompt-ids", "1,500", "--out", &out_file],
        &["--prompt-ids", "500", "vocabulary"],
    );
    assert_fails_naming(
        &["forward", "--model", &tiny, "--prompt", "hello", "--out", &out_file],
        &["--prompt", "tokenizer"],
    );
    assert_fails_naming(
        &["forward", "--model", "/no/such/dir", "--prompt-ids", "1", "--out", &out_file],
        &["/no/such/dir"],
    );
    assert_fails_naming(
        &["forward", "--model", &tiny, "--prompt", "a", "--prompt-ids", "1", "--out", &out_file],
        &["--prompt"],
    );
    assert_fails_naming(&["forward", "--model", &tiny, "--out", &out_file], &["--prompt"]);
    let unwritable = "/no/such/dir/out.safetensors";
    assert_fails_naming(
        &["forward", "--model", &tiny, "--prompt-ids", "1", "--out", unwritable],
        &["--out", unwritable],
    );
    assert!(!Path::new(unwritable).exists());
}
