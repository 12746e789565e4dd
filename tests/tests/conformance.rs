//! The op conformance suite (`layerwise::backend::conformance`) on every backend this build has:
//! the CPU backend against the reference, and the reference against itself (which checks that the
//! suite's own plumbing runs). A device backend adds one line here.

layerwise::conformance_tests!(conformance_cpu, layerwise::Cpu::default());
layerwise::conformance_tests!(conformance_reference, layerwise::Reference::default());
