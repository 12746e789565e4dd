// The project's CUDA sources, compiled by the host C++ compiler against cuda_emu.h, each kernel
// exported as `emu_<kernel>` (see EMU_EXPORT) for the Rust side (kernels/src/emulated.rs) and the
// stand-in driver.
#include "cuda_emu.h"

#include "acd.cu"
#include "argmax.cu"
#include "attention.cu"
#include "elementwise.cu"
#include "memory.cu"
#include "norms.cu"
#include "products.cu"
#include "selftest.cuh"

EMU_EXPORT(lw_layer_norm)
EMU_EXPORT(lw_rms_norm)
EMU_EXPORT(lw_add)
EMU_EXPORT(lw_mul)
EMU_EXPORT(lw_gelu_tanh_inplace)
EMU_EXPORT(lw_gelu_erf_inplace)
EMU_EXPORT(lw_silu_inplace)
EMU_EXPORT(lw_relu_inplace)
EMU_EXPORT(lw_scale_heads)
EMU_EXPORT(lw_argmax_rows)
EMU_EXPORT(lw_acd_select)
EMU_EXPORT(lw_acd_lower_f32)
EMU_EXPORT(lw_acd_lower_f16)
EMU_EXPORT(lw_acd_lower_bf16)
EMU_EXPORT(lw_acd_lower_from_logits)
EMU_EXPORT(lw_acd_finish)
EMU_EXPORT(lw_matvec_f32)
EMU_EXPORT(lw_matvec_f16)
EMU_EXPORT(lw_matvec_bf16)
EMU_EXPORT(lw_matvec1_f32)
EMU_EXPORT(lw_matvec1_f16)
EMU_EXPORT(lw_matvec1_bf16)
EMU_EXPORT(lw_gemm_f32)
EMU_EXPORT(lw_gemm_f16)
EMU_EXPORT(lw_gemm_bf16)
EMU_EXPORT(lw_norm_head_f32)
EMU_EXPORT(lw_norm_head_f16)
EMU_EXPORT(lw_norm_head_bf16)
EMU_EXPORT(lw_norm_head1_f32)
EMU_EXPORT(lw_norm_head1_f16)
EMU_EXPORT(lw_norm_head1_bf16)
EMU_EXPORT(lw_embed_f32)
EMU_EXPORT(lw_embed_f16)
EMU_EXPORT(lw_embed_bf16)
EMU_EXPORT(lw_gather_rows)
EMU_EXPORT(lw_split_columns)
EMU_EXPORT(lw_rope)
EMU_EXPORT(lw_kv_write)
EMU_EXPORT(lw_copy_blocks)
EMU_EXPORT(lw_attention)
EMU_EXPORT(lw_attention_probs)
EMU_EXPORT(lw_test_neighbour)
EMU_EXPORT(lw_test_deadlock)
EMU_EXPORT(lw_test_half_warp)
EMU_EXPORT(lw_test_exit_before_wait)
