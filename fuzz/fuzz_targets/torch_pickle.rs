//! `cargo +nightly fuzz run torch_pickle`: see layerwise_tests::fuzz_targets::torch_pickle.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| layerwise_tests::fuzz_targets::torch_pickle(data));
