//! `layerwise tokenizer train`, `train`, `train-exits` and `fit-conversions` end to end on a tiny
//! model: each writes a checkpoint the other commands load; a stopped run resumes to the same loss
//! curve; bad data, flags and layers are refused by name.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_fails_naming, layerwise, stderr};
use serde_json::Value;

/// A small corpus: 60 short sentences in a JSON Lines file.
fn corpus(dir: &Path) -> PathBuf {
    let words = ["the", "lord", "said", "unto", "moses", "and", "he", "went", "up", "into", "mountain", "of", "god"];
    let lines: Vec<String> = (0..60)
        .map(|i| {
            let sentence: Vec<&str> = (0..9).map(|j| words[(i * 7 + j * 3 + i / 5) % words.len()]).collect();
            serde_json::json!({ "text": format!("{}.", sentence.join(" ")) }).to_string()
        })
        .collect();
    let path = dir.join("data.jsonl");
    std::fs::write(&path, lines.join("\n")).expect("write corpus");
    path
}

/// A tokenizer of 300 tokens trained on the corpus, and a 2-layer GPT-2 config with an exit on layer 1.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let data = corpus(dir);
    let tok = dir.join("tok");
    let out = layerwise(&["tokenizer", "train", "--data", s(&data), "--vocab-size", "300", "--out", s(&tok)]);
    assert!(out.status.success(), "tokenizer train: {}", stderr(&out));
    assert!(tok.join("tokenizer.json").is_file());
    let config = serde_json::json!({
        "model_type": "gpt2", "vocab_size": 300, "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 32,
        "bos_token_id": 0, "eos_token_id": 0, "lm_head_layer_indices": [1]
    });
    std::fs::write(tok.join("config.json"), config.to_string()).expect("config");
    (data, tok)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn train_args<'a>(data: &'a str, tok: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--config",
        tok,
        "--data",
        data,
        "--eval-data",
        data,
        "--out",
        out,
        "--max-steps",
        "6",
        "--batch-size",
        "2",
        "--block-size",
        "16",
        "--warmup-steps",
        "1",
        "--save-every",
        "2",
    ]
}

fn losses(dir: &Path) -> Vec<f64> {
    let log: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("training-log.json")).expect("log")).expect("json");
    log["steps"].as_array().expect("steps").iter().map(|r| r["loss"].as_f64().expect("loss")).collect()
}

#[test]
fn a_model_trained_from_scratch_gains_exits_and_conversions_and_generates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, tok) = setup(dir.path());
    let model = dir.path().join("model");
    let out = layerwise(&train_args(s(&data), s(&tok), s(&model)));
    let err = stderr(&out);
    assert!(out.status.success(), "train: {err}");
    assert!(err.contains("held-out loss") && err.contains("exit 1") && err.contains("original"), "{err}");
    assert_eq!(losses(&model).len(), 6);
    assert!(std::fs::read_to_string(model.join("loss-curve.svg")).expect("svg").contains("<svg"));
    let generated = layerwise(&["generate", "--model", s(&model), "--prompt", "the lord", "--max-new-tokens", "4"]);
    assert!(generated.status.success(), "generate: {}", stderr(&generated));

    // More pre-training from the checkpoint's weights (a fresh optimizer).
    let more = dir.path().join("more");
    let mut args = train_args(s(&data), s(&tok), s(&more));
    args.extend(["--init", s(&model)]);
    let out = layerwise(&args);
    assert!(out.status.success(), "train --init: {}", stderr(&out));
    assert!(losses(&more)[0] < losses(&model)[0], "starting from trained weights starts lower");

    // A second exit head on layer 2, the base frozen.
    let exits = dir.path().join("exits");
    let out = layerwise(&[
        "train-exits",
        "--model",
        s(&model),
        "--layers",
        "2",
        "--data",
        s(&data),
        "--out",
        s(&exits),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--block-size",
        "16",
    ]);
    assert!(out.status.success(), "train-exits: {}", stderr(&out));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(exits.join("config.json")).expect("config")).expect("json");
    assert_eq!(config["lm_head_layer_indices"], serde_json::json!([1, 2]));
    let early =
        layerwise(&["generate", "--model", s(&exits), "--exit", "2", "--prompt", "the", "--max-new-tokens", "3"]);
    assert!(early.status.success(), "generate --exit 2: {}", stderr(&early));

    // A conversion matrix for layer 1, read by --converted.
    let conv = dir.path().join("conv");
    let out =
        layerwise(&["fit-conversions", "--model", s(&model), "--layers", "1", "--data", s(&data), "--out", s(&conv)]);
    assert!(out.status.success(), "fit-conversions: {}", stderr(&out));
    assert!(stderr(&out).contains("unexplained"), "{}", stderr(&out));
    let converted = layerwise(&[
        "generate",
        "--model",
        s(&conv),
        "--exit",
        "1",
        "--converted",
        "--prompt",
        "the",
        "--max-new-tokens",
        "3",
    ]);
    assert!(converted.status.success(), "generate --converted: {}", stderr(&converted));
}

#[test]
fn a_stopped_run_resumes_to_the_same_loss_curve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, tok) = setup(dir.path());
    let whole = dir.path().join("whole");
    assert!(layerwise(&train_args(s(&data), s(&tok), s(&whole))).status.success());
    let parts = dir.path().join("parts");
    let mut first = train_args(s(&data), s(&tok), s(&parts));
    first.extend(["--stop-after", "3"]);
    assert!(layerwise(&first).status.success());
    assert_eq!(losses(&parts).len(), 3);
    let out = layerwise(&train_args(s(&data), s(&tok), s(&parts)));
    assert!(stderr(&out).contains("resuming") && stderr(&out).contains("at step 3"), "{}", stderr(&out));
    assert_eq!(losses(&parts), losses(&whole));
}

#[test]
fn bad_training_input_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, tok) = setup(dir.path());
    let out = dir.path().join("out");
    let (data, tok, out) = (s(&data), s(&tok), s(&out));
    // A JSON Lines file without the column.
    let other = dir.path().join("other.jsonl");
    std::fs::write(&other, "{\"body\": \"text\"}\n").expect("write");
    assert_fails_naming(
        &["train", "--config", tok, "--data", s(&other), "--out", out],
        &["other.jsonl", "line 1", "`text`"],
    );
    assert_fails_naming(
        &["train", "--config", tok, "--data", data, "--column", "body", "--out", out],
        &["data.jsonl", "line 1", "no `body` field"],
    );
    // Empty data.
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n").expect("write");
    assert_fails_naming(&["train", "--config", tok, "--data", s(&empty), "--out", out], &["empty.txt", "no documents"]);
    // Sequences longer than the context.
    assert_fails_naming(
        &["train", "--config", tok, "--data", data, "--out", out, "--block-size", "64"],
        &["--block-size 64", "context of 32"],
    );
    // Layers the model does not have.
    let model = dir.path().join("model");
    assert!(layerwise(&train_args(data, tok, s(&model))).status.success());
    assert_fails_naming(
        &["train-exits", "--model", s(&model), "--layers", "9", "--data", data, "--out", out],
        &["--layers", "layer 9", "1..=2"],
    );
    assert_fails_naming(
        &["fit-conversions", "--model", s(&model), "--layers", "2", "--data", data, "--out", out],
        &["--layers", "layer 2"],
    );
    // A tokenizer larger than the config's vocabulary.
    let small = dir.path().join("small.json");
    let config = serde_json::json!({"model_type": "gpt2", "vocab_size": 100, "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 32});
    std::fs::write(&small, config.to_string()).expect("write");
    assert_fails_naming(
        &["train", "--config", s(&small), "--tokenizer", tok, "--data", data, "--out", out],
        &["tokens do not fit", "vocab_size of 100"],
    );
    // A tokenizer vocabulary below the byte alphabet.
    assert_fails_naming(
        &["tokenizer", "train", "--data", data, "--vocab-size", "100", "--out", out],
        &["--vocab-size", "256"],
    );
}
