//! CUDA kernels for layerwise, and their proof without a GPU.
//!
//! The kernels are CUDA C sources under `kernels/cuda/`, one file per kernel family, each with a
//! header comment giving the algorithm, the launch shape and what it must equal (an op of the
//! reference backend, `layerwise::backend::Reference`). The same sources are built two ways:
//! - for a GPU, at run time with NVRTC for the device's architecture ([`cuda`]);
//! - for the CPU, by the host C++ compiler against `kernels/emulation/cuda_emu.h`, which runs the
//!   threads of a block as fibers with CUDA's barrier, warp-shuffle, vote and atomic semantics
//!   ([`emulated`]). The `emulated_*` tests run every kernel that way against the reference backend,
//!   with the threads scheduled in forward and in reverse order (a missing barrier shows up as a
//!   difference between the two).
//!
//! [`cuda`] is the backend built on these kernels (cudarc, dynamic loading); the `stand_in_driver_*`
//! tests run it end to end on a stand-in driver that executes each launch with the CPU build.
//!
//! What has run on a GPU: the self-test on an NVIDIA H200 (2026-11-30); the kernels and the
//! backend have changed since (see the README's "GPU" section and `kernels/NOTES.md`).

pub mod cuda;
pub mod emulated;
pub mod sources;

/// Where the build put the stand-in CUDA driver (`libcuda.so`, see `kernels/standin/`): for tests
/// that run the CUDA backend without a GPU, with this directory on LD_LIBRARY_PATH.
pub const STAND_IN_DRIVER_DIR: &str = env!("LAYERWISE_STANDIN_DIR");
