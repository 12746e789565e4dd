//! The demo checkpoint `models/kjv-gpt2-multiexit` (issue #14), trained here by
//! tools/scripts/train_demo.sh: it loads in upstream autocontrastive-gen with the logits layerwise
//! computes (recorded by `make_training_fixtures.py --roundtrip`), and its committed training log
//! shows what the issue asks of it: every head's held-out loss fell, and deeper heads end lower.

use std::path::PathBuf;

use layerwise::{load, ForwardRequest};
use layerwise_tests::{assert_close, read_safetensors};

fn demo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/kjv-gpt2-multiexit"))
}

#[test]
fn the_demo_loads_in_upstream_with_the_same_logits() {
    let rec = read_safetensors(&demo().join("roundtrip.safetensors"));
    let loaded = load(demo().to_str().expect("utf-8")).expect("load");
    assert_eq!(loaded.model.spec().exit_layers, [2, 4]);
    let ids: Vec<u32> = rec["input_ids"].values.iter().map(|&v| v as u32).collect();
    let out = loaded
        .model
        .forward(&ids, &ForwardRequest { logits: true, exits: vec![2, 4], ..Default::default() })
        .expect("forward");
    assert_close("logits", &out.logits.expect("logits"), &rec["logits"], 1e-5);
    for layer in [2, 4] {
        assert_close(&format!("exit {layer}"), &out.exits[&layer], &rec[&format!("exit.{layer}")], 1e-5);
    }
}

#[test]
fn the_demo_training_log_shows_falling_ordered_held_out_losses() {
    let log: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(demo().join("training/run2-log.json")).expect("log"))
            .expect("json");
    let first: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(demo().join("training/run-log.json")).expect("log"))
            .expect("json");
    let start = &first["initial_held_out"];
    let end = log["steps"].as_array().expect("steps").iter().rev().find_map(|s| s.get("held_out")).expect("held-out");
    let loss = |v: &serde_json::Value, head: &str| v[head].as_f64().expect("loss");
    for head in ["exit 2", "exit 4", "original"] {
        assert!(loss(end, head) < loss(start, head) - 3.0, "{head}: {} -> {}", loss(start, head), loss(end, head));
    }
    assert!(loss(end, "exit 4") < loss(end, "exit 2"), "exit 4 below exit 2");
    assert!(loss(end, "original") < loss(end, "exit 4"), "the top layer below exit 4");
}
