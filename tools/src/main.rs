//! `layerwise`: the command-line face of the engine. Each subcommand is a thin layer over the
//! engine's public API; the engine never prints, this program decides what to show.

mod activations;
mod attention;
mod bench;
mod bench_train;
mod classify;
mod dataset;
mod eval;
mod flags;
mod forward;
mod generate;
mod heads;
mod heads_classifier;
mod info;
mod input;
mod lens;
mod memory;
mod output;
mod plot;
mod run;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "layerwise",
    version,
    about = "Inference for multi-exit language models: early exit, auto-contrastive decoding, logit lens"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a prompt through the model and write logits, exit-head logits and hidden states.
    Forward(forward::Args),
    /// Generate text from the original head, an early exit (--exit) or an ACD contrast (--contrast).
    Generate(Box<generate::Args>),
    /// Generate for every row of a dataset under one or more exit plans, continuously batched, into
    /// a resumable output directory (generations.jsonl, run.json).
    Run(Box<run::Args>),
    /// Measure generation and prefill throughput, peak memory and the fraction of the memory-bandwidth bound.
    Bench(bench::Args),
    /// The logit lens of a prompt: every layer's prediction at every position, as JSON, HTML, SVG or PNG.
    Lens(lens::Args),
    /// Internal activations by name (e.g. h.0,h.5.mlp), computing no further than the deepest one.
    Activations(activations::Args),
    /// Attention probabilities per layer and head (decoders and encoders): safetensors, JSON or an
    /// HTML head view or model view.
    Attention(attention::Args),
    /// Attention heads over a set of texts (a language model) or a labelled dataset (a classifier):
    /// entropy, importance (by ablation; by gradient), their correlation, the masking curve, the
    /// model view, and with --prune a pruned checkpoint.
    Heads(heads::Args),
    /// Describe a checkpoint and measure what opening it costs (time, resident memory).
    Info(info::Args),
    /// Language-modeling scores as lm-evaluation-harness computes them (perplexity).
    Eval(eval::Args),
    /// Train exit heads on a checkpoint (upstream's run_training.py): base frozen unless --unfreeze.
    TrainExits(Box<train::ExitArgs>),
    /// Train a model from scratch from a transformers config.json (exit heads alongside when it
    /// lists lm_head_layer_indices).
    Train(Box<train::ScratchArgs>),
    /// Fit conversion matrices (least squares from layer-L states to the top layer's), used by
    /// --converted.
    FitConversions(Box<train::ConversionArgs>),
    /// Training throughput of a config, as a fraction of this machine's matrix-product ceiling.
    BenchTrain(bench_train::Args),
    /// Tokenizer tools.
    Tokenizer(train::TokenizerArgs),
    /// Classify texts with an encoder classifier (BERT): labels, probabilities, and the accuracy
    /// when the texts have labels.
    Classify(classify::Args),
}

fn main() -> ExitCode {
    report_sigbus();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Forward(args) => forward::run(args),
        Command::Info(args) => info::run(args),
        Command::Generate(args) => generate::run(*args),
        Command::Run(args) => run::run(*args),
        Command::Bench(args) => bench::run(args),
        Command::Lens(args) => lens::run(args),
        Command::Heads(args) => heads::run(args),
        Command::Attention(args) => attention::run(args),
        Command::Activations(args) => activations::run(args),
        Command::Eval(args) => eval::run(args),
        Command::TrainExits(args) => train::run_exits(*args),
        Command::Train(args) => train::run_scratch(*args),
        Command::Tokenizer(args) => train::run_tokenizer(args),
        Command::BenchTrain(args) => bench_train::run(args),
        Command::FitConversions(args) => train::run_conversions(*args),
        Command::Classify(args) => classify::run(args),
    };
    let result = result.and_then(|()| output::flush());
    report_peak_memory();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if output::is_closed_pipe(&err) => ExitCode::from(output::CLOSED_PIPE_STATUS),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// With `LAYERWISE_PEAK_RSS` set, the process's peak resident memory on stderr as it ends (the
/// hostile-input tests bound and report each case's footprint with it).
fn report_peak_memory() {
    if std::env::var_os("LAYERWISE_PEAK_RSS").is_none() {
        return;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if let Some(kib) = status.lines().find_map(|l| l.strip_prefix("VmHWM:")) {
        let kib: f64 = kib.trim().trim_end_matches("kB").trim().parse().unwrap_or(0.0);
        eprintln!("layerwise: peak RSS {:.1} MiB", kib / 1024.0);
    }
}

/// Weights are mapped, not read: if a checkpoint file shrinks while in use (rewritten or truncated
/// by another program), the next read of a page past its new end raises SIGBUS. Say what happened
/// and exit with the status a shell gives that signal (135), rather than die without a word.
fn report_sigbus() {
    extern "C" fn on_sigbus(_: libc::c_int) {
        const MESSAGE: &[u8] = b"error: a weights file shrank while in use (SIGBUS on a mapped page): \
rerun once the checkpoint is complete, and do not rewrite a checkpoint while it is in use\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe; MESSAGE is a static buffer.
        unsafe {
            libc::write(2, MESSAGE.as_ptr().cast(), MESSAGE.len());
            libc::_exit(135);
        }
    }
    // SAFETY: the handler calls only async-signal-safe functions and touches no Rust state.
    unsafe {
        libc::signal(libc::SIGBUS, on_sigbus as *const () as libc::sighandler_t);
    }
}
