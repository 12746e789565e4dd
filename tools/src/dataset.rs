//! Labelled text datasets for the encoder commands (`classify`, `heads` on a classifier): rows of
//! a text, an optional second text (a pair) and an optional true label, from JSON Lines, CSV,
//! Parquet (named columns) or a plain text file (one text per line).

use std::path::Path;

use anyhow::{bail, Context, Result};
use layerwise::io::records::{data_files, read_records, Record};
use serde_json::Value;

/// The columns to read.
pub struct Columns {
    pub text: String,
    pub pair: Option<String>,
    pub labels: Option<String>,
}

/// One row of the dataset.
pub struct Row {
    pub text: String,
    pub pair: Option<String>,
    /// The true label's name (from id2label).
    pub expected: Option<String>,
}

/// The rows of `--texts`: records with the named columns, or lines of a plain text file.
pub fn read_rows(path: &Path, columns: &Columns, labels: &[String]) -> Result<Vec<Row>> {
    let plain = path.is_file() && path.extension().is_none_or(|e| e == "txt");
    let rows: Vec<Row> = if plain {
        if columns.pair.is_some() || columns.labels.is_some() {
            bail!("--texts {}: a plain text file has no columns (use JSON Lines, CSV or Parquet)", path.display());
        }
        let text = std::fs::read_to_string(path).with_context(|| format!("--texts {}", path.display()))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| Row { text: l.to_string(), pair: None, expected: None })
            .collect()
    } else {
        let mut rows = Vec::new();
        for file in data_files(path, None)? {
            for (i, record) in read_records(&file)?.iter().enumerate() {
                let at = || format!("--texts {} row {}", file.display(), i + 1);
                rows.push(Row {
                    text: column(record, &columns.text, "--text-column").with_context(at)?,
                    pair: columns
                        .pair
                        .as_ref()
                        .map(|c| column(record, c, "--pair-column"))
                        .transpose()
                        .with_context(at)?,
                    expected: columns.labels.as_ref().map(|c| label(record, c, labels)).transpose().with_context(at)?,
                });
            }
        }
        rows
    };
    if rows.is_empty() {
        bail!("--texts {}: no texts", path.display());
    }
    Ok(rows)
}

/// A text column's value.
fn column(record: &Record, name: &str, flag: &str) -> Result<String> {
    match record.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => bail!("{flag} {name}: expected text, found {other}"),
        None => {
            bail!("{flag} {name}: no such column (columns: {})", record.keys().cloned().collect::<Vec<_>>().join(", "))
        }
    }
}

/// A label column's value as a label name: a name from `labels`, or an index into them.
fn label(record: &Record, name: &str, labels: &[String]) -> Result<String> {
    let value = record.get(name).with_context(|| format!("--labels-column {name}: no such column"))?;
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => bail!("--labels-column {name}: expected a label name or index, found {other}"),
    };
    if labels.contains(&text) {
        return Ok(text);
    }
    match text.parse::<usize>() {
        Ok(index) if index < labels.len() => Ok(labels[index].clone()),
        _ => bail!(
            "--labels-column {name}: `{text}` is neither a label ({}) nor an index below {}",
            labels.join(", "),
            labels.len()
        ),
    }
}
