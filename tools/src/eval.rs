//! `layerwise eval`: language-modeling scores under an exit plan, or under every head at once
//! (`--all-plans`): rolling-window perplexity as lm-evaluation-harness's `loglikelihood_rolling`
//! scores it (per token, per word, per byte, bits per byte), last-word accuracy and perplexity as
//! its `lambada_openai` task does, and SimCTG's repetition and diversity of generated text.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use layerwise::evaluation::heads::{Heads, Scorer};
use layerwise::evaluation::last_word::{encode_pair, last_word, split_last_word, LastWordReport};
use layerwise::evaluation::repetition::repetition_and_diversity;
use layerwise::evaluation::{perplexity_of, Document, PerplexityReport};
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
    Perplexity(ScoreArgs),
    /// Last-word prediction (lm-eval's lambada_openai): each text less its last word is the
    /// context, a space and that word the target; accuracy (the target is the greedy continuation)
    /// and perplexity over targets.
    LastWord(ScoreArgs),
    /// Repetition (rep-2/3/4) and diversity of generated texts as SimCTG measures them (upstream's
    /// inference metrics).
    Generation(GenerationArgs),
    /// The unigram baseline: the per-token perplexity of --data under token frequencies counted on
    /// --train (add-one smoothing over the vocabulary), both tokenized as `train` tokenizes.
    Unigram(UnigramArgs),
}

#[derive(clap::Args, Debug)]
struct UnigramArgs {
    /// The checkpoint whose tokenizer and vocabulary to use.
    #[arg(long, value_name = "SRC")]
    model: String,
    /// The text whose token frequencies make the baseline.
    #[arg(long, value_name = "FILE")]
    train: PathBuf,
    /// The text it is scored on.
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
}

#[derive(clap::Args, Debug)]
struct ScoreArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    plan: PlanArgs,
    /// The data: a .jsonl file (one JSON object per line, its `text` field a document), or any
    /// other text file (the whole file one document).
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// Score the original head, every exit head and the --pair contrasts, all from one forward
    /// pass per window, as one table.
    #[arg(long, conflicts_with_all = ["exit", "contrast"])]
    all_plans: bool,
    /// With --all-plans: an ACD contrast to add, UPPER,LOWER (e.g. original,2 or 4,2; repeatable).
    /// Default: the original head against each exit.
    #[arg(long = "pair", value_name = "UPPER,LOWER", requires = "all_plans")]
    pairs: Vec<String>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct GenerationArgs {
    /// Generated texts: a .jsonl file (--column the text) or a text file (one text per line).
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// The JSON Lines field holding each generated text.
    #[arg(long, default_value = "text")]
    column: String,
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    match args.metric {
        Metric::Perplexity(args) => crate::with_backend!(args.model, loaded => run_perplexity(&args, loaded)),
        Metric::LastWord(args) => crate::with_backend!(args.model, loaded => run_last_word(&args, loaded)),
        Metric::Generation(args) => run_generation(&args),
        Metric::Unigram(args) => run_unigram(&args),
    }
}

/// What the flags ask to score: the plan, or every head (`--all-plans`).
fn scorers<B: Backend>(args: &ScoreArgs, loaded: &LoadedModel<B>) -> Result<Option<Vec<Scorer>>> {
    if !args.all_plans {
        return Ok(None);
    }
    let exits = loaded.model.spec().exit_layers.clone();
    let pairs = if args.pairs.is_empty() {
        exits.iter().map(|&l| (None, l)).collect()
    } else {
        args.pairs.iter().map(|p| parse_pair(p, &exits)).collect::<Result<Vec<_>>>()?
    };
    Ok(Some(Scorer::all(&exits, &pairs, args.plan.alpha, args.plan.min_candidates)))
}

fn parse_pair(text: &str, exits: &[usize]) -> Result<(Option<usize>, usize)> {
    let layer = |s: &str| -> Result<usize> {
        let l: usize = s.trim().parse().with_context(|| format!("--pair {text}: `{s}` is not a layer"))?;
        if !exits.contains(&l) {
            bail!("--pair {text}: layer {l} has no exit head (exits: {exits:?})");
        }
        Ok(l)
    };
    let Some((upper, lower)) = text.split_once(',') else { bail!("--pair {text}: expected UPPER,LOWER") };
    let upper = if upper.trim() == "original" { None } else { Some(layer(upper)?) };
    Ok((upper, layer(lower)?))
}

/// Runs `score` under the plan or the scorers; the error names the flag that chose the heads.
fn with_heads<T>(
    args: &ScoreArgs,
    scorers: &Option<Vec<Scorer>>,
    score: impl FnOnce(Heads<'_>) -> layerwise::Result<T>,
) -> Result<T> {
    let plan = args.plan.plan()?;
    let (heads, flag) = match scorers {
        Some(s) => (Heads::Many(s), "--all-plans"),
        None if plan.is_some() => (Heads::Plan(plan.as_ref()), args.plan.flag()),
        None => (Heads::Plan(None), "eval"),
    };
    score(heads).map_err(|e| anyhow::anyhow!("{flag}: {e}"))
}

fn names(scorers: &Option<Vec<Scorer>>, args: &ScoreArgs) -> Vec<String> {
    match scorers {
        Some(s) => s.iter().map(Scorer::name).collect(),
        None => vec![match (&args.plan.exit, &args.plan.contrast) {
            (Some(l), _) => format!("exit {l}"),
            (None, Some(c)) => format!("acd {c}"),
            _ => "original".into(),
        }],
    }
}

fn run_perplexity<B: Backend>(args: &ScoreArgs, loaded: LoadedModel<B>) -> Result<()> {
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
    let scorers = scorers(args, &loaded)?;
    let reports = with_heads(args, &scorers, |heads| perplexity_of(&loaded.model, heads, &documents))?;
    let names = names(&scorers, args);
    if args.json {
        let rows: Vec<Value> = names.iter().zip(&reports).map(|(name, r)| perplexity_json(name, r)).collect();
        return output::line(if args.all_plans { json!({ "heads": rows }) } else { rows[0].clone() });
    }
    let report = &reports[0];
    let tokens: usize = report.documents.iter().map(|d| d.tokens).sum();
    output::line(format!("{} documents, {tokens} tokens", report.documents.len()))?;
    output::line(format!(
        "{:<18} {:>12} {:>12} {:>12} {:>10}",
        "head", "token ppl", "word ppl", "byte ppl", "bits/byte"
    ))?;
    for (name, r) in names.iter().zip(&reports) {
        output::line(format!(
            "{name:<18} {:>12.4} {:>12.4} {:>12.4} {:>10.4}",
            r.token_perplexity(),
            r.word_perplexity(),
            r.byte_perplexity(),
            r.bits_per_byte()
        ))?;
    }
    Ok(())
}

fn perplexity_json(name: &str, report: &PerplexityReport) -> Value {
    let per_document: Vec<Value> = report
        .documents
        .iter()
        .map(|d| json!({"loglikelihood": d.loglikelihood, "tokens": d.tokens, "words": d.words, "bytes": d.bytes}))
        .collect();
    json!({
        "head": name,
        "documents": report.documents.len(),
        "tokens": report.documents.iter().map(|d| d.tokens).sum::<usize>(),
        "token_perplexity": report.token_perplexity(),
        "word_perplexity": report.word_perplexity(),
        "byte_perplexity": report.byte_perplexity(),
        "bits_per_byte": report.bits_per_byte(),
        "per_document": per_document,
    })
}

fn run_last_word<B: Backend>(args: &ScoreArgs, loaded: LoadedModel<B>) -> Result<()> {
    let texts = read_documents(&args.data)?;
    let tokenizer = loaded.tokenizer.as_ref().with_context(|| "eval last-word: the checkpoint has no tokenizer")?;
    let items = texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let where_ = || format!("--data {}: item {i}", args.data.display());
            let (context, target) =
                split_last_word(text).with_context(|| format!("{}: no space, so no last word", where_()))?;
            let pair = encode_pair(tokenizer, context, &target).with_context(where_)?;
            if pair.1.is_empty() {
                bail!("{}: the last word has no tokens", where_());
            }
            Ok(pair)
        })
        .collect::<Result<Vec<_>>>()?;
    let scorers = scorers(args, &loaded)?;
    let reports = with_heads(args, &scorers, |heads| last_word(&loaded.model, heads, &items))?;
    let names = names(&scorers, args);
    if args.json {
        let rows: Vec<Value> = names.iter().zip(&reports).map(|(name, r)| last_word_json(name, r)).collect();
        return output::line(if args.all_plans { json!({ "heads": rows }) } else { rows[0].clone() });
    }
    output::line(format!("{} items", items.len()))?;
    output::line(format!("{:<18} {:>10} {:>12}", "head", "accuracy", "perplexity"))?;
    for (name, r) in names.iter().zip(&reports) {
        output::line(format!("{name:<18} {:>10.4} {:>12.4}", r.accuracy(), r.perplexity()))?;
    }
    Ok(())
}

fn last_word_json(name: &str, report: &LastWordReport) -> Value {
    let items: Vec<Value> =
        report.items.iter().map(|s| json!({"loglikelihood": s.loglikelihood, "greedy": s.greedy})).collect();
    json!({"head": name, "items": items.len(), "accuracy": report.accuracy(), "perplexity": report.perplexity(), "per_item": items})
}

fn run_generation(args: &GenerationArgs) -> Result<()> {
    let what = format!("--data {}", args.data.display());
    let texts: Vec<String> = if args.data.extension().is_some_and(|e| e == "jsonl") {
        layerwise::io::documents::read_documents(&args.data, &args.column).with_context(|| what.clone())?
    } else {
        let text = layerwise::io::read_text(&args.data).with_context(|| format!("{what}: cannot read"))?;
        text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect()
    };
    if texts.is_empty() {
        bail!("{what}: no texts");
    }
    let pooled = repetition_and_diversity(&texts);
    // Upstream's script measures each text alone, a too-short text counting diversity 0.
    let per_text: f64 = texts.iter().map(|t| repetition_and_diversity(&[t]).map_or(0.0, |r| r.diversity)).sum::<f64>()
        / texts.len() as f64;
    let Some(r) = pooled else {
        bail!("{what}: the texts are too short to have 4-grams (SimCTG's metrics need at least 5 words)")
    };
    if args.json {
        return output::line(json!({
            "texts": texts.len(), "rep_2": r.rep_2, "rep_3": r.rep_3, "rep_4": r.rep_4,
            "diversity": r.diversity, "mean_diversity_per_text": per_text,
        }));
    }
    output::line(format!(
        "{} texts: rep-2 {:.2}, rep-3 {:.2}, rep-4 {:.2}, diversity {:.4} (mean per text {:.4})",
        texts.len(),
        r.rep_2,
        r.rep_3,
        r.rep_4,
        r.diversity,
        per_text
    ))
}

fn run_unigram(args: &UnigramArgs) -> Result<()> {
    let files = layerwise::ModelFiles::resolve(&args.model).with_context(|| format!("--model {}", args.model))?;
    let spec = layerwise::ModelSpec::from_file(&files.config)?;
    let tokenizer = layerwise::Tokenizer::load(&files.tokenizer)?
        .with_context(|| format!("--model {}: no tokenizer", args.model))?;
    // Each document followed by the end-of-text token, as `layerwise train` reads them.
    let tokens = |path: &Path| -> Result<Vec<u32>> {
        let mut out = Vec::new();
        for doc in read_documents(path)? {
            out.extend(tokenizer.encode(&doc).with_context(|| format!("{}", path.display()))?);
            out.extend(spec.eos_token_ids.first().copied());
        }
        Ok(out)
    };
    let mut counts = vec![1.0f64; spec.vocab_size];
    let train = tokens(&args.train)?;
    for &t in &train {
        if let Some(c) = counts.get_mut(t as usize) {
            *c += 1.0;
        }
    }
    let total: f64 = counts.iter().sum();
    let scored = tokens(&args.data)?;
    let nll = scored.iter().map(|&t| -(counts.get(t as usize).copied().unwrap_or(1.0) / total).ln()).sum::<f64>()
        / scored.len().max(1) as f64;
    output::line(format!(
        "unigram baseline: {nll:.4} nats/token (token perplexity {:.1}) on {} tokens, from {} training tokens",
        nll.exp(),
        scored.len(),
        train.len()
    ))
}

/// The documents of `path`: each line's `text` of a .jsonl file, else the whole file.
fn read_documents(path: &Path) -> Result<Vec<String>> {
    layerwise::io::documents::read_documents(path, "text").with_context(|| format!("--data {}", path.display()))
}
