//! `layerwise heads` on an encoder classifier and a labelled dataset, as the bertology exercise
//! (Michel et al. 2019) runs it: each head's attention entropy, its importance from the gradient
//! of the classification loss with respect to a head mask, their correlation, the masking search
//! (accuracy per step), the model view of the first row and, with `--prune`, the pruned checkpoint.

use anyhow::{bail, Context, Result};
use layerwise::analysis::classifier_heads::{attention_entropy, mask_search};
use layerwise::analysis::heads::prune_checkpoint_files;
use layerwise::encoder::{EncoderInput, EncoderRequest, LoadedEncoder};
use layerwise::training::bert::ClassifierNetwork;
use layerwise::{Backend, HeadMask};

use crate::dataset::{read_rows, Columns};
use crate::heads::{full_table_csv, output_dir, pruned_note, write_correlation, Args};
use crate::plot::{head_table_svg, line_plot_svg, model_view_html, Series};

pub fn run(args: &Args) -> Result<()> {
    if args.heads_per_step != 1 {
        bail!("--heads-per-step: a classifier's masking search masks one head per step");
    }
    let Some(labels_column) = args.labels_column.clone() else {
        bail!("--labels-column: a classifier's importance and masking search need each row's true label")
    };
    let columns =
        Columns { text: args.text_column.clone(), pair: args.pair_column.clone(), labels: Some(labels_column) };
    crate::with_encoder!(args.model, loaded => run_on(args, &columns, loaded))
}

fn run_on<B: Backend>(args: &Args, columns: &Columns, loaded: LoadedEncoder<B>) -> Result<()> {
    let names = loaded.encoder.labels().to_vec();
    if names.is_empty() {
        bail!("--model {}: the checkpoint has no classification head (classifier.weight)", args.model.source());
    }
    let mut rows = read_rows(&args.texts, columns, &names)?;
    rows.truncate(args.max_rows.map_or(usize::MAX, |n| n as usize));
    let mut inputs = Vec::with_capacity(rows.len());
    let mut labels = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        inputs.push(loaded.encode(&row.text, row.pair.as_deref()).with_context(|| format!("--texts: row {}", i + 1))?);
        let expected = row.expected.as_ref().context("--labels-column: a row without a label")?;
        labels.push(names.iter().position(|n| n == expected).context("a label outside id2label")?);
    }
    let spec = loaded.encoder.spec();
    let weights = layerwise::io::open_weights(&loaded.files.weights)?;
    let network = ClassifierNetwork::new(spec, &weights).context("--model")?;
    let threshold = args.threshold.unwrap_or(0.05);
    anyhow::ensure!(threshold <= 1.0, "--threshold: {threshold} is not a fraction of the accuracy (0..=1)");
    let write = output_dir(&args.out)?;

    let entropy = attention_entropy(&loaded.encoder, &inputs)?;
    write("entropy.json", &serde_json::to_vec_pretty(&serde_json::json!({"per_token": entropy}))?)?;
    write("entropy.csv", full_table_csv("entropy_per_token", &entropy).as_bytes())?;
    write("entropy.svg", head_table_svg("Attention entropy per token (nats)", &entropy).as_bytes())?;

    let gradient = network.head_mask_gradient(&inputs, &labels, &HeadMask::ones(spec.num_layers, spec.num_heads))?;
    let importance = gradient.importance();
    let json = serde_json::json!({"loss": gradient.loss, "tokens": gradient.tokens, "gradient": gradient.gradient,
        "importance": importance});
    write("importance.json", &serde_json::to_vec_pretty(&json)?)?;
    write("importance.csv", full_table_csv("importance", &importance).as_bytes())?;
    write(
        "importance.svg",
        head_table_svg("Head importance (|d loss / d mask|, per layer L2)", &importance).as_bytes(),
    )?;
    let coefficient = write_correlation(&write, &entropy, &importance, "importance (|d loss / d mask|, per layer L2)")?;

    let search = mask_search(&network, &inputs, &labels, threshold)?;
    let floor = search.base_accuracy * (1.0 - threshold);
    let curve = Series { name: "accuracy".into(), points: search.curve.iter().map(|&(n, a)| (n as f64, a)).collect() };
    let title = format!("Masking the least important heads ({} masked within the threshold)", search.order.len());
    write(
        "pruning.svg",
        line_plot_svg(&title, "heads masked", "accuracy", &[curve], Some((floor, "threshold"))).as_bytes(),
    )?;
    let report = if args.prune {
        Some(prune_checkpoint_files(spec, &loaded.files, &search.mask, &args.out.join("pruned")).context("--prune")?)
    } else {
        None
    };
    let summary = serde_json::json!({"threshold": threshold, "search": search, "pruned": report});
    write("pruning.json", &serde_json::to_vec_pretty(&summary)?)?;
    write_model_view(&write, &loaded, &inputs[0])?;
    eprintln!(
        "heads: {} rows; accuracy {:.4}; entropy-importance r {}; {} of {} heads masked within -{}%{}; wrote {}",
        inputs.len(),
        search.base_accuracy,
        coefficient.map_or("n/a".to_string(), |r| format!("{r:.4}")),
        search.order.len(),
        spec.num_layers * spec.num_heads,
        threshold * 100.0,
        pruned_note(report.as_ref()),
        args.out.display()
    );
    Ok(())
}

/// model_view.html: every layer's and head's attention on `input`, the pair's segments marked.
fn write_model_view<B: Backend>(
    write: &dyn Fn(&str, &[u8]) -> Result<()>,
    loaded: &LoadedEncoder<B>,
    input: &EncoderInput,
) -> Result<()> {
    let output = loaded
        .encoder
        .forward(std::slice::from_ref(input), &EncoderRequest { attentions: true, ..Default::default() })?;
    let attentions = output.into_iter().next().map(|o| o.attentions).unwrap_or_default();
    write(
        "model_view.html",
        model_view_html(
            &token_labels(loaded, input),
            &attentions.into_iter().enumerate().collect(),
            sentence_b_start(input),
        )
        .as_bytes(),
    )
}

/// Each token's vocabulary string (`[CLS]`, `##ing`), or `#id`.
pub fn token_labels<B: Backend>(loaded: &LoadedEncoder<B>, input: &EncoderInput) -> Vec<String> {
    input
        .ids
        .iter()
        .map(|&id| loaded.tokenizer.as_ref().and_then(|t| t.token(id)).unwrap_or_else(|| format!("#{id}")))
        .collect()
}

/// Where a pair's second segment starts (its first token of type 1).
pub fn sentence_b_start(input: &EncoderInput) -> Option<usize> {
    input.types.iter().position(|&t| t == 1)
}
