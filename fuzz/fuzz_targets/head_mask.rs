//! `cargo +nightly fuzz run head_mask`: see layerwise_tests::fuzz_targets::head_mask.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| layerwise_tests::fuzz_targets::head_mask(data));
