// What every kernel file shares: integer types and dynamic shared memory without CUDA headers (so
// that NVRTC and the host compiler of the emulation build the same sources), f16/bf16 widening by
// hand, and warp and block reductions.
//
// Reductions assume blockDim.x is a multiple of 32 (every lane of every warp takes part in the
// full-mask shuffles) and at most 1024; `scratch` is 32 floats of shared memory.
#pragma once

#ifdef LAYERWISE_EMULATION
#include <cstdint>
#define DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(emu::dynamic_shared())
#else
typedef unsigned int uint32_t;
typedef unsigned short uint16_t;
typedef unsigned long long uint64_t;
#define DYNAMIC_SHARED(type, name)                                        \
  extern __shared__ __align__(16) unsigned char lw_dynamic_shared[];      \
  type* name = reinterpret_cast<type*>(lw_dynamic_shared)
#endif

#define LW_FULL_MASK 0xffffffffu
#define LW_INF __int_as_float(0x7f800000)

// bf16 is the upper half of an f32.
__device__ __forceinline__ float bf16_to_f32(uint16_t b) { return __uint_as_float(uint32_t(b) << 16); }

// IEEE half to f32, subnormals, infinities and NaN included.
__device__ __forceinline__ float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    if (mantissa == 0) return __uint_as_float(sign);
    // Subnormal: value = mantissa * 2^-24.
    float v = float(mantissa) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// Weights in f32, or f16 / bf16 as their raw 16-bit patterns, read widened to f32.
struct lw_f16 {
  uint16_t bits;
};
struct lw_bf16 {
  uint16_t bits;
};
template <class T>
__device__ __forceinline__ float lw_load(const T* p, size_t i);
template <>
__device__ __forceinline__ float lw_load<float>(const float* p, size_t i) { return p[i]; }
template <>
__device__ __forceinline__ float lw_load<lw_f16>(const lw_f16* p, size_t i) { return f16_to_f32(p[i].bits); }
template <>
__device__ __forceinline__ float lw_load<lw_bf16>(const lw_bf16* p, size_t i) { return bf16_to_f32(p[i].bits); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(LW_FULL_MASK, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(LW_FULL_MASK, v, offset));
  return v;
}

// The sum of `v` over the block, returned to every thread.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // the previous use of scratch is over
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_sum(lane < warps ? scratch[lane] : 0.0f);
}

// The maximum of `v` over the block, returned to every thread.
__device__ __forceinline__ float block_max(float v, float* scratch) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_max(lane < warps ? scratch[lane] : -LW_INF);
}

// One row's LayerNorm (biased variance, two passes) or RMSNorm into `dst`, by the whole block; every
// thread must call it. `bias` null means RMSNorm. Shared by norms.cu and the fused norm + head of
// products.cu.
__device__ __forceinline__ void lw_norm_row(float* dst, const float* row, const float* w, const float* bias, int cols,
                                            float eps, float* scratch) {
  if (bias) {
    float sum = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) sum += row[c];
    float mean = block_sum(sum, scratch) / float(cols);
    float squares = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
      float d = row[c] - mean;
      squares += d * d;
    }
    float inv = 1.0f / sqrtf(block_sum(squares, scratch) / float(cols) + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = (row[c] - mean) * inv * w[c] + bias[c];
  } else {
    float squares = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) squares += row[c] * row[c];
    float inv = 1.0f / sqrtf(block_sum(squares, scratch) / float(cols) + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = w[c] * (row[c] * inv);
  }
}
