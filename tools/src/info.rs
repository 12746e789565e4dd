//! `layerwise info`: what a checkpoint is, and what opening it costs.

use std::time::Instant;

use anyhow::Result;
use layerwise::{Backend, LoadedModel, TokenizerFiles, WeightFiles};
use serde_json::json;

use crate::input::ModelArgs;
use crate::memory;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let start = Instant::now();
    crate::with_backend!(args.model, loaded => describe(&args, loaded, start.elapsed().as_secs_f64()))
}

fn describe<B: Backend>(args: &Args, loaded: LoadedModel<B>, open_s: f64) -> Result<()> {
    let (rss, _) = memory::resident_mib().unwrap_or((f64::NAN, f64::NAN));
    let spec = loaded.model.spec();
    let (format, weight_files) = match &loaded.files.weights {
        WeightFiles::Safetensors(files) => ("safetensors", files),
        WeightFiles::TorchBin(files) => ("pytorch_model.bin (converted to safetensors once, cached)", files),
    };
    let tokenizer = match &loaded.files.tokenizer {
        TokenizerFiles::Json(_) => "tokenizer.json",
        TokenizerFiles::VocabMerges { .. } => "vocab.json + merges.txt",
        TokenizerFiles::WordPiece { .. } => "vocab.txt (WordPiece)",
        TokenizerFiles::None => "none",
    };
    let w = &loaded.weights;
    if args.json {
        let line = json!({
            "dir": loaded.files.dir,
            "architecture": format!("{:?}", spec.architecture),
            "layers": spec.num_layers,
            "hidden": spec.hidden_size,
            "heads": spec.num_heads,
            "kv_heads": spec.num_kv_heads,
            "vocab": spec.vocab_size,
            "context": spec.max_positions,
            "exits": spec.exit_layers,
            "weights_format": format,
            "weight_files": weight_files.len(),
            "parameters": w.parameters,
            "weight_bytes": w.bytes,
            "dtypes": w.by_dtype,
            "tokenizer": tokenizer,
            "open_s": open_s,
            "rss_mib": rss,
        });
        crate::output::line(&line)?;
    } else {
        crate::output::line(format_args!("model        {}", loaded.files.dir.display()))?;
        crate::output::line(format_args!(
            "architecture {:?}: {} layers, hidden {}, {} heads ({} kv), vocab {}, context {}",
            spec.architecture,
            spec.num_layers,
            spec.hidden_size,
            spec.num_heads,
            spec.num_kv_heads,
            spec.vocab_size,
            spec.max_positions
        ))?;
        crate::output::line(format_args!("exits        {}", spec.describe_exits()))?;
        crate::output::line(format_args!(
            "weights      {format}, {} file(s), {} tensors, {:.1}M parameters, {:.1} MiB, {:?}",
            weight_files.len(),
            w.tensors,
            w.parameters as f64 / 1e6,
            w.bytes as f64 / (1 << 20) as f64,
            w.by_dtype
        ))?;
        crate::output::line(format_args!("tokenizer    {tokenizer}"))?;
        crate::output::line(format_args!("opened in    {open_s:.3}s, {}", memory::describe()))?;
    }
    Ok(())
}
