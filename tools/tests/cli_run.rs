//! `layerwise run`: batch generation over a dataset. Every generation equals `layerwise generate`
//! on the same prompt and plan; the input formats, windows and bad rows behave as documented; a
//! run killed (SIGKILL) at several points and re-run ends with each (row, plan) exactly once and
//! the same lines as an uninterrupted run; bad files and options fail before any work.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_fails_naming, layerwise, stderr};
use serde_json::{json, Value};

const PROMPTS: [&str; 6] = [
    "In the beginning God created",
    "And the LORD spake unto Moses, saying",
    "Blessed are the",
    "Now there was a famine in the land, and Abram went down into Egypt to sojourn there",
    "Then said Jesus unto them",
    "And it came to pass",
];

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A JSON Lines dataset: the prompts with ids, references and a kept column, and bad rows.
fn dataset(dir: &Path) -> PathBuf {
    let mut lines: Vec<Value> = PROMPTS
        .iter()
        .enumerate()
        .map(|(i, p)| json!({"key": format!("r{i}"), "text": p, "ref": "of the earth", "topic": i * 10}))
        .collect();
    lines.push(json!({"key": "number", "text": 17, "ref": "x"}));
    lines.push(json!({"key": "missing", "ref": "x"}));
    lines.push(json!({"key": "long", "text": "and the ".repeat(60), "ref": "x"}));
    let path = dir.join("rows.jsonl");
    let text: Vec<String> = lines.iter().map(Value::to_string).collect();
    std::fs::write(&path, text.join("\n") + "\n").expect("write dataset");
    path
}

fn run_args<'a>(data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--data",
        data,
        "--output-dir",
        out,
        "--text-column",
        "text",
        "--id-column",
        "key",
        "--reference-column",
        "ref",
        "--keep-columns",
        "topic",
        "--plans",
        "original,exit:2,contrast:4,2",
        "--max-new-tokens",
        "10",
        "--block-size",
        "40",
        "--batch-size",
        "4",
    ]
}

/// generations.jsonl by (id, plan).
fn generations(out: &Path) -> BTreeMap<(String, String), Value> {
    let text = std::fs::read_to_string(out.join("generations.jsonl")).expect("generations.jsonl");
    let mut map = BTreeMap::new();
    for line in text.lines() {
        let record: Value = serde_json::from_str(line).expect("a JSON line");
        let key = (record["id"].to_string(), record["plan"].as_str().expect("plan").to_owned());
        assert!(map.insert(key.clone(), record).is_none(), "{key:?} written twice");
    }
    map
}

fn run_json(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).expect("run.json")).expect("JSON")
}

/// What `layerwise generate` makes of one prompt under a plan's flags.
fn generate(prompt: &str, plan: &[&str]) -> Vec<u64> {
    let mut args = vec!["generate", "--prompt", prompt, "--max-new-tokens", "10", "--json"];
    args.extend_from_slice(plan);
    let out = layerwise(&args);
    assert!(out.status.success(), "generate: {}", stderr(&out));
    let line: Value = serde_json::from_slice(&out.stdout).expect("generate --json");
    line["ids"].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id")).collect()
}

#[test]
fn every_row_under_every_plan_equals_generate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dataset(dir.path());
    let out = dir.path().join("out");
    let result = layerwise(&run_args(s(&data), s(&out)));
    assert!(result.status.success(), "run: {}", stderr(&result));
    let generations = generations(&out);
    assert_eq!(generations.len(), PROMPTS.len() * 3);
    let plans: [(&str, Vec<&str>); 3] =
        [("original", vec![]), ("exit:2", vec!["--exit", "2"]), ("contrast:4,2", vec!["--contrast", "4,2"])];
    for (i, prompt) in PROMPTS.iter().enumerate() {
        for (plan, flags) in &plans {
            let record = &generations[&(format!("\"r{i}\""), plan.to_string())];
            let ids: Vec<u64> =
                record["generated_ids"].as_array().expect("ids").iter().filter_map(Value::as_u64).collect();
            assert_eq!(ids, generate(prompt, flags), "row r{i} under {plan}");
            assert_eq!(record["prompt"], *prompt);
            assert_eq!(record["reference"], "of the earth");
            assert_eq!(record["topic"], i * 10, "the kept column");
            assert_eq!(record["new_tokens"], ids.len());
            assert!(record["generated_text"].is_string() && record["finish_reason"].is_string());
        }
    }
    let run = run_json(&out);
    assert_eq!(run["status"], "complete");
    let counts = &run["counts"];
    assert_eq!(counts["rows_read"], 9);
    assert_eq!(counts["rows_ready"], 6);
    assert_eq!(counts["rows_bad"], 2, "{run}");
    assert_eq!(counts["rows_too_long"], 1, "{run}");
    assert_eq!(counts["generations_written"], 18);
    let bad: Vec<&Value> = run["bad"].as_array().expect("bad").iter().map(|b| &b["id"]).collect();
    assert_eq!(bad, [&json!("number"), &json!("missing")]);
    assert_eq!(run["too_long"][0]["id"], "long");
    assert!(run["too_long"][0]["reason"].as_str().expect("reason").contains("block size of 40"));
    let err = stderr(&result);
    assert!(err.contains("skipped \"number\": `text` is not text (a number)"), "{err}");
}

#[test]
fn csv_parquet_folders_splits_windows_and_auto() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    std::fs::write(data.join("train.csv"), "text,n\nAnd God said,1\n\"Let there be light, and\",2\n").expect("csv");
    std::fs::write(data.join("test.csv"), "text,n\nunused,3\n").expect("csv");
    let out = dir.path().join("out");
    // --split picks train.csv; --max-window-size keeps the last 3 tokens; auto fills the block of 12.
    let result = layerwise(&[
        "run",
        "--data",
        s(&data),
        "--split",
        "train",
        "--output-dir",
        s(&out),
        "--max-window-size",
        "3",
        "--block-size",
        "12",
        "--max-new-tokens",
        "auto",
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    let records = generations(&out);
    assert_eq!(records.len(), 2, "only the train split");
    for record in records.values() {
        let prompt_tokens = record["prompt_tokens"].as_u64().expect("prompt tokens");
        assert!(prompt_tokens <= 3, "the window: {record}");
        assert_eq!(record["finish_reason"], "length");
        assert_eq!(record["new_tokens"].as_u64(), Some(12 - prompt_tokens), "auto fills the block: {record}");
    }
    assert_eq!(records[&("1".into(), "original".into())]["prompt"], " light, and", "the last 3 tokens' text");

    // Parquet, as Hugging Face datasets writes it (the evaluation fixture's `text` column).
    let parquet = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/evaluation/texts.parquet");
    let out = dir.path().join("out-parquet");
    let result = layerwise(&[
        "run",
        "--data",
        s(&parquet),
        "--output-dir",
        s(&out),
        "--keep-columns",
        "n",
        "--max-new-tokens",
        "3",
        "--max-window-size",
        "20",
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    let records = generations(&out);
    assert_eq!(records.len(), 2);
    assert!(records.values().all(|r| r["n"].is_i64() && r["new_tokens"] == 3));
}

/// Starts a slowed run and SIGKILLs it once `lines` generations are written.
fn kill_after(args: &[&str], out: &Path, lines: usize) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_layerwise"))
        .args(args)
        .args(["--pause-per-row-ms", "40"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let written = std::fs::read_to_string(out.join("generations.jsonl")).map_or(0, |t| t.lines().count());
        if written >= lines {
            break;
        }
        assert!(child.try_wait().expect("wait").is_none(), "the run ended before {lines} lines");
        assert!(Instant::now() < deadline, "the run wrote {written} lines in two minutes");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
}

#[test]
fn a_killed_run_resumes_without_losing_or_repeating_a_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dataset(dir.path());
    let whole = dir.path().join("whole");
    assert!(layerwise(&run_args(s(&data), s(&whole))).status.success());
    let expected = generations(&whole);

    let out = dir.path().join("killed");
    let args = run_args(s(&data), s(&out));
    // Killed after 1 line, after 7 (into the second plan), after 13 (into the third); then a line cut
    // short as a kill in the middle of a write leaves it.
    for lines in [1, 7, 13] {
        kill_after(&args, &out, lines);
        let run = run_json(&out);
        assert_eq!(run["status"], "running", "killed before it completed");
    }
    let path = out.join("generations.jsonl");
    let mut text = std::fs::read_to_string(&path).expect("read");
    let written = text.lines().count();
    assert!(written < expected.len(), "the kills left work to do ({written} lines)");
    text.push_str("{\"id\": \"r5\", \"plan\": \"contr");
    std::fs::write(&path, text).expect("write");

    let result = layerwise(&args);
    assert!(result.status.success(), "resume: {}", stderr(&result));
    assert!(stderr(&result).contains(&format!("{written} already in")), "{}", stderr(&result));
    let resumed = generations(&out);
    assert_eq!(resumed.len(), expected.len(), "every (row, plan) once");
    for (key, record) in &expected {
        let got = &resumed[key];
        for field in ["generated_ids", "generated_text", "prompt", "reference", "topic", "finish_reason"] {
            assert_eq!(got[field], record[field], "{key:?} {field}");
        }
    }
    let run = run_json(&out);
    assert_eq!(run["status"], "complete");
    assert_eq!(run["counts"]["generations_written"], expected.len());
    assert_eq!(run["counts"]["generations_before_this_run"], written);
}

#[test]
fn output_directories_of_other_runs_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dataset(dir.path());
    let out = dir.path().join("out");
    let args = run_args(s(&data), s(&out));
    assert!(layerwise(&args).status.success());
    let mut other = args.clone();
    let at = other.len() - 5;
    other[at] = "7"; // --max-new-tokens
    assert_fails_naming(&other, &["another configuration", "max_new_tokens", "--overwrite-output-dir"]);
    other.push("--overwrite-output-dir");
    let result = layerwise(&other);
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(generations(&out).values().all(|r| r["new_tokens"].as_u64() <= Some(7)));
    let full = dir.path().join("full");
    std::fs::create_dir(&full).expect("mkdir");
    std::fs::write(full.join("notes.txt"), "mine").expect("write");
    assert_fails_naming(&run_args(s(&data), s(&full)), &["not empty", "--overwrite-output-dir"]);
}

#[test]
fn bad_files_and_options_fail_before_any_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dataset(dir.path());
    let out = dir.path().join("out");
    let (d, o) = (s(&data), s(&out));
    let with = |extra: &[&'static str]| {
        let mut args = vec!["run", "--data", d, "--output-dir", o, "--id-column", "key"];
        args.extend_from_slice(extra);
        args
    };
    assert_fails_naming(&with(&["--text-column", "txt"]), &["--text-column `txt`", "columns: key, ref, text, topic"]);
    assert_fails_naming(&with(&["--keep-columns", "prompt"]), &["--keep-columns `prompt`", "output field"]);
    assert_fails_naming(&with(&["--plans", "exit:9"]), &["--plans `exit:9`"]);
    assert_fails_naming(&with(&["--plans", "contrast:4"]), &["--plans `contrast:4`", "lower layer"]);
    assert_fails_naming(&with(&["--plans", "middle"]), &["--plans", "`middle`"]);
    assert_fails_naming(&with(&["--block-size", "9999"]), &["--block-size 9999", "256"]);
    let duplicate = dir.path().join("dup.jsonl");
    std::fs::write(&duplicate, "{\"key\": 1, \"text\": \"a\"}\n{\"key\": 1, \"text\": \"b\"}\n").expect("write");
    assert_fails_naming(
        &["run", "--data", s(&duplicate), "--output-dir", o, "--id-column", "key"],
        &["--id-column `key`", "appears twice"],
    );
    let broken = dir.path().join("broken.jsonl");
    std::fs::write(&broken, "{\"text\": \"a\"}\n{\"text\": \n").expect("write");
    assert_fails_naming(&["run", "--data", s(&broken), "--output-dir", o], &["broken.jsonl", "line 2"]);
    assert_fails_naming(
        &["run", "--data", s(&dir.path().join("nothing.jsonl")), "--output-dir", o],
        &["nothing.jsonl"],
    );
    assert!(!out.exists(), "no output directory was made by a failed start");
    assert_fails_naming(&["generate", "--prompt", "a", "--max-new-tokens", "auto"], &["--max-new-tokens auto"]);
}

#[test]
fn generation_flags_pass_through_to_every_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("rows.jsonl");
    std::fs::write(&data, format!("{}\n{}\n", json!({"text": PROMPTS[0]}), json!({"text": PROMPTS[2]})))
        .expect("write");
    let flag_sets: [&[&str]; 2] = [
        &["--num-beams", "3", "--num-return-sequences", "2"],
        &["--do-sample", "--top-k", "20", "--seed", "7", "--repetition-penalty", "1.3"],
    ];
    for (n, flags) in flag_sets.iter().enumerate() {
        let out = dir.path().join(format!("out{n}"));
        let mut args = vec!["run", "--data", s(&data), "--output-dir", s(&out), "--max-new-tokens", "10"];
        args.extend_from_slice(flags);
        let result = layerwise(&args);
        assert!(result.status.success(), "{flags:?}: {}", stderr(&result));
        let records = generations(&out);
        for (i, prompt) in [PROMPTS[0], PROMPTS[2]].iter().enumerate() {
            let record = &records[&(i.to_string(), "original".to_string())];
            let ids: Vec<u64> =
                record["generated_ids"].as_array().expect("ids").iter().filter_map(Value::as_u64).collect();
            assert_eq!(ids, generate(prompt, flags), "{flags:?}: row {i}");
            if n == 0 {
                assert_eq!(record["generated_texts"].as_array().map(Vec::len), Some(2), "two beams returned");
            }
        }
    }
}
