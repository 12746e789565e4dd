//! `layerwise attention`: attention probabilities per layer and head, as safetensors, JSON or an
//! HTML head view or model view; of a decoder, or of an encoder (BERT, a sentence pair with
//! `--pair`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use layerwise::encoder::{EncoderInput, EncoderRequest, LoadedEncoder};
use layerwise::{Backend, InspectRequest, LoadedModel};

use crate::heads_classifier::{sentence_b_start, token_labels};
use crate::input::{write_safetensors, InputArgs, MaskArgs};
use crate::lens::token_label;
use crate::plot::{attention_html, model_view_html};

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
    /// {layer: [heads][query][key]}) or .html (see --view).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// The HTML page: `head` (one layer's heads over the tokens, the first listed layer shown
    /// first) or `model` (every listed layer x every head as small maps, as bertviz's model view).
    #[arg(long, value_name = "VIEW", default_value = "head", value_parser = ["head", "model"])]
    view: String,
    /// An encoder's second text: the input is the pair `[CLS] prompt [SEP] pair [SEP]`.
    #[arg(long, value_name = "TEXT")]
    pair: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    let format = match args.out.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => "safetensors",
        Some("json") => "json",
        Some("html") => "html",
        _ => bail!("--out {}: the extension must be .safetensors, .json or .html", args.out.display()),
    };
    if args.input.model.is_encoder() {
        return crate::with_encoder!(args.input.model, loaded => run_encoder(&args, loaded, format));
    }
    anyhow::ensure!(
        args.pair.is_none(),
        "--pair: sentence pairs are for encoders; `{}` is a decoder",
        args.input.model.source()
    );
    crate::with_backend!(args.input.model, loaded => run_on(&args, loaded, format))
}

/// `--layers` as block indices below `n` (every block when absent).
fn chosen_layers(args: &Args, n: usize) -> Result<Vec<usize>> {
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
    anyhow::ensure!(!layers.is_empty(), "--layers: name at least one block");
    Ok(layers)
}

/// Writes the attention maps `attentions` (block -> `[heads, T, T]`) over `texts` in `format`.
fn write_maps(
    args: &Args,
    format: &str,
    ids: &[u32],
    texts: &[String],
    attentions: &BTreeMap<usize, Vec<f32>>,
    sentence_b_start: Option<usize>,
) -> Result<()> {
    let t = ids.len();
    match format {
        "safetensors" => {
            let tensors: Vec<(String, Vec<usize>, &[f32])> = attentions
                .iter()
                .map(|(layer, probs)| (format!("attn.{layer}"), vec![probs.len() / (t * t), t, t], &probs[..]))
                .collect();
            write_safetensors(&args.out, &tensors)?;
        }
        "json" => {
            let layers: BTreeMap<String, Vec<Vec<&[f32]>>> = attentions
                .iter()
                .map(|(layer, probs)| (layer.to_string(), probs.chunks(t * t).map(|h| h.chunks(t).collect()).collect()))
                .collect();
            let json = serde_json::json!({"tokens": ids, "texts": texts, "layers": layers});
            std::fs::write(&args.out, serde_json::to_vec(&json)?)
                .with_context(|| format!("--out {}: cannot write", args.out.display()))?;
        }
        _ => {
            let first = attentions.keys().next().copied().unwrap_or(0);
            let page = if args.view == "model" {
                model_view_html(texts, attentions, sentence_b_start)
            } else {
                attention_html(texts, attentions, first)
            };
            std::fs::write(&args.out, page).with_context(|| format!("--out {}: cannot write", args.out.display()))?;
        }
    }
    Ok(())
}

fn run_encoder<B: Backend>(args: &Args, loaded: LoadedEncoder<B>, format: &str) -> Result<()> {
    let input = match (&args.input.prompt.prompt, &args.input.prompt.prompt_ids) {
        (Some(text), _) => loaded.encode(text, args.pair.as_deref()).context("--prompt")?,
        (None, Some(_)) if args.pair.is_some() => bail!("--pair: give the first text with --prompt"),
        (None, Some(list)) => EncoderInput::from_ids(crate::input::parse_ids(list)?),
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    let spec = loaded.encoder.spec();
    let layers = chosen_layers(args, spec.num_layers)?;
    let head_mask = args.mask.mask(spec)?;
    let request = EncoderRequest { attentions: true, head_mask, ..Default::default() };
    let output = loaded.encoder.forward(std::slice::from_ref(&input), &request).context("--prompt")?;
    let all = output.into_iter().next().map(|o| o.attentions).unwrap_or_default();
    let attentions: BTreeMap<usize, Vec<f32>> =
        all.into_iter().enumerate().filter(|(layer, _)| layers.contains(layer)).collect();
    let texts = token_labels(&loaded, &input);
    write_maps(args, format, &input.ids, &texts, &attentions, sentence_b_start(&input))?;
    eprintln!(
        "attention: {} layers over {} tokens of an encoder; wrote {}",
        attentions.len(),
        input.ids.len(),
        args.out.display()
    );
    Ok(())
}

fn run_on<B: Backend>(args: &Args, loaded: LoadedModel<B>, format: &str) -> Result<()> {
    let ids = args.input.prompt.ids(&loaded)?;
    let model = &loaded.model;
    let n = model.spec().num_layers;
    let layers = chosen_layers(args, n)?;
    let head_mask = args.mask.mask(model.spec())?;
    let seen = model.inspect(&ids, &InspectRequest { attentions: layers.clone(), head_mask, ..Default::default() })?;
    let t = ids.len();
    let label = token_label(&loaded);
    let texts: Vec<String> = ids.iter().map(|&id| label(id)).collect();
    write_maps(args, format, &ids, &texts, &seen.attentions, None)?;
    eprintln!(
        "attention: {} layers over {t} tokens; {} of {n} blocks ran; wrote {}",
        seen.attentions.len(),
        seen.blocks_run,
        args.out.display()
    );
    Ok(())
}
