//! Text datasets as lists of documents: a JSON Lines file (one object per line, one string column
//! the document), a Parquet file (one string column, as Hugging Face datasets store them), or any
//! other file as one document. Used by evaluation and training alike.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// The documents of `path`: the `column` field of each line of a `.jsonl` file, the `column`
/// column of a `.parquet` file, else the whole file. Blank lines are skipped; a file with no text is
/// an error, as is a line that is not a JSON object with a string `column`, or a Parquet file
/// without a string column of that name.
pub fn read_documents(path: &Path, column: &str) -> Result<Vec<String>> {
    if path.extension().is_some_and(|e| e == "parquet") {
        return read_parquet(path, column);
    }
    let text = super::read_text(path).map_err(|e| Error::io(path, e))?;
    let bad = |line: usize, reason: String| Error::bad_file(path, format!("line {line}: {reason}"));
    let documents: Vec<String> = if path.extension().is_some_and(|e| e == "jsonl") {
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(n, line)| {
                let value: Value = serde_json::from_str(line).map_err(|e| bad(n + 1, format!("not JSON ({e})")))?;
                match value.get(column) {
                    Some(Value::String(s)) => Ok(s.clone()),
                    Some(_) => Err(bad(n + 1, format!("`{column}` is not a string"))),
                    None => Err(bad(n + 1, format!("no `{column}` field"))),
                }
            })
            .collect::<Result<_>>()?
    } else {
        vec![text]
    };
    if documents.iter().all(|d| d.trim().is_empty()) {
        return Err(Error::bad_file(path, "no documents (the file has no text)"));
    }
    Ok(documents)
}

/// The string column `column` of a Parquet file, row by row.
fn read_parquet(path: &Path, column: &str) -> Result<Vec<String>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    use parquet::schema::types::Type;
    let bad = |reason: String| Error::bad_file(path, reason);
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(|e| bad(format!("not a Parquet file ({e})")))?;
    let schema = reader.metadata().file_metadata().schema();
    let fields = schema.get_fields();
    let Some(field) = fields.iter().find(|f| f.name() == column) else {
        let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
        return Err(bad(format!("no column `{column}` (columns: {})", names.join(", "))));
    };
    let projection = Type::group_type_builder(schema.name())
        .with_fields(vec![field.clone()])
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let rows = reader.get_row_iter(Some(projection)).map_err(|e| bad(e.to_string()))?;
    let mut documents = Vec::new();
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| bad(format!("row {i}: {e}")))?;
        match row.get_column_iter().next().map(|(_, value)| value) {
            Some(Field::Str(text)) => documents.push(text.clone()),
            Some(Field::Null) => return Err(bad(format!("row {i}: `{column}` is null"))),
            _ => return Err(bad(format!("row {i}: `{column}` is not a string"))),
        }
    }
    if documents.iter().all(|d| d.trim().is_empty()) {
        return Err(bad("no documents (the column has no text)".into()));
    }
    Ok(documents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_name_the_line_and_column_they_lack() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, "{\"text\": \"a\"}\n\n{\"body\": \"b\"}\n").expect("write");
        let err = read_documents(&path, "text").expect_err("no text on line 3").to_string();
        assert!(err.contains("line 3: no `text` field"), "{err}");
        std::fs::write(&path, "{\"text\": \"a\"}\n{\"text\": \"b\"}\n").expect("write");
        assert_eq!(read_documents(&path, "text").expect("read"), ["a", "b"]);
        let empty = dir.path().join("e.txt");
        std::fs::write(&empty, " \n").expect("write");
        assert!(read_documents(&empty, "text").expect_err("empty").to_string().contains("no documents"));
    }
}
