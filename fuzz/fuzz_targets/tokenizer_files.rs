//! `cargo +nightly fuzz run tokenizer_files`: see layerwise_tests::fuzz_targets::tokenizer_files.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| layerwise_tests::fuzz_targets::tokenizer_files(data));
