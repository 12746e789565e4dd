//! The paged KV cache: incremental decoding equals recomputing the whole sequence (across block
//! boundaries, after forks, beyond GPT-Neo's local window, batched with other sequences), blocks are
//! shared and returned correctly, exhaustion is a recoverable error, and early exits run only the
//! blocks they need.

use layerwise::exits::{Contrast, ExitPlan, PlanOptions, Projection, Upper};
use layerwise::runtime::{Decoder, DecoderOptions, SeqId};
use layerwise::{load, ForwardRequest, LoadedModel};
use layerwise_tests::fixture_str;

fn plan(plan: ExitPlan) -> PlanOptions {
    PlanOptions { plan, ..Default::default() }
}

/// The plan's output at every position of `ids`, by one full forward pass.
fn recomputed(loaded: &LoadedModel, plan: &PlanOptions, ids: &[u32]) -> Vec<Vec<f32>> {
    let request = ForwardRequest { plan: Some(plan.clone()), ..Default::default() };
    let all = loaded.model.forward(ids, &request).expect("forward").plan.expect("plan");
    all.chunks(loaded.model.spec().vocab_size).map(<[f32]>::to_vec).collect()
}

fn assert_rows_close(what: &str, a: &[f32], b: &[f32]) {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-4 * y.abs().max(1.0), "{what}: index {i}: {x} vs {y}");
    }
}

fn step_one(decoder: &mut Decoder<'_, layerwise::Cpu>, seq: SeqId) -> Vec<f32> {
    let outputs = decoder.step().expect("step");
    outputs.into_iter().find(|o| o.seq == seq).expect("output for the sequence").logits
}

/// Grows a sequence token by token and compares every step with the recomputed plan output.
fn incremental_equals_recompute(name: &str, plan: PlanOptions, length: usize) {
    let loaded = load(&fixture_str(name)).expect("load");
    let vocab = loaded.model.spec().vocab_size as u32;
    let tokens: Vec<u32> = (0..length as u32).map(|i| (i * 37 + 11) % vocab).collect();
    let reference = recomputed(&loaded, &plan, &tokens);
    let options = DecoderOptions { plan, block_size: 4, cache_tokens: Some(64), head_mask: None };
    let mut decoder = Decoder::new(&loaded.model, options).expect("decoder");
    let prompt = 3;
    let seq = decoder.add_sequence(&tokens[..prompt]).expect("add");
    for position in prompt - 1..length {
        let scores = step_one(&mut decoder, seq);
        assert_rows_close(&format!("{name} position {position}"), &scores, &reference[position]);
        if position + 1 < length {
            decoder.append(seq, tokens[position + 1]).expect("append");
        }
    }
    assert_eq!(decoder.block_table(seq).expect("table").len(), length.div_ceil(4));
}

#[test]
fn incremental_decoding_equals_recompute_for_every_architecture() {
    // 22 tokens: six blocks of 4, and far beyond GPT-Neo's local window of 4.
    incremental_equals_recompute("gpt2-sharded", plan(ExitPlan::Original), 22);
    incremental_equals_recompute("gpt-neo-bin", plan(ExitPlan::Original), 22);
    incremental_equals_recompute("llama-bf16", plan(ExitPlan::Original), 22);
    let acd = plan(ExitPlan::Contrast { upper: Upper::Layer(4), lower: 2 });
    incremental_equals_recompute("gpt-neo-bin", acd, 22);
    let lens = PlanOptions { plan: ExitPlan::Exit(3), projection: Projection::Lens, ..Default::default() };
    incremental_equals_recompute("llama-bf16", lens, 22);
}

#[test]
fn forks_share_blocks_then_diverge_correctly() {
    let loaded = load(&fixture_str("gpt-neo-bin")).expect("load");
    let acd = plan(ExitPlan::Contrast { upper: Upper::Original, lower: 2 });
    let mut decoder = Decoder::new(
        &loaded.model,
        DecoderOptions { plan: acd.clone(), block_size: 4, cache_tokens: Some(64), head_mask: None },
    )
    .expect("decoder");
    let prompt = [5u32, 17, 42, 3, 88, 61]; // one full block and half of the next
    let a = decoder.add_sequence(&prompt).expect("add");
    decoder.step().expect("prefill");
    let used = decoder.pool().num_blocks() - decoder.pool().free_blocks();
    assert_eq!(used, 2);

    let b = decoder.fork(a).expect("fork");
    assert_eq!(decoder.block_table(a).expect("a"), decoder.block_table(b).expect("b"));
    assert_eq!(decoder.pool().num_blocks() - decoder.pool().free_blocks(), 2, "a fork allocates nothing");
    for &block in decoder.block_table(a).expect("a") {
        assert_eq!(decoder.pool().refcount(block), 2);
    }

    // Diverge: each appends a different token into the shared half-full block, then a few more.
    let (mut seq_a, mut seq_b) = (prompt.to_vec(), prompt.to_vec());
    for (step, (ta, tb)) in [(7u32, 9u32), (1, 2), (30, 31), (44, 45), (60, 61), (70, 71)].into_iter().enumerate() {
        decoder.append(a, ta).expect("append a");
        decoder.append(b, tb).expect("append b");
        seq_a.push(ta);
        seq_b.push(tb);
        let outputs = decoder.step().expect("step both");
        assert_eq!(outputs.len(), 2, "one batched step serves both sequences");
        let ra = recomputed(&loaded, &acd, &seq_a);
        let rb = recomputed(&loaded, &acd, &seq_b);
        assert_rows_close(&format!("fork a, step {step}"), &outputs[0].logits, ra.last().expect("row"));
        assert_rows_close(&format!("fork b, step {step}"), &outputs[1].logits, rb.last().expect("row"));
    }
    let (ta, tb) = (decoder.block_table(a).expect("a").to_vec(), decoder.block_table(b).expect("b").to_vec());
    assert_eq!(ta[0], tb[0], "the full first block stays shared");
    assert_eq!(decoder.pool().refcount(ta[0]), 2);
    assert_ne!(ta[1], tb[1], "the half-full block was copied on write");

    decoder.release(a).expect("release a");
    assert_eq!(decoder.pool().refcount(tb[0]), 1);
    decoder.release(b).expect("release b");
    assert_eq!(decoder.pool().free_blocks(), decoder.pool().num_blocks(), "every block returned");
    assert!(decoder.release(b).is_err(), "releasing twice is an error");
}

#[test]
fn one_step_serves_sequences_of_different_lengths() {
    let loaded = load(&fixture_str("llama-bf16")).expect("load");
    let original = plan(ExitPlan::Original);
    let mut decoder = Decoder::new(&loaded.model, DecoderOptions { block_size: 4, ..Default::default() }).expect("d");
    let prompts: [&[u32]; 3] = [&[1, 2, 3, 4, 5, 6, 7, 8, 9], &[40], &[7, 7, 7, 7, 7]];
    let ids: Vec<SeqId> = prompts.iter().map(|p| decoder.add_sequence(p).expect("add")).collect();
    let outputs = decoder.step().expect("batched prefill");
    assert_eq!(outputs.len(), 3);
    for ((out, prompt), id) in outputs.iter().zip(prompts).zip(&ids) {
        assert_eq!(out.seq, *id);
        assert_rows_close("prefill", &out.logits, recomputed(&loaded, &original, prompt).last().expect("row"));
    }
    // Only two sequences get a new token: only they are stepped.
    decoder.append(ids[0], 11).expect("append");
    decoder.append(ids[2], 12).expect("append");
    let outputs = decoder.step().expect("step");
    assert_eq!(outputs.iter().map(|o| o.seq).collect::<Vec<_>>(), vec![ids[0], ids[2]]);
    let grown = [[prompts[0], &[11]].concat(), [prompts[2], &[12]].concat()];
    for (out, tokens) in outputs.iter().zip(&grown) {
        assert_rows_close("decode", &out.logits, recomputed(&loaded, &original, tokens).last().expect("row"));
    }
}

#[test]
fn pool_exhaustion_is_an_error_that_corrupts_nothing() {
    let loaded = load(&fixture_str("gpt2-sharded")).expect("load");
    let original = plan(ExitPlan::Original);
    let options = DecoderOptions { plan: original.clone(), block_size: 4, cache_tokens: Some(12), head_mask: None }; // 3 blocks
    let mut decoder = Decoder::new(&loaded.model, options).expect("decoder");
    let a = decoder.add_sequence(&[1, 2, 3, 4, 5, 6]).expect("add"); // 2 blocks
    decoder.step().expect("fits");
    let b = decoder.add_sequence(&[9, 8, 7, 6, 5]).expect("add"); // needs 2, only 1 left
    let err = decoder.step().expect_err("pool exhausted").to_string();
    assert!(err.contains("KV cache") && err.contains("3 blocks"), "{err}");
    assert_eq!(decoder.pool().free_blocks(), 1, "nothing leaked");
    assert_eq!(decoder.block_table(a).expect("a").len(), 2);

    // After releasing `b`, `a` goes on exactly as if nothing happened.
    decoder.release(b).expect("release");
    decoder.append(a, 7).expect("append");
    let scores = step_one(&mut decoder, a);
    let reference = recomputed(&loaded, &original, &[1, 2, 3, 4, 5, 6, 7]);
    assert_rows_close("after exhaustion", &scores, reference.last().expect("row"));
}

#[test]
fn early_exits_run_and_cache_only_the_blocks_they_need() {
    let loaded = load(&fixture_str("gpt2-sharded")).expect("load");
    let cases = [
        (ExitPlan::Original, 4),
        (ExitPlan::Exit(1), 1),
        (ExitPlan::Exit(2), 2),
        (ExitPlan::Contrast { upper: Upper::Layer(2), lower: 1 }, 2),
        (ExitPlan::Contrast { upper: Upper::Original, lower: 1 }, 4),
    ];
    for (exit_plan, depth) in cases {
        let mut decoder = Decoder::new(&loaded.model, DecoderOptions { plan: plan(exit_plan), ..Default::default() })
            .expect("decoder");
        assert_eq!(decoder.depth(), depth, "{exit_plan:?}");
        let seq = decoder.add_sequence(&[1, 2, 3]).expect("add");
        decoder.step().expect("prefill");
        decoder.append(seq, 4).expect("append");
        decoder.step().expect("step");
        assert_eq!(decoder.blocks_run(), 2 * depth as u64, "{exit_plan:?}: blocks computed over two steps");
    }
}

#[test]
fn plans_are_validated_against_the_checkpoint() {
    let loaded = load(&fixture_str("gpt2-sharded")).expect("load"); // exits 1, 2, 4; conversions 1, 2
    let error = |p: PlanOptions| match Decoder::new(&loaded.model, DecoderOptions { plan: p, ..Default::default() }) {
        Ok(_) => panic!("plan accepted"),
        Err(e) => e.to_string(),
    };
    let msg = error(plan(ExitPlan::Exit(3)));
    assert!(msg.contains("exit") && msg.contains("layer 3") && msg.contains("[1, 2, 4]"), "{msg}");
    let msg = error(plan(ExitPlan::Contrast { upper: Upper::Layer(4), lower: 3 }));
    assert!(msg.contains("contrast (lower layer)") && msg.contains("layer 3"), "{msg}");
    let msg = error(plan(ExitPlan::Exit(5)));
    assert!(msg.contains("outside 1..=4"), "{msg}");
    let msg = error(PlanOptions {
        plan: ExitPlan::Contrast { upper: Upper::Layer(4), lower: 1 },
        contrast: Contrast::Acd { alpha: 1.5, min_candidates: 1 },
        ..Default::default()
    });
    assert!(msg.contains("alpha"), "{msg}");
    let msg = error(PlanOptions { plan: ExitPlan::Exit(3), projection: Projection::Converted, ..Default::default() });
    assert!(msg.contains("name_to_conv_matrix.3_to_4"), "{msg}");
    // The lens reads any layer, heads or not.
    let lens = PlanOptions { plan: ExitPlan::Exit(3), projection: Projection::Lens, ..Default::default() };
    assert!(Decoder::new(&loaded.model, DecoderOptions { plan: lens, ..Default::default() }).is_ok());
}

#[test]
fn a_custom_contrast_function_replaces_acd() {
    let loaded = load(&fixture_str("gpt2-sharded")).expect("load");
    let difference = |upper: &[f32], lower: &[f32], out: &mut [f32]| {
        for ((o, u), l) in out.iter_mut().zip(upper).zip(lower) {
            *o = u - l;
        }
    };
    let custom = PlanOptions {
        plan: ExitPlan::Contrast { upper: Upper::Layer(4), lower: 1 },
        contrast: Contrast::Custom(std::sync::Arc::new(difference)),
        ..Default::default()
    };
    let prompt = [5u32, 17, 42];
    let out = loaded.model.forward(&prompt, &ForwardRequest { exits: vec![1, 4], ..Default::default() }).expect("f");
    let mut decoder = Decoder::new(&loaded.model, DecoderOptions { plan: custom, ..Default::default() }).expect("d");
    decoder.add_sequence(&prompt).expect("add");
    let scores = decoder.step().expect("step").remove(0).logits;
    let vocab = loaded.model.spec().vocab_size;
    let last = |v: &[f32]| v[(prompt.len() - 1) * vocab..].to_vec();
    let expected: Vec<f32> = last(&out.exits[&4]).iter().zip(last(&out.exits[&1])).map(|(u, l)| u - l).collect();
    assert_rows_close("custom contrast", &scores, &expected);
}

#[test]
fn prompts_in_chunks_and_evicted_sequences_give_the_same_outputs() {
    // A prompt run in chunks of 5 (beside another sequence) ends with the scores and the normed
    // states of the whole prompt run at once; an evicted sequence is recomputed at its next step and
    // gives what it was waiting for, its states only for the tokens not reported yet.
    let loaded = load(&fixture_str("gpt2-sharded")).expect("load");
    let vocab = loaded.model.spec().vocab_size as u32;
    let hidden = loaded.model.spec().hidden_size;
    let tokens: Vec<u32> = (0..23u32).map(|i| (i * 37 + 11) % vocab).collect();
    let options = || DecoderOptions { block_size: 4, cache_tokens: Some(128), ..Default::default() };
    let states = layerwise::runtime::SeqRequest { normed_states: true, ..Default::default() };

    let mut whole = Decoder::new(&loaded.model, options()).expect("decoder");
    let seq = whole.add_sequence(&tokens).expect("add");
    whole.set_request(seq, states.clone()).expect("request");
    let reference = whole.step().expect("step").remove(0);
    assert_eq!(reference.hidden.len(), tokens.len() * hidden);

    let mut chunked = Decoder::new(&loaded.model, options()).expect("decoder");
    let other = chunked.add_sequence(&tokens[..2]).expect("add");
    let seq = chunked.add_sequence(&tokens).expect("add");
    chunked.set_request(seq, states.clone()).expect("request");
    let mut outputs = Vec::new();
    while chunked.pending(seq).expect("pending") > 0 {
        let step = chunked.run_step_for(&[(other, 1), (seq, 5)]).expect("step");
        outputs = step.into_outputs().expect("outputs");
        if chunked.pending(seq).expect("pending") > 0 {
            assert!(outputs.iter().all(|o| o.seq != seq), "a partly run prompt has no output");
        }
        chunked.append(other, 7).expect("append");
    }
    let last = outputs.into_iter().find(|o| o.seq == seq).expect("the last chunk's output");
    assert_rows_close("chunked prefill scores", &last.logits, &reference.logits);
    assert_rows_close("chunked prefill states", &last.hidden, &reference.hidden);
    assert_eq!(last.hidden.len(), reference.hidden.len());

    // Append a token, evict, and recompute: the scores after the new token, and one state row.
    chunked.append(seq, tokens[3]).expect("append");
    let free = chunked.pool().free_blocks();
    chunked.evict(seq).expect("evict");
    assert_eq!(chunked.pool().free_blocks(), free + tokens.len().div_ceil(4));
    assert_eq!(chunked.pending(seq).expect("pending"), tokens.len() + 1);
    let again = chunked.run_step_for(&[(seq, usize::MAX)]).expect("step").into_outputs().expect("outputs").remove(0);
    let mut longer = tokens.clone();
    longer.push(tokens[3]);
    let expected = recomputed(&loaded, &PlanOptions::default(), &longer);
    assert_rows_close("recomputed after eviction", &again.logits, &expected[tokens.len()]);
    assert_eq!(again.hidden.len(), hidden, "only the state of the token not reported before");
}
