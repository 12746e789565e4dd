//! The CPU kernels on synthetic weights shaped like GPT-2 medium's: matrix-vector products (decoding),
//! matrix-matrix products (prefill, batched decoding) in every dtype and layout, the same products
//! over weights too large for the caches (as in a model), the 8-bit one-token product in and out of the
//! caches, and attention over the paged cache.
//!
//! `cargo bench -p layerwise-benches --bench kernels`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use layerwise::backend::{AttentionParams, Backend, Layout, Matrix, SeqLayout, StepLayout};
use layerwise::HostTensor;
use layerwise::{Cpu, DType};

fn values(n: usize, seed: u64) -> Vec<f32> {
    (0..n as u64).map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed) >> 7) % 1000) as f32 / 1000.0 - 0.5).collect()
}

fn linear(c: &mut Criterion) {
    // GPT-2 medium's MLP up-projection: 1024 -> 4096.
    let (n_in, n_out) = (1024usize, 4096usize);
    let mut group = c.benchmark_group("linear_1024x4096");
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for layout in [Layout::OutIn, Layout::InOut] {
            let shape = match layout {
                Layout::OutIn => vec![n_out, n_in],
                Layout::InOut => vec![n_in, n_out],
            };
            let tensor = HostTensor::from_f32(values(n_in * n_out, 1), shape).converted(dtype);
            let cpu = Cpu::default();
            let weight = cpu.weight(&tensor, layout).expect("weight");
            for rows in [1usize, 4, 16, 128] {
                let x = Matrix::new(values(rows * n_in, 2), rows, n_in).expect("shape");
                group.throughput(Throughput::Bytes((n_in * n_out * dtype.size()) as u64));
                let id = BenchmarkId::new(format!("{dtype}_{layout:?}"), rows);
                group.bench_with_input(id, &x, |b, x| b.iter(|| cpu.linear(x, &weight, None)));
            }
        }
    }
    group.finish();
}

/// Batched decoding as a model meets it: each product reads a weight no cache holds. Sixteen tokens
/// times 24 distinct 1024 x 4096 weights (384 MiB in f32) in turn; throughput in FLOP (2 per
/// multiply-add) to compare with the FMA peak `layerwise bench` measures.
fn linear_from_memory(c: &mut Criterion) {
    let (n_in, n_out, count) = (1024usize, 4096usize, 24usize);
    let mut group = c.benchmark_group("linear_from_memory_1024x4096x24");
    let cpu = Cpu::default();
    for dtype in [DType::F32, DType::BF16] {
        for layout in [Layout::OutIn, Layout::InOut] {
            let shape = match layout {
                Layout::OutIn => vec![n_out, n_in],
                Layout::InOut => vec![n_in, n_out],
            };
            let weights: Vec<_> = (0..count as u64)
                .map(|i| {
                    let tensor = HostTensor::from_f32(values(n_in * n_out, i), shape.clone()).converted(dtype);
                    cpu.weight(&tensor, layout).expect("weight")
                })
                .collect();
            for rows in [1usize, 4, 8, 16, 32, 64, 128, 512] {
                let x = Matrix::new(values(rows * n_in, 2), rows, n_in).expect("shape");
                group.throughput(Throughput::Elements((2 * rows * n_in * n_out * count) as u64));
                let id = BenchmarkId::new(format!("{dtype}_{layout:?}"), rows);
                group.bench_with_input(id, &x, |b, x| {
                    b.iter(|| {
                        cpu.run(|| {
                            for w in &weights {
                                std::hint::black_box(cpu.linear(x, w, None).expect("linear"));
                            }
                        })
                    })
                });
            }
        }
    }
    group.finish();
}

/// The 8-bit one-token product where its weights stay in the caches and where they come from memory:
/// bytes per second either way. Equal rates say the kernel's own instructions, not the memory, set
/// its pace.
fn q8_one_token(c: &mut Criterion) {
    let cpu = Cpu::with_q8_weights();
    let mut group = c.benchmark_group("q8_one_token");
    // (name, n_in, n_out, count): 1.1 MB in the caches; 24 x 4.5 MB = 108 MB from memory.
    for (name, n_in, n_out, count) in
        [("in_cache_1024x1024", 1024usize, 1024usize, 1usize), ("from_memory_1024x4096x24", 1024, 4096, 24)]
    {
        for layout in [Layout::OutIn, Layout::InOut] {
            let shape = match layout {
                Layout::OutIn => vec![n_out, n_in],
                Layout::InOut => vec![n_in, n_out],
            };
            let weights: Vec<_> = (0..count as u64)
                .map(|i| {
                    cpu.weight(&HostTensor::from_f32(values(n_in * n_out, i), shape.clone()), layout).expect("weight")
                })
                .collect();
            let x = Matrix::new(values(n_in, 2), 1, n_in).expect("shape");
            // Q8_0 bytes: 34 per 32 weights.
            group.throughput(Throughput::Bytes((n_in * n_out / 32 * 34 * count) as u64));
            group.bench_with_input(BenchmarkId::new(name, format!("{layout:?}")), &x, |b, x| {
                b.iter(|| {
                    cpu.run(|| {
                        for w in &weights {
                            std::hint::black_box(cpu.linear(x, w, None).expect("linear"));
                        }
                    })
                })
            });
        }
    }
    group.finish();
}

fn paged_attention(c: &mut Criterion) {
    // 16 heads of 64, one query over 512 cached positions in blocks of 16.
    let cpu = Cpu::default();
    let (heads, head_dim, context, block) = (16usize, 64usize, 512usize, 16usize);
    let width = heads * head_dim;
    let mut store = cpu.kv_store(1, context / block, block, width).expect("store");
    let keys = Matrix::new(values(context * width, 3), context, width).expect("shape");
    let vals = Matrix::new(values(context * width, 4), context, width).expect("shape");
    let table: Vec<u32> = (0..(context / block) as u32).rev().collect(); // scattered blocks
    let mut layout = StepLayout {
        ids: vec![0; context],
        positions: (0..context as u32).collect(),
        sequences: vec![SeqLayout {
            first_row: 0,
            len: context,
            first_position: 0,
            table_start: 0,
            table_len: table.len(),
        }],
        block_tables: table.clone(),
        block_size: block,
        ..Default::default()
    };
    layout.slots = (0..context).map(|pos| layout.slot_of(0, pos) as u32).collect();
    let fill = cpu.upload_step(layout.clone()).expect("step");
    cpu.kv_write(&mut store, 0, &fill, &keys, &vals).expect("write");
    // One query at the last position.
    layout.sequences[0] =
        SeqLayout { first_row: 0, len: 1, first_position: context - 1, table_start: 0, table_len: table.len() };
    let step = cpu.upload_step(layout).expect("step");
    let q = Matrix::new(values(width, 5), 1, width).expect("shape");
    let params =
        AttentionParams { num_heads: heads, num_kv_heads: heads, head_dim, scale: 0.125, window: None, causal: true };
    c.bench_function("paged_attention_16x64_ctx512", |b| b.iter(|| cpu.paged_attention(&q, &store, 0, &step, &params)));
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = linear, linear_from_memory, q8_one_token, paged_attention
}
criterion_main!(benches);
