// Auto-contrastive decoding fused with its softmax over the whole vocabulary: upstream
// autocontrastive-gen's `calculate_contrasted_logits` (the engine's `math::acd_with`), reading the
// lower head only at the plausible tokens. Three kernels, in order on one stream:
//
// 1. lw_acd_select (grid rows, block 1024, dynamic shared 256 * 4 bytes for the radix histogram):
//    norm = log Σ exp(upper) (online max and sum, one pass); p_i = exp(upper_i - norm); threshold =
//    min(alpha * max p, the min_candidates-th largest p) (the k-th largest upper logit by a 4-pass
//    radix select on its bits when min_candidates > 1); the plausible tokens p_i >= threshold,
//    compacted into a list.
// 2. lw_acd_lower_* (grid (G, rows), block 256, dynamic shared hidden * 4 bytes): for each plausible
//    token, score_i = (upper_i - norm) - features · head[i], a warp per token over the whole grid:
//    with a trained model a handful of head rows are read; with a flat distribution (random weights,
//    a small alpha) the whole head, at the device's bandwidth rather than one multiprocessor's.
// 3. lw_acd_finish (grid rows, block 1024): in one pass with an online max and sum, mass = Σ p_i and
//    Z = Σ exp(score_i - max score) over the plausible tokens; the output is score_i + log(mass) -
//    log(Z) - max score for them and upper_i - norm for the others (log-probabilities).
// Passes over the vocabulary: 5 (9 with min_candidates > 1), each read of upper is vocab * 4 bytes.
//
// Must equal the reference backend's contrast_acd within 1e-5 in log-probability (relative to
// max(1, |value|)); lw_acd_lower_from_logits takes the lower logits precomputed (a head stored
// [hidden, vocab]).
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

// 1. lw_acd_select: per row, norm and threshold into stats[row] = (norm, threshold), and the plausible
// tokens, in no particular order, into plausible[row * vocab ..] with their number in counts[row].
extern "C" __global__ void lw_acd_select(float* stats, uint32_t* plausible, uint32_t* counts, const float* upper,
                                         int vocab, float alpha, int min_candidates) {
  DYNAMIC_SHARED(uint32_t, histogram);
  __shared__ float scratch_m[32], scratch_s[32];
  __shared__ float shared_norm, shared_threshold;
  __shared__ uint32_t count;
  const float* row = upper + size_t(blockIdx.x) * vocab;

  // norm = log Σ exp(upper), online.
  float m = -LW_INF, s = 0.0f;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) lw_online_merge(m, s, row[i], 1.0f);
  lw_block_online(m, s, scratch_m, scratch_s);
  float norm = m + logf(s);
  float threshold = expf(m - norm) * alpha;
  if (min_candidates > 1) {
    int k = min_candidates < vocab ? min_candidates : vocab;
    threshold = fminf(threshold, expf(lw_kth_largest(row, vocab, k, histogram) - norm));
  }
  if (threadIdx.x == 0) {
    shared_norm = norm;
    shared_threshold = threshold;
    count = 0;
  }
  __syncthreads();
  norm = shared_norm;
  threshold = shared_threshold;

  // Compaction: a warp's plausible tokens take consecutive places, one atomic per warp and step.
  int lane = threadIdx.x & 31;
  uint32_t* list = plausible + size_t(blockIdx.x) * vocab;
  for (int base = threadIdx.x - lane; base < vocab; base += blockDim.x) {
    int token = base + lane;
    bool keep = token < vocab && expf(row[token] - norm) >= threshold;
    unsigned ballot = __ballot_sync(LW_FULL_MASK, keep);
    uint32_t first = 0;
    if (lane == 0 && ballot) first = atomicAdd(&count, uint32_t(__popc(ballot)));
    first = __shfl_sync(LW_FULL_MASK, first, 0);
    if (keep) list[first + __popc(ballot & ((1u << lane) - 1u))] = uint32_t(token);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    stats[2 * blockIdx.x] = norm;
    stats[2 * blockIdx.x + 1] = threshold;
    counts[blockIdx.x] = count;
  }
}

// 2. lw_acd_lower_*: out[row][token] = (upper - norm) - features[row] · head[token] for each plausible
// token, a warp per token, the warps of the whole grid taking the row's list in turn (so that a row
// with thousands of plausible tokens reads the head at the device's bandwidth, and one with a few
// costs a few warps). Dynamic shared memory: hidden * 4 bytes (the row's features).
template <class T>
__device__ void lw_acd_lower(float* out, const float* upper, const float* stats, const uint32_t* plausible,
                             const uint32_t* counts, const float* features, const T* head, int vocab, int hidden) {
  DYNAMIC_SHARED(float, feats);
  int row = blockIdx.y, warps = blockDim.x >> 5, lane = threadIdx.x & 31;
  int count = int(counts[row]);
  if (int(blockIdx.x) * warps >= count) return;  // uniform across the block: nothing for it
  const float* f = features + size_t(row) * hidden;
  for (int c = threadIdx.x; c < hidden; c += blockDim.x) feats[c] = f[c];
  __syncthreads();
  float norm = stats[2 * row];
  const uint32_t* list = plausible + size_t(row) * vocab;
  for (int k = blockIdx.x * warps + (threadIdx.x >> 5); k < count; k += gridDim.x * warps) {
    int token = int(list[k]);
    float acc[1] = {0.0f};
    lw_lane_dots<T, 1>(acc, feats, hidden, head + size_t(token) * hidden, 1, hidden);
    float lower = warp_sum(acc[0]);
    if (lane == 0) out[size_t(row) * vocab + token] = (upper[size_t(row) * vocab + token] - norm) - lower;
  }
}

#define LW_ACD_LOWER(name, T)                                                                                     \
  extern "C" __global__ void name(float* out, const float* upper, const float* stats, const uint32_t* plausible, \
                                  const uint32_t* counts, const float* features, const T* head, int vocab,      \
                                  int hidden) {                                                                  \
    lw_acd_lower(out, upper, stats, plausible, counts, features, head, vocab, hidden);                           \
  }
LW_ACD_LOWER(lw_acd_lower_f32, float)
LW_ACD_LOWER(lw_acd_lower_f16, lw_f16)
LW_ACD_LOWER(lw_acd_lower_bf16, lw_bf16)

// The same with the lower logits computed beforehand (`lower`: [rows, vocab]; a head stored
// [hidden, vocab]): a thread per plausible token. Grid (any, rows).
extern "C" __global__ void lw_acd_lower_from_logits(float* out, const float* upper, const float* stats,
                                                    const uint32_t* plausible, const uint32_t* counts,
                                                    const float* lower, int vocab) {
  int row = blockIdx.y, count = int(counts[row]);
  float norm = stats[2 * row];
  const uint32_t* list = plausible + size_t(row) * vocab;
  for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < count; k += gridDim.x * blockDim.x) {
    size_t at = size_t(row) * vocab + list[k];
    out[at] = (upper[at] - norm) - lower[at];
  }
}

// 3. lw_acd_finish: per row, mass = Σ p_i and the max and normaliser of the scores over the plausible
// tokens in one pass, then the output in place.
extern "C" __global__ void lw_acd_finish(float* out, const float* upper, const float* stats, int vocab) {
  __shared__ float scratch_m[32], scratch_s[32];
  const float* row = upper + size_t(blockIdx.x) * vocab;
  float* o = out + size_t(blockIdx.x) * vocab;
  float norm = stats[2 * blockIdx.x], threshold = stats[2 * blockIdx.x + 1];
  float mass = 0.0f, sm = -LW_INF, ss = 0.0f;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    float p = expf(row[i] - norm);
    if (p >= threshold) {
      mass += p;
      lw_online_merge(sm, ss, o[i], 1.0f);
    }
  }
  mass = block_sum(mass, scratch_m);
  lw_block_online(sm, ss, scratch_m, scratch_s);
  float log_share = logf(mass) - logf(ss) - sm;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    float logp = row[i] - norm;
    o[i] = expf(logp) >= threshold ? o[i] + log_share : logp;
  }
}
