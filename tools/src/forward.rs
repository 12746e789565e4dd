//! `layerwise forward`: one forward pass over a prompt, every output written to a safetensors file.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use layerwise::{Backend, ForwardRequest, LoadedModel};

use crate::input::{InputArgs, MaskArgs, PlanArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    input: InputArgs,
    #[command(flatten)]
    plan: PlanArgs,
    #[command(flatten)]
    mask: MaskArgs,
    /// Output file (safetensors): `logits` [T, vocab] (under a plan flag: the plan's output, for a
    /// contrast the contrasted log-probabilities), `exit.<L>` [T, vocab] for every exit head,
    /// `hidden.<i>` [T, hidden] for i = 0..=num_layers, all f32.
    #[arg(long, value_name = "FILE.safetensors")]
    out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    crate::with_backend!(args.input.model, loaded => run_on(&args, loaded))
}

fn run_on<B: Backend>(args: &Args, loaded: LoadedModel<B>) -> Result<()> {
    let ids = args.input.prompt.ids(&loaded)?;
    let spec = loaded.model.spec();
    let head_mask = args.mask.mask(spec)?;
    let request = ForwardRequest { plan: args.plan.plan()?, head_mask, ..ForwardRequest::everything(spec) };
    let start = Instant::now();
    let plan_flag = if request.plan.is_some() { args.plan.flag() } else { "forward" };
    let out = loaded.model.forward(&ids, &request).context(plan_flag)?;
    let seconds = start.elapsed().as_secs_f64();

    let t = ids.len();
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
    if let Some(logits) = out.plan.as_ref().or(out.logits.as_ref()) {
        tensors.push(("logits".into(), vec![t, spec.vocab_size], logits));
    }
    for (layer, logits) in &out.exits {
        tensors.push((format!("exit.{layer}"), vec![t, spec.vocab_size], logits));
    }
    for (i, hidden) in out.hidden_states.iter().enumerate() {
        tensors.push((format!("hidden.{i}"), vec![t, spec.hidden_size], hidden));
    }
    crate::input::write_safetensors(&args.out, &tensors)?;
    eprintln!(
        "forward: {t} tokens through {} layers in {seconds:.3}s; wrote {} tensors to {}; {}",
        out.blocks_run,
        tensors.len(),
        args.out.display(),
        crate::memory::describe()
    );
    Ok(())
}
