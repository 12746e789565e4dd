// Auto-contrastive decoding fused with its softmax over the whole vocabulary: upstream
// autocontrastive-gen's `calculate_contrasted_logits` (the engine's `math::acd_with`), one block per
// row, reading the lower head only at the plausible tokens.
//
// For a row: norm = log Σ exp(upper) (online max and sum, one pass); p_i = exp(upper_i - norm);
// threshold = min(alpha * max p, the min_candidates-th largest p) (the k-th largest upper logit by a
// 4-pass radix select on its bits when min_candidates > 1); plausible = p_i >= threshold. For each
// plausible token, score_i = (upper_i - norm) - lower_i, lower_i = features · head[i] (a warp per
// token, lanes across the hidden size: only plausible rows of the head are read); then, in one pass
// with an online max and sum, mass = Σ p_i and Z = Σ exp(score_i - max score) over the plausible
// tokens; the output is score_i + log(mass) - log(Z) - max score for them and upper_i - norm for the
// others (log-probabilities). Passes over the vocabulary: 4 (8 with min_candidates > 1).
//
// Launch: grid (rows), block a multiple of 32 threads (256 or 1024), dynamic shared memory
// hidden * 4 + 256 * 4 bytes (the features, the radix histogram). Must equal the reference backend's
// contrast_acd within 1e-5 in log-probability (relative to max(1, |value|)); the lower logits of
// lw_acd_from_logits come precomputed (a head stored [hidden, vocab]).
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

// The lower logit of `token`: features · head[token] by one warp, or a precomputed logit.
template <class T>
struct lw_head_rows {
  const T* head;
  const float* features;  // in shared memory
  int hidden;
  __device__ __forceinline__ float warp_logit(int token) const {
    int lane = threadIdx.x & 31;
    const T* row = head + size_t(token) * hidden;
    float sum = 0.0f;
    for (int c = lane; c < hidden; c += 32) sum += features[c] * lw_load(row, c);
    return warp_sum(sum);
  }
};
struct lw_lower_logits {
  const float* logits;  // this row's
  __device__ __forceinline__ float warp_logit(int token) const { return logits[token]; }
};

template <class Lower>
__device__ void lw_acd_row(float* out, const float* upper, const Lower& lower, int vocab, float alpha,
                           int min_candidates, uint32_t* histogram) {
  __shared__ float scratch_m[32], scratch_s[32];
  __shared__ float shared_norm, shared_threshold;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;

  // 1. norm = log Σ exp(upper), online.
  float m = -LW_INF, s = 0.0f;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) lw_online_merge(m, s, upper[i], 1.0f);
  lw_block_online(m, s, scratch_m, scratch_s);
  float norm = m + logf(s);
  float max_p = expf(m - norm);

  // 2. The threshold.
  float threshold = max_p * alpha;
  if (min_candidates > 1) {
    int k = min_candidates < vocab ? min_candidates : vocab;
    float kth = expf(lw_kth_largest(upper, vocab, k, histogram) - norm);
    threshold = fminf(threshold, kth);
  }
  if (threadIdx.x == 0) {
    shared_norm = norm;
    shared_threshold = threshold;
  }
  __syncthreads();
  norm = shared_norm;
  threshold = shared_threshold;

  // 3. Contrast scores of the plausible tokens, a warp per token.
  for (int base = warp * 32; base < vocab; base += warps * 32) {
    int token = base + lane;
    bool plausible = token < vocab && expf(upper[token] - norm) >= threshold;
    unsigned ballot = __ballot_sync(LW_FULL_MASK, plausible);
    while (ballot) {
      int l = __ffs(ballot) - 1;
      ballot &= ballot - 1;
      int t = base + l;
      float lower_logit = lower.warp_logit(t);
      if (lane == l) out[t] = (upper[t] - norm) - lower_logit;
    }
  }
  __syncthreads();  // every score is written before any thread reads another's

  // 4. mass, and the max and normaliser of the scores, in one pass.
  float mass = 0.0f, sm = -LW_INF, ss = 0.0f;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    float p = expf(upper[i] - norm);
    if (p >= threshold) {
      mass += p;
      lw_online_merge(sm, ss, out[i], 1.0f);
    }
  }
  mass = block_sum(mass, scratch_m);
  lw_block_online(sm, ss, scratch_m, scratch_s);
  float log_share = logf(mass) - logf(ss) - sm;

  // 5. The output.
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    float logp = upper[i] - norm;
    out[i] = expf(logp) >= threshold ? out[i] + log_share : logp;
  }
}

#define LW_ACD_KERNEL(name, T)                                                                              \
  extern "C" __global__ void name(float* out, const float* upper, const float* features, const T* head,    \
                                  int vocab, int hidden, float alpha, int min_candidates) {                \
    DYNAMIC_SHARED(float, shared);                                                                          \
    float* feats = shared;                                                                                  \
    uint32_t* histogram = reinterpret_cast<uint32_t*>(shared + hidden);                                     \
    const float* f = features + size_t(blockIdx.x) * hidden;                                                \
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) feats[c] = f[c];                                 \
    __syncthreads();                                                                                        \
    lw_head_rows<T> lower{head, feats, hidden};                                                             \
    lw_acd_row(out + size_t(blockIdx.x) * vocab, upper + size_t(blockIdx.x) * vocab, lower, vocab, alpha,   \
               min_candidates, histogram);                                                                  \
  }

LW_ACD_KERNEL(lw_acd_f32, float)
LW_ACD_KERNEL(lw_acd_f16, lw_f16)
LW_ACD_KERNEL(lw_acd_bf16, lw_bf16)

// The same with the lower logits computed beforehand ([rows, vocab]); dynamic shared memory 256 * 4 bytes.
extern "C" __global__ void lw_acd_from_logits(float* out, const float* upper, const float* lower, int vocab,
                                              float alpha, int min_candidates) {
  DYNAMIC_SHARED(uint32_t, histogram);
  lw_lower_logits l{lower + size_t(blockIdx.x) * vocab};
  lw_acd_row(out + size_t(blockIdx.x) * vocab, upper + size_t(blockIdx.x) * vocab, l, vocab, alpha,
             min_candidates, histogram);
}
