//! `layerwise bench`: generation throughput, prefill throughput, peak memory, and how close decoding
//! comes to the machine's memory-bandwidth bound.

use std::time::Instant;

use anyhow::Result;
use layerwise::generation::speculative::{generate_speculative, SpeculationOptions};
use layerwise::generation::{
    generate, ContrastiveOptions, GenerationConfig, GenerationOptions, SampleOptions, SamplingOptions, Strategy,
};
use layerwise::runtime::{Decoder, DecoderOptions, SeqId};
use layerwise::{Backend, LoadedModel};
use rayon::prelude::*;
use serde_json::json;

use crate::input::{ModelArgs, PlanArgs, SpeculateArgs};
use crate::memory;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    plan: PlanArgs,
    /// Sequences decoded together.
    #[arg(long, value_name = "B", default_value_t = 1)]
    batch: usize,
    /// Prompt tokens per sequence (synthetic ids).
    #[arg(long, value_name = "P", default_value_t = 32)]
    prompt_len: usize,
    /// Tokens generated per sequence (exactly: EOS is ignored).
    #[arg(long, value_name = "N", default_value_t = 64)]
    new_tokens: usize,
    /// Beam search with N beams (batch 1).
    #[arg(long, value_name = "N")]
    num_beams: Option<usize>,
    /// Contrastive search with this penalty among --top-k candidates (batch 1).
    #[arg(long, value_name = "A")]
    penalty_alpha: Option<f32>,
    /// Candidates of contrastive search [default: 50, as transformers].
    #[arg(long, value_name = "K", requires = "penalty_alpha")]
    top_k: Option<usize>,
    /// DoLa over these layers: low, high or a list (batch 1).
    #[arg(long, value_name = "LAYERS")]
    dola_layers: Option<String>,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
    /// With --speculate: plain and speculative decoding timed in the same run (batch 1; greedy
    /// outputs are checked equal).
    #[command(flatten)]
    speculation: SpeculateArgs,
    /// With --speculate: time sampling (transformers' defaults: top-k 50, temperature 1; seed 0)
    /// instead of greedy decoding, plain against speculative.
    #[arg(long, requires = "speculate")]
    do_sample: bool,
    /// A prompt text instead of synthetic ids (tokenized; replaces --prompt-len): what a trained
    /// model's exits agree on depends on it.
    #[arg(long, value_name = "TEXT")]
    prompt: Option<String>,
}

impl Args {
    /// The decoding strategy the flags ask for, if any besides greedy.
    fn strategy(&self) -> Result<Option<GenerationOptions>> {
        let mut options = GenerationConfig { max_new_tokens: self.new_tokens, ..Default::default() };
        if let Some(n) = self.num_beams {
            options.beam.num_beams = n;
        }
        if let Some(alpha) = self.penalty_alpha {
            options.contrastive = Some(ContrastiveOptions { penalty_alpha: alpha, top_k: self.top_k.unwrap_or(50) });
        }
        if let Some(layers) = &self.dola_layers {
            options.dola_layers = Some(layers.parse().map_err(anyhow::Error::from)?);
        }
        let any = options.beam.num_beams > 1 || options.contrastive.is_some() || options.dola_layers.is_some();
        if !any {
            return Ok(None);
        }
        anyhow::ensure!(self.batch == 1, "--batch must be 1 with --num-beams, --penalty-alpha or --dola-layers");
        Ok(Some(options.resolve().map_err(|e| anyhow::anyhow!(crate::flags::translate(&e.to_string())))?))
    }
}

struct Timing {
    prefill_s: f64,
    decode_s: f64,
}

pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(args.batch >= 1, "--batch must be at least 1");
    anyhow::ensure!(args.prompt_len >= 1, "--prompt-len must be at least 1");
    anyhow::ensure!(args.new_tokens >= 1, "--new-tokens must be at least 1");
    crate::with_backend!(args.model, loaded => run_on(&args, loaded))
}

fn run_on<B: Backend>(args: &Args, loaded: LoadedModel<B>) -> Result<()> {
    let spec = loaded.model.spec();
    let text_prompt = match &args.prompt {
        Some(text) => Some(loaded.encode(text)?),
        None => None,
    };
    let prompt_len = text_prompt.as_ref().map_or(args.prompt_len, Vec::len);
    anyhow::ensure!(prompt_len >= 1, "--prompt: the text has no tokens");
    anyhow::ensure!(
        prompt_len + args.new_tokens <= spec.max_positions,
        "--prompt-len {} + --new-tokens {} exceed the model's context of {} positions",
        prompt_len,
        args.new_tokens,
        spec.max_positions
    );
    let plan = args.plan.plan()?.unwrap_or_default();
    let block_size = 16;
    let per_sequence = (prompt_len + args.new_tokens).div_ceil(block_size) * block_size;
    let strategy = args.strategy()?;
    let cache_tokens = match &strategy {
        Some(options) => options.cache_tokens(prompt_len),
        None => args.batch.saturating_mul(per_sequence),
    };
    let options = DecoderOptions { plan: plan.clone(), block_size, cache_tokens: Some(cache_tokens), head_mask: None };
    let mut decoder = Decoder::new(&loaded.model, options)
        .map_err(|e| crate::flags::decoder_error(e, "--batch with --prompt-len and --new-tokens", args.plan.flag()))?;
    // Made once the cache is known to fit (they are as many as the sequences it holds).
    let vocab = spec.vocab_size as u64;
    let prompts: Vec<Vec<u32>> = match &text_prompt {
        Some(ids) => vec![ids.clone(); args.batch],
        None => (0..args.batch as u64)
            .map(|b| (0..prompt_len as u64).map(|i| ((i * 7919 + b * 104_729 + 13) % vocab) as u32).collect())
            .collect(),
    };
    let speculation = args.speculation.options()?;
    let speculated = match &speculation {
        Some(s) => {
            anyhow::ensure!(args.batch == 1 && strategy.is_none(), "--speculate runs greedy decoding of one sequence");
            let mut options = GenerationOptions { max_new_tokens: args.new_tokens, ..Default::default() };
            if args.do_sample {
                let sampling = SampleOptions { sampling: SamplingOptions::default(), num_return_sequences: 1 };
                options.strategy = Strategy::Sample(sampling);
            }
            Some(bench_speculation(&mut decoder, &prompts[0], &options, s)?)
        }
        None => None,
    };

    // A short warm-up brings the weights in from disk (and converts them, with --dtype), as a
    // framework's load step would; the timed run then measures generation alone.
    let launches_before: Option<u64>;
    let graphs_before: Option<u64>;
    let timing = match &strategy {
        None => {
            generate_batch(&mut decoder, &prompts, 2.min(args.new_tokens))?;
            launches_before = loaded.model.backend().launches();
            graphs_before = loaded.model.backend().graph_launches();
            generate_batch(&mut decoder, &prompts, args.new_tokens)?
        }
        Some(options) => {
            let warm_up = GenerationOptions { max_new_tokens: 2.min(args.new_tokens), ..options.clone() };
            generate(&mut decoder, &prompts[0], &warm_up, None, |_| true)?;
            launches_before = loaded.model.backend().launches();
            graphs_before = loaded.model.backend().graph_launches();
            // Beam and contrastive search interleave prefill and search: their time counts as decode.
            let start = Instant::now();
            let out = generate(&mut decoder, &prompts[0], options, None, |_| true)?;
            anyhow::ensure!(out.ids.len() == args.new_tokens, "the strategy stopped before --new-tokens");
            let total = start.elapsed().as_secs_f64();
            let prefill_s = out.prefill_s.min(total);
            Timing { prefill_s, decode_s: total - prefill_s }
        }
    };

    // Kernel launches of the timed run per new token (with greedy decoding, per step: a prefill step
    // launches what a decode step does, a product being one launch for any number of rows).
    let launches_per_token = match (launches_before, loaded.model.backend().launches()) {
        (Some(before), Some(after)) => Some((after - before) as f64 / args.new_tokens as f64),
        _ => None,
    };
    let graph_launches_per_token = match (graphs_before, loaded.model.backend().graph_launches()) {
        (Some(before), Some(after)) => Some((after - before) as f64 / args.new_tokens as f64),
        _ => None,
    };
    let bytes_per_step = loaded.model.step_weight_bytes(&plan)? as f64;
    let decode_steps = (args.new_tokens - 1) as f64;
    let (batch, prompt_len, new_tokens) = (args.batch as f64, prompt_len as f64, args.new_tokens as f64);
    let decode_tok_per_s = if timing.decode_s > 0.0 { batch * decode_steps / timing.decode_s } else { 0.0 };
    let prefill_tok_per_s = if timing.prefill_s > 0.0 { batch * prompt_len / timing.prefill_s } else { 0.0 };
    let end_to_end_tok_per_s = batch * new_tokens / (timing.prefill_s + timing.decode_s);
    // Read before the bandwidth probe, whose buffer is not the model's memory.
    let peak_rss_mb = memory::resident_mib().map_or(f64::NAN, |(_, peak)| peak);
    // The probe reads host memory: it bounds the CPU backends only (a device's bandwidth is measured
    // by tools/gpu-selftest).
    let host_backend = matches!(loaded.model.backend().name(), "cpu" | "reference");
    let bandwidth = if host_backend { measure_read_bandwidth() } else { f64::NAN };
    let achieved = if timing.decode_s > 0.0 { bytes_per_step * decode_steps / timing.decode_s } else { 0.0 };
    // The arithmetic side: matrix-product FLOPs of a decode token (the plan's blocks and one head of
    // vocabulary size; ACD's lower head reads only the plausible rows) and attention over the
    // average context, against the larger of the FMA loop's rate and a large product's.
    let context = prompt_len + new_tokens / 2.0;
    let qw = (spec.num_heads * spec.head_dim) as f64;
    let depth = decoder.depth();
    let flops_per_token = 2.0 * crate::bench_train::product_weights(spec, depth, 1) + 4.0 * depth as f64 * context * qw;
    let achieved_flops = flops_per_token * decode_tok_per_s;
    // A prompt token meets the blocks and attends to half the prompt on average; the head runs on
    // each sequence's last prompt token only.
    let prefill_flops_per_sequence = prompt_len
        * (2.0 * crate::bench_train::product_weights(spec, depth, 0) + 2.0 * depth as f64 * (prompt_len + 1.0) * qw)
        + 2.0
            * (crate::bench_train::product_weights(spec, depth, 1)
                - crate::bench_train::product_weights(spec, depth, 0));
    let prefill_flops =
        if timing.prefill_s > 0.0 { batch * prefill_flops_per_sequence / timing.prefill_s } else { 0.0 };
    let (fma_peak, gemm_ceiling) = if host_backend {
        (layerwise::backend::cpu::peak::fma_peak_flops(), crate::bench_train::gemm_ceiling() * 1e9)
    } else {
        (f64::NAN, f64::NAN)
    };
    let arithmetic_peak = fma_peak.max(gemm_ceiling);
    let line = json!({
        "decode_tok_per_s": decode_tok_per_s,
        "prefill_tok_per_s": prefill_tok_per_s,
        "end_to_end_tok_per_s": end_to_end_tok_per_s,
        "peak_rss_mb": peak_rss_mb,
        "bandwidth_fraction": host_backend.then_some(achieved / bandwidth),
        "bandwidth_gb_s": host_backend.then_some(bandwidth / 1e9),
        "device": loaded.model.backend().name(),
        "achieved_gb_s": achieved / 1e9,
        "decode_gflop_s": achieved_flops / 1e9,
        "fma_peak_gflop_s": host_backend.then_some(fma_peak / 1e9),
        "gemm_ceiling_gflop_s": host_backend.then_some(gemm_ceiling / 1e9),
        "arithmetic_fraction": host_backend.then_some(achieved_flops / arithmetic_peak),
        "gflops": achieved_flops / 1e9,
        "peak_fraction": host_backend.then_some(achieved_flops / arithmetic_peak),
        "prefill_gflop_s": prefill_flops / 1e9,
        "prefill_peak_fraction": host_backend.then_some(prefill_flops / arithmetic_peak),
        "weight_bytes_per_step": bytes_per_step,
        "launches_per_token": launches_per_token,
        "graph_launches_per_token": graph_launches_per_token,
        "blocks_per_step": decoder.depth(),
        "batch": args.batch,
        "prompt_len": prompt_len,
        "new_tokens": args.new_tokens,
        "prefill_s": timing.prefill_s,
        "decode_s": timing.decode_s,
        "plan": format!("{:?}", plan.plan),
        "projection": format!("{:?}", plan.projection),
        "dtype": args.model.dtype.map_or("as stored".to_string(), |d| d.to_string()),
        "threads": rayon::current_num_threads(),
        "strategy": strategy_name(args),
    });
    let mut line = line;
    if let Some(s) = &speculated {
        line["speculation"] = s.clone();
        line["acceptance_rate"] = s["acceptance_rate"].clone();
    }
    if args.json {
        crate::output::line(&line)?;
    } else {
        let bound = if host_backend {
            format!(
                "{:.0}% of the {:.1} GB/s read bandwidth, {:.1} GFLOP/s = {:.0}% of the {:.0} GFLOP/s arithmetic peak \
                 (prefill {:.1} GFLOP/s = {:.0}%)",
                100.0 * achieved / bandwidth,
                bandwidth / 1e9,
                achieved_flops / 1e9,
                100.0 * achieved_flops / arithmetic_peak,
                arithmetic_peak / 1e9,
                prefill_flops / 1e9,
                100.0 * prefill_flops / arithmetic_peak,
            )
        } else {
            let graphs = graph_launches_per_token.map_or(String::new(), |n| format!(" in {n:.1} graph launches"));
            let launches =
                launches_per_token.map_or(String::new(), |n| format!(", {n:.0} kernel launches per token{graphs}"));
            format!("{:.1} GB/s of weights read ({} device{launches})", achieved / 1e9, loaded.model.backend().name())
        };
        crate::output::line(format_args!(
            "{:?} batch {}: prefill {prefill_tok_per_s:.1} tok/s, decode {decode_tok_per_s:.1} tok/s, end-to-end {end_to_end_tok_per_s:.1} tok/s; \
             {bound} ({:.0} MB of weights per step); peak {peak_rss_mb:.0} MiB",
            plan.plan,
            args.batch,
            bytes_per_step / 1e6
        ))?;
        if let Some(s) = &speculated {
            crate::output::line(format_args!(
                "speculation (drafts from exit {}): decode {:.1} tok/s against plain {:.1} tok/s = {:.2}x; {:.0}% of drafts accepted, {:.2} tokens a round; identical output: {}",
                s["draft_layer"],
                s["decode_tok_per_s"].as_f64().unwrap_or(0.0),
                s["plain_decode_tok_per_s"].as_f64().unwrap_or(0.0),
                s["speedup"].as_f64().unwrap_or(0.0),
                100.0 * s["acceptance_rate"].as_f64().unwrap_or(0.0),
                s["tokens_per_round"].as_f64().unwrap_or(0.0),
                s["identical"]
            ))?;
        }
    }
    Ok(())
}

/// Plain and speculative decoding of `prompt` with `options`, alternated three times (the best
/// pace of each counts): tokens/s of both, the speedup, what speculation did, and whether both
/// generated the same ids (greedy; `null` when sampling, whose streams differ).
fn bench_speculation<B: Backend>(
    decoder: &mut Decoder<'_, B>,
    prompt: &[u32],
    options: &GenerationOptions,
    speculation: &SpeculationOptions,
) -> Result<serde_json::Value> {
    let pace = |g: &layerwise::generation::Generation| g.decode_s / g.ids.len().saturating_sub(1).max(1) as f64;
    let (mut plain_s, mut fast_s) = (f64::MAX, f64::MAX);
    let mut identical = true;
    let mut last = None;
    for _ in 0..3 {
        let plain = generate(decoder, prompt, options, None, |_| true)?;
        plain_s = plain_s.min(pace(&plain));
        let (fast, stats) = generate_speculative(decoder, prompt, options, speculation, None, |_| true)?;
        fast_s = fast_s.min(pace(&fast));
        identical &= fast.ids == plain.ids;
        last = Some(stats);
    }
    let stats = last.unwrap_or_default();
    let mut out = crate::generate::speculation_json(&stats);
    out["decode_tok_per_s"] = json!(1.0 / fast_s);
    out["plain_decode_tok_per_s"] = json!(1.0 / plain_s);
    out["speedup"] = json!(plain_s / fast_s);
    out["identical"] = if options.strategy == Strategy::Greedy { json!(identical) } else { json!(null) };
    Ok(out)
}

/// Prefills every prompt in one step, then decodes `new_tokens - 1` greedy steps for all of them.
fn generate_batch<B: Backend>(decoder: &mut Decoder<'_, B>, prompts: &[Vec<u32>], new_tokens: usize) -> Result<Timing> {
    let seqs: Vec<SeqId> = prompts.iter().map(|p| decoder.add_sequence(p)).collect::<layerwise::Result<_>>()?;
    let start = Instant::now();
    // Only the chosen ids come back from each step.
    let mut step = decoder.run_step()?;
    let prefill_s = start.elapsed().as_secs_f64();
    for _ in 1..new_tokens {
        let chosen = step.argmax()?;
        for (&seq, &token) in step.sequences().iter().zip(&chosen) {
            decoder.append(seq, token)?;
        }
        step = decoder.run_step()?;
    }
    let decode_s = start.elapsed().as_secs_f64() - prefill_s;
    for seq in seqs {
        decoder.release(seq)?;
    }
    Ok(Timing { prefill_s, decode_s })
}

/// Read bandwidth of this machine in bytes/s: the best of a few sweeps over 1 GiB (more than the
/// last-level cache of the machines this ran on, up to 480 MiB), each thread reading its own
/// contiguous part with the engine's vectorised dot product (of the part with itself: the second
/// read of each line comes from L1).
fn measure_read_bandwidth() -> f64 {
    let buffer = vec![1.0f32; 256 << 20];
    let part = buffer.len().div_ceil(rayon::current_num_threads());
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        let total: f32 = buffer.par_chunks(part).map(layerwise::backend::cpu::read_all).sum();
        std::hint::black_box(total);
        best = best.min(start.elapsed().as_secs_f64());
    }
    (buffer.len() * 4) as f64 / best
}

/// The strategy flags, as the JSON line names them.
fn strategy_name(args: &Args) -> String {
    match (args.num_beams, args.penalty_alpha, &args.dola_layers) {
        (Some(n), _, _) if n > 1 => format!("beam {n}"),
        (_, Some(alpha), _) => format!("contrastive {alpha} k={}", args.top_k.unwrap_or(50)),
        (_, _, Some(layers)) => format!("dola {layers}"),
        _ => "greedy".to_string(),
    }
}
