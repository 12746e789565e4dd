//! The CUDA C sources, embedded for run-time compilation (NVRTC) and for the compile tests.

/// `(file name, text)` of every kernel family, and of the header they share.
pub const SOURCES: &[(&str, &str)] = &[
    ("common.cuh", include_str!("../cuda/common.cuh")),
    ("norms.cu", include_str!("../cuda/norms.cu")),
    ("elementwise.cu", include_str!("../cuda/elementwise.cu")),
    ("argmax.cu", include_str!("../cuda/argmax.cu")),
    ("acd.cu", include_str!("../cuda/acd.cu")),
    ("products.cu", include_str!("../cuda/products.cu")),
    ("memory.cu", include_str!("../cuda/memory.cu")),
    ("attention.cu", include_str!("../cuda/attention.cu")),
];

/// The kernels each file defines (their `extern "C"` names).
pub const KERNELS: &[(&str, &[&str])] = &[
    ("norms.cu", &["lw_layer_norm", "lw_rms_norm"]),
    (
        "elementwise.cu",
        &[
            "lw_add",
            "lw_mul",
            "lw_gelu_tanh_inplace",
            "lw_gelu_erf_inplace",
            "lw_silu_inplace",
            "lw_relu_inplace",
            "lw_scale_heads",
        ],
    ),
    ("argmax.cu", &["lw_argmax_rows"]),
    (
        "acd.cu",
        &[
            "lw_acd_select",
            "lw_acd_lower_f32",
            "lw_acd_lower_f16",
            "lw_acd_lower_bf16",
            "lw_acd_lower_from_logits",
            "lw_acd_finish",
        ],
    ),
    (
        "products.cu",
        &[
            "lw_matvec_f32",
            "lw_matvec_f16",
            "lw_matvec_bf16",
            "lw_matvec1_f32",
            "lw_matvec1_f16",
            "lw_matvec1_bf16",
            "lw_gemm_f32",
            "lw_gemm_f16",
            "lw_gemm_bf16",
            "lw_norm_head_f32",
            "lw_norm_head_f16",
            "lw_norm_head_bf16",
            "lw_norm_head1_f32",
            "lw_norm_head1_f16",
            "lw_norm_head1_bf16",
        ],
    ),
    (
        "memory.cu",
        &[
            "lw_embed_f32",
            "lw_embed_f16",
            "lw_embed_bf16",
            "lw_gather_rows",
            "lw_split_columns",
            "lw_rope",
            "lw_kv_write",
            "lw_copy_blocks",
        ],
    ),
    ("attention.cu", &["lw_attention", "lw_attention_probs"]),
];

/// The text of kernel file `file` with its `#include "common.cuh"` replaced by the header's text: one
/// self-contained program for NVRTC (no include paths, no files on disk).
pub fn program(file: &str) -> Option<String> {
    let text = SOURCES.iter().find(|(name, _)| *name == file)?.1;
    let common = SOURCES.iter().find(|(name, _)| *name == "common.cuh")?.1;
    Some(text.replace("#include \"common.cuh\"", common))
}
