//! Greedy generation under every exit plan gives the ids that transformers + upstream
//! autocontrastive-gen generated (tools/scripts/make_fixtures.py), and each plan's scores at the
//! prompt's last position match upstream's within 1e-5 in probability.

use layerwise::exits::{Contrast, ExitPlan, PlanOptions, Projection, Upper};
use layerwise::generation::{generate, GenerationConfig};
use layerwise::math::softmax;
use layerwise::runtime::{Decoder, DecoderOptions};
use layerwise::{load_on, Backend, Cpu, ForwardRequest, Reference};
use layerwise_tests::{fixture, fixture_str, read_safetensors};
use serde_json::Value;

struct Case {
    name: String,
    plan: PlanOptions,
    eos: Vec<u32>,
    min_new_tokens: usize,
    ids: Vec<u32>,
}

fn layer_of(v: &Value) -> Upper {
    match v.as_str() {
        Some("original") => Upper::Original,
        _ => Upper::Layer(v.as_u64().expect("layer") as usize),
    }
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().expect("ids").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn cases(name: &str) -> (Vec<u32>, usize, Vec<Case>) {
    let path = fixture(name).join("generation.json");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    let cases = json["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            let plan = match c["kind"].as_str().expect("kind") {
                "original" => ExitPlan::Original,
                "exit" => ExitPlan::Exit(c["layer"].as_u64().expect("layer") as usize),
                _ => ExitPlan::Contrast {
                    upper: layer_of(&c["upper"]),
                    lower: c["lower"].as_u64().expect("lower") as usize,
                },
            };
            let projection = match c["projection"].as_str().expect("projection") {
                "heads" => Projection::ExitHeads,
                "lens" => Projection::Lens,
                _ => Projection::Converted,
            };
            let contrast = match (c["alpha"].as_f64(), c["min_candidates"].as_u64()) {
                (Some(alpha), Some(k)) => Contrast::Acd { alpha: alpha as f32, min_candidates: k as usize },
                _ => Contrast::default(),
            };
            Case {
                name: c["name"].as_str().expect("name").to_string(),
                plan: PlanOptions { plan, projection, contrast },
                eos: ids_of(&c["eos_token_id"]),
                min_new_tokens: c["min_new_tokens"].as_u64().unwrap_or(0) as usize,
                ids: ids_of(&c["ids"]),
            }
        })
        .collect();
    (ids_of(&json["prompt"]), json["max_new_tokens"].as_u64().expect("max") as usize, cases)
}

/// Probabilities of a plan output: contrasts are log-probabilities already, others are logits.
fn probabilities(plan: &PlanOptions, scores: &[f32]) -> Vec<f32> {
    match plan.plan {
        ExitPlan::Contrast { .. } => scores.iter().map(|l| l.exp()).collect(),
        _ => softmax(scores),
    }
}

fn check_fixture<B: Backend>(name: &str, backend: B) {
    let loaded = load_on(&fixture_str(name), backend).expect("load");
    let (prompt, max_new_tokens, cases) = cases(name);
    let recorded_scores = read_safetensors(&fixture(name).join("generation.safetensors"));
    assert!(cases.len() >= 8);
    let mut compared = 0;
    for case in &cases {
        // A small block size, so that prompt and generation cross block boundaries.
        let options =
            DecoderOptions { plan: case.plan.clone(), block_size: 4, cache_tokens: Some(64), head_mask: None };
        let mut decoder = Decoder::new(&loaded.model, options).expect("decoder");
        let generation = GenerationConfig {
            max_new_tokens,
            min_new_tokens: case.min_new_tokens,
            eos_token_ids: case.eos.clone(),
            ..Default::default()
        };
        let out =
            generate(&mut decoder, &prompt, &generation.resolve().expect("options"), None, |_| true).expect("generate");
        assert_eq!(out.ids, case.ids, "{name} {}: generated ids", case.name);
        assert_eq!(decoder.pool().free_blocks(), decoder.pool().num_blocks(), "released at the end");

        if let Some(reference) = recorded_scores.get(&case.name) {
            let mut decoder =
                Decoder::new(&loaded.model, DecoderOptions { plan: case.plan.clone(), ..Default::default() })
                    .expect("decoder");
            decoder.add_sequence(&prompt).expect("add");
            let scores = decoder.step().expect("step").remove(0).logits;
            let ours = probabilities(&case.plan, &scores);
            let theirs: Vec<f32> = reference.values.iter().map(|&v| v as f32).collect();
            let theirs = probabilities(&case.plan, &theirs);
            compared += 1;
            let worst = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst <= 1e-5, "{name} {}: probability error {worst:e}", case.name);

            // The forward pass under the same plan gives the same last row.
            let request = ForwardRequest { plan: Some(case.plan.clone()), ..Default::default() };
            let all = loaded.model.forward(&prompt, &request).expect("forward").plan.expect("plan");
            let vocab = loaded.model.spec().vocab_size;
            let last = &all[(prompt.len() - 1) * vocab..];
            for (a, b) in last.iter().zip(&scores) {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{name} {}: forward vs decoder", case.name);
            }
        }
    }
    assert_eq!(compared, recorded_scores.len(), "{name}: every recorded plan output was compared");
}

#[test]
fn gpt2_plans_match_upstream() {
    check_fixture("gpt2-sharded", Cpu::default());
}

#[test]
fn gpt2_plans_match_upstream_on_the_reference_backend() {
    check_fixture("gpt2-sharded", Reference::default());
}

#[test]
fn gpt_neo_plans_match_upstream() {
    check_fixture("gpt-neo-bin", Cpu::default());
}

#[test]
fn gpt_neo_plans_match_upstream_on_the_reference_backend() {
    check_fixture("gpt-neo-bin", Reference::default());
}

#[test]
fn llama_plans_match_upstream_formulas() {
    check_fixture("llama-bf16", Cpu::default());
}

#[test]
fn llama_plans_match_upstream_formulas_on_the_reference_backend() {
    check_fixture("llama-bf16", Reference::default());
}
