//! `layerwise classify`: labels and probabilities of the BERT classifier fixture as transformers
//! computed them (tools/scripts/make_bert_fixtures.py), the accuracy line, the JSON list, plain text
//! files, pairs, and bad flags named.

mod common;

use common::{assert_fails_naming, layerwise, stderr};
use layerwise_tests::{fixture, read_safetensors};

fn classifier() -> String {
    fixture("bert").join("bert-classifier").to_string_lossy().into_owned()
}

fn dataset() -> String {
    fixture("bert").join("emotions.jsonl").to_string_lossy().into_owned()
}

#[test]
fn json_labels_probabilities_and_accuracy_equal_transformers() {
    let out = layerwise(&[
        "classify",
        "--model",
        &classifier(),
        "--texts",
        &dataset(),
        "--labels-column",
        "label",
        "--json",
        "--batch-size",
        "7",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON list");
    let list = list.as_array().expect("a list");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("bert").join("expected.json")).unwrap()).unwrap();
    let predicted = meta["emotions"]["predicted"].as_array().unwrap();
    assert_eq!(list.len(), predicted.len());
    let probs = &read_safetensors(&fixture("bert").join("expected.safetensors"))["classifier.emotions.probs"];
    for (i, (item, want)) in list.iter().zip(predicted).enumerate() {
        assert_eq!(&item["label"], want, "text {i}");
        for (j, p) in item["probs"].as_array().unwrap().iter().enumerate() {
            assert!((p.as_f64().unwrap() - probs.values[i * 3 + j]).abs() < 1e-5, "text {i} label {j}");
        }
        assert!(item["expected"].is_string());
    }
    let accuracy = meta["emotions"]["accuracy"].as_f64().unwrap();
    assert!(stderr(&out).contains(&format!("accuracy: {accuracy:.4} (28 of 30 correct")), "{}", stderr(&out));
}

#[test]
fn plain_text_lines_and_pairs_from_csv() {
    let dir = tempfile::tempdir().unwrap();
    let lines = dir.path().join("texts.txt");
    std::fs::write(&lines, "i feel so happy today\n\ni hate this terrible rain\n").unwrap();
    let out = layerwise(&["classify", "--model", &classifier(), "--texts", lines.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let labels: Vec<&str> = text.lines().map(|l| l.split('\t').next().unwrap()).collect();
    assert_eq!(labels, ["joy", "anger"], "{text}");

    // Pairs, and labels given by index.
    let csv = dir.path().join("pairs.csv");
    std::fs::write(&csv, "a,b,gold\ni am so glad,you smile,1\ni cry,at night,0\n").unwrap();
    let args = ["classify", "--model", &classifier(), "--texts", csv.to_str().unwrap(), "--text-column", "a"];
    let out = layerwise(&[&args[..], &["--pair-column", "b", "--labels-column", "gold"]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("of 2 correct"), "{}", stderr(&out));
}

#[test]
fn bad_flags_and_files_are_named() {
    let bare = fixture("bert").join("bert-random").to_string_lossy().into_owned();
    assert_fails_naming(&["classify", "--model", &bare, "--texts", &dataset()], &["--model", "classification head"]);
    assert_fails_naming(
        &["classify", "--model", &classifier(), "--texts", &dataset(), "--labels-column", "nope"],
        &["--labels-column nope", "no such column", "row 1"],
    );
    assert_fails_naming(
        &["classify", "--model", &classifier(), "--texts", &dataset(), "--text-column", "body"],
        &["--text-column body", "no such column"],
    );
    assert_fails_naming(
        &["classify", "--model", &classifier(), "--texts", &dataset(), "--device", "cuda"],
        &["--device cuda", "CPU"],
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"i cry\", \"label\": \"fear\"}\n").unwrap();
    assert_fails_naming(
        &["classify", "--model", &classifier(), "--texts", bad.to_str().unwrap(), "--labels-column", "label"],
        &["`fear`", "sadness, joy, anger"],
    );
    // A decoder's commands refuse an encoder, by name.
    assert_fails_naming(&["generate", "--model", &classifier(), "--prompt", "hi"], &["bert is an encoder", "classify"]);
}
