//! `layerwise activations`: internal values by name, the forward pass stopping after the deepest one.

use std::path::PathBuf;

use anyhow::{Context, Result};
use layerwise::{Backend, InspectRequest, LoadedModel};

use crate::input::InputArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    input: InputArgs,
    /// Comma-separated points named like the checkpoint's modules: embed, h.5 (block output),
    /// h.5.ln_1, h.5.attn, h.5.resid_mid, h.5.ln_2, h.5.mlp, ln_f (Llama: layers.5.self_attn, norm, ...).
    #[arg(long, value_name = "NAMES", required = true)]
    names: String,
    /// Output file (safetensors): one f32 tensor [T, hidden] per name.
    #[arg(long, value_name = "FILE.safetensors")]
    out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    crate::with_backend!(args.input.model, loaded => run_on(&args, loaded))
}

fn run_on<B: Backend>(args: &Args, loaded: LoadedModel<B>) -> Result<()> {
    let ids = args.input.prompt.ids(&loaded)?;
    let model = &loaded.model;
    let names: Vec<&str> = args.names.split(',').map(str::trim).filter(|n| !n.is_empty()).collect();
    if let Some(twice) = names.iter().enumerate().find(|(i, n)| names[..*i].contains(n)).map(|(_, n)| n) {
        anyhow::bail!("--names: `{twice}` is named twice");
    }
    let points = names.iter().map(|n| model.point(n)).collect::<layerwise::Result<Vec<_>>>().context("--names")?;
    let seen = model.inspect(&ids, &InspectRequest { points: points.clone(), ..Default::default() })?;
    let shape = vec![ids.len(), model.spec().hidden_size];
    let tensors: Vec<(String, Vec<usize>, &[f32])> = names
        .iter()
        .zip(&points)
        .map(|(name, point)| (name.to_string(), shape.clone(), &seen.activations[point][..]))
        .collect();
    crate::input::write_safetensors(&args.out, &tensors)?;
    eprintln!(
        "activations: {} points over {} tokens; {} of {} blocks ran; wrote {}",
        names.len(),
        ids.len(),
        seen.blocks_run,
        model.spec().num_layers,
        args.out.display()
    );
    Ok(())
}
