//! `layerwise heads`: attention entropy, head importance (by ablation, and by the gradient of the
//! loss with respect to a head mask), their correlation, the pruning curve, the model view and (with
//! `--prune`) a pruned checkpoint, over a set of texts. An encoder classifier with a labelled dataset
//! goes to [`crate::heads_classifier`].

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use layerwise::analysis::heads::{
    check_prunable, entropy_importance, entropy_per_token, head_entropy, head_importance, prune_checkpoint,
    prune_search,
};
use layerwise::training::{Head, HeadMaskGradient, Network};
use layerwise::{Backend, HeadMask, InspectRequest, LoadedModel};

use crate::lens::token_label;
use crate::plot::{
    head_table_svg, line_plot_svg, model_view_html, scatter_html, scatter_svg, small_multiples_svg, Point, Series,
};

use crate::input::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The texts. A language model: a .json file holding a list of strings or of token-id lists, or
    /// any other file with one text per line (strings need the checkpoint's tokenizer). An encoder
    /// classifier: JSON Lines, CSV or Parquet with text and label columns (--text-column,
    /// --labels-column).
    #[arg(long, value_name = "FILE")]
    pub texts: PathBuf,
    /// Where the search stops. A language model: when the loss exceeds (1 + X) times the loss with
    /// every head (default 0.1). A classifier: when the accuracy falls below (1 - X) times the
    /// accuracy with every head (default 0.05).
    #[arg(long, value_name = "X")]
    pub threshold: Option<f64>,
    /// Heads masked per step of a language model's pruning search (importance is recomputed after
    /// each step); a classifier's search masks one head per step.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub heads_per_step: usize,
    /// Also write the pruned checkpoint (GPT-2, BERT) to DIR/pruned, loadable by layerwise and
    /// transformers.
    #[arg(long)]
    pub prune: bool,
    /// Use only the first N texts or rows (the search runs a forward and backward pass over all of
    /// them at every step).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_rows: Option<u64>,
    /// A classifier's dataset: the column holding the text.
    #[arg(long, value_name = "NAME", default_value = "text")]
    pub text_column: String,
    /// A classifier's dataset: a column holding a second text (pairs).
    #[arg(long, value_name = "NAME")]
    pub pair_column: Option<String>,
    /// A classifier's dataset: the column holding each row's true label (an id2label name or index).
    #[arg(long, value_name = "NAME")]
    pub labels_column: Option<String>,
    /// Output directory: entropy.{json,csv,svg}, importance.{json,csv}, importance_gradient.{json,csv},
    /// correlation.{json,svg,html}, pruning.{json,svg}, model_view.html.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(x) = args.threshold {
        anyhow::ensure!(x.is_finite() && x >= 0.0, "--threshold: {x} must be a non-negative number");
    }
    if args.model.is_encoder() {
        return crate::heads_classifier::run(&args);
    }
    for (flag, given) in
        [("--pair-column", args.pair_column.is_some()), ("--labels-column", args.labels_column.is_some())]
    {
        anyhow::ensure!(
            !given,
            "{flag}: labelled datasets are for encoder classifiers; `{}` is a language model",
            args.model.source()
        );
    }
    crate::with_backend!(args.model, loaded => run_on(&args, loaded))
}

/// Creates `--out` and returns a writer of files into it.
pub fn output_dir(out: &Path) -> Result<impl Fn(&str, &[u8]) -> Result<()> + '_> {
    std::fs::create_dir_all(out).with_context(|| format!("--out {}: cannot create", out.display()))?;
    Ok(move |name: &str, bytes: &[u8]| -> Result<()> {
        let path = out.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("--out: cannot write {}", path.display()))
    })
}

/// correlation.{json,svg,html}: each head's entropy against its importance.
pub fn write_correlation(
    write: &dyn Fn(&str, &[u8]) -> Result<()>,
    entropy: &[Vec<f32>],
    importance: &[Vec<f32>],
    importance_label: &str,
) -> Result<Option<f64>> {
    let correlation = entropy_importance(entropy, importance);
    let subtitle = match correlation.coefficient {
        Some(r) => format!("Pearson r = {r:.4} over {} heads", correlation.points.len()),
        None => "Pearson r undefined (a constant side)".to_string(),
    };
    let points: Vec<Point> = correlation
        .points
        .iter()
        .map(|&(layer, head, x, y)| Point { x, y, label: format!("layer {layer} head {head}") })
        .collect();
    let title = "Attention entropy against head importance";
    let x_label = "entropy per token (nats)";
    write("correlation.json", &serde_json::to_vec_pretty(&correlation)?)?;
    write("correlation.svg", scatter_svg(title, &subtitle, x_label, importance_label, &points).as_bytes())?;
    write("correlation.html", scatter_html(title, &subtitle, x_label, importance_label, &points).as_bytes())?;
    Ok(correlation.coefficient)
}

/// The summary line's words on a pruned checkpoint.
pub fn pruned_note(report: Option<&layerwise::analysis::heads::PruneReport>) -> String {
    report.map_or(String::new(), |r| {
        format!(
            "; pruned checkpoint {} ({} -> {} parameters)",
            r.directory.display(),
            r.parameters_before,
            r.parameters_after
        )
    })
}

/// `layer,head,<value>` rows of a full table.
pub fn full_table_csv(value: &str, table: &[Vec<f32>]) -> String {
    table_csv(value, &table.iter().map(|r| r.iter().map(|&v| Some(v as f64)).collect()).collect::<Vec<_>>())
}

fn run_on<B: Backend>(args: &Args, loaded: LoadedModel<B>) -> Result<()> {
    let mut texts = read_texts(&args.texts, &loaded)?;
    texts.truncate(args.max_rows.map_or(usize::MAX, |n| n as usize));
    let model = &loaded.model;
    let spec = model.spec();
    if args.prune {
        check_prunable(spec).context("--prune")?;
    }
    let threshold = args.threshold.unwrap_or(0.1);
    let write = output_dir(&args.out)?;

    // Entropy: per text, and the table of summed entropy averaged over the texts.
    let entropies = texts.iter().map(|ids| head_entropy(model, ids)).collect::<layerwise::Result<Vec<_>>>()?;
    let mut mean = vec![vec![0.0f64; spec.num_heads]; spec.num_layers];
    for e in &entropies {
        for (row, totals) in mean.iter_mut().zip(&e.total) {
            row.iter_mut().zip(totals).for_each(|(m, &t)| *m += t as f64 / texts.len() as f64);
        }
    }
    let per_token = entropy_per_token(&entropies, texts.iter().map(Vec::len).sum());
    write(
        "entropy.json",
        &serde_json::to_vec(&serde_json::json!({"mean_total": mean, "per_token": per_token, "texts": entropies}))?,
    )?;
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

    let coefficient = match gradient_importance(args, &loaded, &texts)? {
        Some(gradient) => {
            let importance = gradient.importance();
            let json = serde_json::json!({"loss": gradient.loss, "tokens": gradient.tokens,
                "gradient": gradient.gradient, "importance": importance});
            write("importance_gradient.json", &serde_json::to_vec_pretty(&json)?)?;
            write("importance_gradient.csv", full_table_csv("importance", &importance).as_bytes())?;
            let title = "Head importance (|d loss / d mask|, per layer L2)";
            write("importance_gradient.svg", head_table_svg(title, &importance).as_bytes())?;
            write_correlation(&write, &per_token, &importance, "importance (|d loss / d mask|, per layer L2)")?
        }
        None => None,
    };
    write_model_view(&write, &loaded, &texts[0])?;

    let search = prune_search(model, &texts, threshold, args.heads_per_step)?;
    let limit = search.base_loss * (1.0 + threshold);
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
    let summary = serde_json::json!({"threshold": threshold, "search": search, "pruned": report});
    write("pruning.json", &serde_json::to_vec_pretty(&summary)?)?;
    eprintln!(
        "heads: {} texts; loss {:.4}; entropy-importance r {}; {} of {} heads masked within +{}%{}; wrote {}",
        texts.len(),
        search.base_loss,
        coefficient.map_or("n/a".to_string(), |r| format!("{r:.4}")),
        search.masked_heads(),
        (0..spec.num_layers).map(|l| spec.kept_heads(l).len()).sum::<usize>(),
        threshold * 100.0,
        pruned_note(report.as_ref()),
        args.out.display()
    );
    Ok(())
}

/// The gradient of the LM loss with respect to a head mask of ones (the checkpoint's weights in f32
/// on the host); None, with a note, where it does not apply.
fn gradient_importance<B: Backend>(
    args: &Args,
    loaded: &LoadedModel<B>,
    texts: &[Vec<u32>],
) -> Result<Option<HeadMaskGradient>> {
    let spec = loaded.model.spec();
    let skip = if args.model.adapter.is_some() {
        Some("--adapter is merged into the inference weights only")
    } else if !spec.pruned_heads.is_empty() {
        Some("the checkpoint is already pruned")
    } else {
        None
    };
    if let Some(why) = skip {
        eprintln!("heads: no gradient importance ({why}); ablation importance only");
        return Ok(None);
    }
    let weights = layerwise::io::open_weights(&loaded.files.weights)?;
    let network = Network::new(spec, Some(&weights), 0, false)?;
    let scored: Vec<Vec<u32>> = texts.iter().filter(|t| t.len() >= 2).cloned().collect();
    let ones = HeadMask::ones(spec.num_layers, spec.num_heads);
    Ok(Some(network.head_mask_gradient(&scored, Head::Original, &ones)?))
}

/// model_view.html: every layer's and head's attention on `ids`.
fn write_model_view<B: Backend>(
    write: &dyn Fn(&str, &[u8]) -> Result<()>,
    loaded: &LoadedModel<B>,
    ids: &[u32],
) -> Result<()> {
    let n = loaded.model.spec().num_layers;
    let seen = loaded.model.inspect(ids, &InspectRequest { attentions: (0..n).collect(), ..Default::default() })?;
    let label = token_label(loaded);
    let tokens: Vec<String> = ids.iter().map(|&id| label(id)).collect();
    write("model_view.html", model_view_html(&tokens, &seen.attentions, None).as_bytes())
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
pub fn table_csv(value: &str, table: &[Vec<Option<f64>>]) -> String {
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
