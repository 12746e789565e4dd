//! Contrastive search and DoLa against transformers 4.48's generate() on every fixture architecture
//! (tools/scripts/make_strategy_fixtures.py records them).

use layerwise::generation::dola::DolaLayers;
use layerwise::generation::ContrastiveOptions;
use layerwise::generation::{generate, GenerationConfig};
use layerwise::runtime::{Decoder, DecoderOptions};
use layerwise::{load, load_on, Backend, Cpu, Reference};
use layerwise_tests::{fixture, fixture_str, ids};
use serde_json::Value;

fn options_of(case: &Value) -> GenerationConfig {
    let s = &case["settings"];
    let mut options = GenerationConfig {
        max_new_tokens: case["max_new_tokens"].as_u64().expect("max") as usize,
        ..Default::default()
    };
    options.processors.repetition_penalty = s["repetition_penalty"].as_f64().unwrap_or(1.0) as f32;
    if let Some(alpha) = s["penalty_alpha"].as_f64() {
        let top_k = s["top_k"].as_u64().expect("top_k") as usize;
        options.contrastive = Some(ContrastiveOptions { penalty_alpha: alpha as f32, top_k });
    }
    options.dola_layers = match &s["dola_layers"] {
        Value::String(which) => Some(which.parse().expect("low or high")),
        Value::Array(_) => Some(DolaLayers::List(ids(&s["dola_layers"]).into_iter().map(|l| l as usize).collect())),
        _ => None,
    };
    options
}

#[test]
fn contrastive_search_and_dola_equal_transformers() {
    check(Cpu::default());
}

#[test]
fn contrastive_search_and_dola_equal_transformers_on_the_reference_backend() {
    check(Reference::default());
}

fn check<B: Backend + Clone>(backend: B) {
    let text = std::fs::read_to_string(fixture("strategies/contrastive_dola.json")).expect("read");
    let json: Value = serde_json::from_str(&text).expect("json");
    let cases = json["cases"].as_array().expect("cases");
    assert!(cases.len() >= 21);
    for case in cases {
        let name = case["fixture"].as_str().expect("fixture");
        let loaded = load_on(&fixture_str(name), backend.clone()).expect("load");
        let options = options_of(case);
        let prompt = ids(&case["prompt"]);
        let decoder_options = DecoderOptions { block_size: 4, cache_tokens: Some(256), ..Default::default() };
        let mut decoder = Decoder::new(&loaded.model, decoder_options).expect("decoder");
        let out =
            generate(&mut decoder, &prompt, &options.resolve().expect("options"), None, |_| true).expect("generate");
        assert_eq!(out.ids, ids(&case["ids"]), "{name} {}", case["settings"]);
        assert_eq!(decoder.pool().free_blocks(), decoder.pool().num_blocks(), "every candidate released");
        assert_eq!(case["differs_from_greedy"], true, "each recorded case differs from greedy decoding");
    }
}

#[test]
fn dola_layer_selection_follows_transformers() {
    // gpt2-sharded: 4 layers, tied head: candidates start at layer 2; llama-bf16: untied, from 0.
    let gpt2 = load(&fixture_str("gpt2-sharded")).expect("load");
    let llama = load(&fixture_str("llama-bf16")).expect("load");
    let (g, l) = (gpt2.model.spec(), llama.model.spec());
    assert_eq!(DolaLayers::Low.candidates(g).expect("low"), [2]);
    assert_eq!(DolaLayers::High.candidates(g).expect("high"), [2]);
    assert_eq!(DolaLayers::Low.candidates(l).expect("low"), [0]);
    assert_eq!(DolaLayers::High.candidates(l).expect("high"), [2]);
    assert_eq!(DolaLayers::List(vec![0, 3, 4, 9]).candidates(l).expect("list"), [0, 3]);
    let msg = DolaLayers::List(vec![7]).candidates(l).expect_err("none below the top").to_string();
    assert!(msg.contains("dola_layers"), "{msg}");
    assert!("sideways".parse::<DolaLayers>().expect_err("bad").to_string().contains("dola_layers"));
}
