//! Bad input gets an error that names the file, tensor, field or argument at fault: never a panic,
//! never silent garbage. Each test breaks one thing in a copy of a good fixture.

use std::path::{Path, PathBuf};

use layerwise::{load, Error, ForwardRequest};
use layerwise_tests::fixture;

/// A temporary copy of a fixture directory.
fn copy_of(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join(name);
    std::fs::create_dir(&dir).expect("mkdir");
    for entry in std::fs::read_dir(fixture(name)).expect("read fixture") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dir.join(entry.file_name())).expect("copy");
    }
    (tmp, dir)
}

fn load_err(dir: &Path) -> String {
    match load(&dir.to_string_lossy()) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    edit(&mut config);
    std::fs::write(&path, serde_json::to_string_pretty(&config).expect("json")).expect("write");
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "error message {message:?} should mention {part:?}");
    }
}

#[test]
fn missing_directory_and_missing_config() {
    let msg = load_err(Path::new("/nonexistent/model-dir"));
    assert_mentions(&msg, &["/nonexistent/model-dir", "local checkpoint directory"]);
    let (_tmp, dir) = copy_of("gpt2-sharded");
    std::fs::remove_file(dir.join("config.json")).expect("rm");
    assert_mentions(&load_err(&dir), &["config.json", "not found"]);
}

#[test]
fn missing_weights_and_missing_shard() {
    let (_tmp, dir) = copy_of("gpt2-sharded");
    std::fs::remove_file(dir.join("model-00002-of-00003.safetensors")).expect("rm");
    assert_mentions(&load_err(&dir), &["model-00002-of-00003.safetensors", "model.safetensors.index.json"]);
    std::fs::remove_file(dir.join("model.safetensors.index.json")).expect("rm");
    assert_mentions(&load_err(&dir), &["weights", "model.safetensors", "pytorch_model.bin"]);
}

#[test]
fn malformed_and_unknown_configs() {
    let (_tmp, dir) = copy_of("gpt2-sharded");
    edit_config(&dir, |c| c["model_type"] = "t5".into());
    let msg = load_err(&dir);
    assert_mentions(&msg, &["config.json", "model_type", "t5"]);
    assert!(matches!(load(&dir.to_string_lossy()), Err(Error::UnknownArchitecture { .. })));

    edit_config(&dir, |c| {
        c["model_type"] = "gpt2".into();
        c["n_head"] = "four".into();
    });
    assert_mentions(&load_err(&dir), &["config.json", "n_head"]);

    edit_config(&dir, |c| {
        c["n_head"] = 4.into();
        c["lm_head_layer_indices"] = serde_json::json!([2, 9]);
    });
    assert_mentions(&load_err(&dir), &["lm_head_layer_indices", "9"]);

    edit_config(&dir, |c| {
        c["lm_head_layer_indices"] = serde_json::json!([1, 2, 4]);
        c["activation_function"] = "gelu_10".into();
    });
    assert_mentions(&load_err(&dir), &["activation_function", "gelu_10"]);

    std::fs::write(dir.join("config.json"), "{ not json").expect("write");
    assert_mentions(&load_err(&dir), &["config.json", "JSON"]);
}

#[test]
fn unsupported_options_are_refused_by_name() {
    let (_tmp, dir) = copy_of("llama-bf16");
    edit_config(&dir, |c| c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0}));
    assert_mentions(&load_err(&dir), &["rope_scaling", "yarn"]);
}

#[test]
fn tensor_with_the_wrong_shape() {
    let (_tmp, dir) = copy_of("gpt2-sharded");
    edit_config(&dir, |c| c["vocab_size"] = 97.into());
    assert_mentions(&load_err(&dir), &["transformer.wte.weight", "[96, 32]", "[97, 32]"]);
}

#[test]
fn exit_head_missing_from_the_checkpoint() {
    let (_tmp, dir) = copy_of("gpt2-sharded");
    edit_config(&dir, |c| c["lm_head_layer_indices"] = serde_json::json!([1, 2, 3, 4]));
    assert_mentions(&load_err(&dir), &["name_to_lm_exit_head.lm_head_3.weight", "not found"]);
}

/// Rewrites the llama fixture's weights with one tensor's dtype changed (same bytes, I16 for BF16).
#[test]
fn tensor_with_an_unsupported_dtype() {
    let (_tmp, dir) = copy_of("llama-bf16");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).expect("read");
    let file = safetensors::SafeTensors::deserialize(&bytes).expect("parse");
    let tensors: Vec<(String, safetensors::tensor::TensorView)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            if name == "model.norm.weight" {
                let retyped =
                    safetensors::tensor::TensorView::new(safetensors::Dtype::I16, view.shape().to_vec(), view.data())
                        .expect("view");
                (name, retyped)
            } else {
                (name, view)
            }
        })
        .collect();
    let out = safetensors::serialize(tensors, None).expect("serialize");
    drop(file);
    std::fs::write(&path, out).expect("write");
    assert_mentions(&load_err(&dir), &["model.norm.weight", "I16", "model.safetensors"]);
}

#[test]
fn truncated_safetensors() {
    let (_tmp, dir) = copy_of("llama-bf16");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).expect("read");
    for keep in [0, 5, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..keep]).expect("write");
        assert_mentions(&load_err(&dir), &["model.safetensors", "safetensors"]);
    }
}

#[test]
fn header_offsets_outside_the_file() {
    let (_tmp, dir) = copy_of("llama-bf16");
    let header = br#"{"model.norm.weight":{"dtype":"BF16","shape":[32],"data_offsets":[0,64000]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(&[0u8; 64]);
    std::fs::write(dir.join("model.safetensors"), file).expect("write");
    assert_mentions(&load_err(&dir), &["model.safetensors", "model.norm.weight", "outside", "64 bytes"]);
    // The culprit is named, not the tensor after it in offset order (issue #13).
    let header = br#"{"b":{"dtype":"F32","shape":[4],"data_offsets":[16,32]},"a":{"dtype":"F32","shape":[4],"data_offsets":[0,20]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(&[0u8; 32]);
    std::fs::write(dir.join("model.safetensors"), file).expect("write");
    let msg = load_err(&dir);
    assert_mentions(&msg, &["model.safetensors", "tensor `a`", "need 16 bytes", "hold 20"]);
}

#[test]
fn corrupt_and_truncated_pytorch_bin() {
    let (_tmp, dir) = copy_of("gpt-neo-bin");
    let path = dir.join("pytorch_model.bin");
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("write");
    assert_mentions(&load_err(&dir), &["pytorch_model.bin"]);
    std::fs::write(&path, b"\x80\x02this is no zip archive").expect("write");
    assert_mentions(&load_err(&dir), &["pytorch_model.bin", "zip"]);
    std::fs::write(&path, b"").expect("write");
    assert_mentions(&load_err(&dir), &["pytorch_model.bin"]);
}

#[test]
fn bad_prompts_and_exits_at_run_time() {
    let loaded = load(&fixture("gpt2-sharded").to_string_lossy()).expect("load");
    let run =
        |ids: &[u32], request: &ForwardRequest| loaded.model.forward(ids, request).expect_err("must fail").to_string();
    let logits = ForwardRequest { logits: true, ..Default::default() };
    assert_mentions(&run(&[1, 2, 96], &logits), &["prompt", "96", "position 2", "vocabulary"]);
    assert_mentions(&run(&[1; 65], &logits), &["prompt", "65 tokens", "64"]);
    assert_mentions(&run(&[], &logits), &["prompt", "empty"]);
    let exit3 = ForwardRequest { exits: vec![3], ..Default::default() };
    assert_mentions(&run(&[1, 2], &exit3), &["exit 3", "[1, 2, 4]"]);
    // No tokenizer: text prompts are refused with a pointer to token ids.
    assert_mentions(&loaded.encode("hello").expect_err("no tokenizer").to_string(), &["tokenizer", "token ids"]);
}

#[test]
fn config_values_out_of_range_are_refused_by_name() {
    // Each loaded before and produced NaN or garbage with exit 0 (issue #13).
    let (_tmp, dir) = copy_of("llama-bf16");
    for theta in [0.0, -10000.0] {
        edit_config(&dir, |c| c["rope_theta"] = theta.into());
        assert_mentions(&load_err(&dir), &["config.json", "rope_theta", "> 0"]);
    }
    edit_config(&dir, |c| {
        c["rope_theta"] = 10000.0.into();
        c["rms_norm_eps"] = (-1e-6).into();
    });
    assert_mentions(&load_err(&dir), &["config.json", "rms_norm_eps", ">= 0"]);

    let (_tmp, dir) = copy_of("gpt2-sharded");
    edit_config(&dir, |c| c["layer_norm_epsilon"] = (-1e-5).into());
    assert_mentions(&load_err(&dir), &["config.json", "layer_norm_epsilon", ">= 0"]);

    let (_tmp, dir) = copy_of("gpt-neo-bin");
    edit_config(&dir, |c| c["window_size"] = 0.into());
    assert_mentions(&load_err(&dir), &["config.json", "window_size", "at least 1"]);
}

#[test]
fn config_sizes_beyond_any_model_are_refused_before_anything_is_sized_by_them() {
    // A billion layers once allocated per-layer tables until memory ran out, before the missing
    // tensors were noticed; a width of 2^64 - 1 overflowed the default intermediate size.
    let (_tmp, dir) = copy_of("gpt2-sharded");
    for (field, value) in [("n_layer", 1_000_000_000u64), ("n_embd", u64::MAX), ("vocab_size", 1 << 40)] {
        let original = std::fs::read_to_string(dir.join("config.json")).expect("config");
        edit_config(&dir, |c| c[field] = value.into());
        assert_mentions(&load_err(&dir), &["config.json", field, &value.to_string(), "the most this engine accepts"]);
        std::fs::write(dir.join("config.json"), original).expect("restore");
    }
}

#[test]
fn a_header_naming_a_tensor_twice_is_refused() {
    let (_tmp, dir) = copy_of("llama-bf16");
    // The same name as F32 [8] and then BF16 [16]: 32 bytes each; a parser keeping the later entry
    // would read the first 32 bytes as bf16.
    let header = br#"{"model.norm.weight":{"dtype":"F32","shape":[8],"data_offsets":[0,32]},"model.norm.weight":{"dtype":"BF16","shape":[16],"data_offsets":[32,64]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(&[0u8; 64]);
    std::fs::write(dir.join("model.safetensors"), file).expect("write");
    assert_mentions(&load_err(&dir), &["model.safetensors", "model.norm.weight", "twice"]);
}

#[test]
fn a_vocabulary_giving_two_tokens_one_id_is_refused() {
    let (_tmp, dir) = copy_of("demo-gpt2-multiexit");
    let path = dir.join("vocab.json");
    let mut vocab: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    let (token, _) =
        vocab.iter().find(|(_, id)| id.as_u64() == Some(7)).map(|(t, id)| (t.clone(), id.clone())).expect("id 7");
    let other = vocab.keys().find(|t| **t != token).cloned().expect("another token");
    vocab.insert(other, 7.into());
    std::fs::write(&path, serde_json::to_string(&vocab).expect("json")).expect("write");
    assert_mentions(&load_err(&dir), &["vocab.json", "both have id 7"]);
}
