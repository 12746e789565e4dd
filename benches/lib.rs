//! criterion benchmarks for layerwise live in this folder's bench targets (`cargo bench -p layerwise-benches`).

/// The repository's demo checkpoint (random weights, GPT-2 vocabulary).
pub const DEMO_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/demo-gpt2-multiexit");
