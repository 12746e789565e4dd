//! The rows of a `layerwise run`: records read from the data files, turned into prompts under the
//! window rules (run_gen.py's): `--max-window-size` keeps the last tokens of a long prompt, the
//! block size caps prompt + new tokens, and the reference, stored beside the output, must fit the
//! block too. Rows that cannot be used are set aside with their id and the reason.

use std::collections::HashSet;

use anyhow::{bail, Result};
use layerwise::io::records::Record;
use layerwise::Tokenizer;
use serde_json::{Map, Value};

/// Which columns hold what.
pub struct Columns {
    pub text: String,
    pub reference: Option<String>,
    pub id: Option<String>,
    pub keep: Vec<String>,
    /// Checked like the others; read through [`Windows::max_new_tokens_column`].
    pub max_new_tokens: Option<String>,
}

/// How prompts are cut and how many tokens each may generate.
pub struct Windows {
    /// Prompt and new tokens (and the reference) fit in this many positions.
    pub block_size: usize,
    /// A longer prompt keeps only its last this-many tokens.
    pub max_window_size: Option<usize>,
    /// New tokens per row; `None`: all the space the block leaves after the prompt (`auto`).
    pub max_new_tokens: Option<usize>,
    /// A column holding each row's own number of new tokens (over `max_new_tokens`).
    pub max_new_tokens_column: Option<String>,
}

/// A row ready to generate from.
pub struct Row {
    pub id: Value,
    /// The id as JSON text: the row's key in the output (with the plan's name).
    pub key: String,
    /// The prompt's text (the kept window's text when it was cut).
    pub prompt: String,
    pub ids: Vec<u32>,
    pub reference: Option<String>,
    pub kept: Map<String, Value>,
    pub max_new_tokens: usize,
}

/// A row left out, and why.
pub struct Skipped {
    pub id: Value,
    pub reason: String,
    /// `bad` (a missing or non-text value, a failed request) or `too_long` (does not fit the block).
    pub kind: &'static str,
}

/// Output fields a kept column may not shadow.
pub const RESERVED: [&str; 13] = [
    "id",
    "plan",
    "prompt",
    "prompt_tokens",
    "generated_text",
    "generated_ids",
    "generated_texts",
    "reference",
    "finish_reason",
    "new_tokens",
    "queued_s",
    "prefill_s",
    "decode_s",
];

/// Checks the columns against the records before any work: each named column must be in some
/// row (else it is a typo, named with the columns there are), kept columns must not shadow an
/// output field, and ids must be unique.
pub fn check(records: &[Record], columns: &Columns) -> Result<()> {
    if let Some(column) = columns.keep.iter().find(|c| RESERVED.contains(&c.as_str())) {
        bail!("--keep-columns `{column}`: an output field has this name; it cannot be kept as a column");
    }
    let mut named: Vec<(&str, &str)> = vec![("--text-column", &columns.text)];
    named.extend(columns.reference.as_deref().map(|c| ("--reference-column", c)));
    named.extend(columns.id.as_deref().map(|c| ("--id-column", c)));
    named.extend(columns.max_new_tokens.as_deref().map(|c| ("--max-new-tokens-column", c)));
    named.extend(columns.keep.iter().map(|c| ("--keep-columns", c.as_str())));
    for (flag, column) in named {
        if !records.iter().any(|r| r.contains_key(column)) {
            let mut present: Vec<&str> = records.iter().flat_map(|r| r.keys().map(String::as_str)).collect();
            present.sort_unstable();
            present.dedup();
            bail!("{flag} `{column}`: no row has this column (columns: {})", present.join(", "));
        }
    }
    if let Some(column) = &columns.id {
        let mut seen = HashSet::new();
        for (i, record) in records.iter().enumerate() {
            if let Some(id) = record.get(column).filter(|v| !v.is_null()) {
                if !seen.insert(id.to_string()) {
                    bail!("--id-column `{column}`: the id {id} appears twice (second time in row {i}); ids must be unique");
                }
            }
        }
    }
    Ok(())
}

/// The rows to generate from and the rows set aside.
pub fn prepare(
    records: Vec<Record>,
    columns: &Columns,
    windows: &Windows,
    tokenizer: &Tokenizer,
) -> Result<(Vec<Row>, Vec<Skipped>)> {
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    for (index, record) in records.into_iter().enumerate() {
        let id = match &columns.id {
            None => Value::from(index),
            Some(column) => match record.get(column) {
                Some(id @ (Value::String(_) | Value::Number(_))) => id.clone(),
                other => {
                    let what = if other.is_some() { "is not text or a number" } else { "is missing" };
                    let reason = format!("row {index}: its id (`{column}`) {what}");
                    skipped.push(Skipped { id: Value::from(format!("row {index}")), reason, kind: "bad" });
                    continue;
                }
            },
        };
        match row(&record, id.clone(), columns, windows, tokenizer)? {
            Ok(row) => rows.push(row),
            Err((reason, kind)) => skipped.push(Skipped { id, reason, kind }),
        }
    }
    Ok((rows, skipped))
}

type RowResult = std::result::Result<Row, (String, &'static str)>;

fn row(record: &Record, id: Value, columns: &Columns, windows: &Windows, tokenizer: &Tokenizer) -> Result<RowResult> {
    let text = |column: &str| match record.get(column) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Null) | None => Err((format!("`{column}` is missing"), "bad")),
        Some(other) => Err((format!("`{column}` is not text ({})", kind(other)), "bad")),
    };
    let prompt = match text(&columns.text) {
        Ok(prompt) => prompt,
        Err(e) => return Ok(Err(e)),
    };
    let reference = match columns.reference.as_deref().map(text).transpose() {
        Ok(reference) => reference,
        Err(e) => return Ok(Err(e)),
    };
    let mut ids = tokenizer.encode(&prompt)?;
    let mut prompt_text = prompt;
    if let Some(window) = windows.max_window_size {
        if ids.len() > window {
            ids.drain(..ids.len() - window);
            prompt_text = tokenizer.decode(&ids)?;
        }
    }
    if ids.is_empty() {
        return Ok(Err(("the prompt is empty (no tokens)".into(), "bad")));
    }
    let reference_tokens = match &reference {
        Some(r) => tokenizer.encode(r)?.len(),
        None => 0,
    };
    let block = windows.block_size;
    let own = match &windows.max_new_tokens_column {
        None => None,
        Some(column) => match record.get(column).and_then(|v| v.as_u64().or_else(|| v.as_str()?.trim().parse().ok())) {
            Some(n) => Some(n as usize),
            None => return Ok(Err((format!("`{column}` is not a number of tokens"), "bad"))),
        },
    };
    let (needed, max_new_tokens) = match own.or(windows.max_new_tokens) {
        Some(n) => (ids.len() + n.max(reference_tokens), n),
        None => (ids.len() + reference_tokens.max(1), block.saturating_sub(ids.len())),
    };
    if needed > block {
        let reason = format!(
            "{} prompt tokens, {reference_tokens} reference tokens and {} new tokens do not fit the block size of {block}",
            ids.len(),
            own.or(windows.max_new_tokens).map_or("at least 1".to_string(), |n| n.to_string())
        );
        return Ok(Err((reason, "too_long")));
    }
    let kept = columns.keep.iter().map(|c| (c.clone(), record.get(c).cloned().unwrap_or(Value::Null))).collect();
    Ok(Ok(Row { key: id.to_string(), id, prompt: prompt_text, ids, reference, kept, max_new_tokens }))
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "text",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
