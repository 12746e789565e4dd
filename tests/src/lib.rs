//! Helpers shared by the cross-crate tests: fixture paths and comparisons against the values
//! transformers recorded (tools/scripts/make_fixtures.py).

pub mod counting;
pub mod fuzz_targets;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// `fixture(name)` as a string, for APIs that take a model source.
pub fn fixture_str(name: &str) -> String {
    fixture(name).to_string_lossy().into_owned()
}

/// Token ids from a JSON array (as the fixture scripts record them).
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("an array of ids").iter().map(|t| t.as_u64().expect("an id") as u32).collect()
}

/// A tensor recorded by the fixture script: shape and values widened to f64.
pub struct Recorded {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

/// Reads every tensor of a safetensors file written by the fixture script or by `layerwise forward`.
pub fn read_safetensors(path: &Path) -> HashMap<String, Recorded> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data();
            let values: Vec<f64> = match view.dtype() {
                safetensors::Dtype::F32 => {
                    data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect()
                }
                safetensors::Dtype::F64 => {
                    data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
                }
                safetensors::Dtype::I64 => {
                    data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64).collect()
                }
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            (name, Recorded { shape: view.shape().to_vec(), values })
        })
        .collect()
}

/// The recorded outputs of a fixture checkpoint (`expected.safetensors`).
pub fn expected(name: &str) -> HashMap<String, Recorded> {
    read_safetensors(&fixture(name).join("expected.safetensors"))
}

/// The prompt a fixture's outputs were recorded for.
pub fn expected_ids(expected: &HashMap<String, Recorded>) -> Vec<u32> {
    expected["input_ids"].values.iter().map(|&v| v as u32).collect()
}

/// Largest |actual - reference| relative to the largest |reference| of the tensor.
pub fn relative_error(actual: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(actual.len(), reference.len(), "length mismatch");
    let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(f64::MIN_POSITIVE);
    let diff = actual.iter().zip(reference).fold(0.0f64, |m, (a, r)| m.max((*a as f64 - r).abs()));
    diff / scale
}

/// Asserts `relative_error(actual, reference) <= tolerance`, naming the tensor.
pub fn assert_close(what: &str, actual: &[f32], reference: &Recorded, tolerance: f64) {
    let err = relative_error(actual, &reference.values);
    assert!(err <= tolerance, "{what}: relative error {err:.3e} exceeds {tolerance:e}");
}
