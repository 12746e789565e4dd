//! `cargo +nightly fuzz run generation_config`: see layerwise_tests::fuzz_targets::generation_config.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| layerwise_tests::fuzz_targets::generation_config(data));
