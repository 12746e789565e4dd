//! Every output of the forward pass equals what transformers (and upstream autocontrastive-gen, for
//! the exit heads) recorded, at every position, for each fixture architecture and storage format.

use layerwise::{load, load_on, Backend, Cpu, ForwardRequest, Reference};
use layerwise_tests::{assert_close, expected, expected_ids, fixture_str};

/// f32 weights and f32 compute: only summation order differs from torch.
const TOLERANCE: f64 = 1e-4;

fn check_fixture<B: Backend>(name: &str, backend: B) {
    let recorded = expected(name);
    let ids = expected_ids(&recorded);
    let loaded = load_on(&fixture_str(name), backend).unwrap_or_else(|e| panic!("{name}: {e}"));
    let spec = loaded.model.spec().clone();
    let out = loaded.model.forward(&ids, &ForwardRequest::everything(&spec)).expect("forward");

    assert_eq!(out.blocks_run, spec.num_layers);
    assert_close(&format!("{name} logits"), out.logits.as_deref().expect("logits"), &recorded["logits"], TOLERANCE);
    assert_eq!(recorded["logits"].shape, vec![ids.len(), spec.vocab_size]);

    let recorded_exits: Vec<usize> =
        recorded.keys().filter_map(|k| k.strip_prefix("exit.").map(|l| l.parse().expect("layer"))).collect();
    assert!(!recorded_exits.is_empty(), "{name} has exit heads");
    assert_eq!(out.exits.len(), recorded_exits.len(), "{name}: one output per exit head");
    for layer in recorded_exits {
        assert_close(
            &format!("{name} exit.{layer}"),
            &out.exits[&layer],
            &recorded[&format!("exit.{layer}")],
            TOLERANCE,
        );
    }

    assert_eq!(out.hidden_states.len(), spec.num_layers + 1);
    for (i, hidden) in out.hidden_states.iter().enumerate() {
        assert_close(&format!("{name} hidden.{i}"), hidden, &recorded[&format!("hidden.{i}")], TOLERANCE);
    }
}

#[test]
fn gpt2_sharded_safetensors_f32() {
    check_fixture("gpt2-sharded", Cpu::default());
}

#[test]
fn gpt2_sharded_safetensors_f32_on_the_reference_backend() {
    check_fixture("gpt2-sharded", Reference::default());
}

#[test]
fn gpt_neo_from_pytorch_bin_with_local_attention() {
    // The prompt (12 tokens) is longer than the local window (4), so local layers really mask.
    check_fixture("gpt-neo-bin", Cpu::default());
}

#[test]
fn gpt_neo_from_pytorch_bin_with_local_attention_on_the_reference_backend() {
    check_fixture("gpt-neo-bin", Reference::default());
}

#[test]
fn llama_bf16_with_grouped_query_attention() {
    check_fixture("llama-bf16", Cpu::default());
}

#[test]
fn llama_bf16_with_grouped_query_attention_on_the_reference_backend() {
    check_fixture("llama-bf16", Reference::default());
}

#[test]
fn demo_checkpoint_f16_with_real_vocabulary() {
    check_fixture("demo-gpt2-multiexit", Cpu::default());
}

#[test]
fn demo_checkpoint_f16_with_real_vocabulary_on_the_reference_backend() {
    check_fixture("demo-gpt2-multiexit", Reference::default());
}

#[test]
fn exits_alone_run_only_the_blocks_they_need() {
    let name = "gpt2-sharded";
    let recorded = expected(name);
    let ids = expected_ids(&recorded);
    let loaded = load(&fixture_str(name)).expect("load");
    for layer in [1usize, 2, 4] {
        let request = ForwardRequest { exits: vec![layer], ..Default::default() };
        let out = loaded.model.forward(&ids, &request).expect("forward");
        assert_eq!(out.blocks_run, layer, "exit {layer} needs {layer} blocks");
        assert!(out.logits.is_none() && out.hidden_states.is_empty());
        assert_close(
            &format!("exit.{layer} alone"),
            &out.exits[&layer],
            &recorded[&format!("exit.{layer}")],
            TOLERANCE,
        );
    }
}

#[test]
fn a_prefix_of_the_prompt_gives_the_same_rows() {
    // Causality: the first k rows depend only on the first k tokens.
    let name = "llama-bf16";
    let recorded = expected(name);
    let ids = expected_ids(&recorded);
    let loaded = load(&fixture_str(name)).expect("load");
    let request = ForwardRequest { logits: true, ..Default::default() };
    let full = loaded.model.forward(&ids, &request).expect("forward").logits.expect("logits");
    let k = 5;
    let prefix = loaded.model.forward(&ids[..k], &request).expect("forward").logits.expect("logits");
    let vocab = loaded.model.spec().vocab_size;
    for (a, b) in prefix.iter().zip(&full[..k * vocab]) {
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
    }
}
