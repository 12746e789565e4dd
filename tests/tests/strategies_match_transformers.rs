//! Logits processors, warpers and stopping rules against what transformers 4.48 recorded
//! (tools/scripts/make_strategy_fixtures.py): processed scores on fixed logits, and generate() ids on
//! every fixture architecture.

use layerwise::generation::{generate, GenerationConfig, ProcessorOptions, SamplingOptions};
use layerwise::load;
use layerwise::runtime::{Decoder, DecoderOptions};
use layerwise_tests::{fixture, fixture_str, ids, read_safetensors};
use serde_json::Value;

fn json(path: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(path)).expect("read")).expect("json")
}

fn processors_of(settings: &Value) -> ProcessorOptions {
    ProcessorOptions {
        repetition_penalty: settings["repetition_penalty"].as_f64().unwrap_or(1.0) as f32,
        no_repeat_ngram_size: settings["no_repeat_ngram_size"].as_u64().unwrap_or(0) as usize,
    }
}

#[test]
fn processor_chains_equal_transformers_processed_scores() {
    let recorded = read_safetensors(&fixture("strategies/processors.safetensors"));
    let spec = json("strategies/processors.json");
    let sequence = ids(&spec["sequence"]);
    let logits: Vec<f32> = recorded["logits"].values.iter().map(|&v| v as f32).collect();
    let cases = spec["cases"].as_array().expect("cases");
    assert!(cases.len() >= 8);
    for (i, case) in cases.iter().enumerate() {
        let sampling = SamplingOptions {
            temperature: case["temperature"].as_f64().unwrap_or(1.0) as f32,
            top_k: case["top_k"].as_u64().unwrap_or(0) as usize,
            top_p: case["top_p"].as_f64().unwrap_or(1.0) as f32,
            min_p: case["min_p"].as_f64().map(|p| p as f32),
            typical_p: case["typical_p"].as_f64().unwrap_or(1.0) as f32,
            seed: 0,
        };
        let mut ours = logits.clone();
        processors_of(case).apply(&sequence, &mut ours);
        sampling.warp(&mut ours, 1);
        let theirs = &recorded[&format!("processed.{i}")].values;
        let removed = theirs.iter().filter(|v| !v.is_finite()).count();
        for (j, (a, b)) in ours.iter().zip(theirs).enumerate() {
            if b.is_finite() {
                assert!((*a as f64 - b).abs() <= 1e-5 * b.abs().max(1.0), "case {i} {case} token {j}: {a} vs {b}");
            } else {
                assert!(a.is_infinite() && *a < 0.0, "case {i} {case}: token {j} should be removed, got {a}");
            }
        }
        // Every case changes something, so that the comparison means something.
        assert!(removed > 0 || ours != logits, "case {i} left the logits unchanged");
    }
}

#[test]
fn generation_with_processors_and_stop_strings_equals_transformers() {
    let spec = json("strategies/generation.json");
    let cases = spec["cases"].as_array().expect("cases");
    assert!(cases.len() >= 12);
    let mut changed = 0;
    for case in cases {
        let name = case["fixture"].as_str().expect("fixture");
        let loaded = load(&fixture_str(name)).expect("load");
        let settings = &case["settings"];
        let options = GenerationConfig {
            max_new_tokens: case["max_new_tokens"].as_u64().expect("max") as usize,
            eos_token_ids: vec![],
            processors: processors_of(settings),
            stop_strings: settings["stop_strings"]
                .as_array()
                .map(|s| s.iter().map(|v| v.as_str().expect("stop").to_owned()).collect())
                .unwrap_or_default(),
            ..Default::default()
        };
        let prompt = ids(&case["prompt"]);
        let mut decoder = Decoder::new(&loaded.model, DecoderOptions::default()).expect("decoder");
        let out =
            generate(&mut decoder, &prompt, &options.resolve().expect("options"), loaded.tokenizer.as_ref(), |_| true)
                .expect("generate");
        let expected = ids(&case["ids"]);
        assert_eq!(out.ids, expected, "{name} {settings}");
        changed += usize::from(case["differs_from_greedy"].as_bool() == Some(true));
    }
    assert!(changed >= 10, "most recorded cases must differ from plain greedy decoding");
}

#[test]
fn brace_matching_stops_when_the_generated_braces_close() {
    use layerwise::generation::stopping::{BraceMatching, TextStops};
    let loaded = load(&fixture_str("demo-gpt2-multiexit")).expect("load");
    let tokenizer = loaded.tokenizer.as_ref().expect("tokenizer");
    // Feeds `generated` after `prompt` one token at a time; returns the text generated when the rule
    // stopped (None: it never did).
    let stop_text = |prompt: &str, generated: &str, start_level: usize| {
        let mut sequence = tokenizer.encode(prompt).expect("encode");
        let prompt_len = sequence.len();
        let mut stops = TextStops::new(tokenizer, &[], Some(BraceMatching { start_level }));
        for token in tokenizer.encode(generated).expect("encode") {
            sequence.push(token);
            if stops.should_stop(&sequence).expect("stop") {
                return Some(tokenizer.decode(&sequence[prompt_len..]).expect("decode"));
            }
        }
        None
    };
    // One brace open in the prompt: the inner pair does not stop it, the one closing main does.
    let text = stop_text("fn main() {", "\n    if x { y(); }\n    z();\n}\nfn more() {}", 1).expect("stopped");
    assert!(text.contains("z();") && text.trim_end().ends_with('}') && !text.contains("more"), "{text:?}");
    // None open in the prompt: the first pair the generation opens ends it.
    let text = stop_text("let v =", " vec!{a, {b}} + rest {c}", 0).expect("stopped");
    assert!(text.ends_with("{a, {b}}") || text.trim_end().ends_with("}}"), "{text:?}");
    assert!(!text.contains("rest"), "{text:?}");
    // Closing braces before any opening one do not stop a generation that opened none.
    assert_eq!(stop_text("x", " } } plain text", 0), None);
}

#[test]
fn stop_strings_without_a_tokenizer_are_refused_by_flag() {
    let loaded = load(&fixture_str("gpt2-sharded")).expect("load");
    let mut decoder = Decoder::new(&loaded.model, DecoderOptions::default()).expect("decoder");
    let options = GenerationConfig { stop_strings: vec!["x".into()], ..Default::default() };
    let msg = options
        .resolve()
        .and_then(|o| generate(&mut decoder, &[1, 2], &o, None, |_| true))
        .expect_err("refused")
        .to_string();
    assert!(msg.contains("stop") && msg.contains("tokenizer"), "{msg}");
}
