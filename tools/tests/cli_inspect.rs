//! `layerwise lens`, `activations`, `attention` and `--head-mask`: outputs in every format, the HTML
//! pages rendered in headless Chromium (skipped when no browser is installed; CI installs Debian's
//! `chromium`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{assert_fails_naming, layerwise, stderr};
use layerwise_tests::{fixture, fixture_str, read_safetensors};

const PROMPT: &str = "The quick brown fox jumps over the lazy dog";
/// The random demo fixture (4 layers, GPT-2's vocabulary) the row and token counts below are for.
const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/demo-gpt2-multiexit");

fn run_ok(args: &[&str]) {
    let out = layerwise(args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
}

#[test]
fn lens_json_has_the_contract_fields() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lens.json");
    run_ok(&[
        "lens",
        "--model",
        DEMO,
        "--prompt",
        PROMPT,
        "--subblocks",
        "--top-k",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    let lens: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let rows = lens["rows"].as_array().unwrap();
    let labels: Vec<&str> = rows.iter().map(|r| r.as_str().unwrap()).collect();
    assert_eq!(&labels[..3], ["embed", "h.0.attn", "h.0.mlp"]);
    assert_eq!(labels.len(), 1 + 2 * 4);
    let positions = lens["tokens"].as_array().unwrap().len();
    assert!(positions > 5);
    for key in ["top_ids", "top_probs"] {
        let v = lens[key].as_array().unwrap();
        assert_eq!(v.len(), rows.len(), "{key}");
        assert_eq!(v[0].as_array().unwrap().len(), positions, "{key}");
        assert_eq!(v[0][0].as_array().unwrap().len(), 4, "{key}");
    }
    for key in ["entropy", "kl_to_final"] {
        assert_eq!(lens[key].as_array().unwrap().len(), rows.len(), "{key}");
        assert_eq!(lens[key][0].as_array().unwrap().len(), positions, "{key}");
    }
}

#[test]
fn lens_writes_svg_and_png() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("lens.svg");
    run_ok(&["lens", "--model", DEMO, "--prompt", PROMPT, "--metric", "kl", "--out", svg.to_str().unwrap()]);
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.contains("h.3") && text.contains("·fox"), "labels in the SVG");
    let png = dir.path().join("lens.png");
    run_ok(&["lens", "--model", DEMO, "--prompt", PROMPT, "--out", png.to_str().unwrap()]);
    let picture = resvg::tiny_skia::Pixmap::load_png(&png).expect("a PNG");
    assert!(picture.width() > 600 && picture.height() > 200);
    assert!(distinct_colours(&picture) > 20, "a heatmap, not a blank picture");
}

#[test]
fn lens_refuses_bad_options_by_name() {
    assert_fails_naming(&["lens", "--prompt", "hi", "--out", "x.txt"], &["--out", ".json"]);
    assert_fails_naming(&["lens", "--prompt", "hi", "--decoder", "h.9", "--out", "x.json"], &["h.9"]);
    assert_fails_naming(&["lens", "--prompt", "hi", "--metric", "loss", "--out", "x.json"], &["--metric"]);
    assert_fails_naming(&["lens", "--prompt", "hi", "--top-k", "0", "--out", "x.json"], &["top-k"]);
    assert_fails_naming(
        &["lens", "--prompt", "hi", "--decoder", "exits", "--subblocks", "--out", "x.json"],
        &["--subblocks"],
    );
}

#[test]
fn activations_equal_transformers_module_outputs() {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("inspect").join("lens.json")).unwrap()).unwrap();
    let prompt: Vec<String> = meta["prompt"].as_array().unwrap().iter().map(|v| v.to_string()).collect();
    let recorded = read_safetensors(&fixture("inspect").join("gpt2-sharded.safetensors"));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("act.safetensors");
    let model = fixture_str("gpt2-sharded");
    let args = ["activations", "--model", &model, "--prompt-ids", &prompt.join(","), "--names", "h.0,h.1.mlp,embed"];
    let result = layerwise(&[&args[..], &["--out", out.to_str().unwrap()]].concat());
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(stderr(&result).contains("2 of 4 blocks ran"), "{}", stderr(&result));
    let written = read_safetensors(&out);
    for name in ["h.0", "h.1.mlp", "embed"] {
        let values: Vec<f32> = written[name].values.iter().map(|&v| v as f32).collect();
        layerwise_tests::assert_close(name, &values, &recorded[&format!("act.{name}")], 1e-4);
    }
    assert_fails_naming(&["activations", "--prompt", "hi", "--names", "h.0,h.0", "--out", "x.safetensors"], &["twice"]);
    assert_fails_naming(
        &["activations", "--prompt", "hi", "--names", "h.0.foo", "--out", "x.safetensors"],
        &["h.0.foo"],
    );
}

fn distinct_colours(picture: &resvg::tiny_skia::Pixmap) -> usize {
    let mut seen: Vec<[u8; 4]> = picture.data().chunks_exact(4).map(|p| [p[0], p[1], p[2], p[3]]).collect();
    seen.sort_unstable();
    seen.dedup();
    seen.len()
}

/// Debian's `chromium`, or `$LAYERWISE_CHROMIUM`.
fn browser() -> Option<PathBuf> {
    let candidates = [std::env::var("LAYERWISE_CHROMIUM").unwrap_or_default(), "/usr/bin/chromium".into()];
    candidates.into_iter().filter(|c| !c.is_empty()).map(PathBuf::from).find(|p| p.is_file())
}

fn headless(browser: &Path, args: &[&str]) -> std::process::Output {
    Command::new(browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run"])
        .args(args)
        .output()
        .expect("run chromium")
}

/// Renders `page` in headless Chromium: the DOM after its script ran, and a screenshot.
pub fn render(page: &Path, ready: &str, dir: &Path) -> Option<(String, resvg::tiny_skia::Pixmap)> {
    let Some(browser) = browser() else {
        eprintln!("skipped: no chromium (apt install chromium, or set LAYERWISE_CHROMIUM)");
        return None;
    };
    let url = format!("file://{}", page.display());
    let dom = headless(&browser, &["--dump-dom", &url]);
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    assert!(dom.contains(&format!("data-ready=\"{ready}\"")), "the page's script ran to the end: {dom:.2000}");
    let shot = dir.join("shot.png");
    let out = headless(&browser, &[&format!("--screenshot={}", shot.display()), "--window-size=1200,700", &url]);
    assert!(shot.is_file(), "screenshot written: {}", String::from_utf8_lossy(&out.stderr));
    Some((dom, resvg::tiny_skia::Pixmap::load_png(&shot).expect("a PNG screenshot")))
}

#[test]
fn lens_page_renders_in_headless_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("lens.html");
    run_ok(&["lens", "--model", DEMO, "--prompt", PROMPT, "--metric", "ranks", "--out", page.to_str().unwrap()]);
    let Some((dom, shot)) = render(&page, "lens", dir.path()) else { return };
    // Every cell was painted by the script, and the tokens label the columns.
    let cells = dom.matches("<td data-r=").count();
    assert_eq!(cells, 5 * 9, "5 rows x 9 positions");
    assert_eq!(dom.matches("style=\"background: rgb(").count(), cells, "every cell coloured");
    assert!(dom.contains("·fox"));
    assert!(distinct_colours(&shot) > 50, "the screenshot shows the heatmap");
    // Viridis' dark end and the bright end are both on screen.
    let pixels: Vec<&[u8]> = shot.data().chunks_exact(4).collect();
    let near = |c: [u8; 3]| pixels.iter().any(|p| (0..3).all(|i| (p[i] as i32 - c[i] as i32).abs() < 12));
    assert!(near([68, 1, 84]) && near([253, 231, 37]), "both ends of the colour scale appear");
}

/// The inspect fixtures' prompt as `--prompt-ids`.
fn fixture_prompt() -> String {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("inspect").join("lens.json")).unwrap()).unwrap();
    meta["prompt"].as_array().unwrap().iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",")
}

/// The head mask transformers was run with, written as a `--head-mask` file.
fn recorded_mask_file(dir: &Path) -> PathBuf {
    let recorded = read_safetensors(&fixture("inspect").join("gpt2-sharded.safetensors"));
    let mask = &recorded["head_mask"];
    let rows: Vec<Vec<f64>> = mask.values.chunks(mask.shape[1]).map(<[f64]>::to_vec).collect();
    let path = dir.join("mask.json");
    std::fs::write(&path, serde_json::to_string(&rows).unwrap()).unwrap();
    path
}

#[test]
fn attention_and_head_mask_flags_equal_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let recorded = read_safetensors(&fixture("inspect").join("gpt2-sharded.safetensors"));
    let model = fixture_str("gpt2-sharded");
    let prompt = fixture_prompt();
    let mask = recorded_mask_file(dir.path());
    let out = dir.path().join("attn.safetensors");
    run_ok(&["attention", "--model", &model, "--prompt-ids", &prompt, "--out", out.to_str().unwrap()]);
    let written = read_safetensors(&out);
    for layer in 0..4 {
        let name = format!("attn.{layer}");
        let values: Vec<f32> = written[&name].values.iter().map(|&v| v as f32).collect();
        layerwise_tests::assert_close(&name, &values, &recorded[&name], 1e-5);
    }
    let masked = dir.path().join("masked.safetensors");
    let mask_arg = mask.to_str().unwrap();
    let args = ["attention", "--model", &model, "--prompt-ids", &prompt, "--layers", "1", "--head-mask", mask_arg];
    run_ok(&[&args[..], &["--out", masked.to_str().unwrap()]].concat());
    let values: Vec<f32> = read_safetensors(&masked)["attn.1"].values.iter().map(|&v| v as f32).collect();
    layerwise_tests::assert_close("masked attention", &values, &recorded["masked.attn.1"], 1e-5);

    let logits = dir.path().join("logits.safetensors");
    let args = ["forward", "--model", &model, "--prompt-ids", &prompt, "--head-mask", mask_arg];
    run_ok(&[&args[..], &["--out", logits.to_str().unwrap()]].concat());
    let values: Vec<f32> = read_safetensors(&logits)["logits"].values.iter().map(|&v| v as f32).collect();
    layerwise_tests::assert_close("forward --head-mask", &values, &recorded["masked.logits"], 1e-4);

    let wrong = dir.path().join("wrong.json");
    std::fs::write(&wrong, "[[1, 1], [1, 1]]").unwrap();
    assert_fails_naming(
        &[
            "forward",
            "--model",
            &model,
            "--prompt-ids",
            "1,2",
            "--head-mask",
            wrong.to_str().unwrap(),
            "--out",
            "x.safetensors",
        ],
        &["--head-mask", "2 layers x 2 heads"],
    );
    assert_fails_naming(
        &["attention", "--model", &model, "--prompt-ids", "1,2", "--layers", "7", "--out", "x.json"],
        &["--layers", "7"],
    );
}

#[test]
fn generating_with_a_head_mask_equals_generating_from_the_pruned_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let texts = fixture("inspect").join("texts.json");
    let heads = dir.path().join("heads");
    let model = fixture_str("gpt2-sharded");
    let args = ["heads", "--model", &model, "--texts", texts.to_str().unwrap(), "--threshold", "0.02", "--prune"];
    run_ok(&[&args[..], &["--out", heads.to_str().unwrap()]].concat());
    let pruning: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(heads.join("pruning.json")).unwrap()).unwrap();
    let mask = dir.path().join("mask.json");
    std::fs::write(&mask, pruning["search"]["mask"].to_string()).unwrap();
    let generate = |model: &str, extra: &[&str]| -> serde_json::Value {
        let args = ["generate", "--model", model, "--prompt-ids", "5,17,42", "--max-new-tokens", "8", "--json"];
        let out = layerwise(&[&args[..], extra].concat());
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["ids"].clone()
    };
    let masked = generate(&model, &["--head-mask", mask.to_str().unwrap()]);
    let pruned = generate(heads.join("pruned").to_str().unwrap(), &[]);
    assert_eq!(masked, pruned);
    assert_ne!(masked, generate(&model, &[]), "the mask changes the generation on this fixture");
}

#[test]
fn attention_page_renders_in_headless_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("attention.html");
    run_ok(&["attention", "--model", DEMO, "--prompt", PROMPT, "--layers", "3", "--out", page.to_str().unwrap()]);
    let Some((dom, shot)) = render(&page, "attention", dir.path()) else { return };
    assert!(dom.matches("<line ").count() > 9 * 4, "lines from every query of every head");
    assert_eq!(dom.matches("<text ").count(), 2 * 9, "the tokens on both sides");
    assert!(distinct_colours(&shot) > 20, "the screenshot shows the lines");
}

#[test]
fn model_view_of_a_decoder_renders_in_headless_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("model.html");
    run_ok(&["attention", "--model", DEMO, "--prompt", PROMPT, "--view", "model", "--out", page.to_str().unwrap()]);
    let Some((dom, shot)) = render(&page, "model-view", dir.path()) else { return };
    assert_eq!(dom.matches("class=\"cell\"").count(), 4 * 4, "a map per layer and head");
    assert!(dom.contains("id=\"large\""), "the first head shown large");
    assert!(distinct_colours(&shot) > 20, "the screenshot shows the maps");
}

#[test]
fn model_view_of_a_bert_pair_renders_with_the_segment_menu() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("bert.html");
    let model = fixture("bert").join("bert-classifier");
    let (model, page_arg) = (model.to_str().unwrap(), page.to_str().unwrap());
    let args = ["attention", "--model", model, "--prompt", "i hate rain", "--pair", "but the sun", "--view", "model"];
    run_ok(&[&args[..], &["--out", page_arg]].concat());
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.contains("\"sentence_b_start\":5"), "[CLS] i hate rain [SEP] | but the sun [SEP]");
    let Some((dom, shot)) = render(&page, "model-view", dir.path()) else { return };
    assert_eq!(dom.matches("class=\"cell\"").count(), 3 * 4, "3 layers x 4 heads");
    assert!(!dom.contains("id=\"pairs\" hidden"), "the A/B menu is shown for a pair");
    assert!(distinct_colours(&shot) > 20);
    // The head view of the same pair.
    let head = dir.path().join("head.html");
    run_ok(&[&args[..7], &["--out", head.to_str().unwrap()]].concat());
    let Some((dom, _)) = render(&head, "attention", dir.path()) else { return };
    assert_eq!(dom.matches("<text ").count(), 2 * 9, "the pair's 9 tokens on both sides");
    assert!(dom.matches("<line ").count() > 9 * 4, "lines from every query of every head");
    // The JSON of an encoder names its WordPiece tokens.
    let json = dir.path().join("bert.json");
    run_ok(&[&args[..7], &["--out", json.to_str().unwrap()]].concat());
    let value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(value["texts"][0], "[CLS]");
    assert_eq!(value["layers"]["2"].as_array().unwrap().len(), 4);
}

#[test]
fn correlation_page_renders_in_headless_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("heads");
    let model = fixture("bert").join("bert-classifier");
    let dataset = fixture("bert").join("emotions.jsonl");
    run_ok(&[
        "heads",
        "--model",
        model.to_str().unwrap(),
        "--texts",
        dataset.to_str().unwrap(),
        "--labels-column",
        "label",
        "--out",
        out.to_str().unwrap(),
    ]);
    let Some((dom, shot)) = render(&out.join("correlation.html"), "scatter", dir.path()) else { return };
    assert_eq!(dom.matches("<circle").count(), 12, "a dot per head");
    assert_eq!(dom.matches("<tr>").count(), 1 + 12, "a header and a row per head");
    assert!(dom.contains("Pearson r = "));
    assert!(distinct_colours(&shot) > 3, "dots drawn");
}

#[test]
fn attention_refuses_pairs_for_decoders() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a.html");
    common::assert_fails_naming(
        &["attention", "--model", DEMO, "--prompt", "a", "--pair", "b", "--out", out.to_str().unwrap()],
        &["--pair"],
    );
}
