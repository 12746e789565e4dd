//! 8-bit weights (`--dtype q8`, GGUF's Q8_0 blocks): the CPU's fast paths compute what the reference
//! backend computes with the dequantised weights, and the error against f32 is what 8-bit weights
//! imply (reported, with greedy agreement over 64 tokens, by `q8_error_report`; the README quotes it).

use std::path::PathBuf;

use layerwise::backend::{Backend, WeightFormat};
use layerwise::exits::{ExitPlan, PlanOptions, Upper};
use layerwise::generation::{generate, GenerationOptions};
use layerwise::runtime::{Decoder, DecoderOptions};
use layerwise::{load_on, Cpu, ForwardRequest, LoadedModel, Reference};
use layerwise_tests::fixture_str;

fn demo() -> String {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/kjv-gpt2-multiexit")).to_string_lossy().into_owned()
}

/// A prompt of ordinary text for the trained demo (KJV), as ids.
fn prompt<B: Backend>(loaded: &LoadedModel<B>) -> Vec<u32> {
    loaded.encode("And God said unto Moses, I AM THAT I AM: and he said, Thus shalt thou say").expect("encode")
}

fn logits<B: Backend>(loaded: &LoadedModel<B>, ids: &[u32]) -> (Vec<f32>, Vec<Vec<f32>>) {
    let spec = loaded.model.spec();
    let request = ForwardRequest { logits: true, exits: spec.exit_layers.clone(), ..Default::default() };
    let out = loaded.model.forward(ids, &request).expect("forward");
    let exits = spec.exit_layers.iter().map(|layer| out.exits[layer].clone()).collect();
    (out.logits.expect("logits"), exits)
}

#[test]
fn the_cpu_computes_with_8_bit_weights_what_the_reference_does() {
    for source in [demo(), fixture_str("gpt2-sharded"), fixture_str("gpt-neo-bin")] {
        let fast = load_on(&source, Cpu::with_q8_weights()).expect("load");
        let reference = load_on(&source, Reference { weights: Some(WeightFormat::Q8) }).expect("load");
        let ids: Vec<u32> = (0..40u32).map(|i| (i * 37 + 11) % fast.model.spec().vocab_size as u32).collect();
        let (fast_logits, fast_exits) = logits(&fast, &ids);
        let (ref_logits, ref_exits) = logits(&reference, &ids);
        let close = |a: &[f32], b: &[f32], what: &str| {
            let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1.0);
            let worst = a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(worst <= 1e-4 * scale, "{source} {what}: {worst} (scale {scale})");
        };
        close(&fast_logits, &ref_logits, "logits");
        for (i, (a, b)) in fast_exits.iter().zip(&ref_exits).enumerate() {
            close(a, b, &format!("exit {i}"));
        }
        // And it really is the 8-bit model: the f32 logits differ.
        let f32_logits = logits(&load_on(&source, Cpu::default()).expect("load"), &ids).0;
        assert!(f32_logits.iter().zip(&fast_logits).any(|(a, b)| (a - b).abs() > 1e-4), "{source}: q8 equals f32");
    }
}

/// Max |logit difference| against f32, the share of positions whose top token agrees, and the
/// number of the first 64 greedy tokens that equal f32's, under `plan`.
fn error_against_f32(source: &str, plan: PlanOptions) -> (f32, f64, usize) {
    let exact = load_on(source, Cpu::default()).expect("load");
    let eight = load_on(source, Cpu::with_q8_weights()).expect("load");
    let ids = prompt(&exact);
    let (a, b) = (logits(&exact, &ids).0, logits(&eight, &ids).0);
    let vocab = exact.model.spec().vocab_size;
    let max_abs = a.iter().zip(&b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    let argmax =
        |row: &[f32]| row.iter().enumerate().fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m }).0;
    let agree = a.chunks(vocab).zip(b.chunks(vocab)).filter(|(x, y)| argmax(x) == argmax(y)).count();
    let options = GenerationOptions { max_new_tokens: 64, ..Default::default() };
    let greedy = |loaded: &LoadedModel| {
        let mut decoder =
            Decoder::new(&loaded.model, DecoderOptions { plan: plan.clone(), ..Default::default() }).expect("decoder");
        generate(&mut decoder, &ids, &options, None, |_| true).expect("generate").ids
    };
    let (x, y) = (greedy(&exact), greedy(&eight));
    let same_prefix = x.iter().zip(&y).take_while(|(p, q)| p == q).count();
    (max_abs, agree as f64 / (a.len() / vocab) as f64, same_prefix)
}

#[test]
fn q8_error_report() {
    // The trained demo model: its logits mean something, so agreement is informative.
    // ACD divides two heads' probabilities: where contrast scores are close, the weights' rounding
    // picks the other token sooner.
    let plans = [
        ("original head", PlanOptions::default(), 32),
        ("exit 2", PlanOptions { plan: ExitPlan::Exit(2), ..Default::default() }, 32),
        (
            "ACD original vs 2",
            PlanOptions { plan: ExitPlan::Contrast { upper: Upper::Original, lower: 2 }, ..Default::default() },
            8,
        ),
    ];
    for (name, plan, min_greedy) in plans {
        let (max_abs, top1, greedy) = error_against_f32(&demo(), plan);
        eprintln!("demo, {name}: max |logit error| {max_abs:.4}, top-1 agreement {:.1}%, greedy tokens equal to f32's: {greedy} of 64", 100.0 * top1);
        // 8-bit blocks keep about 2.5 significant digits per weight: small logit errors, the same
        // argmax almost everywhere, and a long common greedy prefix.
        assert!(max_abs < 0.5, "{name}: max |logit error| {max_abs}");
        assert!(top1 >= 0.9, "{name}: top-1 agreement {top1}");
        assert!(greedy >= min_greedy, "{name}: greedy diverged after {greedy} tokens");
    }
}
