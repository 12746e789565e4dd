//! `layerwise classify`: an encoder classifier (BERT's `BertForSequenceClassification`) over a file of
//! texts: the label and probabilities of each, and the accuracy when the file has labels.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use layerwise::backend::WeightFormat;
use layerwise::encoder::{Classification, EncoderInput, LoadedEncoder};
use layerwise::Backend;
use serde_json::{json, Value};

use crate::dataset::{read_rows, Columns};
use crate::input::Device;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A BERT classifier: a local checkpoint directory or a Hugging Face Hub id (e.g.
    /// bhadresh-savani/bert-base-uncased-emotion).
    #[arg(long, value_name = "SRC")]
    model: String,
    /// The texts: JSON Lines, CSV or Parquet (a column per field), a folder of them, or a plain text
    /// file with one text per line.
    #[arg(long, value_name = "FILE")]
    texts: PathBuf,
    /// The column holding the text.
    #[arg(long, value_name = "NAME", default_value = "text")]
    text_column: String,
    /// A column holding a second text: each row is classified as a pair (`[CLS] a [SEP] b [SEP]`).
    #[arg(long, value_name = "NAME")]
    pair_column: Option<String>,
    /// A column holding each row's true label (a name from the checkpoint's id2label, or its index):
    /// the accuracy is reported.
    #[arg(long, value_name = "NAME")]
    labels_column: Option<String>,
    /// Texts per forward pass.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    batch_size: u32,
    /// Weight matrices in this dtype (f32, f16, bf16, q8). Default: as stored.
    #[arg(long, value_name = "D", value_parser = crate::input::parse_dtype)]
    dtype: Option<WeightFormat>,
    /// Where the ops run: cpu, reference, or auto (the CPU: encoders' bidirectional attention has no
    /// CUDA kernel yet, so cuda is refused).
    #[arg(long, value_name = "DEVICE", default_value = "cpu", value_parser = crate::input::parse_device)]
    device: Device,
    /// Print a JSON list with one object per text (`label`, `probs` in id2label order, and
    /// `expected` with --labels-column) instead of one line per text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    match args.device {
        Device::Cpu | Device::Auto => run_on(&args, layerwise::Cpu { weights: args.dtype }),
        Device::Reference => run_on(&args, layerwise::Reference { weights: args.dtype }),
        Device::Cuda(_) => {
            bail!("--device cuda: encoders run on the CPU only (bidirectional attention has no CUDA kernel yet)")
        }
    }
}

fn run_on<B: Backend>(args: &Args, backend: B) -> Result<()> {
    let loaded = layerwise::encoder::load_on(&args.model, backend)
        .with_context(|| format!("cannot load model `{}`", args.model))?;
    let labels = loaded.encoder.labels().to_vec();
    if labels.is_empty() {
        bail!("--model {}: the checkpoint has no classification head (classifier.weight)", args.model);
    }
    let columns =
        Columns { text: args.text_column.clone(), pair: args.pair_column.clone(), labels: args.labels_column.clone() };
    let rows = read_rows(&args.texts, &columns, &labels)?;
    let inputs: Vec<EncoderInput> = rows
        .iter()
        .enumerate()
        .map(|(i, row)| {
            loaded.encode(&row.text, row.pair.as_deref()).with_context(|| format!("--texts: row {}", i + 1))
        })
        .collect::<Result<_>>()?;
    let verdicts = classify_all(&loaded, &inputs, args.batch_size as usize)?;

    let scored: Vec<bool> =
        rows.iter().zip(&verdicts).filter_map(|(r, v)| r.expected.as_ref().map(|e| *e == v.label)).collect();
    if args.json {
        let list: Vec<Value> = rows
            .iter()
            .zip(&verdicts)
            .map(|(row, v)| {
                let mut item = json!({ "label": v.label, "probs": v.probs });
                if let Some(expected) = &row.expected {
                    item["expected"] = json!(expected);
                }
                item
            })
            .collect();
        crate::output::line(serde_json::to_string(&list)?)?;
    } else {
        for (row, v) in rows.iter().zip(&verdicts) {
            let shown: String = row.text.chars().take(60).collect();
            crate::output::line(format!("{}\t{:.4}\t{shown}", v.label, v.probs[v.index]))?;
        }
    }
    if !scored.is_empty() {
        let correct = scored.iter().filter(|&&c| c).count();
        eprintln!(
            "accuracy: {:.4} ({correct} of {} correct; labels {})",
            correct as f64 / scored.len() as f64,
            scored.len(),
            labels.join(", ")
        );
    }
    Ok(())
}

/// Every input's verdict, `batch` inputs per forward pass.
fn classify_all<B: Backend>(
    loaded: &LoadedEncoder<B>,
    inputs: &[EncoderInput],
    batch: usize,
) -> Result<Vec<Classification>> {
    let mut verdicts = Vec::with_capacity(inputs.len());
    for chunk in inputs.chunks(batch) {
        verdicts.extend(loaded.encoder.classify(chunk)?);
    }
    Ok(verdicts)
}
