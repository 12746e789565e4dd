//! One decoding step of a model under the original head, an early exit and ACD, after a 32-token
//! prompt. Defaults to the demo checkpoint; set LAYERWISE_BENCH_MODEL to a directory (e.g. the
//! reference checkpoint of tools/scripts/make_reference_checkpoint.py) for real sizes.
//!
//! `cargo bench -p layerwise-benches --bench decode`

use criterion::{criterion_group, criterion_main, Criterion};
use layerwise::exits::{ExitPlan, PlanOptions, Upper};
use layerwise::runtime::{Decoder, DecoderOptions};

fn decode_step(c: &mut Criterion) {
    let source = std::env::var("LAYERWISE_BENCH_MODEL").unwrap_or_else(|_| layerwise_benches::DEMO_MODEL.to_string());
    let loaded = layerwise::load(&source).expect("load the bench model");
    let spec = loaded.model.spec().clone();
    let (top, low) = (spec.num_layers, spec.exit_layers.first().copied().unwrap_or(1));
    let plans = [
        ("original", ExitPlan::Original),
        ("exit_lowest", ExitPlan::Exit(low)),
        ("acd_top_vs_lowest", ExitPlan::Contrast { upper: Upper::Layer(top), lower: low }),
    ];
    let prompt: Vec<u32> = (0..32u32).map(|i| (i * 7919 + 13) % spec.vocab_size as u32).collect();
    let mut group = c.benchmark_group("decode_step");
    group.sample_size(10);
    for (name, plan) in plans {
        if plan != ExitPlan::Original && spec.exit_layers.is_empty() {
            continue;
        }
        let options = DecoderOptions { plan: PlanOptions { plan, ..Default::default() }, ..Default::default() };
        let mut decoder = Decoder::new(&loaded.model, options).expect("decoder");
        let seq = decoder.add_sequence(&prompt).expect("prompt");
        decoder.step().expect("prefill");
        group.bench_function(name, |b| {
            b.iter(|| {
                // Each iteration appends one token and runs one step; fork/release keeps the context
                // length fixed, so every iteration measures the same step.
                let fork = decoder.fork(seq).expect("fork");
                decoder.append(fork, 1).expect("append");
                let out = decoder.step().expect("step");
                decoder.release(fork).expect("release");
                out
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decode_step);
criterion_main!(benches);
