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

// Programmatic dependent launch (sm_90 and later; the host's launch attribute, kernels/src/cuda):
// a kernel may start while the one before it in the stream is still running, so that its launch
// and its first weight loads overlap that kernel's tail. lw_await_inputs() waits until the
// previous kernel has finished and its writes are visible (griddepcontrol.wait), then lets the next
// kernel start launching (griddepcontrol.launch_dependents): at most two kernels overlap. The rule
// every kernel follows: before lw_await_inputs it reads nothing but weights (never written while
// the model runs) and writes no global memory; and every thread calls it, on early-exit paths too,
// so that no kernel can finish before its predecessor (the emulation fails a launch in which a
// thread returns without it). Launched without the attribute, or built for sm_80, it costs nothing.
#if defined(LAYERWISE_EMULATION)
__device__ __forceinline__ void lw_await_inputs() { emu::grid_dependency_wait(); }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void lw_await_inputs() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
#else
__device__ __forceinline__ void lw_await_inputs() {}
#endif

#define LW_FULL_MASK 0xffffffffu
#define LW_INF __int_as_float(0x7f800000)

// bf16 is the upper half of an f32.
__device__ __forceinline__ float bf16_to_f32(uint16_t b) { return __uint_as_float(uint32_t(b) << 16); }

// IEEE half to f32, subnormals, infinities and NaN included: the device's exact conversion
// instruction, and the same by hand in the emulation (where no PTX runs).
#ifndef LAYERWISE_EMULATION
__device__ __forceinline__ float f16_to_f32(uint16_t h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
#else
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
#endif

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

// 16 bytes read in one instruction (LDG.128 on the device): 4 f32 or 8 f16 / bf16 weights. The
// address must be 16-byte aligned.
struct __align__(16) lw_vec16 {
  uint32_t w[4];
};
template <class T>
struct lw_per16 {
  static constexpr int n = 16 / sizeof(T);  // elements per 16 bytes
};
__device__ __forceinline__ lw_vec16 lw_load16(const void* p) { return *reinterpret_cast<const lw_vec16*>(p); }
__device__ __forceinline__ bool lw_aligned16(const void* p) { return (reinterpret_cast<size_t>(p) & 15) == 0; }

// The elements of 16 loaded bytes, widened to f32, in memory order.
template <class T>
__device__ __forceinline__ void lw_unpack(const lw_vec16& v, float* out);
template <>
__device__ __forceinline__ void lw_unpack<float>(const lw_vec16& v, float* out) {
#pragma unroll
  for (int k = 0; k < 4; ++k) out[k] = __uint_as_float(v.w[k]);
}
template <>
__device__ __forceinline__ void lw_unpack<lw_bf16>(const lw_vec16& v, float* out) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    out[2 * k] = __uint_as_float(v.w[k] << 16);
    out[2 * k + 1] = __uint_as_float(v.w[k] & 0xffff0000u);
  }
}
template <>
__device__ __forceinline__ void lw_unpack<lw_f16>(const lw_vec16& v, float* out) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    out[2 * k] = f16_to_f32(uint16_t(v.w[k] & 0xffffu));
    out[2 * k + 1] = f16_to_f32(uint16_t(v.w[k] >> 16));
  }
}

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

// The end of a block's share of work that several blocks split (the splits of an attention row,
// the slices of a vocabulary row): publishes the block's writes (__threadfence) and takes a ticket
// from *counter; true, in every thread, for the block that draws the last of `blocks` tickets,
// which then reads the others' results (through volatile loads, not a stale L1 line) and sets the
// counter back to 0. Every thread of the block must call it; `flag` is an int of shared memory.
__device__ __forceinline__ bool lw_last_block(uint32_t* counter, int blocks, int* flag) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) *flag = atomicAdd(counter, 1u) == uint32_t(blocks - 1);
  __syncthreads();
  bool last = *flag != 0;
  if (last) __threadfence();
  return last;
}

// Rows of x a warp's dot products handle at once (lw_lane_dots: the decode matvec's limit).
#define LW_MAX_TOKENS 8

// acc[r] += Σ_k w[k] * x[r * x_stride + i + k] over the elements of one 16-byte load of weights at i.
template <class T, int MAXT>
__device__ __forceinline__ void lw_accumulate16(float* acc, const lw_vec16& raw, const float* x, int i, int t,
                                                int x_stride) {
  constexpr int V = lw_per16<T>::n;
  float wv[V];
  lw_unpack<T>(raw, wv);
#pragma unroll
  for (int r = 0; r < MAXT; ++r) {
    if (r < t) {
      const float* xr = x + size_t(r) * x_stride + i;
      float xv[V];
#pragma unroll
      for (int h = 0; h < V / 4; ++h) lw_unpack<float>(lw_load16(xr + 4 * h), xv + 4 * h);
#pragma unroll
      for (int k = 0; k < V; ++k) acc[r] += wv[k] * xv[k];
    }
  }
}

// Rounds of U 16-byte loads per lane over elements [begin, n) of the row (a warp reads 512 * U
// contiguous bytes per round, every load issued before any is used); returns where they stopped.
template <class T, int MAXT, int U>
__device__ __forceinline__ int lw_lane_rounds(float* acc, const float* x, int x_stride, const T* row, int t, int begin,
                                              int n) {
  constexpr int V = lw_per16<T>::n;
  int lane = threadIdx.x & 31;
  int round = 32 * V * U;
  int end = begin + (n - begin) / round * round;
  for (int base = begin + lane * V; base < end; base += round) {
    lw_vec16 raw[U];
#pragma unroll
    for (int u = 0; u < U; ++u) raw[u] = lw_load16(row + base + u * 32 * V);
#pragma unroll
    for (int u = 0; u < U; ++u) lw_accumulate16<T, MAXT>(acc, raw[u], x, base + u * 32 * V, t, x_stride);
  }
  return end;
}

// Whether lw_lane_dots reads this row and x 16 bytes at a time (else one element per lane per step).
template <class T>
__device__ __forceinline__ bool lw_vector_path(const float* x, int x_stride, const T* row, int n) {
  return n % lw_per16<T>::n == 0 && x_stride % 4 == 0 && lw_aligned16(row) && lw_aligned16(x);
}

// This lane's share of Σ_{i < n} x[r * x_stride + i] * row[i] for r < t <= MAXT (summed over the
// warp by the caller). When the row and x allow it, 16-byte loads in rounds of 8 in flight per lane,
// then of 4, then one (a 4 KiB f32 row: one round of 8; a 2 KiB bf16 row: one of 4): the fewer
// rounds, the fewer times a warp waits a whole memory latency. Else, or for the tail, one element
// per lane per step.
template <class T, int MAXT = LW_MAX_TOKENS>
__device__ __forceinline__ void lw_lane_dots(float* acc, const float* x, int x_stride, const T* row, int t, int n) {
  constexpr int V = lw_per16<T>::n;
  int lane = threadIdx.x & 31;
  int done = 0;
  if (lw_vector_path(x, x_stride, row, n)) {
    done = lw_lane_rounds<T, MAXT, 8>(acc, x, x_stride, row, t, 0, n);
    done = lw_lane_rounds<T, MAXT, 4>(acc, x, x_stride, row, t, done, n);
    for (int base = done + lane * V; base < n; base += 32 * V)
      lw_accumulate16<T, MAXT>(acc, lw_load16(row + base), x, base, t, x_stride);
    done = n;
  }
  for (int i = done + lane; i < n; i += 32) {
    float wv = lw_load(row, i);
#pragma unroll
    for (int r = 0; r < MAXT; ++r) {
      if (r < t) acc[r] += wv * x[size_t(r) * x_stride + i];
    }
  }
}

// lw_lane_dots in two halves, so that a kernel can issue a row's first loads before it waits for its
// inputs (lw_await_inputs): lw_first_loads issues this lane's first round of 16-byte weight loads
// as lw_lane_dots would (8 when the row has a round of 8, else 4, else the row's few loads, at most
// 4) into `raw` and returns how many, with the elements the warp's round spans in *covered; it
// reads no x. `vector` is lw_vector_path for this row and x; when false, no load is issued.
// lw_lane_dots_after then adds those loads' products and the rest of the row: the same sums, in the
// same order, as lw_lane_dots alone.
template <class T>
__device__ __forceinline__ int lw_first_loads(lw_vec16 (&raw)[8], const T* row, int n, bool vector, int* covered) {
  constexpr int V = lw_per16<T>::n;
  int lane = threadIdx.x & 31;
  int count = 0;
  *covered = 0;
  if (vector) {
    if (n >= 256 * V) {
      count = 8;
      *covered = 256 * V;
    } else if (n >= 128 * V) {
      count = 4;
      *covered = 128 * V;
    } else {
      count = (n - lane * V + 32 * V - 1) / (32 * V);  // this lane's loads at lane * V + u * 32 * V < n
      *covered = n;
    }
  }
#pragma unroll
  for (int u = 0; u < 8; ++u) {
    if (u < count) raw[u] = lw_load16(row + lane * V + u * 32 * V);
  }
  return count;
}

template <class T, int MAXT>
__device__ __forceinline__ void lw_lane_dots_after(float* acc, const lw_vec16 (&raw)[8], int count, int covered,
                                                   const float* x, int x_stride, const T* row, int t, int n) {
  constexpr int V = lw_per16<T>::n;
  int lane = threadIdx.x & 31;
#pragma unroll
  for (int u = 0; u < 8; ++u) {
    if (u < count) lw_accumulate16<T, MAXT>(acc, raw[u], x, lane * V + u * 32 * V, t, x_stride);
  }
  lw_lane_dots<T, MAXT>(acc, x + covered, x_stride, row + covered, t, n - covered);
}

// The activations, with the formulas of the engine's `math` module (elementwise.cu applies them in
// place; the products apply them to each output as it is stored).
__device__ __forceinline__ float lw_gelu_tanh(float v) {
  return 0.5f * v * (1.0f + tanhf(0.7978846f * (v + 0.044715f * v * v * v)));
}
__device__ __forceinline__ float lw_gelu_erf(float v) { return 0.5f * v * (1.0f + erff(v * 0.70710678f)); }
__device__ __forceinline__ float lw_silu(float v) { return v / (1.0f + expf(-v)); }
__device__ __forceinline__ float lw_relu(float v) { return fmaxf(v, 0.0f); }

// What a product does with each finished output value (bias included): store it, add it to the
// value already there (a residual branch's last product: x += W·h + b), or store an activation of
// it. The codes are the host's (kernels/src/cuda/mod.rs, `Epilogue`).
#define LW_EPILOGUE_STORE 0
#define LW_EPILOGUE_ADD 1
#define LW_EPILOGUE_GELU_TANH 2
#define LW_EPILOGUE_GELU_ERF 3
#define LW_EPILOGUE_RELU 4
#define LW_EPILOGUE_SILU 5
__device__ __forceinline__ void lw_epilogue(float* out, float v, int epilogue) {
  switch (epilogue) {
    case LW_EPILOGUE_ADD: *out += v; break;
    case LW_EPILOGUE_GELU_TANH: *out = lw_gelu_tanh(v); break;
    case LW_EPILOGUE_GELU_ERF: *out = lw_gelu_erf(v); break;
    case LW_EPILOGUE_RELU: *out = lw_relu(v); break;
    case LW_EPILOGUE_SILU: *out = lw_silu(v); break;
    default: *out = v;
  }
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
