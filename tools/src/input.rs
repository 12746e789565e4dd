//! Arguments shared by the subcommands: which model, which prompt.

use anyhow::{bail, Context, Result};
use layerwise::exits::{Contrast, ExitPlan, PlanOptions, Projection, Upper};
use std::path::PathBuf;

use layerwise::backend::WeightFormat;
use layerwise::generation::speculative::SpeculationOptions;
use layerwise::generation::{BraceMatching, ContrastiveOptions, GenerationConfig, GenerationOptions, SamplingOptions};
use layerwise::{Backend, LoadedModel};

/// The demo checkpoint shipped in the repository: a small GPT-2 with exits on layers 2 and 4, trained
/// here on the King James Bible (tools/scripts/train_demo.sh).
pub const DEMO_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/kjv-gpt2-multiexit");

#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    /// A local checkpoint directory or a Hugging Face Hub id (e.g. ibm/gpt2-medium-multiexit).
    /// Defaults to the repository's demo checkpoint (models/kjv-gpt2-multiexit, trained on the KJV).
    #[arg(long, value_name = "SRC")]
    pub model: Option<String>,
    /// Compute with weight matrices in this dtype (f32, f16, bf16) or in 8-bit blocks (q8: GGUF's
    /// Q8_0, CPU only), converting them on first use when the checkpoint stores another. Default: as
    /// stored.
    #[arg(long, value_name = "D", value_parser = parse_dtype)]
    pub dtype: Option<WeightFormat>,
    /// Where the ops run: cpu (the optimised backend), reference (plain Rust, one function per op:
    /// slow, the definition every backend is checked against), cuda or cuda:N (a GPU, an error when
    /// none is there), or auto (the first GPU when a CUDA driver and a device exist, else the CPU).
    #[arg(long, value_name = "DEVICE", default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    /// A PEFT adapter folder (adapter_config.json + adapter_model.safetensors): LoRA and (IA)^3 are
    /// merged into the weights at load; prompt tuning's virtual tokens go before every generated
    /// prompt.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
}

/// The `--device` choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Reference,
    Cuda(usize),
    Auto,
}

pub fn parse_device(text: &str) -> std::result::Result<Device, String> {
    match text {
        "cpu" => Ok(Device::Cpu),
        "reference" => Ok(Device::Reference),
        "cuda" => Ok(Device::Cuda(0)),
        "auto" => Ok(Device::Auto),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("`{other}` is not a device (cpu, reference, cuda, cuda:N, auto)")),
    }
}

/// The device `--device auto` picks: CUDA device 0 if a driver reports one, else the CPU (said on stderr).
pub fn auto_device() -> Device {
    if layerwise_kernels::cuda::device_count() > 0 {
        Device::Cuda(0)
    } else {
        eprintln!("device: cpu (--device auto: no CUDA driver or device found)");
        Device::Cpu
    }
}

impl ModelArgs {
    /// Opens the checkpoint on `backend` (what [`with_backend!`] calls for the chosen device).
    /// `--model`, or the demo checkpoint.
    pub fn source(&self) -> &str {
        self.model.as_deref().unwrap_or(DEMO_MODEL)
    }

    /// Whether `--model` is an encoder (config.json's `model_type` is bert). False when the config
    /// cannot be read: the decoder loader then says why.
    pub fn is_encoder(&self) -> bool {
        layerwise::ModelFiles::resolve(self.source())
            .ok()
            .and_then(|files| layerwise::ModelSpec::from_file(&files.config).ok())
            .is_some_and(|spec| spec.architecture == layerwise::model::config::Architecture::Bert)
    }

    /// Opens `--model` as an encoder on `backend` (no adapters: PEFT adapters are for decoders).
    pub fn load_encoder_on<B: Backend>(&self, backend: B) -> Result<layerwise::encoder::LoadedEncoder<B>> {
        if let Some(dir) = &self.adapter {
            bail!("--adapter {}: adapters apply to decoders; `{}` is an encoder", dir.display(), self.source());
        }
        let source = self.source();
        layerwise::encoder::load_on(source, backend).with_context(|| format!("cannot load model `{source}`"))
    }

    pub fn load_on<B: Backend>(&self, backend: B) -> Result<LoadedModel<B>> {
        let source = self.model.as_deref().unwrap_or(DEMO_MODEL);
        match &self.adapter {
            None => layerwise::load_on(source, backend).with_context(|| format!("cannot load model `{source}`")),
            Some(dir) => layerwise::load_adapted(source, dir, backend)
                .with_context(|| format!("cannot load model `{source}` with --adapter {}", dir.display())),
        }
    }
}

/// Opens the model of `$args` (a [`ModelArgs`]) on the backend `--device` names and evaluates
/// `$body` with it bound to `$loaded` (a `LoadedModel<B>` of that backend's type).
#[macro_export]
macro_rules! with_backend {
    ($args:expr, $loaded:ident => $body:expr) => {{
        let args: &$crate::input::ModelArgs = &$args;
        let device = match args.device {
            $crate::input::Device::Auto => $crate::input::auto_device(),
            chosen => chosen,
        };
        match device {
            $crate::input::Device::Cpu | $crate::input::Device::Auto => {
                let $loaded = args.load_on(layerwise::Cpu { weights: args.dtype })?;
                $body
            }
            $crate::input::Device::Reference => {
                let $loaded = args.load_on(layerwise::Reference { weights: args.dtype })?;
                $body
            }
            $crate::input::Device::Cuda(ordinal) => {
                let dtype = match args.dtype {
                    Some(layerwise::backend::WeightFormat::Q8) => {
                        anyhow::bail!("--dtype q8: 8-bit weights run on the CPU only (--device cpu)")
                    }
                    other => other.and_then(layerwise::backend::WeightFormat::dtype),
                };
                let backend = layerwise_kernels::cuda::Cuda::open(ordinal, dtype)
                    .map_err(|e| anyhow::anyhow!("--device cuda:{ordinal}: {e}"))?;
                if args.device == $crate::input::Device::Auto {
                    eprintln!("device: {} (--device auto)", backend.description());
                }
                let $loaded = args.load_on(backend)?;
                $body
            }
        }
    }};
}

/// Opens the encoder of `$args` (a [`ModelArgs`]) on the CPU or reference backend (`--device`;
/// encoders have no CUDA kernels) and evaluates `$body` with it bound to `$loaded`.
#[macro_export]
macro_rules! with_encoder {
    ($args:expr, $loaded:ident => $body:expr) => {{
        let args: &$crate::input::ModelArgs = &$args;
        match args.device {
            $crate::input::Device::Cpu | $crate::input::Device::Auto => {
                let $loaded = args.load_encoder_on(layerwise::Cpu { weights: args.dtype })?;
                $body
            }
            $crate::input::Device::Reference => {
                let $loaded = args.load_encoder_on(layerwise::Reference { weights: args.dtype })?;
                $body
            }
            $crate::input::Device::Cuda(_) => {
                anyhow::bail!(
                    "--device cuda: encoders run on the CPU only (bidirectional attention has no CUDA kernel yet)"
                )
            }
        }
    }};
}

/// The self-speculative decoding flags (`generate`, `bench`).
#[derive(clap::Args, Debug)]
pub struct SpeculateArgs {
    /// Self-speculative decoding (greedy or sampling): the exit head of LAYER drafts tokens running
    /// only the blocks below it, the plan verifies them in one pass over the blocks above; greedy
    /// output is plain greedy's exactly, sampled tokens follow plain sampling's distribution
    /// (speculative sampling's acceptance rule). `auto`: start from the plan's lower layer for a
    /// contrast, else the exit nearest half the depth, and move to the exit measured fastest.
    #[arg(long, value_name = "LAYER|auto")]
    pub speculate: Option<String>,
    /// Most drafts per speculation round (adapted to the acceptance below that).
    #[arg(long, value_name = "K", default_value_t = 6, requires = "speculate")]
    pub draft_tokens: usize,
    /// Always draft --draft-tokens per round: no adaptation, speculation never turned off (to
    /// measure acceptance).
    #[arg(long, requires = "speculate")]
    pub fixed_drafts: bool,
}

impl SpeculateArgs {
    /// The speculation the flags ask for, if any.
    pub fn options(&self) -> Result<Option<SpeculationOptions>> {
        let Some(text) = self.speculate.as_deref() else { return Ok(None) };
        let draft_layer = match text {
            "auto" => None,
            layer => {
                Some(layer.parse().map_err(|_| anyhow::anyhow!("--speculate: `{layer}` is not a layer or `auto`"))?)
            }
        };
        anyhow::ensure!(self.draft_tokens >= 1, "--draft-tokens: must be at least 1");
        Ok(Some(SpeculationOptions { draft_layer, max_drafts: self.draft_tokens, adaptive: !self.fixed_drafts }))
    }
}

pub fn parse_dtype(text: &str) -> std::result::Result<WeightFormat, String> {
    WeightFormat::parse(text).ok_or_else(|| format!("`{text}` is not a dtype (f32, f16, bf16, q8)"))
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
    pub fn ids<B: Backend>(&self, loaded: &LoadedModel<B>) -> Result<Vec<u32>> {
        let ids = match (&self.prompt, &self.prompt_ids) {
            (Some(text), _) => loaded.encode(text).context("--prompt")?,
            (None, Some(list)) => parse_ids(list)?,
            (None, None) => bail!("give --prompt or --prompt-ids"),
        };
        loaded.model.check_prompt(&ids).context(if self.prompt.is_some() { "--prompt" } else { "--prompt-ids" })?;
        Ok(ids)
    }
}

pub fn parse_ids(list: &str) -> Result<Vec<u32>> {
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

/// The model and the prompt: the flags of every command that runs one prompt.
#[derive(clap::Args, Debug)]
pub struct InputArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
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
        let projection = projection(self.lens, self.converted);
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

/// The projection `--lens` / `--converted` choose (exit heads when neither is given).
pub fn projection(lens: bool, converted: bool) -> Projection {
    if lens {
        Projection::Lens
    } else if converted {
        Projection::Converted
    } else {
        Projection::ExitHeads
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
    let lower = layer(lower)?;
    if let Upper::Layer(upper) = upper {
        if lower > upper {
            // Legal upstream (the contrast is computed all the same): say so, in case it was a typo.
            eprintln!(
                "note: --contrast `{pair}`: the lower layer {lower} sits above the upper layer {upper}; contrasting as given"
            );
        }
    }
    Ok(ExitPlan::Contrast { upper, lower })
}

/// Generation settings with transformers' names; each flag overrides the checkpoint's
/// `generation_config.json` and `--generation-config`.
#[derive(clap::Args, Debug, Default)]
pub struct GenerationArgs {
    /// A transformers generation_config.json read over the checkpoint's own; flags override it.
    #[arg(long, value_name = "FILE")]
    pub generation_config: Option<PathBuf>,
    /// Tokens to generate at most [default: 32, or the generation config's]. `layerwise run` also
    /// takes `auto`: all the space the block size leaves after each prompt.
    #[arg(long, value_name = "N", value_parser = parse_new_tokens)]
    pub max_new_tokens: Option<NewTokens>,
    /// EOS is not allowed before this many new tokens.
    #[arg(long, value_name = "N")]
    pub min_new_tokens: Option<usize>,
    /// Sample instead of taking the most likely token.
    #[arg(long)]
    pub do_sample: bool,
    /// Sampling temperature [default: 1].
    #[arg(long, value_name = "T")]
    pub temperature: Option<f32>,
    /// Sample among the K most likely tokens only (0: all) [default: 50, as transformers].
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Sample within the smallest set of tokens whose probability reaches P.
    #[arg(long, value_name = "P")]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than P times the most likely one.
    #[arg(long, value_name = "P")]
    pub min_p: Option<f32>,
    /// Locally typical sampling with mass P.
    #[arg(long, value_name = "P")]
    pub typical_p: Option<f32>,
    /// Seed of the sampler; the same seed gives the same text.
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Divide the scores of tokens already in the sequence by X (multiply negative ones).
    #[arg(long, value_name = "X")]
    pub repetition_penalty: Option<f32>,
    /// No n-gram of this size appears twice.
    #[arg(long, value_name = "N")]
    pub no_repeat_ngram_size: Option<usize>,
    /// Stop when this text is generated (repeatable).
    #[arg(long, value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Stop when the braces opened in the generation are closed.
    #[arg(long)]
    pub brace_matching: bool,
    /// Braces already open in the prompt, for --brace-matching.
    #[arg(long, value_name = "N", requires = "brace_matching")]
    pub brace_start_level: Option<usize>,
    /// Beam search with N beams (1: none).
    #[arg(long, value_name = "N")]
    pub num_beams: Option<usize>,
    /// Beam hypotheses are ranked by score / length ^ X [default: 1].
    #[arg(long, value_name = "X", allow_negative_numbers = true)]
    pub length_penalty: Option<f32>,
    /// When beam search ends: true (num_beams hypotheses finished), false (heuristic, the default)
    /// or never (no better hypothesis possible); the bare flag means true.
    #[arg(long, value_name = "WHEN", num_args = 0..=1, default_missing_value = "true")]
    pub early_stopping: Option<String>,
    /// Sequences to return (beams, or independent samples with --do-sample).
    #[arg(long, value_name = "N")]
    pub num_return_sequences: Option<usize>,
    /// Contrastive search with this degeneration penalty among the --top-k candidates (greedy only).
    #[arg(long, value_name = "A")]
    pub penalty_alpha: Option<f32>,
    /// DoLa: contrast the final layer with the most divergent of these layers: low, high or a list
    /// such as 0,2,4.
    #[arg(long, value_name = "LAYERS")]
    pub dola_layers: Option<String>,
}

/// `--max-new-tokens`: a number, or `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewTokens {
    Count(usize),
    Auto,
}

fn parse_new_tokens(text: &str) -> std::result::Result<NewTokens, String> {
    match text {
        "auto" => Ok(NewTokens::Auto),
        n => n.parse().map(NewTokens::Count).map_err(|_| format!("`{n}` is not a number of tokens or `auto`")),
    }
}

impl GenerationArgs {
    /// The checkpoint's defaults, then --generation-config, then the flags.
    pub fn options<B: Backend>(&self, loaded: &LoadedModel<B>) -> Result<GenerationOptions> {
        if self.max_new_tokens == Some(NewTokens::Auto) {
            bail!("--max-new-tokens auto: only `layerwise run` has a block size to fill; give a number");
        }
        self.options_allowing_auto(loaded)
    }

    /// [`GenerationArgs::options`], `--max-new-tokens auto` left for the caller to resolve per prompt
    /// (the options then hold the default).
    pub fn options_allowing_auto<B: Backend>(&self, loaded: &LoadedModel<B>) -> Result<GenerationOptions> {
        let mut options =
            GenerationConfig::for_checkpoint(loaded.model.spec(), loaded.files.generation_config.as_deref())?;
        if let Some(path) = &self.generation_config {
            options.apply_generation_config(path).context("--generation-config")?;
        }
        if let Some(NewTokens::Count(n)) = self.max_new_tokens {
            options.max_new_tokens = n;
        }
        if let Some(n) = self.min_new_tokens {
            options.min_new_tokens = n;
        }
        if self.do_sample && options.sampling.is_none() {
            options.sampling = Some(SamplingOptions::default());
        }
        let sampling_flags = [
            ("--temperature", self.temperature.is_some()),
            ("--top-k", self.top_k.is_some()),
            ("--top-p", self.top_p.is_some()),
            ("--min-p", self.min_p.is_some()),
            ("--typical-p", self.typical_p.is_some()),
            ("--seed", self.seed.is_some()),
        ];
        // transformers' choice: contrastive search when penalty_alpha > 0 and top_k > 1, not sampling.
        if let Some(alpha) = self.penalty_alpha {
            if options.sampling.is_some() {
                bail!("--penalty-alpha selects contrastive search, which does not sample: drop --do-sample");
            }
            let top_k = self.top_k.or(options.contrastive.map(|c| c.top_k)).unwrap_or(50);
            options.contrastive =
                (alpha > 0.0 && top_k > 1).then_some(ContrastiveOptions { penalty_alpha: alpha, top_k });
        } else if let (Some(k), Some(contrastive)) = (self.top_k, options.contrastive.as_mut()) {
            contrastive.top_k = k;
        }
        if let Some(layers) = &self.dola_layers {
            options.dola_layers = Some(
                layers
                    .parse()
                    .map_err(|e: layerwise::Error| anyhow::anyhow!(crate::flags::translate(&e.to_string())))?,
            );
        }
        let top_k_used = options.contrastive.is_some();
        match options.sampling.as_mut() {
            Some(sampling) => {
                sampling.temperature = self.temperature.unwrap_or(sampling.temperature);
                sampling.top_k = self.top_k.unwrap_or(sampling.top_k);
                sampling.top_p = self.top_p.unwrap_or(sampling.top_p);
                sampling.min_p = self.min_p.or(sampling.min_p);
                sampling.typical_p = self.typical_p.unwrap_or(sampling.typical_p);
                sampling.seed = self.seed.unwrap_or(sampling.seed);
            }
            None => {
                let unused = |(flag, given): &&(&str, bool)| *given && !(top_k_used && *flag == "--top-k");
                if let Some((flag, _)) = sampling_flags.iter().find(unused) {
                    bail!("{flag} only applies when sampling: add --do-sample (greedy decoding ignores it)");
                }
            }
        }
        if let Some(p) = self.repetition_penalty {
            options.processors.repetition_penalty = p;
        }
        if let Some(n) = self.no_repeat_ngram_size {
            options.processors.no_repeat_ngram_size = n;
        }
        if !self.stop.is_empty() {
            options.stop_strings = self.stop.clone();
        }
        if self.brace_matching {
            options.brace_matching = Some(BraceMatching { start_level: self.brace_start_level.unwrap_or(0) });
        }
        if let Some(n) = self.num_beams {
            options.beam.num_beams = n;
        }
        if let Some(p) = self.length_penalty {
            options.beam.length_penalty = p;
        }
        if let Some(when) = &self.early_stopping {
            options.beam.early_stopping =
                when.parse().map_err(|e: layerwise::Error| anyhow::anyhow!(crate::flags::translate(&e.to_string())))?;
        }
        if let Some(n) = self.num_return_sequences {
            options.beam.num_return_sequences = n;
        }
        options.resolve().map_err(|e| anyhow::anyhow!(crate::flags::translate(&e.to_string())))
    }
}

/// Writes f32 tensors `(name, shape, values)` to a safetensors file given by `--out`.
pub fn write_safetensors(out: &std::path::Path, tensors: &[(String, Vec<usize>, &[f32])]) -> Result<()> {
    use safetensors::tensor::TensorView;
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            let view = TensorView::new(safetensors::Dtype::F32, shape.clone(), bytemuck::cast_slice(data))
                .with_context(|| format!("tensor {name}"))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    // The safetensors error already holds its I/O cause: one message, not a chain that repeats it.
    safetensors::serialize_to_file(views, None, out)
        .map_err(|e| anyhow::anyhow!("--out {}: cannot write: {e}", out.display()))
}

/// `--head-mask`, shared by `forward`, `generate` and `attention`.
#[derive(clap::Args, Debug)]
pub struct MaskArgs {
    /// Mask attention heads (transformers' head_mask): a JSON file with one list of factors per
    /// layer, one per head (0 masks a head, 1 keeps it), e.g. `mask` of `layerwise heads`' pruning.json.
    #[arg(long, value_name = "FILE.json")]
    pub head_mask: Option<PathBuf>,
}

impl MaskArgs {
    /// The mask, checked against the model's layers and heads.
    pub fn mask(&self, spec: &layerwise::ModelSpec) -> Result<Option<layerwise::HeadMask>> {
        let Some(path) = &self.head_mask else { return Ok(None) };
        let what = || format!("--head-mask {}", path.display());
        let text = layerwise::io::read_config(path).with_context(|| format!("{}: cannot read", what()))?;
        Ok(Some(layerwise::HeadMask::from_json(&text, spec).with_context(what)?))
    }
}
