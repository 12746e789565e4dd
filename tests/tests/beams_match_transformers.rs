//! Beam search against transformers 4.48's generate() (and, under ACD, upstream autocontrastive-gen)
//! on every fixture architecture: each early_stopping rule, length penalties, several returned
//! sequences, processors (tools/scripts/make_strategy_fixtures.py records them).

use layerwise::exits::{ExitPlan, PlanOptions, Upper};
use layerwise::generation::beam::{beam_search, EarlyStopping};
use layerwise::generation::{generate, GenerationConfig};
use layerwise::runtime::{Decoder, DecoderOptions};
use layerwise::{load, load_on, Backend, Cpu, Reference};
use layerwise_tests::{fixture, fixture_str, ids};
use serde_json::Value;

fn options_of(case: &Value) -> GenerationConfig {
    let s = &case["settings"];
    let mut options = GenerationConfig {
        max_new_tokens: case["max_new_tokens"].as_u64().expect("max") as usize,
        min_new_tokens: s["min_new_tokens"].as_u64().unwrap_or(0) as usize,
        eos_token_ids: match &case["eos_token_id"] {
            Value::Array(_) => ids(&case["eos_token_id"]),
            one => vec![one.as_u64().expect("eos") as u32],
        },
        ..Default::default()
    };
    options.processors.repetition_penalty = s["repetition_penalty"].as_f64().unwrap_or(1.0) as f32;
    options.processors.no_repeat_ngram_size = s["no_repeat_ngram_size"].as_u64().unwrap_or(0) as usize;
    options.beam.num_beams = s["num_beams"].as_u64().expect("beams") as usize;
    options.beam.length_penalty = s["length_penalty"].as_f64().unwrap_or(1.0) as f32;
    options.beam.num_return_sequences = s["num_return_sequences"].as_u64().unwrap_or(1) as usize;
    options.beam.early_stopping = match &s["early_stopping"] {
        Value::Bool(true) => EarlyStopping::Always,
        Value::String(w) if w == "never" => EarlyStopping::Never,
        _ => EarlyStopping::Heuristic,
    };
    options
}

fn plan_of(case: &Value) -> PlanOptions {
    let plan = case["plan"].as_str().expect("plan");
    match plan.strip_prefix("contrast.") {
        None => PlanOptions::default(),
        Some(layers) => {
            let (upper, lower) = layers.split_once('.').expect("upper.lower");
            let plan = ExitPlan::Contrast {
                upper: Upper::Layer(upper.parse().expect("upper")),
                lower: lower.parse().expect("lower"),
            };
            PlanOptions { plan, ..Default::default() }
        }
    }
}

#[test]
fn beam_search_equals_transformers_and_upstream() {
    check(Cpu::default());
}

#[test]
fn beam_search_equals_transformers_and_upstream_on_the_reference_backend() {
    check(Reference::default());
}

fn check<B: Backend + Clone>(backend: B) {
    let text = std::fs::read_to_string(fixture("strategies/beams.json")).expect("read");
    let json: Value = serde_json::from_str(&text).expect("json");
    let cases = json["cases"].as_array().expect("cases");
    assert!(cases.len() >= 24);
    let (mut acd, mut several, mut ended, mut scored, mut two_eos) = (0, 0, 0, 0, 0);
    for case in cases {
        let name = case["fixture"].as_str().expect("fixture");
        let loaded = load_on(&fixture_str(name), backend.clone()).expect("load");
        let options = options_of(case);
        let prompt = ids(&case["prompt"]);
        let decoder_options = DecoderOptions {
            plan: plan_of(case),
            block_size: 4,
            cache_tokens: Some(options.resolve().expect("options").cache_tokens(prompt.len())),
            head_mask: None,
        };
        let mut decoder = Decoder::new(&loaded.model, decoder_options).expect("decoder");
        let out =
            generate(&mut decoder, &prompt, &options.resolve().expect("options"), None, |_| true).expect("beam search");
        let expected: Vec<Vec<u32>> = case["sequences"].as_array().expect("sequences").iter().map(ids).collect();
        assert_eq!(out.sequences, expected, "{name} {} {}", case["plan"], case["settings"]);
        assert_eq!(out.ids, expected[0]);
        // transformers' sequences_scores: sum of log-probabilities / length ^ length_penalty.
        if let Some(scores) = case["sequence_scores"].as_array() {
            let hypotheses = beam_search(&mut decoder, &prompt, &options.resolve().expect("options"), &options.beam)
                .expect("beam search");
            for (h, expected) in hypotheses.iter().zip(scores) {
                let expected = expected.as_f64().expect("score") as f32;
                assert!(
                    (h.score - expected).abs() <= 1e-4 * expected.abs().max(1.0),
                    "{name}: score {} vs {expected}",
                    h.score
                );
            }
            scored += 1;
        }
        two_eos += usize::from(case["eos_token_id"].is_array());
        assert_eq!(decoder.pool().free_blocks(), decoder.pool().num_blocks(), "every beam released");
        acd += usize::from(case["plan"] != "original");
        several += usize::from(expected.len() > 1);
        ended += usize::from(expected.iter().any(|s| s.len() < options.max_new_tokens));
    }
    assert!(acd >= 4 && several >= 8 && ended >= 16, "the recorded cases cover ACD, several sequences and EOS");
    assert!(scored >= 24 && two_eos >= 3, "scores recorded, and cases with two EOS ids");
}

#[test]
fn beams_share_the_prompt_blocks() {
    let loaded = load(&fixture_str("gpt2-sharded")).expect("load");
    let prompt: Vec<u32> = (0..32).map(|i| (i * 7 % 90) as u32).collect();
    let mut options = GenerationConfig { max_new_tokens: 8, ..Default::default() };
    options.beam.num_beams = 4;
    let block_size = 4;
    let decoder_options = DecoderOptions {
        block_size,
        cache_tokens: Some(options.resolve().expect("options").cache_tokens(prompt.len())),
        ..Default::default()
    };
    let mut decoder = Decoder::new(&loaded.model, decoder_options).expect("decoder");
    generate(&mut decoder, &prompt, &options.resolve().expect("options"), None, |_| true).expect("beam search");
    // Unshared, four beams of 40 tokens would hold 4 * 10 blocks; shared, the 8 prompt blocks count
    // once and each beam owns its last 2-3 blocks (a copied partial block and the ones after it).
    let prompt_blocks = prompt.len() / block_size;
    let per_beam = (prompt.len() + options.max_new_tokens).div_ceil(block_size);
    let peak = decoder.pool().peak_used_blocks();
    assert!(peak <= prompt_blocks + 4 * (per_beam - prompt_blocks + 1), "peak {peak} blocks");
    assert!(peak < 4 * per_beam, "beams must share the prompt: peak {peak} vs {} unshared", 4 * per_beam);
}

#[test]
fn impossible_beam_options_are_refused_by_flag() {
    let loaded = load(&fixture_str("gpt2-sharded")).expect("load");
    let mut decoder = Decoder::new(&loaded.model, DecoderOptions::default()).expect("decoder");
    let mut refuse = |options: GenerationConfig| {
        options
            .resolve()
            .and_then(|o| generate(&mut decoder, &[1, 2], &o, None, |_| true))
            .expect_err("refused")
            .to_string()
    };
    let mut three = GenerationConfig::default();
    three.beam.num_return_sequences = 3;
    let msg = refuse(three);
    // The engine names its own fields (the CLI turns them into flags).
    assert!(msg.contains("num_return_sequences") && msg.contains("num_beams"), "{msg}");
    let mut sampled_beams = GenerationConfig { sampling: Some(Default::default()), ..Default::default() };
    sampled_beams.beam.num_beams = 2;
    assert!(refuse(sampled_beams).contains("num_beams"));
    let mut zero = GenerationConfig::default();
    zero.beam.num_beams = 0;
    assert!(refuse(zero).contains("num_beams"));
}
