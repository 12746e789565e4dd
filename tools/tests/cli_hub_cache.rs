//! Hub ids resolve through the standard Hugging Face cache layout (HF_HOME/hub/models--owner--name),
//! so a model downloaded once (by layerwise or by transformers) works offline.

use std::process::Command;

use layerwise_tests::{fixture, read_safetensors};

#[test]
fn offline_hub_id_loads_from_the_hf_cache() {
    let home = tempfile::tempdir().expect("tmp");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = home.path().join("hub").join("models--acme--tiny-multiexit");
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).expect("mkdir");
    std::fs::create_dir_all(repo.join("refs")).expect("mkdir");
    std::fs::write(repo.join("refs").join("main"), commit).expect("ref");
    for entry in std::fs::read_dir(fixture("gpt2-sharded")).expect("fixture") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), snapshot.join(entry.file_name())).expect("copy");
    }
    let out_file = home.path().join("out.safetensors");
    let run = |model: &str| {
        Command::new(env!("CARGO_BIN_EXE_layerwise"))
            .args(["forward", "--model", model, "--prompt-ids", "5,17,42", "--out"])
            .arg(&out_file)
            .env("HF_HOME", home.path())
            .env_remove("HF_HUB_CACHE")
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .expect("run")
    };
    let out = run("acme/tiny-multiexit");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(read_safetensors(&out_file)["logits"].shape, vec![3, 96]);

    let missing = run("acme/not-downloaded");
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success());
    for part in ["acme/not-downloaded", "HF_HUB_OFFLINE", "local checkpoint directory"] {
        assert!(err.contains(part), "{err:?} should mention {part:?}");
    }
}
