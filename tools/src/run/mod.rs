//! `layerwise run`: generation over a whole dataset, the workflow of upstream's run_inference.py and
//! of run_gen.py scripts: every row under every plan, continuously batched by the engine's
//! scheduler, written row by row to a resumable output directory.
//!
//! Files: [`rows`] (records to prompts, windows, bad rows), [`output`] (generations.jsonl and
//! run.json, resumption).

mod output;
mod rows;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use layerwise::exits::{Contrast, ExitPlan, PlanOptions, Upper};
use layerwise::generation::{Event, GenerationOptions, Request, RequestId, Scheduler, SchedulerOptions};
use layerwise::io::records::{data_files, read_records};
use layerwise::runtime::{Decoder, DecoderOptions};
use layerwise::{Backend, LoadedModel};
use serde_json::{json, Value};

use crate::input::{GenerationArgs, MaskArgs, ModelArgs, NewTokens};
use output::OutputDir;
use rows::{Columns, Row, Skipped, Windows};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The dataset: a JSON Lines, CSV or Parquet file, or a folder of them (e.g. a Hugging Face
    /// dataset's snapshot).
    #[arg(long, value_name = "FILE_OR_DIR")]
    data: PathBuf,
    /// In a folder, only the files of this split (named `SPLIT.*`, `SPLIT-*`, `SPLIT_*`, or in a
    /// folder named SPLIT).
    #[arg(long, value_name = "SPLIT")]
    split: Option<String>,
    /// Where generations.jsonl and run.json go. Running the same command again resumes.
    #[arg(long, value_name = "DIR")]
    output_dir: PathBuf,
    /// Replace the generations and run.json of a previous run in --output-dir.
    #[arg(long)]
    overwrite_output_dir: bool,
    /// The column holding each prompt.
    #[arg(long, value_name = "NAME", default_value = "text")]
    text_column: String,
    /// A column stored beside each generation (e.g. the gold continuation); its tokens must fit
    /// the block size with the prompt.
    #[arg(long, value_name = "NAME")]
    reference_column: Option<String>,
    /// The column of row ids (text or numbers, unique); default: the row's index.
    #[arg(long, value_name = "NAME")]
    id_column: Option<String>,
    /// Columns copied into each output line, comma-separated.
    #[arg(long, value_name = "A,B", value_delimiter = ',')]
    keep_columns: Vec<String>,
    /// A column of non-negative integers: each row's own --max-new-tokens (CSV text is read as a
    /// number too), still within the block size.
    #[arg(long, value_name = "NAME")]
    max_new_tokens_column: Option<String>,
    /// Only the first N rows.
    #[arg(long, value_name = "N")]
    max_rows: Option<usize>,
    /// Positions for prompt + new tokens [default: the model's context].
    #[arg(long, value_name = "N")]
    block_size: Option<usize>,
    /// Prompts longer than this keep their last N tokens.
    #[arg(long, value_name = "N")]
    max_window_size: Option<usize>,
    /// The exit plans, each row generated under each: `original`, `exit:L`, `contrast:U,L` (U a
    /// layer or `original`), comma-separated, e.g. original,exit:12,contrast:24,12.
    #[arg(long, value_name = "PLANS", default_value = "original")]
    plans: String,
    /// ACD plausibility threshold of the contrast plans.
    #[arg(long, value_name = "A", default_value_t = 0.1)]
    alpha: f32,
    /// ACD keeps at least this many candidate tokens.
    #[arg(long, value_name = "K", default_value_t = 1)]
    min_candidates: usize,
    /// Project layers with the model's own final norm and LM head (logit lens) instead of exit heads.
    #[arg(long, conflicts_with = "converted")]
    lens: bool,
    /// Project layers through the checkpoint's conversion matrices and the original LM head.
    #[arg(long)]
    converted: bool,
    #[command(flatten)]
    generation: GenerationArgs,
    #[command(flatten)]
    mask: MaskArgs,
    /// Sequences per step (beams and contrastive candidates count one each).
    #[arg(long, value_name = "N", default_value_t = 16)]
    batch_size: usize,
    /// Prompt tokens per step beside the decoding sequences (longer prompts run in chunks).
    #[arg(long, value_name = "N", default_value_t = 512)]
    max_step_tokens: usize,
    /// KV-cache capacity in tokens [default: batch size x (block size + 16)]. A smaller cache
    /// preempts and recomputes requests instead of failing.
    #[arg(long, value_name = "N")]
    cache_tokens: Option<usize>,
    /// Seconds between progress lines when stderr is not a terminal.
    #[arg(long, value_name = "S", default_value_t = 10.0)]
    progress_every: f64,
    /// Sleep this long after writing each generation, so that tests can kill a run mid-way.
    #[arg(long, hide = true, value_name = "MS")]
    pause_per_row_ms: Option<u64>,
}

pub fn run(args: Args) -> Result<()> {
    crate::with_backend!(args.model, loaded => run_on(&args, loaded))
}

fn run_on<B: Backend>(args: &Args, loaded: LoadedModel<B>) -> Result<()> {
    let spec = loaded.model.spec();
    let tokenizer = loaded.tokenizer.as_ref().context("layerwise run reads text: the checkpoint has no tokenizer")?;

    // Everything is checked before any work: options, plans, files, columns.
    let plans = parse_plans(args)?;
    let head_mask = args.mask.mask(spec)?;
    for (name, plan) in &plans {
        let options = DecoderOptions { plan: plan.clone(), cache_tokens: Some(1), ..Default::default() };
        Decoder::new(&loaded.model, options).map_err(|e| anyhow::anyhow!("--plans `{name}`: {e}"))?;
    }
    let base = args.generation.options_allowing_auto(&loaded)?;
    let block_size = args.block_size.unwrap_or(spec.max_positions);
    if block_size < 2 || block_size > spec.max_positions {
        bail!(
            "--block-size {block_size}: must be between 2 and the model's context of {} positions",
            spec.max_positions
        );
    }
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let windows = Windows {
        block_size,
        max_window_size: args.max_window_size,
        max_new_tokens: match args.generation.max_new_tokens {
            Some(NewTokens::Auto) => None,
            _ => Some(base.max_new_tokens),
        },
        max_new_tokens_column: args.max_new_tokens_column.clone(),
    };
    if args.max_window_size == Some(0) {
        bail!("--max-window-size must be at least 1");
    }
    let columns = Columns {
        text: args.text_column.clone(),
        reference: args.reference_column.clone(),
        id: args.id_column.clone(),
        keep: args.keep_columns.iter().filter(|c| !c.is_empty()).cloned().collect(),
        max_new_tokens: args.max_new_tokens_column.clone(),
    };
    let files = data_files(&args.data, args.split.as_deref()).context("--data")?;
    let mut records = Vec::new();
    for file in &files {
        records.extend(read_records(file).context("--data")?);
    }
    if let Some(n) = args.max_rows {
        records.truncate(n);
    }
    if records.is_empty() {
        bail!("--data {}: no rows", args.data.display());
    }
    rows::check(&records, &columns)?;
    let read = records.len();
    let (rows, mut skipped) = rows::prepare(records, &columns, &windows, tokenizer)?;

    let configuration = json!({
        "model": args.model.model.as_deref().unwrap_or(crate::input::DEMO_MODEL),
        "dtype": args.model.dtype.map(|d| format!("{d:?}")),
        "adapter": args.model.adapter.as_ref().map(|p| p.display().to_string()),
        "data": files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
        "text_column": columns.text,
        "reference_column": columns.reference,
        "id_column": columns.id,
        "keep_columns": columns.keep,
        "max_rows": args.max_rows,
        "block_size": block_size,
        "max_window_size": args.max_window_size,
        "max_new_tokens": windows.max_new_tokens.map_or(json!("auto"), |n| json!(n)),
        "max_new_tokens_column": args.max_new_tokens_column,
        "plans": plans.iter().map(|(name, _)| name.clone()).collect::<Vec<_>>(),
        "projection": if args.lens { "lens" } else if args.converted { "converted" } else { "exit_heads" },
        "alpha": args.alpha,
        "min_candidates": args.min_candidates,
        "head_mask": args.mask.head_mask.as_ref().map(|p| p.display().to_string()),
        // Every other generation option (max_new_tokens is the field above).
        "generation": format!("{:?}", GenerationOptions { max_new_tokens: 0, ..base.clone() }),
    });
    let mut out = OutputDir::open(&args.output_dir, &configuration, args.overwrite_output_dir)?;
    let total = rows.len() * plans.len();
    let todo = rows.iter().flat_map(|r| plans.iter().filter(|(p, _)| !out.is_done(&r.key, p))).count();
    let mut summary = Summary {
        configuration,
        read,
        ready: rows.len(),
        plans: plans.len(),
        resumed: out.resumed,
        ..Default::default()
    };
    out.write_run(&summary.json(&skipped, "running"))?;
    for s in &skipped {
        eprintln!("skipped {}: {}", s.id, s.reason);
    }
    eprintln!(
        "{} rows read, {} to generate under {} plan(s): {} generations, {} already in {} ({} to go)",
        read,
        rows.len(),
        plans.len(),
        total,
        total - todo,
        args.output_dir.display(),
        todo
    );

    let mut progress = Progress::new(todo, args.progress_every);
    let cache_tokens = args.cache_tokens.unwrap_or(args.batch_size * (block_size + 16));
    let scheduling = SchedulerOptions { max_sequences: args.batch_size, max_step_tokens: args.max_step_tokens.max(1) };
    for (name, plan) in &plans {
        let pending: Vec<&Row> = rows.iter().filter(|r| !out.is_done(&r.key, name)).collect();
        if pending.is_empty() {
            continue;
        }
        let options = DecoderOptions {
            plan: plan.clone(),
            cache_tokens: Some(cache_tokens),
            head_mask: head_mask.clone(),
            ..Default::default()
        };
        let decoder = Decoder::new(&loaded.model, options).map_err(|e| anyhow::anyhow!("--cache-tokens: {e}"))?;
        let mut scheduler = Scheduler::new(decoder, Some(tokenizer), scheduling);
        let mut requests: HashMap<RequestId, &Row> = HashMap::new();
        for row in pending {
            let options = GenerationOptions { max_new_tokens: row.max_new_tokens, ..base.clone() };
            match scheduler.submit(Request { prompt: row.ids.clone(), options }) {
                Ok(id) => {
                    requests.insert(id, row);
                }
                Err(e) => {
                    let reason = format!("plan {name}: {}", crate::flags::translate(&e.to_string()));
                    eprintln!("skipped {}: {reason}", row.id);
                    skipped.push(Skipped { id: row.id.clone(), reason, kind: "bad" });
                    progress.advance(0);
                }
            }
        }
        while !scheduler.is_idle() {
            for event in scheduler.step().context("generating")? {
                let Event::Finished { request, result } = event else { continue };
                let Some(row) = requests.remove(&request) else { continue };
                match result {
                    Ok(completion) => {
                        let g = &completion.generation;
                        let record = record(row, name, &completion, tokenizer)?;
                        out.append(&row.key, name, &record)?;
                        summary.generated += 1;
                        summary.prompt_tokens += g.prompt_tokens;
                        summary.new_tokens += g.ids.len();
                        progress.advance(g.ids.len());
                        if let Some(ms) = args.pause_per_row_ms {
                            std::thread::sleep(Duration::from_millis(ms));
                        }
                    }
                    Err(e) => {
                        let reason = format!("plan {name}: {e}");
                        eprintln!("skipped {}: {reason}", row.id);
                        skipped.push(Skipped { id: row.id.clone(), reason, kind: "bad" });
                        progress.advance(0);
                    }
                }
            }
        }
        summary.preemptions += scheduler.stats().preemptions;
    }
    progress.end();
    summary.seconds = progress.started.elapsed().as_secs_f64();
    summary.written = out.written();
    out.write_run(&summary.json(&skipped, "complete"))?;
    let bad = skipped.iter().filter(|s| s.kind == "bad").count();
    eprintln!(
        "wrote {} generations ({} this run, {:.1} rows/s, {:.1} new tokens/s); {} rows too long, {} bad; {}",
        out.written(),
        summary.generated,
        summary.generated as f64 / summary.seconds.max(1e-9),
        summary.new_tokens as f64 / summary.seconds.max(1e-9),
        skipped.len() - bad,
        bad,
        args.output_dir.join(output::GENERATIONS).display()
    );
    Ok(())
}

/// One output line.
fn record(
    row: &Row,
    plan: &str,
    completion: &layerwise::generation::scheduler::Completion,
    tokenizer: &layerwise::Tokenizer,
) -> Result<Value> {
    let g = &completion.generation;
    let mut record = json!({
        "id": row.id,
        "plan": plan,
        "prompt": row.prompt,
        "prompt_tokens": g.prompt_tokens,
        "generated_text": tokenizer.decode(&g.ids)?,
        "generated_ids": g.ids,
        "reference": row.reference,
        "finish_reason": g.finish.name(),
        "new_tokens": g.ids.len(),
        "queued_s": completion.queued_s,
        "prefill_s": g.prefill_s,
        "decode_s": g.decode_s,
    });
    if g.sequences.len() > 1 {
        let texts = g.sequences.iter().map(|s| tokenizer.decode(s)).collect::<layerwise::Result<Vec<_>>>()?;
        record["generated_texts"] = json!(texts);
    }
    if let Value::Object(fields) = &mut record {
        fields.extend(row.kept.clone());
    }
    Ok(record)
}

/// `--plans`: names and plans. `contrast:U,L` takes the comma inside it.
fn parse_plans(args: &Args) -> Result<Vec<(String, PlanOptions)>> {
    let projection = crate::input::projection(args.lens, args.converted);
    let contrast = Contrast::Acd { alpha: args.alpha, min_candidates: args.min_candidates };
    let usage = "expected original, exit:L or contrast:U,L (e.g. original,exit:12,contrast:24,12)";
    let layer = |s: &str, whole: &str| -> Result<usize> {
        s.trim().parse().with_context(|| format!("--plans `{whole}`: `{s}` is not a layer; {usage}"))
    };
    let mut plans: Vec<(String, PlanOptions)> = Vec::new();
    let mut parts = args.plans.split(',').map(str::trim).filter(|p| !p.is_empty());
    while let Some(part) = parts.next() {
        let (name, plan) = if part == "original" {
            (part.to_string(), ExitPlan::Original)
        } else if let Some(l) = part.strip_prefix("exit:") {
            (part.to_string(), ExitPlan::Exit(layer(l, part)?))
        } else if let Some(upper) = part.strip_prefix("contrast:") {
            let lower = parts.next().with_context(|| format!("--plans `{part}`: no lower layer; {usage}"))?;
            let name = format!("{part},{lower}");
            let upper = if upper.trim() == "original" { Upper::Original } else { Upper::Layer(layer(upper, &name)?) };
            (name.clone(), ExitPlan::Contrast { upper, lower: layer(lower, &name)? })
        } else {
            bail!("--plans: `{part}`: {usage}");
        };
        if plans.iter().any(|(n, _)| *n == name) {
            bail!("--plans: `{name}` is listed twice");
        }
        plans.push((name, PlanOptions { plan, projection, contrast: contrast.clone() }));
    }
    if plans.is_empty() {
        bail!("--plans: no plan given; {usage}");
    }
    Ok(plans)
}

/// Counts for run.json.
#[derive(Default)]
struct Summary {
    configuration: Value,
    read: usize,
    ready: usize,
    plans: usize,
    resumed: usize,
    generated: usize,
    written: usize,
    prompt_tokens: usize,
    new_tokens: usize,
    preemptions: u64,
    seconds: f64,
}

impl Summary {
    fn json(&self, skipped: &[Skipped], status: &str) -> Value {
        let too_long: Vec<&Skipped> = skipped.iter().filter(|s| s.kind == "too_long").collect();
        let bad: Vec<&Skipped> = skipped.iter().filter(|s| s.kind == "bad").collect();
        let list = |s: &[&Skipped]| s.iter().map(|s| json!({"id": s.id, "reason": s.reason})).collect::<Vec<_>>();
        json!({
            "status": status,
            "configuration": self.configuration,
            "counts": {
                "rows_read": self.read,
                "rows_ready": self.ready,
                "rows_too_long": too_long.len(),
                "rows_bad": bad.len(),
                "plans": self.plans,
                "generations_written": self.written,
                "generations_before_this_run": self.resumed,
                "generations_this_run": self.generated,
            },
            "totals": {
                "seconds": self.seconds,
                "prompt_tokens": self.prompt_tokens,
                "new_tokens": self.new_tokens,
                "rows_per_s": self.generated as f64 / self.seconds.max(1e-9),
                "new_tokens_per_s": self.new_tokens as f64 / self.seconds.max(1e-9),
                "preemptions": self.preemptions,
            },
            "too_long": list(&too_long),
            "bad": list(&bad),
        })
    }
}

/// Rows done, tokens per second and the time left: a redrawn line on a terminal, a plain line every
/// few seconds otherwise.
struct Progress {
    total: usize,
    done: usize,
    tokens: usize,
    started: Instant,
    last: Instant,
    every: Duration,
    terminal: bool,
}

impl Progress {
    fn new(total: usize, every: f64) -> Self {
        let now = Instant::now();
        Progress {
            total,
            done: 0,
            tokens: 0,
            started: now,
            last: now,
            every: Duration::from_secs_f64(every.max(0.0)),
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn advance(&mut self, tokens: usize) {
        self.done += 1;
        self.tokens += tokens;
        if self.terminal {
            eprint!("\r\x1b[2K{}", self.line());
        } else if self.last.elapsed() >= self.every || self.done == self.total {
            eprintln!("{}", self.line());
            self.last = Instant::now();
        }
    }

    fn end(&self) {
        if self.terminal && self.done > 0 {
            eprintln!();
        }
    }

    fn line(&self) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta = elapsed / self.done.max(1) as f64 * (self.total - self.done.min(self.total)) as f64;
        format!(
            "rows {}/{} [{:>3.0}%] {:.1} rows/s {:.0} tok/s ETA {}",
            self.done,
            self.total,
            100.0 * self.done as f64 / self.total.max(1) as f64,
            self.done as f64 / elapsed.max(1e-9),
            self.tokens as f64 / elapsed.max(1e-9),
            crate::train::duration(eta)
        )
    }
}
