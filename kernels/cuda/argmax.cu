// The first index of the largest value of each row (torch.argmax's rule among ties; the engine's
// `math::argmax`), one block per row: each thread keeps its best (value, index) over a strided part
// of the row, then warps and the block keep the larger value, the smaller index among equals.
//
// The step's finite check rides on the same pass: a row holding NaN or +inf, or no value above -inf,
// gets LW_NON_FINITE_ROW instead of an index (the host turns it into the error the reference
// backend's argmax_rows gives).
//
// Launch: grid (rows), block (a multiple of 32 threads, e.g. 1024). Must equal the reference
// backend's argmax_rows exactly.
#include "common.cuh"

#define LW_NON_FINITE_ROW 0xffffffffu

// NaN or +inf: a score no model should produce (-inf is a token ruled out).
__device__ __forceinline__ bool lw_bad_score(float v) { return v != v || v == LW_INF; }

__device__ __forceinline__ void lw_keep_better(float& value, int& index, float other_value, int other_index) {
  if (other_value > value || (other_value == value && other_index < index)) {
    value = other_value;
    index = other_index;
  }
}

extern "C" __global__ void lw_argmax_rows(uint32_t* out, const float* x, int cols) {
  lw_await_inputs();
  __shared__ float best_values[32];
  __shared__ int best_indices[32];
  __shared__ int bad_warps[32];
  const float* row = x + size_t(blockIdx.x) * cols;
  float value = -LW_INF;
  int index = 0x7fffffff;
  bool bad = false;
  // Four loads in flight per thread before they are compared (a row of a 50k vocabulary is ~12
  // rounds of a 1024-thread block, each bound by memory latency, not bandwidth).
  int stride = blockDim.x, c = threadIdx.x;
  for (; c + 3 * stride < cols; c += 4 * stride) {
    float v0 = row[c], v1 = row[c + stride], v2 = row[c + 2 * stride], v3 = row[c + 3 * stride];
    bad |= lw_bad_score(v0) || lw_bad_score(v1) || lw_bad_score(v2) || lw_bad_score(v3);
    lw_keep_better(value, index, v0, c);
    lw_keep_better(value, index, v1, c + stride);
    lw_keep_better(value, index, v2, c + 2 * stride);
    lw_keep_better(value, index, v3, c + 3 * stride);
  }
  for (; c < cols; c += stride) {
    bad |= lw_bad_score(row[c]);
    lw_keep_better(value, index, row[c], c);
  }
  bad = __any_sync(LW_FULL_MASK, bad);
  for (int offset = 16; offset > 0; offset >>= 1) {
    float v = __shfl_xor_sync(LW_FULL_MASK, value, offset);
    int i = __shfl_xor_sync(LW_FULL_MASK, index, offset);
    lw_keep_better(value, index, v, i);
  }
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    best_values[warp] = value;
    best_indices[warp] = index;
    bad_warps[warp] = bad;
  }
  __syncthreads();
  if (warp == 0) {
    int warps = blockDim.x >> 5;
    value = lane < warps ? best_values[lane] : -LW_INF;
    index = lane < warps ? best_indices[lane] : 0x7fffffff;
    bad = __any_sync(LW_FULL_MASK, lane < warps && bad_warps[lane]);
    for (int offset = 16; offset > 0; offset >>= 1) {
      float v = __shfl_xor_sync(LW_FULL_MASK, value, offset);
      int i = __shfl_xor_sync(LW_FULL_MASK, index, offset);
      lw_keep_better(value, index, v, i);
    }
    if (lane == 0) out[blockIdx.x] = bad || value == -LW_INF ? LW_NON_FINITE_ROW : uint32_t(index);
  }
}
