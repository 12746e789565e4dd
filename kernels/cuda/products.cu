// Matrix products with a weight stored [out, in] (the CUDA backend stores every matrix so, GPT-2's
// Conv1D [in, out] weights transposed once at upload), in f32, f16 or bf16, summed in f32.
//
// lw_matvec_*: decoding, t <= 8 rows of x (lw_matvec1_*: the same for one row, t = 1, compiled
//   apart: a kernel's registers are those of its widest path, and eight rows' sums and operands took
//   the bf16 kernel to 164 registers a thread, one block per multiprocessor, on the H200): `split`
//   warps per output feature (1, 2, 4 or 8), each over a slice of the row (more warps in flight
//   when there are few features); the lanes stream the slice once (coalesced 16-byte loads, several
//   in flight per lane, the first round issued before the kernel waits for x, lw_await_inputs in
//   common.cuh) and keep one sum per token, then a shuffle reduction, and the feature's slices are
//   added in order through shared memory.
//   Bound by reading the weight: n_out * n_in elements per launch.
// Both products end with an epilogue (common.cuh, lw_epilogue) applied to each output value with its
//   bias: store it, add it to the output (a residual branch: x += W·h + b in one launch), or store an
//   activation of it (GELU, ReLU, SiLU: the MLP's up-projection and its activation in one launch).
// lw_gemm_*: prefill and batches, any t: 16 x 16 output tiles per block of 256 threads, 16-wide steps
//   along `in` through shared memory.
// lw_norm_head_*: a norm (LayerNorm, or RMSNorm when norm_b is null) fused with the product that reads
//   it (the final norm and one or several vocabulary heads, or a block's norm and its first product):
//   each warp first issues its first round of weight loads (before the wait for the states), then
//   the block normalises the t rows of each head's state into shared memory (a few KiB, cheap next
//   to the weights it reads) while they are in flight, then its warps compute their output features as lw_matvec does, with its
//   epilogue. out[h][r][o] (epilogue) Σ_i norm(state[h][r])[i] * head_h[o][i] (+ bias[o]);
//   heads[h] points at head h; bias (null for none) is for a single head. lw_norm_head1_*: the same
//   for one row (t = 1), compiled apart for fewer registers, as lw_matvec1_*.
//
// Launch: lw_matvec: grid ceil(n_out / (warps per block / split)), block 256; lw_gemm: grid (ceil(n_out / 16),
// ceil(t / 16)), block 256; lw_norm_head: grid (ceil(vocab / warps per block), heads), block 256,
// dynamic shared memory t * hidden * 4 bytes + 256. Must equal the reference backend's linear (then
// add_assign or activate, for the epilogues; layer_norm / rms_norm then linear, for the fused head)
// within 1e-5 of the largest output for f32 weights, 1e-4 for f16/bf16 (the conformance tolerances).
#include "common.cuh"

template <class T, int MAXT>
__device__ void lw_matvec(float* out, const float* x, const T* w, const float* bias, int t, int n_in, int n_out,
                          int split, int epilogue) {
  __shared__ float sums[32][LW_MAX_TOKENS];  // each warp's sums, per token
  int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int o = blockIdx.x * (warps / split) + warp / split;
  int part = warp % split;
  // Slices of whole 16-byte loads, so that each starts aligned as the row does.
  constexpr int V = lw_per16<T>::n;
  int slice = (n_in + split - 1) / split;
  slice = (slice + V - 1) / V * V;
  int start = min(n_in, part * slice), end = min(n_in, start + slice);
  const T* row = w + size_t(o < n_out ? o : 0) * n_in + start;
  // The row's first loads go out before the wait for x (the previous kernel's output), so that they
  // are in flight while it finishes (an f32 row of 1024: the whole row).
  lw_vec16 raw[8];
  int covered = 0;
  int early = o < n_out ? lw_first_loads<T>(raw, row, end - start, lw_vector_path(x + start, n_in, row, end - start), &covered) : 0;
  lw_await_inputs();
  float acc[MAXT];
#pragma unroll
  for (int r = 0; r < MAXT; ++r) acc[r] = 0.0f;
  if (o < n_out) lw_lane_dots_after<T, MAXT>(acc, raw, early, covered, x + start, n_in, row, t, end - start);
#pragma unroll
  for (int r = 0; r < MAXT; ++r) {
    float s = warp_sum(acc[r]);
    if (lane == 0) sums[warp][r] = s;
  }
  __syncthreads();
  // Lane r of the feature's first warp adds the slices' sums for token r, in slice order.
  if (part == 0 && lane < t && o < n_out) {
    float s = 0.0f;
    for (int p = 0; p < split; ++p) s += sums[warp + p][lane];
    lw_epilogue(out + size_t(lane) * n_out + o, bias ? s + bias[o] : s, epilogue);
  }
}

template <class T>
__device__ void lw_gemm(float* out, const float* x, const T* w, const float* bias, int t, int n_in, int n_out,
                        int epilogue) {
  __shared__ float xs[16][17];
  __shared__ float ws[16][17];
  lw_await_inputs();
  int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;  // ty: the tile's row (token), tx: its column (feature)
  int r = blockIdx.y * 16 + ty, o = blockIdx.x * 16 + tx;
  float acc = 0.0f;
  for (int k0 = 0; k0 < n_in; k0 += 16) {
    // x tile: rows r, columns k0 + tx; weight tile: features blockIdx.x * 16 + ty, inputs k0 + tx.
    int wo = blockIdx.x * 16 + ty;
    xs[ty][tx] = (r < t && k0 + tx < n_in) ? x[size_t(r) * n_in + k0 + tx] : 0.0f;
    ws[ty][tx] = (wo < n_out && k0 + tx < n_in) ? lw_load(w, size_t(wo) * n_in + k0 + tx) : 0.0f;
    __syncthreads();
#pragma unroll
    for (int k = 0; k < 16; ++k) acc += xs[ty][k] * ws[tx][k];
    __syncthreads();
  }
  if (r < t && o < n_out) lw_epilogue(out + size_t(r) * n_out + o, bias ? acc + bias[o] : acc, epilogue);
}

template <class T, int MAXT>
__device__ void lw_norm_head(float* out, const float* states, const float* norm_w, const float* norm_b,
                             const T* const* heads, const float* bias, int t, int hidden, int vocab, float eps,
                             int epilogue) {
  DYNAMIC_SHARED(float, shared);
  float* normed = shared;              // [t, hidden]
  float* scratch = shared + t * hidden;  // 32 floats
  int h = blockIdx.y;
  int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  int o = blockIdx.x * warps + (threadIdx.x >> 5);
  const T* row = heads[h] + size_t(o < vocab ? o : 0) * hidden;
  // The first round of this warp's weight loads (lw_first_loads), issued before the wait for the
  // states and before the norm: the norm's block reductions run while they are in flight instead of
  // before the first of them (3-4 us a launch on the H200, run 6 of NOTES.md).
  lw_vec16 raw[8];
  int covered = 0;
  int early = o < vocab ? lw_first_loads<T>(raw, row, hidden, lw_vector_path(normed, hidden, row, hidden), &covered) : 0;
  lw_await_inputs();
  const float* state = states + size_t(h) * t * hidden;
  for (int r = 0; r < t; ++r) {
    lw_norm_row(normed + size_t(r) * hidden, state + size_t(r) * hidden, norm_w, norm_b, hidden, eps, scratch);
  }
  __syncthreads();
  if (o >= vocab) return;
  // The dot products as lw_lane_dots alone would sum them, in the same order: the early round, then the rest.
  float acc[MAXT];
#pragma unroll
  for (int r = 0; r < MAXT; ++r) acc[r] = 0.0f;
  lw_lane_dots_after<T, MAXT>(acc, raw, early, covered, normed, hidden, row, t, hidden);
  float* dst = out + size_t(h) * t * vocab;
#pragma unroll
  for (int r = 0; r < MAXT; ++r) {
    if (r < t) {
      float sum = warp_sum(acc[r]);
      if (lane == 0) lw_epilogue(dst + size_t(r) * vocab + o, bias ? sum + bias[o] : sum, epilogue);
    }
  }
}

#define LW_PRODUCTS(suffix, T)                                                                                   \
  extern "C" __global__ void lw_matvec_##suffix(float* out, const float* x, const T* w, const float* bias, int t, \
                                                int n_in, int n_out, int split, int epilogue) {                  \
    lw_matvec<T, LW_MAX_TOKENS>(out, x, w, bias, t, n_in, n_out, split, epilogue);                               \
  }                                                                                                              \
  extern "C" __global__ void lw_matvec1_##suffix(float* out, const float* x, const T* w, const float* bias, int t, \
                                                 int n_in, int n_out, int split, int epilogue) {                 \
    lw_matvec<T, 1>(out, x, w, bias, t, n_in, n_out, split, epilogue);                                           \
  }                                                                                                              \
  extern "C" __global__ void lw_gemm_##suffix(float* out, const float* x, const T* w, const float* bias, int t,   \
                                              int n_in, int n_out, int epilogue) {                               \
    lw_gemm(out, x, w, bias, t, n_in, n_out, epilogue);                                                          \
  }                                                                                                              \
  extern "C" __global__ void lw_norm_head_##suffix(float* out, const float* states, const float* norm_w,          \
                                                   const float* norm_b, const T* const* heads, const float* bias, \
                                                   int t, int hidden, int vocab, float eps, int epilogue) {      \
    lw_norm_head<T, LW_MAX_TOKENS>(out, states, norm_w, norm_b, heads, bias, t, hidden, vocab, eps, epilogue);   \
  }                                                                                                              \
  extern "C" __global__ void lw_norm_head1_##suffix(float* out, const float* states, const float* norm_w,         \
                                                    const float* norm_b, const T* const* heads, const float* bias, \
                                                    int t, int hidden, int vocab, float eps, int epilogue) {     \
    lw_norm_head<T, 1>(out, states, norm_w, norm_b, heads, bias, t, hidden, vocab, eps, epilogue);               \
  }

LW_PRODUCTS(f32, float)
LW_PRODUCTS(f16, lw_f16)
LW_PRODUCTS(bf16, lw_bf16)
