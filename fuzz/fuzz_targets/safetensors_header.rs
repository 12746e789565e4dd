//! `cargo +nightly fuzz run safetensors_header`: see layerwise_tests::fuzz_targets::safetensors_header.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| layerwise_tests::fuzz_targets::safetensors_header(data));
