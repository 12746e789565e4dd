//! `layerwise heads`: the entropy, importance and pruning files, and a pruned checkpoint that loads.

mod common;

use common::{assert_fails_naming, layerwise, stderr};

#[test]
fn heads_writes_tables_plots_and_a_pruned_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let texts = dir.path().join("texts.txt");
    std::fs::write(&texts, "The benefits of bad advice\n\nA second text, somewhat longer than the first one.\n")
        .unwrap();
    let out = dir.path().join("heads");
    // The random demo fixture: 4 layers of 4 heads.
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/demo-gpt2-multiexit");
    let args = [
        "heads",
        "--model",
        demo,
        "--texts",
        texts.to_str().unwrap(),
        "--threshold",
        "0.05",
        "--prune",
        "--out",
        out.to_str().unwrap(),
    ];
    let result = layerwise(&args);
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(stderr(&result).contains("2 texts"), "{}", stderr(&result));
    for file in [
        "entropy.json",
        "entropy.csv",
        "entropy.svg",
        "importance.json",
        "importance.csv",
        "pruning.json",
        "pruning.svg",
    ] {
        assert!(out.join(file).is_file(), "{file}");
    }
    let importance = std::fs::read_to_string(out.join("importance.csv")).unwrap();
    assert_eq!(importance.lines().count(), 1 + 4 * 4, "a row per head: {importance}");
    let pruning: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("pruning.json")).unwrap()).unwrap();
    let curve = pruning["search"]["curve"].as_array().unwrap();
    assert!(curve.len() >= 2, "at least one step");
    let report = &pruning["pruned"];
    assert!(
        report["parameters_after"].as_u64() < report["parameters_before"].as_u64()
            || pruning["search"]["order"].as_array().unwrap().is_empty()
    );
    let svg = std::fs::read_to_string(out.join("pruning.svg")).unwrap();
    assert!(svg.contains("<polyline") && svg.contains("threshold"));
    let entropy = std::fs::read_to_string(out.join("entropy.svg")).unwrap();
    assert_eq!(entropy.matches("layer ").count(), 4, "a panel per layer");

    // The pruned checkpoint runs, with its tokenizer copied.
    let pruned = out.join("pruned");
    let logits = dir.path().join("logits.safetensors");
    let run = layerwise(&[
        "forward",
        "--model",
        pruned.to_str().unwrap(),
        "--prompt",
        "Hello",
        "--out",
        logits.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
}

#[test]
fn heads_refuses_bad_texts_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let one_token = dir.path().join("short.json");
    std::fs::write(&one_token, "[[5]]").unwrap();
    let out = dir.path().join("o");
    assert_fails_naming(
        &["heads", "--texts", one_token.to_str().unwrap(), "--out", out.to_str().unwrap()],
        &["--texts", "two or more tokens"],
    );
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "[3.5]").unwrap();
    assert_fails_naming(&["heads", "--texts", bad.to_str().unwrap(), "--out", out.to_str().unwrap()], &["--texts"]);
    assert_fails_naming(
        &["heads", "--texts", "/nonexistent.txt", "--out", out.to_str().unwrap()],
        &["--texts", "/nonexistent.txt"],
    );
    let ok = dir.path().join("ok.json");
    std::fs::write(&ok, "[[5, 6, 7]]").unwrap();
    assert_fails_naming(
        &["heads", "--texts", ok.to_str().unwrap(), "--threshold=-1", "--out", out.to_str().unwrap()],
        &["threshold"],
    );
    let neo = layerwise_tests::fixture_str("gpt-neo-bin");
    assert_fails_naming(
        &["heads", "--model", &neo, "--texts", ok.to_str().unwrap(), "--prune", "--out", out.to_str().unwrap()],
        &["--prune", "GPT-2"],
    );
}
