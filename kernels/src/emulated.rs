//! Launching the kernels' CPU emulation: the same CUDA sources compiled by the host C++ compiler
//! (see `kernels/emulation/cuda_emu.h` for the execution model). Arguments are passed as CUDA's
//! `kernelParams` are: one pointer per kernel argument, pointing at the argument's value.
//!
//! ```
//! use layerwise_kernels::emulated::{launch, Kernel, Launch};
//!
//! let mut x = vec![-1.0f32, 0.0, 2.0];
//! let (mut ptr, mut n) = (x.as_mut_ptr(), x.len() as u64);
//! let mut params = [&mut ptr as *mut _ as *mut std::ffi::c_void, &mut n as *mut _ as *mut std::ffi::c_void];
//! // SAFETY: lw_relu(float* x, unsigned long long n) reads and writes n floats at x.
//! unsafe { launch(Kernel::Relu, Launch::grid_1d(1, 32), &mut params) }.expect("launch");
//! assert_eq!(x, [0.0, 0.0, 2.0]);
//! ```

use std::ffi::{c_char, c_int, c_void, CStr};

/// A launch's shape, as `cuLaunchKernel` takes it, plus the order the emulator runs a block's
/// threads in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: usize,
    /// Run the blocks, and each block's threads, last to first (0: first to last).
    pub reverse: c_int,
}

impl Launch {
    /// `blocks` blocks of `threads` threads along x.
    pub fn grid_1d(blocks: u32, threads: u32) -> Self {
        Launch { grid: [blocks, 1, 1], block: [threads, 1, 1], shared_bytes: 0, reverse: 0 }
    }

    /// The same launch with the blocks, and the threads of each block, run in reverse order.
    pub fn reversed(self) -> Self {
        Launch { reverse: 1, ..self }
    }
}

type Entry = unsafe extern "C" fn(*const Launch, *mut *mut c_void, *mut c_char, usize) -> c_int;

macro_rules! kernels {
    ($($variant:ident => $symbol:ident),* $(,)?) => {
        extern "C" {
            $(fn $symbol(config: *const Launch, params: *mut *mut c_void, error: *mut c_char, len: usize) -> c_int;)*
        }

        /// Every kernel the emulation library exports.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Kernel {
            $($variant),*
        }

        impl Kernel {
            fn entry(self) -> Entry {
                match self {
                    $(Kernel::$variant => $symbol),*
                }
            }

            /// The kernel's name in the CUDA sources.
            pub fn name(self) -> &'static str {
                match self {
                    $(Kernel::$variant => &stringify!($symbol)[4..]),*
                }
            }
        }
    };
}

kernels! {
    LayerNorm => emu_lw_layer_norm,
    RmsNorm => emu_lw_rms_norm,
    Add => emu_lw_add,
    Mul => emu_lw_mul,
    GeluTanh => emu_lw_gelu_tanh_inplace,
    GeluErf => emu_lw_gelu_erf_inplace,
    Silu => emu_lw_silu_inplace,
    Relu => emu_lw_relu_inplace,
    ScaleHeads => emu_lw_scale_heads,
    ArgmaxRows => emu_lw_argmax_rows,
    AcdSelect => emu_lw_acd_select,
    AcdLowerF32 => emu_lw_acd_lower_f32,
    AcdLowerF16 => emu_lw_acd_lower_f16,
    AcdLowerBf16 => emu_lw_acd_lower_bf16,
    AcdLowerFromLogits => emu_lw_acd_lower_from_logits,
    AcdFinish => emu_lw_acd_finish,
    MatvecF32 => emu_lw_matvec_f32,
    MatvecF16 => emu_lw_matvec_f16,
    MatvecBf16 => emu_lw_matvec_bf16,
    Matvec1F32 => emu_lw_matvec1_f32,
    Matvec1F16 => emu_lw_matvec1_f16,
    Matvec1Bf16 => emu_lw_matvec1_bf16,
    GemmF32 => emu_lw_gemm_f32,
    GemmF16 => emu_lw_gemm_f16,
    GemmBf16 => emu_lw_gemm_bf16,
    NormHeadF32 => emu_lw_norm_head_f32,
    NormHeadF16 => emu_lw_norm_head_f16,
    NormHeadBf16 => emu_lw_norm_head_bf16,
    NormHead1F32 => emu_lw_norm_head1_f32,
    NormHead1F16 => emu_lw_norm_head1_f16,
    NormHead1Bf16 => emu_lw_norm_head1_bf16,
    EmbedF32 => emu_lw_embed_f32,
    EmbedF16 => emu_lw_embed_f16,
    EmbedBf16 => emu_lw_embed_bf16,
    GatherRows => emu_lw_gather_rows,
    SplitColumns => emu_lw_split_columns,
    Rope => emu_lw_rope,
    KvWrite => emu_lw_kv_write,
    CopyBlocks => emu_lw_copy_blocks,
    Attention => emu_lw_attention,
    AttentionProbs => emu_lw_attention_probs,
    TestNeighbour => emu_lw_test_neighbour,
    TestDeadlock => emu_lw_test_deadlock,
    TestHalfWarp => emu_lw_test_half_warp,
    TestExitBeforeWait => emu_lw_test_exit_before_wait,
}

/// Runs `kernel` on the CPU; an error carries the emulator's message (a deadlock, a shuffle outside
/// its mask, a bad launch shape).
///
/// # Safety
/// `params` must hold one pointer per kernel argument, each pointing at a value of that argument's
/// type, and every device pointer among them must address the memory the kernel touches at this
/// launch shape.
pub unsafe fn launch(kernel: Kernel, config: Launch, params: &mut [*mut c_void]) -> Result<(), String> {
    let mut error = [0 as c_char; 1024];
    // SAFETY: the caller vouches for params; config and error outlive the call.
    let status = unsafe { (kernel.entry())(&config, params.as_mut_ptr(), error.as_mut_ptr(), error.len()) };
    if status == 0 {
        return Ok(());
    }
    // SAFETY: the emulator writes a NUL-terminated message into error.
    let message = unsafe { CStr::from_ptr(error.as_ptr()) };
    Err(format!("{}: {}", kernel.name(), message.to_string_lossy()))
}

extern "C" {
    fn emu_use_portable_fibers(on: c_int);
}

/// For launches from now on, anywhere in the process: switch a block's fibers with glibc's
/// ucontext (`true`), or with the emulator's own stack switch where it has one (x86-64; `false`, the
/// default). Both run the same schedule, so every kernel gives the same bits either way; the
/// portable switch makes a system call at every switch and is several times slower.
pub fn use_portable_fibers(on: bool) {
    // SAFETY: sets an atomic flag that each launch reads once.
    unsafe { emu_use_portable_fibers(c_int::from(on)) }
}

/// The attention kernels' argument block (`lw_attention_args` in kernels/cuda/attention.cu), passed
/// by value.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AttentionArgs {
    pub q: *const f32,
    pub keys: *mut f32,
    pub values: *mut f32,
    /// The step's keys and values for the kernel to write first (a decoding step), or null.
    pub new_k: *const f32,
    pub new_v: *const f32,
    pub kv_stride: i32,
    pub positions: *const u32,
    pub row_seq: *const u32,
    pub table_start: *const u32,
    pub block_tables: *const u32,
    pub block_size: i32,
    pub layer: i32,
    pub heads: i32,
    pub kv_heads: i32,
    pub head_dim: i32,
    /// 0: no window.
    pub window: i32,
    pub slots_per_layer: u64,
    pub width: i32,
    /// Floats from one query row to the next (the query width, or a fused q|k|v row's).
    pub q_stride: i32,
    pub scale: f32,
}

/// A kernel argument as CUDA's `kernelParams` holds it: a pointer to the value.
pub fn arg<T>(value: &mut T) -> *mut c_void {
    value as *mut T as *mut c_void
}
