//! `layerwise bench-train`: training throughput of a config on this machine, as a fraction of the
//! machine's own matrix-product ceiling measured in the same run (the `gemm` crate on a 1024^3 f32
//! product with every core: the FMA throughput the training ops can reach). Random weights and
//! tokens; the real loop (forward, backward, clipping, AdamW).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use layerwise::training::data::Blocks;
use layerwise::training::ops::matmul;
use layerwise::training::{Head, Network, TrainOptions, Trainer};
use layerwise::ModelSpec;
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A transformers config.json (or a directory holding one).
    #[arg(long, value_name = "DIR|FILE")]
    config: PathBuf,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value_t = 256)]
    block_size: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let path = if args.config.is_dir() { args.config.join("config.json") } else { args.config.clone() };
    let spec = ModelSpec::from_file(&path).with_context(|| format!("--config {}", args.config.display()))?;
    anyhow::ensure!(
        args.block_size <= spec.max_positions,
        "--block-size exceeds the model's context of {}",
        spec.max_positions
    );
    anyhow::ensure!(args.steps >= 1 && args.batch_size >= 1, "--steps and --batch-size must be at least 1");
    let ceiling = gemm_ceiling();
    let heads: Vec<Head> =
        std::iter::once(Head::Original).chain(spec.exit_layers.iter().map(|&l| Head::Exit(l))).collect();
    let tokens_needed = (args.steps + 1) * args.batch_size * args.block_size;
    let stream: Vec<u32> =
        (0..tokens_needed as u64).map(|i| (i.wrapping_mul(2654435761) >> 7) as u32 % spec.vocab_size as u32).collect();
    let blocks = Blocks::from_tokens(stream, args.block_size, "tokens")?;
    let options = TrainOptions {
        heads: heads.clone(),
        batch_size: args.batch_size,
        block_size: args.block_size,
        max_steps: Some(args.steps + 1),
        ..Default::default()
    };
    let network = Network::new(&spec, None, 0, false)?;
    let mut trainer = Trainer::new(network, options, blocks, None, json!({}), Vec::new())?;
    trainer.train_step()?;
    let started = Instant::now();
    for _ in 0..args.steps {
        trainer.train_step()?;
    }
    let seconds = started.elapsed().as_secs_f64() / args.steps as f64;
    let tokens = (args.batch_size * args.block_size) as f64;
    let flops = training_flops_per_token(&spec, heads.len(), args.block_size);
    let achieved = flops * tokens / seconds / 1e9;
    if args.json {
        let line = json!({
            "step_seconds": seconds, "tokens_per_second": tokens / seconds, "flops_per_token": flops,
            "achieved_gflops": achieved, "gemm_ceiling_gflops": ceiling, "fraction_of_ceiling": achieved / ceiling,
            "threads": rayon::current_num_threads(),
        });
        return crate::output::line(line);
    }
    crate::output::line(format!(
        "{:.3} s/step, {:.0} tokens/s; {:.1} MFLOP/token -> {achieved:.1} GFLOP/s = {:.0}% of this machine's \
         gemm ceiling ({ceiling:.1} GFLOP/s, 1024^3 f32, {} threads)",
        seconds,
        tokens / seconds,
        flops / 1e6,
        100.0 * achieved / ceiling,
        rayon::current_num_threads()
    ))
}

/// Model FLOPs of one training token: 6 per weight of every matrix product (forward 2, backward 4:
/// the LM and exit heads included, embedding lookups not) plus attention's 12·layers·time·width
/// (the full time x time products the ops compute).
fn training_flops_per_token(spec: &ModelSpec, heads: usize, time: usize) -> f64 {
    let qw = (spec.num_heads * spec.head_dim) as f64;
    6.0 * product_weights(spec, spec.num_layers, heads) + 12.0 * spec.num_layers as f64 * time as f64 * qw
}

/// Weights of the matrix products a token meets in the first `layers` blocks and `heads` heads of
/// vocabulary size (embedding lookups not counted).
pub fn product_weights(spec: &ModelSpec, layers: usize, heads: usize) -> f64 {
    let (d, ff) = (spec.hidden_size as f64, spec.intermediate_size as f64);
    let (qw, kw) = ((spec.num_heads * spec.head_dim) as f64, (spec.num_kv_heads * spec.head_dim) as f64);
    let gated = matches!(spec.details, layerwise::model::config::Details::Llama { .. });
    let mlp = if gated { 3.0 * d * ff } else { 2.0 * d * ff };
    let block = d * (qw + 2.0 * kw) + qw * d + mlp;
    layers as f64 * block + heads as f64 * spec.vocab_size as f64 * d
}

/// GFLOP/s of the best of three 1024^3 f32 products.
pub fn gemm_ceiling() -> f64 {
    let n = 1024;
    let a: Vec<f32> = (0..n * n).map(|i| (i % 13) as f32 * 0.01).collect();
    let mut c = vec![0.0f32; n * n];
    matmul(&mut c, (n, n, n), &a, false, &a, false, false);
    (0..3)
        .map(|_| {
            let t = Instant::now();
            matmul(&mut c, (n, n, n), &a, false, &a, false, false);
            2.0 * (n * n * n) as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}
