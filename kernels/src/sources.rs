//! The CUDA C sources, embedded for run-time compilation (NVRTC) and for the compile tests.

/// `(file name, text)` of every kernel family, and of the header they share.
pub const SOURCES: &[(&str, &str)] = &[
    ("common.cuh", include_str!("../cuda/common.cuh")),
    ("norms.cu", include_str!("../cuda/norms.cu")),
    ("elementwise.cu", include_str!("../cuda/elementwise.cu")),
    ("argmax.cu", include_str!("../cuda/argmax.cu")),
    ("acd.cu", include_str!("../cuda/acd.cu")),
    ("products.cu", include_str!("../cuda/products.cu")),
];

/// The kernels each file defines (their `extern "C"` names).
pub const KERNELS: &[(&str, &[&str])] = &[
    ("norms.cu", &["lw_layer_norm", "lw_rms_norm"]),
    ("elementwise.cu", &["lw_add", "lw_mul", "lw_gelu_tanh", "lw_gelu_erf", "lw_silu", "lw_relu", "lw_scale_heads"]),
    ("argmax.cu", &["lw_argmax_rows"]),
    ("acd.cu", &["lw_acd_f32", "lw_acd_f16", "lw_acd_bf16", "lw_acd_from_logits"]),
    (
        "products.cu",
        &[
            "lw_matvec_f32",
            "lw_matvec_f16",
            "lw_matvec_bf16",
            "lw_gemm_f32",
            "lw_gemm_f16",
            "lw_gemm_bf16",
            "lw_norm_head_f32",
            "lw_norm_head_f16",
            "lw_norm_head_bf16",
        ],
    ),
];

/// The text of kernel file `file` with its `#include "common.cuh"` replaced by the header's text: one
/// self-contained program for NVRTC (no include paths, no files on disk).
pub fn program(file: &str) -> Option<String> {
    let text = SOURCES.iter().find(|(name, _)| *name == file)?.1;
    let common = SOURCES.iter().find(|(name, _)| *name == "common.cuh")?.1;
    Some(text.replace("#include \"common.cuh\"", common))
}
