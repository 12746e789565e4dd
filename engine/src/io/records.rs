//! Datasets as records (rows of named columns): JSON Lines, CSV and Parquet files (Hugging Face
//! datasets' formats), or a folder of them, optionally one split of it. Batch generation reads its
//! prompts, references, ids and kept columns from these.
//!
//! ```
//! use layerwise::io::records::{data_files, read_records};
//!
//! # fn main() -> layerwise::Result<()> {
//! let dir = tempfile::tempdir().unwrap();
//! std::fs::create_dir(dir.path().join("data")).unwrap();
//! std::fs::write(dir.path().join("data/train.jsonl"), "{\"text\": \"a\", \"n\": 1}\n").unwrap();
//! std::fs::write(dir.path().join("data/test.csv"), "text,n\nb,2\nc,3\n").unwrap();
//! let files = data_files(dir.path(), Some("test"))?;
//! assert_eq!(files.len(), 1);
//! let rows = read_records(&files[0])?;
//! assert_eq!(rows[1]["text"], "c");
//! assert_eq!(rows[1]["n"], "3"); // CSV fields are text
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// One row: column name to value.
pub type Record = Map<String, Value>;

/// The extensions read as data.
const DATA_EXTENSIONS: [&str; 4] = ["jsonl", "json", "csv", "parquet"];

/// The data files of `path`: the file itself, or every data file under the folder (sorted by
/// path), only those of `split` when given: files named `split.*`, `split-*` or `split_*`, or
/// inside a folder named `split` (Hugging Face datasets' layouts). An error names the path when
/// nothing matches.
pub fn data_files(path: &Path, split: Option<&str>) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        check_extension(path)?;
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    collect(path, &mut files)?;
    files.sort();
    let all = files.len();
    if let Some(split) = split {
        files.retain(|f| in_split(path, f, split));
    }
    if files.is_empty() {
        let what = match split {
            Some(split) if all > 0 => format!("none of its {all} data files belongs to split `{split}`"),
            _ => format!("no data files ({}) in the folder", DATA_EXTENSIONS.join(", ")),
        };
        return Err(Error::MissingFile { path: path.to_path_buf(), what });
    }
    Ok(files)
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
        if kind.is_dir() {
            collect(&path, files)?;
        } else if path.extension().and_then(|e| e.to_str()).is_some_and(|e| DATA_EXTENSIONS.contains(&e)) {
            files.push(path);
        }
    }
    Ok(())
}

fn in_split(root: &Path, file: &Path, split: &str) -> bool {
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let named = stem == split || [format!("{split}-"), format!("{split}_")].iter().any(|p| stem.starts_with(p));
    let in_folder = file
        .strip_prefix(root)
        .ok()
        .and_then(Path::parent)
        .is_some_and(|dirs| dirs.components().any(|c| c.as_os_str() == split));
    named || in_folder
}

fn check_extension(path: &Path) -> Result<&'static str> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    DATA_EXTENSIONS.iter().find(|&&e| e == ext).copied().ok_or_else(|| {
        Error::bad_file(path, format!("not a data file: expected one of .{}", DATA_EXTENSIONS.join(", .")))
    })
}

/// Every row of one data file. JSON Lines (`.jsonl`, or `.json` holding one object per line): each
/// non-blank line an object; CSV: a header row, every field text; Parquet: every column, values as
/// JSON (numbers, text, booleans, null; other types as their text). A line that is not a JSON
/// object, a CSV row of the wrong width, or an unreadable Parquet file is an error naming the file
/// and line: the file is bad, not a row.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    match check_extension(path)? {
        "parquet" => read_parquet(path),
        "csv" => read_csv(path),
        _ => read_json_lines(path),
    }
}

/// The largest data file read whole: larger datasets come as several files (shards), which HF
/// datasets writes anyway.
pub const MAX_DATA_FILE_BYTES: u64 = 4 << 30;

fn read_json_lines(path: &Path) -> Result<Vec<Record>> {
    let bytes = super::read_bytes_at_most(path, MAX_DATA_FILE_BYTES, "split the dataset into shards")
        .map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| Error::bad_file(path, format!("not UTF-8 text ({e})")))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(record)) => Ok(record),
            Ok(_) => Err(Error::bad_file(path, format!("line {}: not a JSON object", n + 1))),
            Err(e) => Err(Error::bad_file(path, format!("line {}: not JSON ({e})", n + 1))),
        })
        .collect()
}

fn read_csv(path: &Path) -> Result<Vec<Record>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = csv::Reader::from_reader(file);
    let bad = |e: csv::Error| {
        let line = e.position().map(|p| format!("line {}: ", p.line())).unwrap_or_default();
        Error::bad_file(path, format!("{line}{e}"))
    };
    let header: Vec<String> = reader.headers().map_err(bad)?.iter().map(str::to_owned).collect();
    let mut records = Vec::new();
    for row in reader.records() {
        let row = row.map_err(bad)?;
        records.push(header.iter().cloned().zip(row.iter().map(|v| Value::String(v.to_owned()))).collect());
    }
    Ok(records)
}

fn read_parquet(path: &Path) -> Result<Vec<Record>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let bad = |reason: String| Error::bad_file(path, reason);
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(|e| bad(format!("not a Parquet file ({e})")))?;
    let rows = reader.get_row_iter(None).map_err(|e| bad(e.to_string()))?;
    let mut records = Vec::new();
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| bad(format!("row {i}: {e}")))?;
        records.push(row.get_column_iter().map(|(name, field)| (name.clone(), json(field))).collect());
    }
    Ok(records)
}

/// A Parquet value as JSON: scalars as themselves, anything else as its text.
fn json(field: &parquet::record::Field) -> Value {
    use parquet::record::Field;
    match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(v) => (*v).into(),
        Field::Short(v) => (*v).into(),
        Field::Int(v) => (*v).into(),
        Field::Long(v) => (*v).into(),
        Field::UByte(v) => (*v).into(),
        Field::UShort(v) => (*v).into(),
        Field::UInt(v) => (*v).into(),
        Field::ULong(v) => (*v).into(),
        Field::Float(v) => serde_json::Number::from_f64(*v as f64).map_or(Value::Null, Value::Number),
        Field::Double(v) => serde_json::Number::from_f64(*v).map_or(Value::Null, Value::Number),
        Field::Str(s) => Value::String(s.clone()),
        other => Value::String(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_name_the_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let jsonl = dir.path().join("d.jsonl");
        std::fs::write(&jsonl, "{\"text\": \"a\"}\n[1]\n").expect("write");
        let err = read_records(&jsonl).expect_err("an array").to_string();
        assert!(err.contains("d.jsonl") && err.contains("line 2: not a JSON object"), "{err}");
        let csv = dir.path().join("d.csv");
        std::fs::write(&csv, "text,id\na,1\nb\n").expect("write");
        let err = read_records(&csv).expect_err("short row").to_string();
        assert!(err.contains("d.csv") && err.contains("line 3"), "{err}");
        let other = dir.path().join("d.txt");
        std::fs::write(&other, "x").expect("write");
        assert!(read_records(&other).expect_err("txt").to_string().contains("not a data file"));
        assert!(data_files(dir.path(), Some("train")).expect_err("no split").to_string().contains("split `train`"));
    }
}
