//! Replays the fuzzers' committed corpus and crash reproducers (fuzz/corpus/<target>/,
//! fuzz/artifacts/<target>/) through the fuzz targets' bodies on stable: every input that ever found
//! a bug stays a test, and `cargo test` needs no nightly toolchain or libFuzzer.

use std::path::Path;

use layerwise_tests::fuzz_targets::TARGETS;

#[test]
fn fuzz_corpus_and_reproducers_end_in_errors_not_crashes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    for (name, target) in TARGETS {
        let mut inputs = 0;
        for folder in ["corpus", "artifacts"] {
            let Ok(entries) = std::fs::read_dir(root.join(folder).join(name)) else { continue };
            for entry in entries {
                let path = entry.expect("corpus entry").path();
                if path.is_file() {
                    target(&std::fs::read(&path).expect("read the input"));
                    inputs += 1;
                }
            }
        }
        assert!(inputs > 0, "fuzz/corpus/{name}: no inputs (the corpus is committed with the targets)");
        eprintln!("fuzz target {name}: {inputs} inputs replayed");
    }
}
