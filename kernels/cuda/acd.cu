// Auto-contrastive decoding fused with its softmax over the whole vocabulary: upstream
// autocontrastive-gen's `calculate_contrasted_logits` (the engine's `math::acd_with`), reading the
// lower head only at the plausible tokens. Three kernels, in order on one stream, each over the whole
// grid: the blocks of a row each take a slice of the vocabulary, and the last block of the row to
// finish (a ticket from counters[row], as attention.cu's splits) combines the slices' sums. No
// kernel passes over a whole vocabulary row from one multiprocessor (the single-block passes of the
// H200 runs cost 41 + 66 us a step).
//
// 1. lw_acd_select (grid (G, rows), block B, dynamic shared 256 * 4 bytes for the radix histogram):
//    each block the online max and sum of exp(upper) over its slice, into partial[row][g]; the last
//    block merges them in slice order: norm = log Σ exp(upper); threshold = min(alpha * max p, the
//    min_candidates-th largest p) with p_i = exp(upper_i - norm) (the k-th largest upper logit by a
//    4-pass radix select on its bits, over the whole row by that block, when min_candidates > 1);
//    stats[row] = (norm, threshold, -).
// 2. lw_acd_lower_* (grid (G, rows), block B, dynamic shared hidden * 4 bytes): each block finds the
//    plausible tokens of its slice (p_i >= threshold; compacted in shared memory by ballots) and
//    scores them, score_i = (upper_i - norm) - features · head[i], a warp per token: with a trained
//    model a handful of head rows are read, with a flat distribution (random weights, a small alpha)
//    the whole head, at the device's bandwidth. Each block sums mass = Σ p_i and the online max and
//    sum of exp(score_i) over its plausible tokens into partial[row][g]; the last block merges them
//    in slice order into stats[row][2] = log(mass) - log(Z) - max score, Z = Σ exp(score_i - max).
//    lw_acd_lower_from_logits: the same with the lower logits precomputed (`lower`: [rows, vocab]).
// 3. lw_acd_finish (any grid (·, rows)): out_i = score_i + stats[row][2] for the plausible tokens,
//    upper_i - norm for the others (log-probabilities).
// Reads of upper: 3 passes (7 with min_candidates > 1). partial holds rows * G * 3 floats; the
// counters start at zero and are left at zero.
//
// Must equal the reference backend's contrast_acd within 1e-5 in log-probability (relative to
// max(1, |value|)).
#include "common.cuh"

// Larger floats map to larger unsigned integers.
__device__ __forceinline__ uint32_t lw_order_key(float v) {
  uint32_t b = __float_as_uint(v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float lw_from_order_key(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Combines two (max, sum of exp(x - max)) pairs.
__device__ __forceinline__ void lw_online_merge(float& m, float& s, float m2, float s2) {
  if (m2 == -LW_INF) return;
  if (m == -LW_INF) {
    m = m2;
    s = s2;
    return;
  }
  float m_new = fmaxf(m, m2);
  s = s * expf(m - m_new) + s2 * expf(m2 - m_new);
  m = m_new;
}

__device__ __forceinline__ void lw_block_online(float& m, float& s, float* scratch_m, float* scratch_s) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    float m2 = __shfl_xor_sync(LW_FULL_MASK, m, offset);
    float s2 = __shfl_xor_sync(LW_FULL_MASK, s, offset);
    lw_online_merge(m, s, m2, s2);
  }
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) {
    scratch_m[warp] = m;
    scratch_s[warp] = s;
  }
  __syncthreads();
  m = lane < warps ? scratch_m[lane] : -LW_INF;
  s = lane < warps ? scratch_s[lane] : 0.0f;
  for (int offset = 16; offset > 0; offset >>= 1) {
    float m2 = __shfl_xor_sync(LW_FULL_MASK, m, offset);
    float s2 = __shfl_xor_sync(LW_FULL_MASK, s, offset);
    lw_online_merge(m, s, m2, s2);
  }
}

// The k-th largest value of row[0..n) (1-based k, 1 <= k <= n), by radix select on the order keys.
__device__ float lw_kth_largest(const float* row, int n, int k, uint32_t* histogram) {
  __shared__ uint32_t chosen_prefix;
  __shared__ int remaining;
  uint32_t prefix = 0, mask = 0;
  if (threadIdx.x == 0) remaining = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) histogram[b] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      uint32_t key = lw_order_key(row[i]);
      if ((key & mask) == prefix) atomicAdd(&histogram[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int need = remaining;
      int bin = 255;
      for (; bin > 0; --bin) {
        if (int(histogram[bin]) >= need) break;
        need -= int(histogram[bin]);
      }
      remaining = need;
      chosen_prefix = prefix | (uint32_t(bin) << shift);
    }
    __syncthreads();
    prefix = chosen_prefix;
    mask |= 255u << shift;
  }
  return lw_from_order_key(prefix);
}

// Slice g of G of a row of n values: [begin, end).
__device__ __forceinline__ void lw_slice(int n, int g, int G, int& begin, int& end) {
  int span = (n + G - 1) / G;
  begin = min(n, g * span);
  end = min(n, begin + span);
}

// 1. lw_acd_select: stats[row] = (norm, threshold, -); partial[row][g] = (max, sum) of the slice.
extern "C" __global__ void lw_acd_select(float* stats, float* partial, uint32_t* counters, const float* upper,
                                         int vocab, float alpha, int min_candidates) {
  lw_await_inputs();
  DYNAMIC_SHARED(uint32_t, histogram);
  __shared__ float scratch_m[32], scratch_s[32];
  __shared__ int last;
  int row = blockIdx.y, g = blockIdx.x, G = gridDim.x;
  const float* u = upper + size_t(row) * vocab;
  int begin, end;
  lw_slice(vocab, g, G, begin, end);
  float m = -LW_INF, s = 0.0f;
  for (int i = begin + threadIdx.x; i < end; i += blockDim.x) lw_online_merge(m, s, u[i], 1.0f);
  lw_block_online(m, s, scratch_m, scratch_s);
  float* mine = partial + (size_t(row) * G + g) * 3;
  if (threadIdx.x == 0) {
    mine[0] = m;
    mine[1] = s;
  }
  if (!lw_last_block(&counters[row], G, &last)) return;
  // The slices merged in order (each thread a strided share, then the block's fixed tree).
  const volatile float* p = partial + size_t(row) * G * 3;
  m = -LW_INF;
  s = 0.0f;
  for (int k = threadIdx.x; k < G; k += blockDim.x) lw_online_merge(m, s, p[3 * k], p[3 * k + 1]);
  lw_block_online(m, s, scratch_m, scratch_s);
  float norm = m + logf(s);
  float threshold = expf(m - norm) * alpha;
  if (min_candidates > 1) {
    int k = min_candidates < vocab ? min_candidates : vocab;
    threshold = fminf(threshold, expf(lw_kth_largest(u, vocab, k, histogram) - norm));
  }
  if (threadIdx.x == 0) {
    stats[3 * row] = norm;
    stats[3 * row + 1] = threshold;
    counters[row] = 0;
  }
}

// 2. lw_acd_lower: the plausible tokens of this block's slice scored into out, their mass and the
// online max and sum of their scores into partial[row][g]; the last block: stats[row][2]. The lower
// logits from head (T, `[vocab, hidden]`) or, when head is null, from logits (`[rows, vocab]`).
template <class T>
__device__ void lw_acd_lower(float* out, float* stats, float* partial, uint32_t* counters, const float* upper,
                             const float* features, const T* head, const float* logits, int vocab, int hidden) {
  DYNAMIC_SHARED(float, feats);
  __shared__ uint32_t list[1024];  // the plausible tokens of one chunk of blockDim.x tokens
  __shared__ uint32_t listed;
  __shared__ float scratch_m[32], scratch_s[32];
  __shared__ int last;
  int row = blockIdx.y, g = blockIdx.x, G = gridDim.x;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const float* u = upper + size_t(row) * vocab;
  float* o = out + size_t(row) * vocab;
  float norm = stats[3 * row], threshold = stats[3 * row + 1];
  int begin, end;
  lw_slice(vocab, g, G, begin, end);
  float mass = 0.0f, sm = -LW_INF, ss = 0.0f;  // this thread's share (scores: lane 0 of each warp)
  bool loaded = false;
  for (int base = begin; base < end; base += blockDim.x) {
    if (threadIdx.x == 0) listed = 0;
    __syncthreads();
    int token = base + int(threadIdx.x);
    bool keep = false;
    if (token < end) {
      float p = expf(u[token] - norm);
      keep = p >= threshold;
      if (keep) mass += p;
    }
    // A warp's plausible tokens take consecutive places in the list, one atomic per warp.
    unsigned ballot = __ballot_sync(LW_FULL_MASK, keep);
    uint32_t first = 0;
    if (lane == 0 && ballot) first = atomicAdd(&listed, uint32_t(__popc(ballot)));
    first = __shfl_sync(LW_FULL_MASK, first, 0);
    if (keep) list[first + __popc(ballot & ((1u << lane) - 1u))] = uint32_t(token);
    __syncthreads();
    int count = int(listed);
    if (count > 0) {  // uniform across the block
      if (head && !loaded) {
        const float* f = features + size_t(row) * hidden;
        for (int c = threadIdx.x; c < hidden; c += blockDim.x) feats[c] = f[c];
        __syncthreads();
        loaded = true;
      }
      for (int k = warp; k < count; k += warps) {
        int t = int(list[k]);
        float lower;
        if (head) {
          float acc[1] = {0.0f};
          lw_lane_dots<T, 1>(acc, feats, hidden, head + size_t(t) * hidden, 1, hidden);
          lower = warp_sum(acc[0]);
        } else {
          lower = logits[size_t(row) * vocab + t];
        }
        float score = (u[t] - norm) - lower;
        if (lane == 0) {
          o[t] = score;
          lw_online_merge(sm, ss, score, 1.0f);
        }
      }
    }
    __syncthreads();  // the list and its count are read before the next chunk resets them
  }
  mass = block_sum(mass, scratch_m);
  lw_block_online(sm, ss, scratch_m, scratch_s);
  float* mine = partial + (size_t(row) * G + g) * 3;
  if (threadIdx.x == 0) {
    mine[0] = mass;
    mine[1] = sm;
    mine[2] = ss;
  }
  if (!lw_last_block(&counters[row], G, &last)) return;
  const volatile float* p = partial + size_t(row) * G * 3;
  mass = 0.0f;
  sm = -LW_INF;
  ss = 0.0f;
  for (int k = threadIdx.x; k < G; k += blockDim.x) {
    mass += p[3 * k];
    lw_online_merge(sm, ss, p[3 * k + 1], p[3 * k + 2]);
  }
  mass = block_sum(mass, scratch_m);
  lw_block_online(sm, ss, scratch_m, scratch_s);
  if (threadIdx.x == 0) {
    stats[3 * row + 2] = logf(mass) - logf(ss) - sm;
    counters[row] = 0;
  }
}

#define LW_ACD_LOWER(name, T)                                                                                   \
  extern "C" __global__ void name(float* out, float* stats, float* partial, uint32_t* counters,              \
                                  const float* upper, const float* features, const T* head, int vocab,        \
                                  int hidden) {                                                                \
    lw_await_inputs();                                                                                        \
    lw_acd_lower<T>(out, stats, partial, counters, upper, features, head, nullptr, vocab, hidden);            \
  }
LW_ACD_LOWER(lw_acd_lower_f32, float)
LW_ACD_LOWER(lw_acd_lower_f16, lw_f16)
LW_ACD_LOWER(lw_acd_lower_bf16, lw_bf16)

extern "C" __global__ void lw_acd_lower_from_logits(float* out, float* stats, float* partial, uint32_t* counters,
                                                    const float* upper, const float* lower, int vocab) {
  lw_await_inputs();
  lw_acd_lower<float>(out, stats, partial, counters, upper, nullptr, nullptr, lower, vocab, 0);
}

// 3. lw_acd_finish: the output, in place.
extern "C" __global__ void lw_acd_finish(float* out, const float* upper, const float* stats, int vocab) {
  lw_await_inputs();
  int row = blockIdx.y;
  const float* u = upper + size_t(row) * vocab;
  float* o = out + size_t(row) * vocab;
  float norm = stats[3 * row], threshold = stats[3 * row + 1], share = stats[3 * row + 2];
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < vocab; i += gridDim.x * blockDim.x) {
    float logp = u[i] - norm;
    o[i] = expf(logp) >= threshold ? o[i] + share : logp;
  }
}
