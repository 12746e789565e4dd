//! Self-speculative decoding is lossless: under every plan, draft layer and draft count, with
//! processors, EOS and `min_new_tokens`, it generates exactly the tokens plain greedy decoding does
//! (which matches transformers, see the strategy tests). On the random fixtures drafts are mostly
//! rejected (the rejection path); on the trained demo model most are accepted (the acceptance path,
//! long rounds, the bonus token). A round's rollback leaves the cache as plain decoding leaves it,
//! and adaptation turns speculation off where the exits disagree with the plan. Speculative sampling
//! draws the tokens plain sampling draws, in distribution (a chi-square test over many seeds against
//! the exact joint distribution of three tokens, computed from plain steps).

use std::path::PathBuf;

use layerwise::exits::{ExitPlan, PlanOptions, Upper};
use layerwise::generation::speculative::{generate_speculative, SpeculationOptions};
use layerwise::generation::{generate, GenerationOptions, ProcessorOptions, SampleOptions, SamplingOptions, Strategy};
use layerwise::runtime::{Decoder, DecoderOptions};
use layerwise::{load, LoadedModel};
use layerwise_tests::fixture_str;

fn demo() -> String {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/kjv-gpt2-multiexit")).to_string_lossy().into_owned()
}

fn plans(exits: &[usize], top: usize) -> Vec<PlanOptions> {
    let mut plans = vec![PlanOptions::default()];
    for &e in exits.iter().filter(|&&e| e > 1) {
        plans.push(PlanOptions { plan: ExitPlan::Exit(e), ..Default::default() });
    }
    for &lower in exits.iter().filter(|&&l| l < top) {
        plans.push(PlanOptions { plan: ExitPlan::Contrast { upper: Upper::Original, lower }, ..Default::default() });
    }
    plans
}

/// Plain and speculative greedy generation under `plan` from `prompt`, for every draft layer
/// below the plan and every draft count: the same ids. Returns the drafts accepted in all.
fn check_lossless(loaded: &LoadedModel, plan: &PlanOptions, prompt: &[u32], options: &GenerationOptions) -> usize {
    let model = &loaded.model;
    let mut decoder =
        Decoder::new(model, DecoderOptions { plan: plan.clone(), ..Default::default() }).expect("decoder");
    let plain = generate(&mut decoder, prompt, options, None, |_| true).expect("plain");
    let depth = decoder.depth();
    let mut accepted = 0;
    for &layer in model.spec().exit_layers.iter().filter(|&&l| l < depth) {
        for (max_drafts, adaptive) in [(1, false), (3, false), (6, true)] {
            let speculation = SpeculationOptions { draft_layer: Some(layer), max_drafts, adaptive };
            let (fast, stats) =
                generate_speculative(&mut decoder, prompt, options, &speculation, None, |_| true).expect("speculative");
            assert_eq!(fast.ids, plain.ids, "{plan:?}, drafts from {layer}, {max_drafts} a round, adaptive {adaptive}");
            assert_eq!(fast.finish, plain.finish);
            assert_eq!(stats.draft_layer, layer);
            assert!(stats.accepted <= stats.drafted);
            accepted += stats.accepted;
            // Every block was given back.
            assert_eq!(decoder.pool().free_blocks(), decoder.pool().num_blocks());
        }
    }
    accepted
}

#[test]
fn speculation_is_lossless_on_the_fixtures() {
    for name in ["gpt2-sharded", "gpt-neo-bin", "llama-bf16"] {
        let loaded = load(&fixture_str(name)).expect("load");
        let spec = loaded.model.spec();
        let prompt: Vec<u32> = vec![5, 17, 42, 8, 3];
        let options = GenerationOptions { max_new_tokens: 24, ..Default::default() };
        for plan in plans(&spec.exit_layers, spec.num_layers) {
            check_lossless(&loaded, &plan, &prompt, &options);
        }
        // Processors, an EOS suppressed for a while, then allowed.
        let processed = GenerationOptions {
            max_new_tokens: 20,
            min_new_tokens: 6,
            eos_token_ids: spec.eos_token_ids.clone(),
            processors: ProcessorOptions { repetition_penalty: 1.3, no_repeat_ngram_size: 2 },
            ..Default::default()
        };
        check_lossless(&loaded, &PlanOptions::default(), &prompt, &processed);
    }
}

#[test]
fn speculation_accepts_drafts_on_the_trained_demo_and_stays_lossless() {
    let loaded = load(&demo()).expect("load the demo model");
    let tokenizer = loaded.tokenizer.as_ref().expect("tokenizer");
    let prompt = tokenizer.encode("And God said unto Moses,").expect("encode");
    let options = GenerationOptions { max_new_tokens: 48, ..Default::default() };
    let spec = loaded.model.spec();
    let mut accepted = 0;
    for plan in plans(&spec.exit_layers, spec.num_layers) {
        accepted += check_lossless(&loaded, &plan, &prompt, &options);
    }
    assert!(accepted > 50, "the trained exits agree with the plans often ({accepted} drafts accepted)");
    // Text stops and EOS end a speculative generation where they end a plain one.
    let stops = GenerationOptions {
        max_new_tokens: 48,
        stop_strings: vec!["LORD".into()],
        eos_token_ids: spec.eos_token_ids.clone(),
        ..Default::default()
    };
    let mut decoder = Decoder::new(&loaded.model, DecoderOptions::default()).expect("decoder");
    let plain = generate(&mut decoder, &prompt, &stops, Some(tokenizer), |_| true).expect("plain");
    let speculation = SpeculationOptions { draft_layer: Some(4), ..Default::default() };
    let (fast, _) =
        generate_speculative(&mut decoder, &prompt, &stops, &speculation, Some(tokenizer), |_| true).expect("fast");
    assert_eq!((fast.ids, fast.finish), (plain.ids, plain.finish));
}

#[test]
fn a_rolled_back_round_leaves_the_cache_as_plain_decoding_does() {
    let loaded = load(&demo()).expect("load the demo model");
    let model = &loaded.model;
    let prompt: Vec<u32> = vec![11, 300, 45, 9, 120];
    let mut decoder = Decoder::new(model, DecoderOptions::default()).expect("decoder");
    let seq = decoder.add_sequence(&prompt).expect("add");
    decoder.step().expect("prefill");
    decoder.append(seq, 77).expect("append");
    // Three drafts of our choosing, then keep only the first.
    let mut drafts = vec![5u32, 6, 7].into_iter();
    let round = decoder.speculate(seq, 2, 3, &mut |_, _| Ok(drafts.next())).expect("speculate");
    assert_eq!(round.drafts, vec![5, 6, 7]);
    assert_eq!(round.target_scores.len(), 4);
    let kept = prompt.len() + 2; // the prompt, 77 and 5
    decoder.rollback(seq, kept).expect("rollback");
    decoder.append(seq, 8).expect("append");
    let after = decoder.step().expect("step").remove(0).logits;

    // The same tokens decoded plainly.
    let mut plain = Decoder::new(model, DecoderOptions::default()).expect("decoder");
    let other = plain.add_sequence(&prompt).expect("add");
    plain.step().expect("prefill");
    let mut verified = Vec::new();
    for token in [77u32, 5, 6, 7] {
        plain.append(other, token).expect("append");
        verified.push(plain.step().expect("step").remove(0).logits);
    }
    // Each verified row is the plain step's output at that position.
    for (row, (got, want)) in round.target_scores.iter().zip(&verified).enumerate() {
        let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "row {row} differs by {worst}");
    }
    let mut plain = Decoder::new(model, DecoderOptions::default()).expect("decoder");
    let other = plain.add_sequence(&[prompt.clone(), vec![77, 5, 8]].concat()).expect("add");
    let want = plain.step().expect("step").remove(0).logits;
    let _ = other;
    let worst = after.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "after the rollback the next step differs by {worst}");
    // Only cached tokens can be kept; the draft layer must be an exit below the plan.
    assert!(decoder.rollback(seq, 100).is_err());
    let message = decoder.speculate(seq, 6, 2, &mut |_, _| Ok(None)).expect_err("layer 6 is the top").to_string();
    assert!(message.contains("draft layer"), "{message}");
}

#[test]
fn adaptation_turns_speculation_off_where_exits_disagree() {
    let loaded = load(&fixture_str("gpt2-sharded")).expect("load");
    let mut decoder = Decoder::new(&loaded.model, DecoderOptions::default()).expect("decoder");
    let options = GenerationOptions { max_new_tokens: 40, ..Default::default() };
    let speculation = SpeculationOptions { draft_layer: Some(1), max_drafts: 4, adaptive: true };
    let (_, stats) =
        generate_speculative(&mut decoder, &[5, 17, 42], &options, &speculation, None, |_| true).expect("generate");
    assert!(stats.acceptance_rate() < 0.5, "random exits rarely agree: {stats:?}");
    assert!(stats.plain_steps > 2 * stats.rounds, "speculation mostly off: {stats:?}");
    // No new tokens: nothing generated, as plain decoding.
    let none = GenerationOptions { max_new_tokens: 0, ..Default::default() };
    let (empty, _) = generate_speculative(&mut decoder, &[5], &none, &speculation, None, |_| true).expect("zero");
    assert!(empty.ids.is_empty());
    // Beams do not speculate.
    let beams = GenerationOptions {
        strategy: Strategy::Beam(layerwise::generation::BeamOptions { num_beams: 2, ..Default::default() }),
        ..Default::default()
    };
    let error = generate_speculative(&mut decoder, &[5], &beams, &speculation, None, |_| true).expect_err("beams");
    assert!(error.to_string().contains("greedy decoding and sampling"), "{error}");
}

/// Chi-square's critical value at p = 0.001 for `dof` degrees of freedom (Wilson-Hilferty).
fn chi_square_critical(dof: usize) -> f64 {
    let k = dof as f64;
    let z = 3.090; // the standard normal's 0.999 quantile
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}

/// Speculative sampling under `plan` with drafts from `draft_layer`: over `draws` seeds, the joint
/// distribution of the first three tokens equals plain sampling's, computed exactly from plain
/// steps (top-k 3 keeps the outcomes to 27). Returns the drafts made and accepted in all.
fn check_sampling_distribution(
    loaded: &LoadedModel,
    plan: &PlanOptions,
    draft_layer: usize,
    draws: u64,
) -> (usize, usize) {
    let model = &loaded.model;
    let tokenizer = loaded.tokenizer.as_ref().expect("tokenizer");
    let prompt = tokenizer.encode("And the LORD spake unto").expect("encode");
    let sampling = SamplingOptions { top_k: 3, temperature: 1.3, ..Default::default() };
    let decoder_options = DecoderOptions { plan: plan.clone(), ..Default::default() };
    // The exact distribution: p(a) p(b | a) p(c | a, b) from plain steps, each warped as sampling does.
    let mut exact = Decoder::new(model, decoder_options.clone()).expect("decoder");
    let mut next = |prefix: &[u32]| -> Vec<(u32, f64)> {
        let seq = exact.add_sequence(&[prompt.as_slice(), prefix].concat()).expect("add");
        let mut scores = exact.step().expect("step").remove(0).logits;
        exact.release(seq).expect("release");
        sampling.warp(&mut scores, 1);
        let probs = layerwise::math::softmax(&scores);
        probs.iter().enumerate().filter(|(_, &p)| p > 0.0).map(|(t, &p)| (t as u32, p as f64)).collect()
    };
    let mut joint: Vec<(Vec<u32>, f64)> = Vec::new();
    for (a, pa) in next(&[]) {
        for (b, pb) in next(&[a]) {
            for (c, pc) in next(&[a, b]) {
                joint.push((vec![a, b, c], pa * pb * pc));
            }
        }
    }
    // Speculative draws, one seed each.
    let mut decoder = Decoder::new(model, decoder_options).expect("decoder");
    let speculation = SpeculationOptions { draft_layer: Some(draft_layer), max_drafts: 2, adaptive: false };
    let mut counts = std::collections::HashMap::<Vec<u32>, usize>::new();
    let (mut drafted, mut accepted) = (0, 0);
    for seed in 0..draws {
        let options = GenerationOptions {
            max_new_tokens: 3,
            strategy: Strategy::Sample(SampleOptions {
                sampling: SamplingOptions { seed, ..sampling.clone() },
                num_return_sequences: 1,
            }),
            ..Default::default()
        };
        let (generation, stats) =
            generate_speculative(&mut decoder, &prompt, &options, &speculation, None, |_| true).expect("sample");
        drafted += stats.drafted;
        accepted += stats.accepted;
        *counts.entry(generation.ids).or_default() += 1;
    }
    for outcome in counts.keys() {
        assert!(joint.iter().any(|(o, _)| o == outcome), "{outcome:?} has probability 0 under plain sampling");
    }
    // Pearson's chi-square; outcomes expected fewer than 5 times are pooled into one cell.
    let (mut chi2, mut cells) = (0.0, 0);
    let (mut pooled_expected, mut pooled_count) = (0.0, 0usize);
    for (outcome, p) in &joint {
        let expected = p * draws as f64;
        let count = counts.get(outcome).copied().unwrap_or(0);
        if expected < 5.0 {
            pooled_expected += expected;
            pooled_count += count;
            continue;
        }
        chi2 += (count as f64 - expected).powi(2) / expected;
        cells += 1;
    }
    if pooled_expected > 0.0 {
        chi2 += (pooled_count as f64 - pooled_expected).powi(2) / pooled_expected;
        cells += 1;
    }
    let critical = chi_square_critical(cells - 1);
    assert!(
        chi2 < critical,
        "{plan:?}, drafts from {draft_layer}: chi-square {chi2:.1} over {} degrees of freedom (critical {critical:.1})",
        cells - 1
    );
    (drafted, accepted)
}

#[test]
fn speculative_sampling_draws_what_plain_sampling_draws() {
    let loaded = load(&demo()).expect("load the demo model");
    let (mut drafted, mut accepted) = (0, 0);
    let contrast = PlanOptions { plan: ExitPlan::Contrast { upper: Upper::Original, lower: 2 }, ..Default::default() };
    for (plan, layer) in [(PlanOptions::default(), 2), (PlanOptions::default(), 4), (contrast, 4)] {
        let (d, a) = check_sampling_distribution(&loaded, &plan, layer, 3000);
        drafted += d;
        accepted += a;
    }
    // Both ways of the rule were taken, often.
    assert!(accepted > drafted / 4 && accepted < drafted * 9 / 10, "{accepted} of {drafted} drafts accepted");
}
