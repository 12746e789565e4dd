//! Sampling: the warped scores equal transformers' TemperatureLogitsWarper / TopKLogitsWarper /
//! TopPLogitsWarper on recorded logits, a seed reproduces a run, and degenerate settings reduce to
//! greedy.

use layerwise::generation::{generate, GenerationConfig, SamplingOptions};
use layerwise::load;
use layerwise::runtime::{Decoder, DecoderOptions};
use layerwise_tests::{fixture, fixture_str, read_safetensors};
use serde_json::Value;

#[test]
fn warpers_match_transformers() {
    let dir = fixture("gpt2-sharded");
    let recorded = read_safetensors(&dir.join("warpers.safetensors"));
    let settings: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("warpers.json")).expect("read")).expect("json");
    let logits: Vec<f32> = recorded["logits"].values.iter().map(|&v| v as f32).collect();
    let settings = settings["settings"].as_array().expect("settings");
    assert!(settings.len() >= 4);
    for (i, s) in settings.iter().enumerate() {
        let options = SamplingOptions {
            temperature: s["temperature"].as_f64().expect("t") as f32,
            top_k: s["top_k"].as_u64().expect("k") as usize,
            top_p: s["top_p"].as_f64().expect("p") as f32,
            ..Default::default()
        };
        let mut ours = logits.clone();
        options.warp(&mut ours, 1);
        let theirs = &recorded[&format!("warped.{i}")].values;
        let kept = theirs.iter().filter(|v| v.is_finite()).count();
        assert!(kept >= 1);
        for (j, (a, b)) in ours.iter().zip(theirs).enumerate() {
            if b.is_finite() {
                assert!((*a as f64 - b).abs() <= 1e-5 * b.abs().max(1.0), "{options:?} token {j}: {a} vs {b}");
            } else {
                assert!(a.is_infinite() && *a < 0.0, "{options:?} token {j} should be removed, got {a}");
            }
        }
    }
}

fn run(options: &GenerationConfig) -> Vec<u32> {
    let loaded = load(&fixture_str("gpt2-sharded")).expect("load");
    let mut decoder = Decoder::new(&loaded.model, DecoderOptions::default()).expect("decoder");
    generate(&mut decoder, &[5, 17, 42], &options.resolve().expect("options"), None, |_| true).expect("generate").ids
}

#[test]
fn seeded_sampling_is_reproducible_and_seeds_differ() {
    let sampled = |seed| GenerationConfig {
        max_new_tokens: 16,
        sampling: Some(SamplingOptions { temperature: 1.5, top_k: 0, seed, ..Default::default() }),
        ..Default::default()
    };
    let first = run(&sampled(7));
    assert_eq!(first.len(), 16);
    assert_eq!(first, run(&sampled(7)), "same seed, same tokens");
    let others: Vec<Vec<u32>> = (8..12).map(|seed| run(&sampled(seed))).collect();
    assert!(others.iter().any(|o| *o != first), "different seeds explore different tokens");
}

#[test]
fn top_k_of_one_is_greedy() {
    let greedy = GenerationConfig { max_new_tokens: 10, ..Default::default() };
    let top1 = GenerationConfig {
        sampling: Some(SamplingOptions { top_k: 1, seed: 3, ..Default::default() }),
        ..greedy.clone()
    };
    assert_eq!(run(&greedy), run(&top1));
}

#[test]
fn impossible_sampling_options_are_refused() {
    let loaded = load(&fixture_str("gpt2-sharded")).expect("load");
    let mut decoder = Decoder::new(&loaded.model, DecoderOptions::default()).expect("decoder");
    let mut bad = |sampling: SamplingOptions| {
        let options = GenerationConfig { max_new_tokens: 4, sampling: Some(sampling), ..Default::default() };
        options
            .resolve()
            .and_then(|o| generate(&mut decoder, &[1, 2], &o, None, |_| true))
            .expect_err("refused")
            .to_string()
    };
    assert!(bad(SamplingOptions { top_p: 1.5, ..Default::default() }).contains("top_p"));
    assert!(bad(SamplingOptions { temperature: 0.0, ..Default::default() }).contains("temperature"));
    let too_long = GenerationConfig { max_new_tokens: 64, ..Default::default() };
    let msg = too_long
        .resolve()
        .and_then(|o| generate(&mut decoder, &[1, 2], &o, None, |_| true))
        .expect_err("context")
        .to_string();
    assert!(msg.contains("max_new_tokens") && msg.contains("64"), "{msg}");
}
