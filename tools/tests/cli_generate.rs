//! The `layerwise generate` contract (flags, JSON line, streaming) and the plan flags of `forward`.

mod common;

use std::path::Path;
use std::process::Output;

use common::{assert_fails_naming, layerwise, stderr};
use layerwise_tests::{fixture, fixture_str, read_safetensors};
use serde_json::Value;

fn json_line(out: &Output) -> Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().expect("a JSON line");
    serde_json::from_str(line).expect("valid JSON")
}

/// The recorded greedy ids of a generation case of the gpt2-sharded fixture.
fn recorded(case: &str) -> (String, Vec<u64>) {
    let text = std::fs::read_to_string(fixture("gpt2-sharded").join("generation.json")).expect("read");
    let json: Value = serde_json::from_str(&text).expect("json");
    let prompt: Vec<String> = json["prompt"].as_array().expect("prompt").iter().map(|v| v.to_string()).collect();
    let case = json["cases"].as_array().expect("cases").iter().find(|c| c["name"] == case).expect("case");
    let ids = case["ids"].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id")).collect();
    (prompt.join(","), ids)
}

#[test]
fn generate_json_under_acd_matches_upstream() {
    let model = fixture_str("gpt2-sharded");
    for (case, plan) in [
        ("contrast.4.1", vec!["--contrast", "4,1"]),
        ("contrast.original.1", vec!["--contrast", "original,1"]),
        ("exit.1", vec!["--exit", "1"]),
        ("original", vec![]),
        ("lens.exit.2", vec!["--exit", "2", "--lens"]),
        ("converted.contrast.4.2", vec!["--contrast", "4,2", "--converted"]),
        ("contrast.4.1.alpha0.3.k3", vec!["--contrast", "4,1", "--alpha", "0.3", "--min-candidates", "3"]),
    ] {
        let (prompt, ids) = recorded(case);
        let mut args = vec!["generate", "--model", &model, "--prompt-ids", &prompt, "--max-new-tokens", "12", "--json"];
        args.extend(plan);
        let line = json_line(&layerwise(&args));
        let got: Vec<u64> = line["ids"].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id")).collect();
        assert_eq!(got, ids, "{case}");
        assert_eq!(line["new_tokens"].as_u64(), Some(ids.len() as u64));
        assert_eq!(line["prompt_tokens"].as_u64(), Some(12));
        for key in ["text", "prefill_s", "decode_s", "decode_tok_per_s"] {
            assert!(line.get(key).is_some(), "{key} in {line}");
        }
    }
}

#[test]
fn every_command_runs_on_the_reference_backend() {
    // The recorded ids of upstream's ACD, on the plain reference backend.
    let model = fixture_str("gpt2-sharded");
    let (prompt, ids) = recorded("contrast.4.1");
    let args = ["generate", "--model", &model, "--prompt-ids", &prompt, "--max-new-tokens", "12", "--json"];
    let line = json_line(&layerwise(&[&args[..], &["--contrast", "4,1", "--device", "reference"]].concat()));
    let got: Vec<u64> = line["ids"].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id")).collect();
    assert_eq!(got, ids);
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("lens.json");
    let lens = ["lens", "--model", &model, "--prompt-ids", "5,17,42", "--device", "reference", "--out"];
    assert!(layerwise(&[&lens[..], &[out.to_str().expect("path")]].concat()).status.success());
    assert!(layerwise(&["info", "--model", &model, "--device", "reference"]).status.success());
    assert_fails_naming(&["info", "--model", &model, "--device", "gpu"], &["--device", "gpu"]);
}

#[test]
fn eight_bit_weights_generate_as_the_reference_backend_does_and_stay_on_the_cpu() {
    // --dtype q8 on the CPU and on the reference backend (the dequantised weights): the same tokens,
    // under a plain head and under a contrast; on CUDA an error naming the flag; a misspelt dtype
    // names the choices.
    let model = fixture_str("gpt2-sharded");
    let base =
        ["generate", "--model", &model, "--prompt-ids", "5,17,42", "--max-new-tokens", "12", "--json", "--dtype", "q8"];
    for plan in [&[][..], &["--contrast", "4,1"][..]] {
        let cpu = json_line(&layerwise(&[&base[..], plan].concat()));
        let reference = json_line(&layerwise(&[&base[..], plan, &["--device", "reference"]].concat()));
        assert_eq!(cpu["ids"], reference["ids"], "{plan:?}");
    }
    assert_fails_naming(&[&base[..], &["--device", "cuda"]].concat(), &["--dtype q8", "CPU only"]);
    assert_fails_naming(&["info", "--model", &model, "--dtype", "q9"], &["q9", "q8"]);
}

#[test]
fn eight_bit_weights_are_cached_and_read_back_on_the_next_load() {
    // The first run quantises and stores one file per matrix under $LAYERWISE_CACHE/q8; the second
    // reads them and generates the same tokens; LAYERWISE_Q8_CACHE=0 writes nothing.
    let model = fixture_str("gpt-neo-bin"); // a torch archive: its conversion is cached beside
    let cache = tempfile::tempdir().expect("tempdir");
    let args =
        ["generate", "--model", &model, "--prompt-ids", "5,17,42", "--max-new-tokens", "8", "--json", "--dtype", "q8"];
    let run = |q8_cache: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_layerwise"))
            .args(args)
            .env("LAYERWISE_CACHE", cache.path())
            .env("LAYERWISE_Q8_CACHE", q8_cache)
            .output()
            .expect("run layerwise");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        json_line(&out)["ids"].clone()
    };
    // Each cached file with its modification time.
    let q8_files = || -> Vec<(std::path::PathBuf, std::time::SystemTime)> {
        let Ok(entries) = std::fs::read_dir(cache.path().join("q8")) else { return Vec::new() };
        let mut files: Vec<_> = entries
            .map(|e| e.expect("entry").path())
            .map(|p| (p.clone(), std::fs::metadata(&p).and_then(|m| m.modified()).expect("mtime")))
            .collect();
        files.sort();
        files
    };
    let uncached = run("0");
    assert!(q8_files().is_empty(), "the cache was turned off");
    let first = run("1");
    let stored = q8_files();
    assert!(stored.len() >= 4, "one file per matrix ({})", stored.len());
    let second = run("1");
    assert_eq!(q8_files(), stored, "read back: nothing new or rewritten");
    assert_eq!((&first, &second), (&uncached, &uncached));
}

#[test]
fn cuda_device_flags_fall_back_or_fail_clearly_and_run_on_the_stand_in_driver() {
    let model = fixture_str("gpt2-sharded");
    let base = ["generate", "--model", &model, "--prompt-ids", "5,17,42", "--max-new-tokens", "4", "--json"];
    let cpu = json_line(&layerwise(&base));
    if layerwise_kernels::cuda::device_count() == 0 {
        // No driver on this machine: cuda is an error naming the flag, auto says it chose the CPU.
        assert_fails_naming(&[&base[..], &["--device", "cuda"]].concat(), &["--device cuda:0", "no CUDA driver"]);
        let auto = layerwise(&[&base[..], &["--device", "auto"]].concat());
        assert!(common::stderr(&auto).contains("device: cpu"), "{}", common::stderr(&auto));
        assert_eq!(json_line(&auto)["ids"], cpu["ids"]);
    }
    // On the stand-in driver (kernels/standin; needs NVRTC to build the module), the CUDA backend
    // generates the CPU's tokens, and auto picks it.
    if !layerwise_kernels::cuda::program::nvrtc_available() {
        eprintln!("stand-in part SKIPPED: libnvrtc not found");
        return;
    }
    let path =
        format!("{}:{}", layerwise_kernels::STAND_IN_DRIVER_DIR, std::env::var("LD_LIBRARY_PATH").unwrap_or_default());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_layerwise"))
        .args(base)
        .args(["--device", "auto"])
        .env("LD_LIBRARY_PATH", path)
        .output()
        .expect("run layerwise");
    assert!(common::stderr(&out).contains("stand-in"), "{}", common::stderr(&out));
    assert_eq!(json_line(&out)["ids"], cpu["ids"]);
}

#[test]
fn generate_streams_the_same_text_it_reports() {
    let base = ["generate", "--prompt", "The benefits of bad advice", "--contrast", "4,2", "--max-new-tokens", "12"];
    let json = json_line(&layerwise(&[&base[..], &["--json"]].concat()));
    let streamed = layerwise(&base);
    assert!(streamed.status.success());
    let stdout = String::from_utf8_lossy(&streamed.stdout);
    assert_eq!(stdout.trim_end_matches('\n'), json["text"].as_str().expect("text"));
    assert!(!stdout.trim().is_empty());
}

#[test]
fn sampling_with_a_seed_is_reproducible() {
    let args = [
        "generate",
        "--prompt",
        "Hello",
        "--do-sample",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "11",
        "--json",
    ];
    assert_eq!(json_line(&layerwise(&args))["ids"], json_line(&layerwise(&args))["ids"]);
}

#[test]
fn impossible_generate_options_are_refused_by_name() {
    let model = fixture_str("gpt2-sharded");
    let base = ["generate", "--model", model.as_str(), "--prompt-ids", "1,2,3"];
    let with = |extra: &[&'static str]| [&base[..], extra].concat();
    assert_fails_naming(&with(&["--exit", "1", "--contrast", "4,1"]), &["--exit", "--contrast"]);
    assert_fails_naming(&with(&["--exit", "3"]), &["--exit", "layer 3", "[1, 2, 4]"]);
    assert_fails_naming(&with(&["--contrast", "4,x"]), &["--contrast", "`x`"]);
    assert_fails_naming(&with(&["--contrast", "4,original"]), &["--contrast", "lower"]);
    assert_fails_naming(&with(&["--contrast", "4,1", "--alpha", "2"]), &["alpha"]);
    assert_fails_naming(&with(&["--alpha", "0.2"]), &["--alpha", "--contrast"]);
    assert_fails_naming(&with(&["--exit", "3", "--converted"]), &["name_to_conv_matrix.3_to_4"]);
    assert_fails_naming(&with(&["--lens"]), &["--lens", "--exit"]);
    assert_fails_naming(&with(&["--do-sample", "--top-p", "1.5"]), &["top-p", "1.5"]);
    assert_fails_naming(&with(&["--top-k", "5"]), &["--top-k", "--do-sample"]);
    assert_fails_naming(&with(&["--max-new-tokens", "100"]), &["max-new-tokens", "64"]);
    assert_fails_naming(&with(&["--do-sample", "--min-p", "2"]), &["min-p", "2"]);
    assert_fails_naming(&with(&["--do-sample", "--typical-p", "0"]), &["typical-p"]);
    assert_fails_naming(&with(&["--repetition-penalty", "0"]), &["repetition-penalty"]);
    assert_fails_naming(&with(&["--brace-start-level", "1"]), &["--brace-start-level", "--brace-matching"]);
    assert_fails_naming(&with(&["--stop", "x"]), &["stop", "tokenizer"]);
    assert_fails_naming(&with(&["--generation-config", "/nonexistent/gc.json"]), &["/nonexistent/gc.json"]);
}

#[test]
fn generation_config_files_set_processors_and_flags_override_them() {
    // transformers' ids for repetition_penalty 1.3 and 0.7 (make_strategy_fixtures.py).
    let strong = strategy_case("generation.json", r#"{"repetition_penalty": 1.3}"#);
    let weak = strategy_case("generation.json", r#"{"repetition_penalty": 0.7}"#);
    let (_dir, config) =
        generation_config(r#"{"repetition_penalty": 1.3, "max_new_tokens": 20, "eos_token_id": null}"#);
    let (model, prompt) = (fixture_str("gpt2-sharded"), prompt_arg(&strong));
    let base = ["generate", "--model", &model, "--prompt-ids", &prompt, "--json", "--generation-config", &config];
    let run = |extra: &[&str]| json_line(&layerwise(&[&base[..], extra].concat()))["ids"].clone();
    assert_eq!(run(&[]), strong["ids"]);
    assert_eq!(run(&["--repetition-penalty", "0.7"]), weak["ids"]);
    std::fs::write(&config, r#"{"top_k": "many"}"#).expect("write");
    assert_fails_naming(&base, &["top_k", "generation_config.json"]);
}

#[test]
fn forward_under_a_plan_writes_the_plan_output_as_logits() {
    let tmp = tempfile::tempdir().expect("tmp");
    let file = tmp.path().join("acd.safetensors");
    let (prompt, _) = recorded("contrast.4.1");
    let model = fixture_str("gpt2-sharded");
    let args =
        ["forward", "--model", &model, "--prompt-ids", &prompt, "--contrast", "4,1", "--out", &file.to_string_lossy()];
    let out = layerwise(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let written = read_safetensors(&file);
    let reference = &read_safetensors(&fixture("gpt2-sharded").join("generation.safetensors"))["contrast.4.1"];
    let logits = &written["logits"];
    let vocab = logits.shape[1];
    let last = &logits.values[(logits.shape[0] - 1) * vocab..];
    for (a, b) in last.iter().zip(&reference.values) {
        assert!((a.exp() - b.exp()).abs() <= 1e-5, "probabilities {} vs {}", a.exp(), b.exp());
    }
    assert!(written.contains_key("exit.1") && written.contains_key("hidden.4"), "the other tensors are still written");
}

#[test]
fn beam_search_flags_return_every_sequence() {
    // transformers' beams (make_strategy_fixtures.py): 3 beams, length penalty 0.5, three sequences;
    // and 4 beams with early stopping; both with the recorded EOS.
    let three = strategy_case("beams.json", r#"{"num_beams": 3, "length_penalty": 0.5, "num_return_sequences": 3}"#);
    let early = strategy_case("beams.json", r#"{"num_beams": 4, "early_stopping": true}"#);
    assert_eq!(three["eos_token_id"], early["eos_token_id"]);
    let (_dir, config) = generation_config(&format!(r#"{{"eos_token_id": {}}}"#, three["eos_token_id"]));
    let (model, prompt) = (fixture_str("gpt2-sharded"), prompt_arg(&three));
    let base = ["generate", "--model", &model, "--prompt-ids", &prompt, "--json", "--generation-config", &config];
    let run = |extra: &[&str]| json_line(&layerwise(&[&base[..], extra].concat()));
    let out =
        run(&["--max-new-tokens", "16", "--num-beams", "3", "--length-penalty", "0.5", "--num-return-sequences", "3"]);
    assert_eq!(out["sequences"], three["sequences"]);
    assert_eq!(out["ids"], three["sequences"][0]);
    let out = run(&["--max-new-tokens", "16", "--num-beams", "4", "--early-stopping"]);
    assert_eq!(out["ids"], early["sequences"][0]);
    assert!(out.get("sequences").is_none(), "one sequence: no sequences key");
    let refused = |extra: &[&str], parts: &[&str]| assert_fails_naming(&[&base[..], extra].concat(), parts);
    refused(&["--num-beams", "1", "--num-return-sequences", "3"], &["num-return-sequences", "--num-beams"]);
    refused(&["--num-beams", "2", "--early-stopping", "sometimes"], &["early-stopping", "sometimes"]);
}

#[test]
fn contrastive_search_and_dola_flags_follow_transformers() {
    let contrastive = strategy_case("contrastive_dola.json", r#"{"penalty_alpha": 0.6, "top_k": 4}"#);
    let dola = strategy_case("contrastive_dola.json", r#"{"dola_layers": [0, 2], "repetition_penalty": 1.2}"#);
    // An EOS the recorded generations never produce: they ran to full length.
    let used: Vec<&Value> = [&contrastive, &dola].iter().flat_map(|c| c["ids"].as_array().expect("ids")).collect();
    let eos = (0u64..96).find(|t| !used.iter().any(|u| u.as_u64() == Some(*t))).expect("a free id");
    let (_dir, config) = generation_config(&format!(r#"{{"eos_token_id": {eos}, "max_new_tokens": 16}}"#));
    let (model, prompt) = (fixture_str("gpt2-sharded"), prompt_arg(&contrastive));
    let base = ["generate", "--model", &model, "--prompt-ids", &prompt, "--json", "--generation-config", &config];
    let run = |extra: &[&str]| json_line(&layerwise(&[&base[..], extra].concat()))["ids"].clone();
    assert_eq!(run(&["--penalty-alpha", "0.6", "--top-k", "4"]), contrastive["ids"]);
    assert_eq!(run(&["--dola-layers", "0,2", "--repetition-penalty", "1.2"]), dola["ids"]);
    let refused = |extra: &[&str], parts: &[&str]| assert_fails_naming(&[&base[..], extra].concat(), parts);
    refused(&["--penalty-alpha", "0.6", "--do-sample"], &["--penalty-alpha", "--do-sample"]);
    refused(&["--dola-layers", "up"], &["dola-layers", "up"]);
    refused(&["--dola-layers", "low", "--num-beams", "2"], &["num-beams", "--dola-layers"]);
}

/// The gpt2-sharded case (original head) of a `tests/fixtures/strategies/` file whose settings are
/// exactly `settings` (JSON).
fn strategy_case(file: &str, settings: &str) -> Value {
    let text = std::fs::read_to_string(fixture("strategies").join(file)).expect("read");
    let json: Value = serde_json::from_str(&text).expect("json");
    let wanted: Value = serde_json::from_str(settings).expect("settings");
    let original = |c: &Value| c["plan"].as_str().unwrap_or("original") == "original";
    json["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .find(|c| c["fixture"] == "gpt2-sharded" && original(c) && c["settings"] == wanted)
        .unwrap_or_else(|| panic!("no gpt2-sharded case with settings {settings} in {file}"))
        .clone()
}

/// A recorded case's prompt as the value of `--prompt-ids`.
fn prompt_arg(case: &Value) -> String {
    let ids: Vec<String> = case["prompt"].as_array().expect("prompt").iter().map(Value::to_string).collect();
    ids.join(",")
}

/// A `generation_config.json` holding `json`, in a directory that lives as long as the first value.
fn generation_config(json: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("generation_config.json");
    std::fs::write(&path, json).expect("write");
    (dir, path.to_string_lossy().into_owned())
}

#[test]
fn an_adapter_changes_generation_as_peft_does() {
    // The LoRA and prompt-tuning fixtures: greedy ids recorded with transformers + peft.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    for name in ["lora-gpt2", "prompt-gpt2"] {
        let dir = fixtures.join("adapters").join(name);
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).expect("expected")).expect("json");
        let prompt: Vec<String> =
            expected["prompt"].as_array().expect("prompt").iter().map(|v| v.to_string()).collect();
        let model = fixtures.join(expected["base"].as_str().expect("base"));
        let out = layerwise(&[
            "generate",
            "--model",
            model.to_str().expect("path"),
            "--adapter",
            dir.to_str().expect("path"),
            "--prompt-ids",
            &prompt.join(","),
            "--max-new-tokens",
            "8",
            "--min-new-tokens",
            "8",
            "--json",
        ]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let line: Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(line["ids"], expected["greedy"], "{name}");
        assert!(line["adapter"].as_str().expect("adapter").starts_with(if name == "lora-gpt2" {
            "LORA"
        } else {
            "PROMPT"
        }));
    }
    assert_fails_naming(
        &["generate", "--prompt", "a", "--adapter", "/nonexistent/adapter"],
        &["--adapter /nonexistent/adapter", "adapter_config.json"],
    );
}

#[test]
fn speculate_generates_what_upstream_recorded_and_reports_its_rounds() {
    let model = fixture_str("gpt2-sharded");
    for (case, plan, draft) in [
        ("original", vec![], "2"),
        ("contrast.original.1", vec!["--contrast", "original,1"], "auto"),
        ("contrast.4.1", vec!["--contrast", "4,1"], "2"),
    ] {
        let (prompt, ids) = recorded(case);
        let mut args = vec!["generate", "--model", &model, "--prompt-ids", &prompt, "--max-new-tokens", "12", "--json"];
        args.extend(plan);
        args.extend(["--speculate", draft, "--draft-tokens", "3", "--fixed-drafts"]);
        let line = json_line(&layerwise(&args));
        let got: Vec<u64> = line["ids"].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id")).collect();
        assert_eq!(got, ids, "{case} with --speculate {draft}");
        let speculation = &line["speculation"];
        assert!(speculation["rounds"].as_u64().expect("rounds") > 0, "{line}");
        for key in ["draft_layer", "drafted", "accepted", "acceptance_rate", "tokens_per_round", "plain_steps"] {
            assert!(speculation.get(key).is_some(), "{key} in {line}");
        }
        // Per draft exit: one exit drafted every round.
        let layers = speculation["layers"].as_array().expect("layers");
        assert_eq!(layers.len(), 1, "{line}");
        assert_eq!(layers[0]["rounds"], speculation["rounds"]);
    }
    // Sampling speculates too (its distribution is tested in tests/speculative.rs): the same seed
    // gives the same tokens run after run.
    let (prompt, _) = recorded("original");
    let sampled = [
        "generate",
        "--model",
        &model,
        "--prompt-ids",
        &prompt,
        "--max-new-tokens",
        "10",
        "--json",
        "--do-sample",
        "--seed",
        "4",
        "--speculate",
        "2",
        "--fixed-drafts",
    ];
    let first = json_line(&layerwise(&sampled));
    assert_eq!(first["new_tokens"], 10, "{first}");
    assert!(first["speculation"]["rounds"].as_u64().expect("rounds") > 0, "{first}");
    assert_eq!(json_line(&layerwise(&sampled))["ids"], first["ids"]);
    // `auto` under ACD drafts from the contrast's lower exit.
    let (prompt, _) = recorded("contrast.original.1");
    let args = ["generate", "--model", &model, "--prompt-ids", &prompt, "--max-new-tokens", "4", "--json"];
    let mut auto = args.to_vec();
    auto.extend(["--contrast", "original,1", "--speculate", "auto"]);
    assert_eq!(json_line(&layerwise(&auto))["speculation"]["draft_layer"].as_u64(), Some(1));
    assert_fails_naming(&[&args[..], &["--speculate", "x"]].concat(), &["--speculate", "`x`"]);
    assert_fails_naming(&[&args[..], &["--speculate", "4"]].concat(), &["draft layer", "4"]);
    assert_fails_naming(
        &[&args[..], &["--speculate", "2", "--num-beams", "2"]].concat(),
        &["greedy decoding and sampling"],
    );
}
