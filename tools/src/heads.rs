//! `layerwise heads`: attention entropy, head importance, the pruning curve and (with `--prune`) a
//! pruned checkpoint, over a set of texts.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use layerwise::analysis::heads::{check_prunable, head_entropy, head_importance, prune_checkpoint, prune_search};
use layerwise::{Backend, LoadedModel};

use crate::plot::{line_plot_svg, small_multiples_svg, Series};

use crate::input::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The texts: a .json file holding a list of strings or of token-id lists, or any other file
    /// with one text per line (strings need the checkpoint's tokenizer).
    #[arg(long, value_name = "FILE")]
    texts: PathBuf,
    /// Stop masking heads when the language-modeling loss exceeds (1 + X) times the loss with
    /// every head.
    #[arg(long, default_value_t = 0.1, value_name = "X")]
    threshold: f64,
    /// Heads masked per step of the pruning search (importance is recomputed after each step).
    #[arg(long, default_value_t = 1, value_name = "N")]
    heads_per_step: usize,
    /// Also write the pruned checkpoint (GPT-2) to DIR/pruned, loadable by layerwise and transformers.
    #[arg(long)]
    prune: bool,
    /// Output directory: entropy.{json,csv,svg}, importance.{json,csv}, pruning.{json,svg}.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    crate::with_backend!(args.model, loaded => run_on(&args, loaded))
}

fn run_on<B: Backend>(args: &Args, loaded: LoadedModel<B>) -> Result<()> {
    let texts = read_texts(&args.texts, &loaded)?;
    let model = &loaded.model;
    let spec = model.spec();
    if args.prune {
        check_prunable(spec).context("--prune")?;
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("--out {}: cannot create", args.out.display()))?;
    let write = |name: &str, bytes: &[u8]| -> Result<()> {
        let path = args.out.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("--out: cannot write {}", path.display()))
    };

    // Entropy: per text, and the table of summed entropy averaged over the texts.
    let entropies = texts.iter().map(|ids| head_entropy(model, ids)).collect::<layerwise::Result<Vec<_>>>()?;
    let mut mean = vec![vec![0.0f64; spec.num_heads]; spec.num_layers];
    for e in &entropies {
        for (row, totals) in mean.iter_mut().zip(&e.total) {
            row.iter_mut().zip(totals).for_each(|(m, &t)| *m += t as f64 / texts.len() as f64);
        }
    }
    write("entropy.json", &serde_json::to_vec(&serde_json::json!({"mean_total": mean, "texts": entropies}))?)?;
    write(
        "entropy.csv",
        table_csv(
            "entropy_summed_over_tokens",
            &mean.iter().map(|r| r.iter().map(|&v| Some(v)).collect()).collect::<Vec<_>>(),
        )
        .as_bytes(),
    )?;
    let panels: Vec<(String, Vec<Series>)> = entropies[0]
        .per_token
        .iter()
        .enumerate()
        .map(|(layer, heads)| {
            let series = heads
                .iter()
                .enumerate()
                .filter(|(_, e)| !e.is_empty())
                .map(|(head, e)| Series {
                    name: format!("head {head}"),
                    points: e.iter().enumerate().map(|(q, &v)| (q as f64, v as f64)).collect(),
                })
                .collect();
            (format!("layer {layer}"), series)
        })
        .collect();
    let plot =
        small_multiples_svg("Attention entropy per head (first text)", "query position", "entropy (nats)", &panels, 4);
    write("entropy.svg", plot.as_bytes())?;

    let importance = head_importance(model, &texts, None)?;
    write("importance.json", &serde_json::to_vec(&importance)?)?;
    write("importance.csv", table_csv("loss_increase", &importance.increase).as_bytes())?;

    let search = prune_search(model, &texts, args.threshold, args.heads_per_step)?;
    let limit = search.base_loss * (1.0 + args.threshold);
    let curve = Series { name: "loss".into(), points: search.curve.iter().map(|&(n, l)| (n as f64, l)).collect() };
    let title = format!("Masking the least important heads ({} masked within the threshold)", search.masked_heads());
    write(
        "pruning.svg",
        line_plot_svg(&title, "heads masked", "LM loss", &[curve], Some((limit, "threshold"))).as_bytes(),
    )?;
    let report = if args.prune {
        Some(prune_checkpoint(model, &loaded.files, &search.mask, &args.out.join("pruned")).context("--prune")?)
    } else {
        None
    };
    let summary = serde_json::json!({"threshold": args.threshold, "search": search, "pruned": report});
    write("pruning.json", &serde_json::to_vec_pretty(&summary)?)?;
    eprintln!(
        "heads: {} texts; loss {:.4}; {} of {} heads masked within +{}%{}; wrote {}",
        texts.len(),
        search.base_loss,
        search.masked_heads(),
        (0..spec.num_layers).map(|l| spec.kept_heads(l).len()).sum::<usize>(),
        args.threshold * 100.0,
        report.map_or(String::new(), |r| format!(
            "; pruned checkpoint {} ({} -> {} parameters)",
            r.directory.display(),
            r.parameters_before,
            r.parameters_after
        )),
        args.out.display()
    );
    Ok(())
}

fn read_texts<B: Backend>(path: &Path, loaded: &LoadedModel<B>) -> Result<Vec<Vec<u32>>> {
    let text = layerwise::io::read_text(path).with_context(|| format!("--texts {}: cannot read", path.display()))?;
    let what = || format!("--texts {}", path.display());
    let texts: Vec<Vec<u32>> = if path.extension().is_some_and(|e| e == "json") {
        let items: Vec<serde_json::Value> =
            serde_json::from_str(&text).with_context(|| format!("{}: expected a JSON list", what()))?;
        items
            .iter()
            .map(|item| match item {
                serde_json::Value::String(s) => Ok(loaded.encode(s)?),
                serde_json::Value::Array(ids) => ids
                    .iter()
                    .map(|id| id.as_u64().map(|id| id as u32).context("a token id"))
                    .collect::<Result<Vec<u32>>>(),
                other => bail!("{other} is neither a string nor a list of token ids"),
            })
            .collect::<Result<_>>()
            .with_context(what)?
    } else {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| loaded.encode(l))
            .collect::<layerwise::Result<_>>()
            .with_context(what)?
    };
    for (i, ids) in texts.iter().enumerate() {
        loaded.model.check_prompt(ids).with_context(|| format!("{}: text {i}", what()))?;
    }
    if !texts.iter().any(|t| t.len() >= 2) {
        bail!("{}: needs at least one text of two or more tokens", what());
    }
    Ok(texts)
}

/// `layer,head,<value>` rows; heads without a value (pruned, masked) are left out.
fn table_csv(value: &str, table: &[Vec<Option<f64>>]) -> String {
    let mut csv = format!("layer,head,{value}\n");
    for (layer, heads) in table.iter().enumerate() {
        for (head, v) in heads.iter().enumerate() {
            if let Some(v) = v {
                let _ = writeln!(csv, "{layer},{head},{v}");
            }
        }
    }
    csv
}
