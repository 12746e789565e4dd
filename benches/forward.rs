//! Prefill forward passes on the demo checkpoint: the whole model, and an exit that stops early.
//! Run with `cargo bench -p layerwise-benches`; set LAYERWISE_BENCH_MODEL to bench another checkpoint.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use layerwise::ForwardRequest;

fn forward(c: &mut Criterion) {
    let source = std::env::var("LAYERWISE_BENCH_MODEL").unwrap_or_else(|_| layerwise_benches::DEMO_MODEL.to_string());
    let loaded = layerwise::load(&source).expect("load the bench model");
    let spec = loaded.model.spec().clone();
    let mut group = c.benchmark_group("forward");
    group.sample_size(10);
    for tokens in [8usize, 32] {
        let ids: Vec<u32> = (0..tokens as u32).map(|i| (i * 7919) % spec.vocab_size as u32).collect();
        let full = ForwardRequest { logits: true, ..Default::default() };
        group.bench_with_input(BenchmarkId::new("original_head", tokens), &ids, |b, ids| {
            b.iter(|| loaded.model.forward(ids, &full).expect("forward"))
        });
        if let Some(&first_exit) = spec.exit_layers.first() {
            let exit = ForwardRequest { exits: vec![first_exit], ..Default::default() };
            group.bench_with_input(BenchmarkId::new(format!("exit_{first_exit}"), tokens), &ids, |b, ids| {
                b.iter(|| loaded.model.forward(ids, &exit).expect("forward"))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
