//! CUDA kernels for layerwise, and their proof without a GPU.
//!
//! The kernels are CUDA C sources under `kernels/cuda/`, one file per kernel family, each with a
//! header comment giving the algorithm, the launch shape and what it must equal (an op of the
//! reference backend, `layerwise::backend::Reference`). The same sources are built two ways:
//! - for a GPU, at run time with NVRTC for the device's architecture (the CUDA backend, to come);
//! - for the CPU, by the host C++ compiler against `kernels/emulation/cuda_emu.h`, which runs the
//!   threads of a block as fibers with CUDA's barrier, warp-shuffle, vote and atomic semantics
//!   ([`emulated`]). The `emulated_*` tests run every kernel that way against the reference backend,
//!   with the threads scheduled in forward and in reverse order (a missing barrier shows up as a
//!   difference between the two).
//!
//! What has run on a GPU: nothing yet (see the README's "GPU" section).

pub mod emulated;
pub mod sources;
