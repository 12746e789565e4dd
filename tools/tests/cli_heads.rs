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
        "importance_gradient.json",
        "importance_gradient.csv",
        "importance_gradient.svg",
        "correlation.json",
        "correlation.svg",
        "correlation.html",
        "model_view.html",
        "pruning.json",
        "pruning.svg",
    ] {
        assert!(out.join(file).is_file(), "{file}");
    }
    let importance = std::fs::read_to_string(out.join("importance.csv")).unwrap();
    assert_eq!(importance.lines().count(), 1 + 4 * 4, "a row per head: {importance}");
    let gradient = std::fs::read_to_string(out.join("importance_gradient.csv")).unwrap();
    assert_eq!(gradient.lines().count(), 1 + 4 * 4, "a row per head: {gradient}");
    let correlation: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("correlation.json")).unwrap()).unwrap();
    assert_eq!(correlation["points"].as_array().unwrap().len(), 16);
    let r = correlation["coefficient"].as_f64().expect("a coefficient");
    assert!((-1.0..=1.0).contains(&r));
    let scatter = std::fs::read_to_string(out.join("correlation.svg")).unwrap();
    assert_eq!(scatter.matches("<circle").count(), 16, "a dot per head");
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

/// The BERT fixtures of tools/scripts/make_bert_fixtures.py.
fn bert(path: &str) -> String {
    layerwise_tests::fixture("bert").join(path).to_string_lossy().into_owned()
}

#[test]
fn heads_on_a_classifier_dataset_reproduce_the_exercise_and_prune() {
    let recorded = layerwise_tests::read_safetensors(&layerwise_tests::fixture("bert").join("expected.safetensors"));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("heads");
    let classifier = bert("bert-classifier");
    let dataset = bert("emotions.jsonl");
    let args = [
        "heads",
        "--model",
        &classifier,
        "--texts",
        &dataset,
        "--labels-column",
        "label",
        "--prune",
        "--out",
        out.to_str().unwrap(),
    ];
    let result = layerwise(&args);
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(stderr(&result).contains("30 rows; accuracy 0.9333"), "{}", stderr(&result));
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join(name)).expect(name)).expect(name)
    };
    // The masking search's curve, mask and parameter counts are transformers'.
    let pruning = read("pruning.json");
    let curve: Vec<f64> = pruning["search"]["curve"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|step| [step[0].as_f64().unwrap(), step[1].as_f64().unwrap()])
        .collect();
    assert_eq!(curve, recorded["classifier.search.curve"].values);
    let mask: Vec<f64> = pruning["search"]["mask"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l.as_array().unwrap().clone())
        .map(|f| f.as_f64().unwrap())
        .collect();
    assert_eq!(mask, recorded["classifier.search.mask"].values);
    let counts = &recorded["classifier.pruned.parameters"].values;
    assert_eq!(pruning["pruned"]["parameters_before"].as_f64(), Some(counts[0]));
    assert_eq!(pruning["pruned"]["parameters_after"].as_f64(), Some(counts[1]));
    // Importance, entropy and their correlation are transformers'.
    let importance: Vec<f32> = read("importance.json")["importance"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l.as_array().unwrap().clone())
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    layerwise_tests::assert_close("importance", &importance, &recorded["classifier.importance"], 1e-4);
    let r = read("correlation.json")["coefficient"].as_f64().unwrap();
    assert!((r - recorded["classifier.correlation"].values[0]).abs() < 1e-4, "correlation {r}");
    for file in
        ["entropy.csv", "importance.csv", "correlation.svg", "correlation.html", "pruning.svg", "model_view.html"]
    {
        assert!(out.join(file).is_file(), "{file}");
    }

    // The pruned checkpoint classifies as the masked model does (transformers' pruned logits).
    let pruned = out.join("pruned");
    let run = layerwise(&["classify", "--model", pruned.to_str().unwrap(), "--texts", &dataset, "--json"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let verdicts: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let logits = &recorded["classifier.pruned.logits"].values;
    let labels = ["sadness", "joy", "anger"];
    for (i, verdict) in verdicts.as_array().unwrap().iter().enumerate() {
        let row = &logits[i * 3..i * 3 + 3];
        let best = (0..3).fold(0, |b, j| if row[j] > row[b] { j } else { b });
        assert_eq!(verdict["label"], labels[best], "row {i}");
    }
}

#[test]
fn heads_on_a_classifier_refuses_what_it_cannot_do_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    let (classifier, dataset) = (bert("bert-classifier"), bert("emotions.jsonl"));
    let base = ["heads", "--model", &classifier, "--texts", &dataset, "--out", out.to_str().unwrap()];
    assert_fails_naming(&base, &["--labels-column"]);
    assert_fails_naming(&[&base[..], &["--labels-column", "mood"]].concat(), &["--labels-column", "mood"]);
    assert_fails_naming(&[&base[..], &["--labels-column", "label", "--threshold", "2"]].concat(), &["--threshold"]);
    assert_fails_naming(
        &[&base[..], &["--labels-column", "label", "--heads-per-step", "2"]].concat(),
        &["--heads-per-step"],
    );
    assert_fails_naming(&[&base[..], &["--labels-column", "label", "--device", "cuda"]].concat(), &["--device cuda"]);
    // --max-rows: the first 10 rows only.
    let few = dir.path().join("few");
    let run = layerwise(
        &[&base[..5], &["--labels-column", "label", "--max-rows", "10", "--out", few.to_str().unwrap()]].concat(),
    );
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(stderr(&run).contains("heads: 10 rows"), "{}", stderr(&run));
    assert_fails_naming(&[&base[..], &["--labels-column", "label", "--max-rows", "0"]].concat(), &["--max-rows"]);
    let random = bert("bert-random");
    assert_fails_naming(
        &["heads", "--model", &random, "--texts", &dataset, "--labels-column", "label", "--out", out.to_str().unwrap()],
        &["classification head"],
    );
    // A language model takes no label columns.
    let texts = dir.path().join("t.json");
    std::fs::write(&texts, "[[5, 6, 7]]").unwrap();
    assert_fails_naming(
        &["heads", "--texts", texts.to_str().unwrap(), "--labels-column", "label", "--out", out.to_str().unwrap()],
        &["--labels-column", "language model"],
    );
}
