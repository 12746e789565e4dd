//! PEFT adapters made with the `peft` library (tools/scripts/make_adapter_fixtures.py): the logits
//! at the prompt's last position and the greedy ids equal what transformers + peft computed, for
//! LoRA on GPT-2's Conv1D and on Llama's nn.Linear (rsLoRA, bf16 base weights), (IA)^3 with output
//! and feed-forward scaling, and prompt tuning; through `generate` and through the scheduler.
//! Unsupported adapters are refused by name.

use layerwise::generation::{generate, Event, GenerationOptions, Request, Scheduler, SchedulerOptions};
use layerwise::runtime::{Decoder, DecoderOptions};
use layerwise::{load_adapted, Cpu};
use layerwise_tests::{fixture, fixture_str, ids};
use serde_json::Value;

fn expected(name: &str) -> Value {
    let path = fixture("adapters").join(name).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("expected.json")).expect("JSON")
}

fn check(name: &str, description: &str) {
    let expected = expected(name);
    let base = fixture_str(expected["base"].as_str().expect("base"));
    let loaded = load_adapted(&base, &fixture("adapters").join(name), Cpu::default()).expect("load with the adapter");
    assert_eq!(loaded.adapter.as_deref(), Some(description));
    let prompt = ids(&expected["prompt"]);
    let greedy = ids(&expected["greedy"]);
    let options = GenerationOptions {
        max_new_tokens: greedy.len(),
        min_new_tokens: greedy.len(),
        eos_token_ids: loaded.model.spec().eos_token_ids.clone(),
        ..Default::default()
    };
    let cache_tokens = Some(prompt.len() + greedy.len() + 32);
    let decoder_options = || DecoderOptions { cache_tokens, ..Default::default() };

    // The first step's scores: the logits at the prompt's last position.
    let mut decoder = Decoder::new(&loaded.model, decoder_options()).expect("decoder");
    let seq = decoder.add_sequence(&prompt).expect("add");
    let logits = decoder.step().expect("step").into_iter().find(|o| o.seq == seq).expect("output").logits;
    let reference: Vec<f32> =
        expected["last_logits"].as_array().expect("logits").iter().map(|v| v.as_f64().expect("f") as f32).collect();
    assert_eq!(logits.len(), reference.len(), "{name}: the vocabulary, virtual tokens not included");
    let worst = logits.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst < 2e-4, "{name}: logits differ from transformers + peft by up to {worst}");
    decoder.release(seq).expect("release");

    let out = generate(&mut decoder, &prompt, &options, None, |_| true).expect("generate");
    assert_eq!(out.ids, greedy, "{name}: greedy ids");

    let mut scheduler = Scheduler::new(
        Decoder::new(&loaded.model, decoder_options()).expect("decoder"),
        None,
        SchedulerOptions::default(),
    );
    scheduler.submit(Request { prompt: prompt.clone(), options }).expect("submit");
    let mut batched = None;
    scheduler
        .run_to_end(|event| {
            if let Event::Finished { result, .. } = event {
                batched = Some(result.expect("request").generation.ids);
            }
        })
        .expect("scheduler");
    assert_eq!(batched.as_deref(), Some(greedy.as_slice()), "{name}: through the scheduler");
}

#[test]
fn lora_on_gpt2_conv1d_equals_peft() {
    check("lora-gpt2", "LORA r=4 alpha=8 on 16 modules");
}

#[test]
fn rslora_on_llama_linear_equals_peft() {
    check("lora-llama", "LORA r=2 alpha=6 on 12 modules");
}

#[test]
fn ia3_equals_peft() {
    check("ia3-gpt2", "IA3 on 8 modules");
}

#[test]
fn prompt_tuning_equals_peft() {
    check("prompt-gpt2", "PROMPT_TUNING with 5 virtual tokens");
}

#[test]
fn unsupported_adapters_are_refused_by_name() {
    let base = fixture_str("gpt2-sharded");
    let error = |dir: &std::path::Path| match load_adapted(&base, dir, Cpu::default()) {
        Ok(_) => panic!("{} should be refused", dir.display()),
        Err(e) => e.to_string(),
    };
    let prefix = error(&fixture("adapters").join("prefix-gpt2"));
    assert!(prefix.contains("peft_type") && prefix.contains("PREFIX_TUNING"), "{prefix}");

    let dir = tempfile::tempdir().expect("tempdir");
    let lora = fixture("adapters").join("lora-gpt2");
    let edited = |edit: &dyn Fn(&mut Value)| {
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(lora.join("adapter_config.json")).expect("read"))
                .expect("json");
        edit(&mut config);
        std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).expect("write");
        std::fs::copy(lora.join("adapter_model.safetensors"), dir.path().join("adapter_model.safetensors"))
            .expect("copy");
        error(dir.path())
    };
    let dora = edited(&|c| c["use_dora"] = Value::Bool(true));
    assert!(dora.contains("use_dora"), "{dora}");
    let saved = edited(&|c| c["modules_to_save"] = serde_json::json!(["lm_head"]));
    assert!(saved.contains("modules_to_save"), "{saved}");
    let bias = edited(&|c| c["bias"] = Value::String("all".into()));
    assert!(bias.contains("`bias`"), "{bias}");
    // A LoRA adapter for another model: its target modules are not in this checkpoint.
    let other = load_adapted(&fixture_str("llama-bf16"), &lora, Cpu::default()).err().expect("wrong base").to_string();
    assert!(other.contains("target module `transformer.h.0.attn.c_attn`"), "{other}");
    std::fs::copy(lora.join("adapter_config.json"), dir.path().join("adapter_config.json")).expect("copy");
    std::fs::remove_file(dir.path().join("adapter_model.safetensors")).expect("rm");
    let missing = error(dir.path());
    assert!(missing.contains("adapter_model.safetensors not found"), "{missing}");
}
