//! `cargo +nightly fuzz run config_json`: see layerwise_tests::fuzz_targets::config_json.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| layerwise_tests::fuzz_targets::config_json(data));
