//! `layerwise attention`: attention probabilities per layer and head, as safetensors, JSON or an
//! HTML head view.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use layerwise::{Backend, InspectRequest, LoadedModel};

use crate::input::{write_safetensors, InputArgs, MaskArgs};
use crate::lens::token_label;
use crate::plot::attention_html;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    input: InputArgs,
    #[command(flatten)]
    mask: MaskArgs,
    /// Blocks (0-based, comma-separated) whose attention to record; default: every block. Nothing
    /// above the highest one is computed.
    #[arg(long, value_name = "L,...")]
    layers: Option<String>,
    /// Output: .safetensors (`attn.<layer>` [heads, T, T] f32), .json (`tokens`, `layers`:
    /// {layer: [heads][query][key]}) or .html (a head view; the first listed layer shown first).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let format = match args.out.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => "safetensors",
        Some("json") => "json",
        Some("html") => "html",
        _ => bail!("--out {}: the extension must be .safetensors, .json or .html", args.out.display()),
    };
    crate::with_backend!(args.input.model, loaded => run_on(&args, loaded, format))
}

fn run_on<B: Backend>(args: &Args, loaded: LoadedModel<B>, format: &str) -> Result<()> {
    let ids = args.input.prompt.ids(&loaded)?;
    let model = &loaded.model;
    let n = model.spec().num_layers;
    let layers: Vec<usize> = match &args.layers {
        None => (0..n).collect(),
        Some(list) => list
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|&l| l < n)
                    .with_context(|| format!("--layers: `{s}` is not a block in 0..{n}"))
            })
            .collect::<Result<_>>()?,
    };
    let Some(&first) = layers.first() else { bail!("--layers: name at least one block") };
    let head_mask = args.mask.mask(model.spec())?;
    let seen = model.inspect(&ids, &InspectRequest { attentions: layers.clone(), head_mask, ..Default::default() })?;
    let t = ids.len();
    let label = token_label(&loaded);
    match format {
        "safetensors" => {
            let tensors: Vec<(String, Vec<usize>, &[f32])> = seen
                .attentions
                .iter()
                .map(|(layer, probs)| (format!("attn.{layer}"), vec![probs.len() / (t * t), t, t], &probs[..]))
                .collect();
            write_safetensors(&args.out, &tensors)?;
        }
        "json" => {
            let layers: BTreeMap<String, Vec<Vec<&[f32]>>> = seen
                .attentions
                .iter()
                .map(|(layer, probs)| (layer.to_string(), probs.chunks(t * t).map(|h| h.chunks(t).collect()).collect()))
                .collect();
            let texts: Vec<String> = ids.iter().map(|&id| label(id)).collect();
            let json = serde_json::json!({"tokens": ids, "texts": texts, "layers": layers});
            std::fs::write(&args.out, serde_json::to_vec(&json)?)
                .with_context(|| format!("--out {}: cannot write", args.out.display()))?;
        }
        _ => {
            let texts: Vec<String> = ids.iter().map(|&id| label(id)).collect();
            std::fs::write(&args.out, attention_html(&texts, &seen.attentions, first))
                .with_context(|| format!("--out {}: cannot write", args.out.display()))?;
        }
    }
    eprintln!(
        "attention: {} layers over {t} tokens; {} of {n} blocks ran; wrote {}",
        seen.attentions.len(),
        seen.blocks_run,
        args.out.display()
    );
    Ok(())
}
