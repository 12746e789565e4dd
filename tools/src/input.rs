//! Arguments shared by the subcommands: which model, which prompt.

use anyhow::{bail, Context, Result};
use layerwise::exits::{Contrast, ExitPlan, PlanOptions, Projection, Upper};
use layerwise::{Cpu, DType, LoadedModel};

/// The demo checkpoint shipped in the repository (random weights, real GPT-2 vocabulary).
pub const DEMO_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/demo-gpt2-multiexit");

#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    /// A local checkpoint directory or a Hugging Face Hub id (e.g. ibm/gpt2-medium-multiexit).
    /// Defaults to the repository's demo checkpoint (random weights).
    #[arg(long, value_name = "SRC")]
    pub model: Option<String>,
    /// Compute with weight matrices in this dtype (f32, f16, bf16), converting them on first use
    /// when the checkpoint stores another. Default: as stored.
    #[arg(long, value_name = "D", value_parser = parse_dtype)]
    pub dtype: Option<DType>,
}

impl ModelArgs {
    pub fn load(&self) -> Result<LoadedModel<Cpu>> {
        let source = self.model.as_deref().unwrap_or(DEMO_MODEL);
        let backend = Cpu { weight_dtype: self.dtype };
        layerwise::load_on(source, backend).with_context(|| format!("cannot load model `{source}`"))
    }
}

fn parse_dtype(text: &str) -> std::result::Result<DType, String> {
    DType::parse(text).ok_or_else(|| format!("`{text}` is not a dtype (f32, f16, bf16)"))
}

#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
pub struct PromptArgs {
    /// Prompt text, tokenized with the checkpoint's tokenizer.
    #[arg(long, value_name = "TEXT")]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids (e.g. 464,3483,286).
    #[arg(long, value_name = "IDS")]
    pub prompt_ids: Option<String>,
}

impl PromptArgs {
    /// The prompt's token ids, checked against the model's vocabulary and context.
    pub fn ids(&self, loaded: &LoadedModel<Cpu>) -> Result<Vec<u32>> {
        let ids = match (&self.prompt, &self.prompt_ids) {
            (Some(text), _) => loaded.encode(text).context("--prompt")?,
            (None, Some(list)) => parse_ids(list)?,
            (None, None) => bail!("give --prompt or --prompt-ids"),
        };
        loaded.model.check_prompt(&ids).context(if self.prompt.is_some() { "--prompt" } else { "--prompt-ids" })?;
        Ok(ids)
    }
}

fn parse_ids(list: &str) -> Result<Vec<u32>> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>().with_context(|| {
                format!("--prompt-ids: `{s}` is not a token id (expected comma-separated non-negative integers)")
            })
        })
        .collect()
}

/// Exit-plan flags shared by `forward` and `generate`.
#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// Read the prediction at layer L (early exit): nothing above layer L is computed.
    #[arg(long, value_name = "L", conflicts_with = "contrast")]
    pub exit: Option<usize>,
    /// Auto-contrastive decoding between an upper and a lower exit, e.g. `24,12` or `original,12`.
    #[arg(long, value_name = "UPPER,LOWER")]
    pub contrast: Option<String>,
    /// ACD plausibility threshold, relative to the upper exit's top probability.
    #[arg(long, value_name = "A", default_value_t = 0.1, requires = "contrast")]
    pub alpha: f32,
    /// ACD keeps at least this many candidate tokens.
    #[arg(long, value_name = "K", default_value_t = 1, requires = "contrast")]
    pub min_candidates: usize,
    /// Project layers with the model's own final norm and LM head (logit lens) instead of exit heads.
    #[arg(long, conflicts_with = "converted")]
    pub lens: bool,
    /// Project layers through the checkpoint's conversion matrices and the original LM head.
    #[arg(long)]
    pub converted: bool,
}

impl PlanArgs {
    /// The plan the flags describe; `None` when no plan flag was given.
    pub fn plan(&self) -> Result<Option<PlanOptions>> {
        let plan = match (&self.exit, &self.contrast) {
            (Some(layer), _) => ExitPlan::Exit(*layer),
            (None, Some(pair)) => parse_contrast(pair)?,
            (None, None) if self.lens || self.converted => bail!("--lens and --converted need --exit or --contrast"),
            (None, None) => return Ok(None),
        };
        let projection = if self.lens {
            Projection::Lens
        } else if self.converted {
            Projection::Converted
        } else {
            Projection::ExitHeads
        };
        let contrast = Contrast::Acd { alpha: self.alpha, min_candidates: self.min_candidates };
        Ok(Some(PlanOptions { plan, projection, contrast }))
    }

    /// The flag a plan error is about, for messages.
    pub fn flag(&self) -> &'static str {
        if self.exit.is_some() {
            "--exit"
        } else {
            "--contrast"
        }
    }
}

fn parse_contrast(pair: &str) -> Result<ExitPlan> {
    let usage = "expected UPPER,LOWER with layer numbers, UPPER may be `original` (e.g. 24,12)";
    let (upper, lower) = pair.split_once(',').with_context(|| format!("--contrast `{pair}`: {usage}"))?;
    let layer = |s: &str| {
        s.trim().parse::<usize>().with_context(|| format!("--contrast `{pair}`: `{s}` is not a layer; {usage}"))
    };
    let upper = match upper.trim() {
        "original" => Upper::Original,
        other => Upper::Layer(layer(other)?),
    };
    if lower.trim() == "original" {
        bail!("--contrast `{pair}`: the lower side must be a layer; the original head can only be the upper side");
    }
    Ok(ExitPlan::Contrast { upper, lower: layer(lower)? })
}
