//! `layerwise eval perplexity`: a JSON Lines set and a plain-text document scored under the
//! original head and a plan, with the totals consistent with the per-document scores; bad data
//! (no `text` field, not JSON, empty) and unknown layers refused by name.

use std::process::Command;

const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/demo-gpt2-multiexit");

fn eval(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_layerwise")).arg("eval").arg("perplexity").args(args).output().expect("run")
}

#[test]
fn eval_perplexity_scores_documents_under_a_plan() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("docs.jsonl");
    std::fs::write(&data, "{\"text\": \"Hello world, this is a test.\"}\n\n{\"text\": \"Another document.\"}\n")
        .expect("write");
    let data = data.to_str().expect("utf-8");
    for plan in [&[][..], &["--exit", "2"][..], &["--contrast", "4,2"][..]] {
        let mut args = vec!["--model", DEMO, "--data", data, "--json"];
        args.extend_from_slice(plan);
        let out = eval(&args);
        assert!(out.status.success(), "{plan:?}: {}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert_eq!(report["documents"], 2, "{plan:?}");
        let docs = report["per_document"].as_array().expect("per document");
        let ll: f64 = docs.iter().map(|d| d["loglikelihood"].as_f64().expect("ll")).sum();
        let tokens: f64 = docs.iter().map(|d| d["tokens"].as_f64().expect("tokens")).sum();
        let bytes: f64 = docs.iter().map(|d| d["bytes"].as_f64().expect("bytes")).sum();
        assert_eq!(bytes, 28.0 + 17.0);
        let ppl = report["token_perplexity"].as_f64().expect("ppl");
        assert!((ppl - (-ll / tokens).exp()).abs() <= 1e-9 * ppl, "{plan:?}: {ppl}");
        let bpb = report["bits_per_byte"].as_f64().expect("bpb");
        assert!((bpb - (-ll / bytes / std::f64::consts::LN_2)).abs() < 1e-9, "{plan:?}: {bpb}");
    }
    // A plain text file is one document.
    let text = dir.path().join("doc.txt");
    std::fs::write(&text, "The benefits of bad advice are many.\nSecond line.").expect("write");
    let out = eval(&["--model", DEMO, "--data", text.to_str().expect("utf-8")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("1 documents") && stdout.contains("bits/byte"), "{stdout}");
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON")
}

#[test]
fn all_plans_in_one_pass_equal_each_plan_alone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("docs.jsonl");
    std::fs::write(&data, "{\"text\": \"And God said, Let there be light: and there was light.\"}\n").expect("write");
    let data = data.to_str().expect("utf-8");
    for metric in ["perplexity", "last-word"] {
        let run = |extra: &[&str]| {
            let mut args = vec![metric, "--model", DEMO, "--data", data, "--json"];
            args.extend_from_slice(extra);
            json_of(&Command::new(env!("CARGO_BIN_EXE_layerwise")).arg("eval").args(&args).output().expect("run"))
        };
        let all = run(&["--all-plans", "--pair", "4,2", "--pair", "original,2"]);
        let heads = all["heads"].as_array().expect("heads");
        let names: Vec<&str> = heads.iter().map(|h| h["head"].as_str().expect("name")).collect();
        assert_eq!(names, ["original", "exit 2", "exit 4", "acd 4-2", "acd original-2"], "{metric}");
        let key = if metric == "perplexity" { "token_perplexity" } else { "perplexity" };
        for (flags, index) in
            [(&[][..], 0), (&["--exit", "2"][..], 1), (&["--exit", "4"][..], 2), (&["--contrast", "4,2"][..], 3)]
        {
            let alone = run(flags)[key].as_f64().expect("value");
            let together = heads[index][key].as_f64().expect("value");
            assert!(
                (alone - together).abs() <= 1e-4 * alone,
                "{metric} {flags:?}: {alone} alone, {together} in --all-plans"
            );
        }
    }
}

#[test]
fn last_word_scores_each_target_and_refuses_texts_without_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("lw.jsonl");
    std::fs::write(
        &data,
        "{\"text\": \"the lord is my shepherd\"}\n{\"text\": \"he leadeth me beside the still waters\"}\n",
    )
    .expect("write");
    let out = eval_metric("last-word", &["--model", DEMO, "--data", data.to_str().expect("utf-8"), "--json"]);
    let report = json_of(&out);
    assert_eq!(report["items"], 2);
    let items = report["per_item"].as_array().expect("items");
    let mean: f64 = items.iter().map(|i| i["loglikelihood"].as_f64().expect("ll")).sum::<f64>() / 2.0;
    assert!((report["perplexity"].as_f64().expect("ppl") - (-mean).exp()).abs() < 1e-6 * (-mean).exp());
    let greedy = items.iter().filter(|i| i["greedy"].as_bool().expect("greedy")).count() as f64;
    assert_eq!(report["accuracy"].as_f64(), Some(greedy / 2.0));
    std::fs::write(&data, "{\"text\": \"oneword\"}\n").expect("write");
    let out = eval_metric("last-word", &["--model", DEMO, "--data", data.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(1) && err.contains("item 0") && err.contains("no last word"), "{err}");
}

#[test]
fn generation_metrics_are_simctgs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("gen.txt");
    // SimCTG's eval_text on "a b a b a b c d e": 4 of 7 bigrams, 4 of 6 trigrams, 4 of 5 4-grams unique.
    std::fs::write(&data, "a b a b a b c d e\n").expect("write");
    let report = json_of(&eval_metric("generation", &["--data", data.to_str().expect("utf-8"), "--json"]));
    assert_eq!(
        (report["rep_2"].as_f64(), report["rep_3"].as_f64(), report["rep_4"].as_f64()),
        (Some(42.86), Some(33.33), Some(20.0))
    );
    std::fs::write(&data, "too short\n").expect("write");
    let out = eval_metric("generation", &["--data", data.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(1) && err.contains("too short to have 4-grams"), "{err}");
}

fn eval_metric(metric: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_layerwise")).arg("eval").arg(metric).args(args).output().expect("run")
}

#[test]
fn eval_perplexity_refuses_bad_data_and_layers_by_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cases: [(&str, &str, &[&str]); 4] = [
        ("no_text.jsonl", "{\"txt\": \"x\"}\n", &["line 1", "no `text` field"]),
        ("not_json.jsonl", "{\"text\": \"ok\"}\nnot json\n", &["line 2", "not JSON"]),
        ("empty.txt", "", &["no documents"]),
        ("number.jsonl", "{\"text\": 5}\n", &["line 1", "`text` is not a string"]),
    ];
    for (name, content, parts) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, content).expect("write");
        let out = eval(&["--model", DEMO, "--data", path.to_str().expect("utf-8")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains("--data") && err.contains(name), "{name}: {err}");
        for part in parts {
            assert!(err.contains(part), "{name}: {err:?} should mention {part:?}");
        }
    }
    let path = dir.path().join("ok.txt");
    std::fs::write(&path, "Some text.").expect("write");
    let out = eval(&["--model", DEMO, "--data", path.to_str().expect("utf-8"), "--exit", "9"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(1) && err.contains("--exit") && err.contains("9"), "{err}");
}

#[test]
fn last_word_refuses_bad_data_and_layers_by_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("lw.jsonl");
    std::fs::write(&data, "{\"body\": \"the lord is my shepherd\"}\n").expect("write");
    let data = data.to_str().expect("utf-8");
    let out = eval_metric("last-word", &["--model", DEMO, "--data", data]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(1) && err.contains("lw.jsonl") && err.contains("no `text` field"), "{err}");
    let ok = dir.path().join("ok.jsonl");
    std::fs::write(&ok, "{\"text\": \"the lord is my shepherd\"}\n").expect("write");
    let out = eval_metric("last-word", &["--model", DEMO, "--data", ok.to_str().expect("utf-8"), "--exit", "9"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(1) && err.contains("--exit") && err.contains('9'), "{err}");
    let out = eval_metric(
        "last-word",
        &["--model", DEMO, "--data", ok.to_str().expect("utf-8"), "--all-plans", "--pair", "3,2"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(1) && err.contains("--pair 3,2") && err.contains("no exit head"), "{err}");
}

#[test]
fn the_unigram_baseline_favours_text_like_its_training_text() {
    let dir = tempfile::tempdir().expect("temp dir");
    let train = dir.path().join("train.txt");
    std::fs::write(&train, "the lord is my shepherd the lord is my light the lord is my rock").expect("write");
    let unlike = dir.path().join("unlike.txt");
    std::fs::write(&unlike, "quantum chromodynamics of gluon plasma").expect("write");
    let perplexity = |data: &std::path::Path| -> f64 {
        let out = eval_metric(
            "unigram",
            &["--model", DEMO, "--train", train.to_str().expect("utf-8"), "--data", data.to_str().expect("utf-8")],
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let after = text.split("token perplexity ").nth(1).expect("perplexity in the line");
        after.split(')').next().expect("number").parse().expect("a number")
    };
    assert!(perplexity(&train) < perplexity(&unlike));
}
