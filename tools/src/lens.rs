//! `layerwise lens`: the logit lens of a prompt, as JSON, an HTML page, SVG or PNG.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use layerwise::analysis::lens::{logit_lens, LensDecoder, LensOptions};
use layerwise::{Backend, LoadedModel};

use crate::plot::{lens_html, lens_svg, LensMetric};

use crate::input::InputArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    input: InputArgs,
    /// What colours the cells: the logit, probability or rank each layer gives the model's own top
    /// token, or the KL divergence from the model's output to the layer's distribution.
    #[arg(long, default_value = "probs", value_parser = ["logits", "probs", "ranks", "kl"])]
    metric: String,
    /// Also the residual stream after each block's attention (rows `h.i.attn`, `h.i.mlp`).
    #[arg(long)]
    subblocks: bool,
    /// How states become distributions: `final` (final norm + LM head), `exits` (the checkpoint's
    /// exit heads), `converted` (its conversion matrices), or blocks / sub-layers to run first, e.g.
    /// `h.11.mlp` or `h.10,h.11` (transformer-utils' decoder_layer_names).
    #[arg(long, default_value = "final", value_name = "DECODER")]
    decoder: String,
    /// Tokens listed per cell.
    #[arg(long, default_value_t = 5, value_name = "K")]
    top_k: usize,
    /// Output file; the extension chooses the format: .json, .html, .svg or .png.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let format = output_format(&args.out)?;
    crate::with_backend!(args.input.model, loaded => run_on(&args, loaded, format))
}

fn run_on<B: Backend>(args: &Args, loaded: LoadedModel<B>, format: &str) -> Result<()> {
    let ids = args.input.prompt.ids(&loaded)?;
    let model = &loaded.model;
    let lens_error = |e: layerwise::Error| anyhow::anyhow!(crate::flags::translate_lens(&e.to_string()));
    let decoder = LensDecoder::parse(model, &args.decoder).map_err(lens_error)?;
    let metric = LensMetric::parse(&args.metric).context("--metric")?;
    let options = LensOptions { decoder, subblocks: args.subblocks, top_k: args.top_k };
    let lens = logit_lens(model, &ids, &options).map_err(lens_error).context("lens")?;
    let label = token_label(&loaded);
    let bytes = match format {
        "json" => serde_json::to_vec(&lens)?,
        "html" => lens_html(&lens, &label, metric).into_bytes(),
        "svg" => lens_svg(&lens, &label, metric).into_bytes(),
        _ => crate::plot::svg_to_png(&lens_svg(&lens, &label, metric)).context("--out: PNG")?,
    };
    std::fs::write(&args.out, bytes).with_context(|| format!("--out {}: cannot write", args.out.display()))?;
    eprintln!("lens: {} rows x {} positions written to {}", lens.rows.len(), ids.len(), args.out.display());
    Ok(())
}

/// The extension of `--out`, checked.
pub fn output_format(out: &Path) -> Result<&'static str> {
    match out.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("json") => Ok("json"),
        Some("html") => Ok("html"),
        Some("svg") => Ok("svg"),
        Some("png") => Ok("png"),
        _ => bail!("--out {}: the extension must be .json, .html, .svg or .png", out.display()),
    }
}

/// A token's text through the checkpoint's tokenizer, else `#id`.
pub fn token_label<B: Backend>(loaded: &LoadedModel<B>) -> impl Fn(u32) -> String + '_ {
    move |id| match &loaded.tokenizer {
        Some(tokenizer) => tokenizer.decode(&[id]).unwrap_or_else(|_| format!("#{id}")),
        None => format!("#{id}"),
    }
}
