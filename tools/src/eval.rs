//! `layerwise eval perplexity`: rolling-window perplexity of a set of documents under an exit plan,
//! as lm-evaluation-harness's `loglikelihood_rolling` scores them (per token, per word, per byte,
//! bits per byte).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use layerwise::evaluation::{perplexity, Document};
use layerwise::{Backend, LoadedModel};
use serde_json::{json, Value};

use crate::input::{ModelArgs, PlanArgs};
use crate::output;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    metric: Metric,
}

#[derive(clap::Subcommand, Debug)]
enum Metric {
    /// Rolling-window perplexity (lm-eval's loglikelihood_rolling): windows of the model's context,
    /// every token scored once, the first after the end-of-text token.
    Perplexity(PerplexityArgs),
}

#[derive(clap::Args, Debug)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    plan: PlanArgs,
    /// The documents: a .jsonl file (one JSON object per line, its `text` field a document), or any
    /// other text file (the whole file one document).
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// Print one JSON object (totals and per-document scores) instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    match args.metric {
        Metric::Perplexity(args) => crate::with_backend!(args.model, loaded => run_perplexity(&args, loaded)),
    }
}

fn run_perplexity<B: Backend>(args: &PerplexityArgs, loaded: LoadedModel<B>) -> Result<()> {
    let texts = read_documents(&args.data)?;
    let documents = texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let tokens =
                loaded.encode(text).with_context(|| format!("--data {}: document {i}", args.data.display()))?;
            if tokens.is_empty() {
                bail!("--data {}: document {i} has no tokens", args.data.display());
            }
            Ok(Document::new(text, tokens))
        })
        .collect::<Result<Vec<_>>>()?;
    let plan = args.plan.plan()?;
    let report = perplexity(&loaded.model, plan.as_ref(), &documents)
        .map_err(|e| anyhow::anyhow!("{}: {e}", if plan.is_some() { args.plan.flag() } else { "eval perplexity" }))?;
    let tokens: usize = report.documents.iter().map(|d| d.tokens).sum();
    if args.json {
        let per_document: Vec<Value> = report
            .documents
            .iter()
            .map(|d| json!({"loglikelihood": d.loglikelihood, "tokens": d.tokens, "words": d.words, "bytes": d.bytes}))
            .collect();
        let line = json!({
            "documents": report.documents.len(),
            "tokens": tokens,
            "token_perplexity": report.token_perplexity(),
            "word_perplexity": report.word_perplexity(),
            "byte_perplexity": report.byte_perplexity(),
            "bits_per_byte": report.bits_per_byte(),
            "per_document": per_document,
        });
        output::line(line)
    } else {
        output::line(format!(
            "{} documents, {tokens} tokens: token perplexity {:.4}, word perplexity {:.4}, byte perplexity {:.4}, bits per byte {:.4}",
            report.documents.len(),
            report.token_perplexity(),
            report.word_perplexity(),
            report.byte_perplexity(),
            report.bits_per_byte()
        ))
    }
}

/// The documents of `path`: each line's `text` of a .jsonl file, else the whole file.
fn read_documents(path: &Path) -> Result<Vec<String>> {
    layerwise::io::documents::read_documents(path, "text").with_context(|| format!("--data {}", path.display()))
}
