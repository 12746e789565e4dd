//! CUDA kernels for layerwise: fused final-norm + exit head, fused contrast + softmax, and paged
//! KV-cache attention, loaded with cudarc.
//!
//! Not written yet: this crate reserves the place in the workspace. The engine's backend interface
//! ([`layerwise::backend::Backend`]) is what a CUDA implementation will provide; until then every
//! op runs on the CPU backend, which is also the reference the kernels will be tested against.
