//! The output directory of a `layerwise run`: `generations.jsonl`, one line per (row, plan),
//! appended and flushed as each finishes, and `run.json`, the configuration and the counts,
//! replaced atomically. Re-running the same command after a crash (even `kill -9`) resumes: a
//! last line cut short is dropped, the finished (row, plan) pairs are skipped, so no row is lost or
//! written twice. A directory holding another configuration's run is refused unless
//! `--overwrite-output-dir`.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub const GENERATIONS: &str = "generations.jsonl";
pub const RUN: &str = "run.json";

/// An open output directory.
pub struct OutputDir {
    dir: PathBuf,
    generations: File,
    /// (row key, plan) pairs already written.
    done: HashSet<(String, String)>,
    /// Lines that were there when the run started.
    pub resumed: usize,
}

impl OutputDir {
    /// Opens `dir` for a run of `configuration`: fresh, resumed, or (with `overwrite`) emptied of a
    /// previous run's two files.
    pub fn open(dir: &Path, configuration: &Value, overwrite: bool) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("--output-dir {}", dir.display()))?;
        let run = dir.join(RUN);
        let generations = dir.join(GENERATIONS);
        if overwrite {
            for path in [&run, &generations] {
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
                }
            }
        } else if run.exists() {
            let text = std::fs::read_to_string(&run).with_context(|| format!("reading {}", run.display()))?;
            let previous: Value =
                serde_json::from_str(&text).with_context(|| format!("{}: not JSON", run.display()))?;
            if let Some(field) = difference(&previous["configuration"], configuration) {
                bail!(
                    "--output-dir {}: holds a run with another configuration (`{field}` differs); run the same command \
                     to resume it, or pass --overwrite-output-dir to replace it",
                    dir.display()
                );
            }
        } else if std::fs::read_dir(dir).with_context(|| format!("--output-dir {}", dir.display()))?.next().is_some() {
            bail!(
                "--output-dir {}: exists and is not empty (no {RUN} of a run to resume); pass --overwrite-output-dir to \
                 write there anyway",
                dir.display()
            );
        }
        let (done, resumed) = read_done(&generations)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&generations)
            .with_context(|| format!("opening {}", generations.display()))?;
        Ok(OutputDir { dir: dir.to_path_buf(), generations: file, done, resumed })
    }

    /// Whether the row with `key` was already generated under `plan`.
    pub fn is_done(&self, key: &str, plan: &str) -> bool {
        self.done.contains(&(key.to_owned(), plan.to_owned()))
    }

    /// Appends one generation (one line, one write, flushed).
    pub fn append(&mut self, key: &str, plan: &str, record: &Value) -> Result<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        self.generations
            .write_all(&line)
            .and_then(|()| self.generations.flush())
            .with_context(|| format!("writing {}", self.dir.join(GENERATIONS).display()))?;
        self.done.insert((key.to_owned(), plan.to_owned()));
        Ok(())
    }

    /// Generations in the file.
    pub fn written(&self) -> usize {
        self.done.len()
    }

    /// Replaces run.json (written to a temporary file, then renamed over it).
    pub fn write_run(&self, run: &Value) -> Result<()> {
        let path = self.dir.join(RUN);
        let temporary = self.dir.join(format!(".{RUN}.tmp"));
        std::fs::write(&temporary, serde_json::to_string_pretty(run)? + "\n")
            .and_then(|()| std::fs::rename(&temporary, &path))
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// The (row, plan) pairs of an existing generations file, after cutting a last line that a crash
/// left unfinished.
fn read_done(path: &Path) -> Result<(HashSet<(String, String)>, usize)> {
    let mut done = HashSet::new();
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((done, 0)),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if complete < bytes.len() {
        let file = OpenOptions::new().write(true).open(path).with_context(|| format!("opening {}", path.display()))?;
        file.set_len(complete as u64)
            .with_context(|| format!("cutting the unfinished last line of {}", path.display()))?;
    }
    let mut lines = 0;
    for (n, line) in bytes[..complete].split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let record: Value = serde_json::from_slice(line)
            .with_context(|| format!("{}: line {} is not JSON; was the file edited?", path.display(), n + 1))?;
        let (Some(id), Some(plan)) = (record.get("id"), record.get("plan").and_then(Value::as_str)) else {
            bail!("{}: line {} has no id or plan; was the file edited?", path.display(), n + 1);
        };
        done.insert((id.to_string(), plan.to_owned()));
        lines += 1;
    }
    Ok((done, lines))
}

/// The first top-level field whose value differs between two configurations.
fn difference(previous: &Value, current: &Value) -> Option<String> {
    let (Some(a), Some(b)) = (previous.as_object(), current.as_object()) else {
        return (previous != current).then(|| "configuration".to_string());
    };
    a.keys().chain(b.keys()).find(|k| a.get(*k) != b.get(*k)).cloned()
}
