//! `layerwise train-exits`, `layerwise train` and `layerwise tokenizer train`: exit heads added to a
//! checkpoint as upstream's `run_training.py` trains them, a small model trained from scratch, and
//! the byte-level BPE tokenizer such a model needs. The loop, the checkpoints and resumption are the
//! engine's (`layerwise::training`); this file reads the flags and the data, shows progress, and
//! draws the loss curve.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use layerwise::io::documents::read_documents;
use layerwise::training::data::Blocks;
use layerwise::training::trainer::LogRecord;
use layerwise::training::{AdamWConfig, Head, Network, Schedule, TrainOptions, Trainer};
use layerwise::{io, DType, ModelFiles, ModelSpec, Tokenizer};
use serde_json::Value;

use crate::plot::{line_plot_svg, Series};

/// Data and optimisation flags shared by both training commands. Defaults differ per command
/// (upstream's for exit heads; a small model's for pre-training) and are filled in when absent.
#[derive(clap::Args, Debug)]
pub struct TrainingArgs {
    /// Training text: a .jsonl file (one JSON object per line, `--column` the document) or any text
    /// file (one document).
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// The JSON Lines field that holds each document.
    #[arg(long, default_value = "text")]
    column: String,
    /// Held-out text (same formats) whose loss per head is reported at the start, every
    /// --eval-every steps and at the end.
    #[arg(long, value_name = "FILE")]
    eval_data: Option<PathBuf>,
    /// The checkpoint directory written (and resumed from when it holds a training state).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Tokens per training sequence (capped at the model's context).
    #[arg(long)]
    block_size: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    epochs: Option<usize>,
    /// Stop after this many steps (the schedule ends there too).
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long, value_name = "LR")]
    lr: Option<f32>,
    #[arg(long)]
    weight_decay: Option<f32>,
    #[arg(long)]
    warmup_steps: Option<usize>,
    /// linear, cosine or constant (after the warm-up).
    #[arg(long, value_parser = parse_schedule)]
    schedule: Option<Schedule>,
    /// Clip the gradient's global norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Save a checkpoint every N steps (and always at the end).
    #[arg(long, default_value_t = 0)]
    save_every: usize,
    /// Held-out losses every N steps (and always at the end).
    #[arg(long, default_value_t = 0)]
    eval_every: usize,
    /// Print a progress line every N steps (default: about 100 lines per run).
    #[arg(long)]
    log_every: Option<usize>,
    /// dtype of the saved model.safetensors (the training state stays f32).
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    save_dtype: DType,
    /// Stop (saving) after this many steps of the run, as if killed there; a later run with the
    /// same --out resumes. For tests of resumption.
    #[arg(long, hide = true)]
    stop_after: Option<usize>,
}

/// Defaults of one command.
struct Defaults {
    block_size: usize,
    batch_size: usize,
    epochs: usize,
    lr: f32,
    weight_decay: f32,
    warmup_steps: usize,
    schedule: Schedule,
}

#[derive(clap::Args, Debug)]
pub struct ExitArgs {
    /// The checkpoint to add exit heads to: a directory or a Hugging Face Hub id.
    #[arg(long, value_name = "SRC")]
    model: String,
    /// The layers (1-based block outputs) whose exit heads train, e.g. 2,4,6; heads the checkpoint
    /// already has continue from their weights, new ones start from --init.
    #[arg(long, value_delimiter = ',', required = true)]
    layers: Vec<usize>,
    /// Train every parameter, not just the exit heads (upstream's freeze_parameters=False).
    #[arg(long)]
    unfreeze: bool,
    /// How a new exit head starts: lm-head (a copy of the LM head) or random (N(0, 0.02)).
    #[arg(long, default_value = "lm-head", value_parser = ["lm-head", "random"])]
    init: String,
    #[command(flatten)]
    training: TrainingArgs,
}

#[derive(clap::Args, Debug)]
pub struct ScratchArgs {
    /// The model to build: a transformers config.json, or a directory holding one (GPT-2, GPT-Neo or
    /// Llama; `lm_head_layer_indices` adds exit heads trained alongside).
    #[arg(long, value_name = "DIR|FILE")]
    config: PathBuf,
    /// The tokenizer directory (tokenizer.json, or vocab.json + merges.txt); default: --config's
    /// directory.
    #[arg(long, value_name = "DIR")]
    tokenizer: Option<PathBuf>,
    /// Start from this checkpoint's weights (same shapes as --config) instead of a random
    /// initialisation: more pre-training with a fresh optimizer and schedule.
    #[arg(long, value_name = "DIR")]
    init: Option<PathBuf>,
    #[command(flatten)]
    training: TrainingArgs,
}

#[derive(clap::Args, Debug)]
pub struct TokenizerArgs {
    #[command(subcommand)]
    command: TokenizerCommand,
}

#[derive(clap::Subcommand, Debug)]
enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer (GPT-2's kind) on a text or JSON Lines file; writes
    /// tokenizer.json and tokenizer_config.json to --out, with <|endoftext|> as token 0.
    Train(TokenizerTrainArgs),
}

#[derive(clap::Args, Debug)]
struct TokenizerTrainArgs {
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    #[arg(long, default_value = "text")]
    column: String,
    /// Vocabulary size, special tokens and the 256 byte symbols included.
    #[arg(long, default_value_t = 4096)]
    vocab_size: usize,
    /// A pair must occur this often to be merged.
    #[arg(long, default_value_t = 2)]
    min_frequency: u64,
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

fn parse_schedule(text: &str) -> std::result::Result<Schedule, String> {
    match text {
        "linear" => Ok(Schedule::Linear),
        "cosine" => Ok(Schedule::Cosine),
        "constant" => Ok(Schedule::Constant),
        _ => Err(format!("`{text}` is not a schedule (linear, cosine, constant)")),
    }
}

fn parse_dtype(text: &str) -> std::result::Result<DType, String> {
    DType::parse(text).ok_or_else(|| format!("`{text}` is not a dtype (f32, f16, bf16)"))
}

/// `layerwise train-exits`.
pub fn run_exits(args: ExitArgs) -> Result<()> {
    let files = ModelFiles::resolve(&args.model).with_context(|| format!("--model {}", args.model))?;
    let mut spec = ModelSpec::from_file(&files.config)?;
    for &layer in &args.layers {
        if layer == 0 || layer > spec.num_layers {
            bail!("--layers: layer {layer} does not exist (the model has layers 1..={})", spec.num_layers);
        }
    }
    let weights = io::open_weights(&files.weights).with_context(|| format!("--model {}", args.model))?;
    let mut exits: Vec<usize> = spec.exit_layers.iter().chain(&args.layers).copied().collect();
    exits.sort_unstable();
    exits.dedup();
    spec.exit_layers = exits;
    let tokenizer = Tokenizer::load(&files.tokenizer)?
        .with_context(|| format!("--model {}: the checkpoint has no tokenizer to read --data with", args.model))?;
    let config = read_json(&files.config)?;
    let companions = companions(&files);
    // Upstream's `run_gpt2_pretraining`: AdamW at 2e-4, linear decay, 3 epochs of 16 x 512 tokens.
    let defaults = Defaults {
        block_size: 512,
        batch_size: 16,
        epochs: 3,
        lr: 2e-4,
        weight_decay: 0.0,
        warmup_steps: 0,
        schedule: Schedule::Linear,
    };
    let heads = args.layers.iter().map(|&l| Head::Exit(l)).collect();
    let build = |seed| -> Result<Network> {
        let mut net = Network::new(&spec, Some(&weights), seed, args.init == "lm-head")?;
        if !args.unfreeze {
            // Upstream's freeze_parameters=True: only the exit heads being trained learn.
            let names: Vec<String> = args.layers.iter().map(|&l| layerwise::model::exit_head_name(l)).collect();
            net.params.train_only(|name| names.iter().any(|n| n == name));
        }
        Ok(net)
    };
    train(&args.training, &defaults, &tokenizer, None, heads, build, config, companions, &spec)
}

/// `layerwise train`.
pub fn run_scratch(args: ScratchArgs) -> Result<()> {
    let config_path = if args.config.is_dir() { args.config.join("config.json") } else { args.config.clone() };
    let spec = ModelSpec::from_file(&config_path).with_context(|| format!("--config {}", args.config.display()))?;
    let tokenizer_dir = match &args.tokenizer {
        Some(dir) => dir.clone(),
        None => config_path.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    let tokenizer_files = layerwise::io::source::tokenizer_files(&tokenizer_dir);
    let tokenizer = Tokenizer::load(&tokenizer_files)?.with_context(|| {
        format!("--tokenizer {}: no tokenizer.json or vocab.json + merges.txt there", tokenizer_dir.display())
    })?;
    if tokenizer.vocab_size() > spec.vocab_size {
        bail!(
            "--tokenizer {}: {} tokens do not fit the config's vocab_size of {}",
            tokenizer_dir.display(),
            tokenizer.vocab_size(),
            spec.vocab_size
        );
    }
    let config = read_json(&config_path)?;
    let mut companions: Vec<PathBuf> = tokenizer_files.paths();
    let generation = config_path.with_file_name("generation_config.json");
    if generation.is_file() {
        companions.push(generation);
    }
    let defaults = Defaults {
        block_size: 256,
        batch_size: 16,
        epochs: 1,
        lr: 1e-3,
        weight_decay: 0.1,
        warmup_steps: 100,
        schedule: Schedule::Cosine,
    };
    let heads = std::iter::once(Head::Original).chain(spec.exit_layers.iter().map(|&l| Head::Exit(l))).collect();
    // Documents are separated by the end-of-text token, as GPT-2's pre-training data was.
    let separator = spec.eos_token_ids.first().copied();
    let init = match &args.init {
        Some(dir) => {
            let files = ModelFiles::from_dir(dir).with_context(|| format!("--init {}", dir.display()))?;
            Some(io::open_weights(&files.weights).with_context(|| format!("--init {}", dir.display()))?)
        }
        None => None,
    };
    let build = |seed| -> Result<Network> {
        let network = Network::new(&spec, init.as_ref(), seed, false);
        match &args.init {
            Some(dir) => network.with_context(|| format!("--init {}", dir.display())),
            None => Ok(network?),
        }
    };
    train(&args.training, &defaults, &tokenizer, separator, heads, build, config, companions, &spec)
}

#[allow(clippy::too_many_arguments)]
fn train(
    args: &TrainingArgs,
    defaults: &Defaults,
    tokenizer: &Tokenizer,
    separator: Option<u32>,
    heads: Vec<Head>,
    build: impl Fn(u64) -> Result<Network>,
    config: Value,
    companions: Vec<PathBuf>,
    spec: &ModelSpec,
) -> Result<()> {
    let block = args.block_size.unwrap_or(defaults.block_size);
    // An explicit --block-size beyond the context is an error; the default is capped to it.
    if block > spec.max_positions && args.block_size.is_some() {
        bail!("--block-size {block} exceeds the model's context of {} positions", spec.max_positions);
    }
    let block = block.min(spec.max_positions);
    let blocks = |path: &Path, flag: &str| -> Result<Blocks> {
        let what = format!("{flag} {}", path.display());
        let documents = read_documents(path, &args.column).with_context(|| what.clone())?;
        Blocks::from_documents(&documents, tokenizer, separator, block, &what).with_context(|| what.clone())
    };
    let train_blocks = blocks(&args.data, "--data")?;
    let held_out = args.eval_data.as_deref().map(|p| blocks(p, "--eval-data")).transpose()?;
    let mut trainer = if Trainer::can_resume(&args.out) {
        let t = Trainer::resume(&args.out, train_blocks, held_out, companions)
            .with_context(|| format!("--out {}: cannot resume", args.out.display()))?;
        eprintln!(
            "resuming {} at step {} of {} (the options saved there apply)",
            args.out.display(),
            t.step(),
            t.total_steps()
        );
        t
    } else {
        let options = TrainOptions {
            heads,
            batch_size: args.batch_size.unwrap_or(defaults.batch_size),
            block_size: block,
            epochs: args.epochs.unwrap_or(defaults.epochs),
            max_steps: args.max_steps,
            optimizer: AdamWConfig {
                learning_rate: args.lr.unwrap_or(defaults.lr),
                weight_decay: args.weight_decay.unwrap_or(defaults.weight_decay),
                warmup_steps: args.warmup_steps.unwrap_or(defaults.warmup_steps),
                schedule: args.schedule.unwrap_or(defaults.schedule),
                max_grad_norm: args.max_grad_norm,
                ..Default::default()
            },
            seed: args.seed,
            save_every: args.save_every,
            eval_every: args.eval_every,
            save_dtype: args.save_dtype,
        };
        let network = build(args.seed)?;
        Trainer::new(network, options, train_blocks, held_out, config, companions)?
    };
    let total = trainer.total_steps();
    let params = trainer.network.params.trainable_count();
    eprintln!(
        "training {params} parameters on {} blocks of {block} tokens, {} per batch: {total} steps; heads: {}",
        trainer.train_blocks(),
        trainer.options.batch_size,
        trainer.options.heads.iter().map(Head::to_string).collect::<Vec<_>>().join(", ")
    );
    let log_every = args.log_every.unwrap_or((total / 100).max(1));
    let started = Instant::now();
    let first_step = trainer.step();
    let mut tokens = 0usize;
    // On a terminal one line is redrawn every step (held-out results stay); otherwise a line is
    // printed every --log-every steps.
    let terminal = std::io::stderr().is_terminal();
    trainer.run(&args.out, args.stop_after.map(|s| first_step + s), |record, total| {
        tokens += record.tokens;
        let line = progress_line(record, total, tokens, started, first_step);
        if terminal {
            let end = if record.held_out.is_some() || record.step == total { "\n" } else { "" };
            eprint!("\r\x1b[2K{line}{end}");
        } else if record.step % log_every == 0 || record.step == total || record.held_out.is_some() {
            eprintln!("{line}");
        }
    })?;
    if let Some(initial) = &trainer.initial_held_out {
        if let Some(last) = trainer.log.iter().rev().find_map(|r| r.held_out.as_ref()) {
            eprintln!("held-out loss (nats/token), start -> end:");
            for (head, start) in initial {
                let end = last.get(head).copied().unwrap_or(f64::NAN);
                eprintln!("  {head:<10} {start:.4} -> {end:.4} (perplexity {:.1})", end.exp());
            }
        }
    }
    write_log(&args.out, &trainer.log, trainer.initial_held_out.as_ref())?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

fn progress_line(r: &LogRecord, total: usize, tokens: usize, started: Instant, first_step: usize) -> String {
    let elapsed = started.elapsed().as_secs_f64();
    let rate = tokens as f64 / elapsed.max(1e-9);
    let done = r.step - first_step;
    let eta = elapsed / done.max(1) as f64 * (total - r.step) as f64;
    let heads: Vec<String> = r.heads.iter().map(|(h, l)| format!("{h} {l:.3}")).collect();
    let mut line = format!(
        "step {}/{total} [{:>3.0}%] loss {:.4} ({}) lr {:.2e} |g| {:.2} {rate:.0} tok/s ETA {}",
        r.step,
        100.0 * r.step as f64 / total.max(1) as f64,
        r.loss,
        heads.join(", "),
        r.learning_rate,
        r.grad_norm,
        duration(eta)
    );
    if let Some(held_out) = &r.held_out {
        let parts: Vec<String> = held_out.iter().map(|(h, l)| format!("{h} {l:.3}")).collect();
        line.push_str(&format!("; held-out {}", parts.join(", ")));
    }
    line
}

pub fn duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s / 60 % 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// `training-log.json` (every step) and `loss-curve.svg` (training loss per head, smoothed over a
/// window, and the held-out points).
fn write_log(dir: &Path, log: &[LogRecord], initial: Option<&BTreeMap<String, f64>>) -> Result<()> {
    let json = serde_json::json!({ "initial_held_out": initial, "steps": log });
    let path = dir.join("training-log.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?).with_context(|| format!("{}", path.display()))?;
    let heads: Vec<String> = log.first().map(|r| r.heads.keys().cloned().collect()).unwrap_or_default();
    let window = (log.len() / 50).max(1);
    let mut series: Vec<Series> = heads
        .iter()
        .map(|head| Series {
            name: format!("{head} (train)"),
            points: log
                .chunks(window)
                .map(|c| {
                    let mean = c.iter().map(|r| r.heads[head]).sum::<f64>() / c.len() as f64;
                    (c[c.len() - 1].step as f64, mean)
                })
                .collect(),
        })
        .collect();
    for head in &heads {
        let mut points: Vec<(f64, f64)> = initial.and_then(|i| i.get(head)).map(|&l| (0.0, l)).into_iter().collect();
        points.extend(log.iter().filter_map(|r| Some((r.step as f64, *r.held_out.as_ref()?.get(head)?))));
        if !points.is_empty() {
            series.push(Series { name: format!("{head} (held-out)"), points });
        }
    }
    let svg = line_plot_svg("Training loss", "step", "loss (nats/token)", &series, None);
    let path = dir.join("loss-curve.svg");
    std::fs::write(&path, svg).with_context(|| format!("{}", path.display()))?;
    Ok(())
}

fn read_json(path: &Path) -> Result<Value> {
    let text = io::read_config(path).with_context(|| format!("{}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))
}

/// The tokenizer and generation files a checkpoint directory carries along.
fn companions(files: &ModelFiles) -> Vec<PathBuf> {
    let mut out = files.tokenizer.paths();
    out.extend(files.generation_config.clone());
    out
}

#[derive(clap::Args, Debug)]
pub struct ConversionArgs {
    /// The checkpoint: a directory or a Hugging Face Hub id.
    #[arg(long, value_name = "SRC")]
    model: String,
    /// Text whose states the maps are fitted on (.jsonl with --column, or any text file).
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    #[arg(long, default_value = "text")]
    column: String,
    /// The layers (1-based, below the top) to fit a conversion to the top layer for.
    #[arg(long, value_delimiter = ',', required = true)]
    layers: Vec<usize>,
    /// Tokens per sequence the model reads (capped at its context).
    #[arg(long, default_value_t = 512)]
    block_size: usize,
    /// The checkpoint written: the model with `name_to_conv_matrix.{L}_to_{N}.weight` added.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    save_dtype: DType,
}

/// `layerwise fit-conversions`.
pub fn run_conversions(args: ConversionArgs) -> Result<()> {
    let files = ModelFiles::resolve(&args.model).with_context(|| format!("--model {}", args.model))?;
    let spec = ModelSpec::from_file(&files.config)?;
    for &layer in &args.layers {
        if layer == 0 || layer >= spec.num_layers {
            bail!(
                "--layers: layer {layer} has no conversion (conversions map layers 1..{} to the top layer)",
                spec.num_layers
            );
        }
    }
    let weights = io::open_weights(&files.weights).with_context(|| format!("--model {}", args.model))?;
    let tokenizer = Tokenizer::load(&files.tokenizer)?
        .with_context(|| format!("--model {}: the checkpoint has no tokenizer to read --data with", args.model))?;
    let what = format!("--data {}", args.data.display());
    let documents = read_documents(&args.data, &args.column).with_context(|| what.clone())?;
    let block = args.block_size.min(spec.max_positions);
    let blocks = Blocks::from_documents(&documents, &tokenizer, None, block, &what).with_context(|| what.clone())?;
    let mut network = Network::new(&spec, Some(&weights), 0, false)?;
    let started = Instant::now();
    let residuals = layerwise::training::conversions::fit_conversions(&mut network, blocks.in_order(8), &args.layers)?;
    eprintln!("fitted on {} tokens in {:.1}s", blocks.tokens.len(), started.elapsed().as_secs_f64());
    for (layer, residual) in residuals {
        eprintln!(
            "  layer {layer} -> {}: unexplained {:.2}% of the top states' energy",
            spec.num_layers,
            100.0 * residual
        );
    }
    layerwise::training::checkpoint::save_checkpoint(
        &args.out,
        &network,
        &read_json(&files.config)?,
        args.save_dtype,
        &companions(&files),
    )?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// `layerwise tokenizer ...`.
pub fn run_tokenizer(args: TokenizerArgs) -> Result<()> {
    let TokenizerCommand::Train(args) = args.command;
    let what = format!("--data {}", args.data.display());
    let documents = read_documents(&args.data, &args.column).with_context(|| what.clone())?;
    let special = "<|endoftext|>";
    let tokenizer =
        Tokenizer::train_byte_level_bpe(&documents, args.vocab_size, args.min_frequency, &[special], &args.data)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("--out {}", args.out.display()))?;
    tokenizer.save(&args.out.join("tokenizer.json"))?;
    let config = serde_json::json!({
        "tokenizer_class": "GPT2TokenizerFast",
        "bos_token": special,
        "eos_token": special,
        "unk_token": special,
        "add_prefix_space": false,
    });
    std::fs::write(args.out.join("tokenizer_config.json"), serde_json::to_string_pretty(&config)?)
        .with_context(|| format!("--out {}", args.out.display()))?;
    eprintln!(
        "trained a byte-level BPE of {} tokens on {} documents; `{special}` is id 0 (set bos_token_id/eos_token_id to 0)",
        tokenizer.vocab_size(),
        documents.len()
    );
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
