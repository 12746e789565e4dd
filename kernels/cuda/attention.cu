// Causal self-attention over the paged cache, for decoding and prefill alike, split over long
// contexts with a merge of partial softmax states (as FlashDecoding and vLLM's paged attention v2),
// the merge done by the last block of each (row, head) to finish, in the same launch.
//
// Each query row r (of sequence row_seq[r], at position positions[r]) sees the keys at positions
// first .. positions[r] (first = positions[r] + 1 - window with a local window, else 0), found
// through its sequence's block table: slot = table[pos / block_size] * block_size + pos % block_size,
// key row = keys[layer][slot][kv_head * head_dim ..], kv_head = head / (heads / kv_heads). The query
// of row r, head h is q[r * q_stride + h * head_dim ..]: q may be the first column block of a fused
// q|k|v projection, read in place.
//
// lw_attention: grid (heads, rows, splits), block a multiple of 32 threads, dynamic shared memory
//   (head_dim + chunk + warps * head_dim) * 4 + chunk * 8 bytes. In a decoding step (one row per
//   sequence, new_k and new_v set) the block whose chunk holds its row's position first writes the
//   row's key and value for its kv head into the cache (the cache write and the attention in one
//   launch; with several rows of a sequence in the step, lw_kv_write runs first, as other rows'
//   blocks would read the slots). The block then finds the cache row
//   of each of its positions (one table lookup per position, all at once, into shared memory), so
//   that no later load waits on a table load. Warps take keys in turn, four at a time (their loads
//   issued together), lanes across head_dim, for the scores and for the weighted values (one row of
//   sums per warp, added in order). Split z takes the visible positions of chunk z (chunk =
//   positions per split): scores s_j = scale * q · k_j, m = max s_j, l = Σ exp(s_j - m),
//   o = Σ exp(s_j - m) v_j (unnormalised).
//   - One split: out = o / l, written at once.
//   - Several: (m, l, o[head_dim]) goes to partial[(row * heads + head) * splits + z] (m = -inf,
//     l = 0 for an empty chunk); the block publishes it (__threadfence) and takes a ticket from
//     counters[row * heads + head] (atomicAdd); the block that draws the last ticket merges the
//     splits in order, M = max m_z, L = Σ l_z exp(m_z - M), out = Σ o_z exp(m_z - M) / L, and
//     sets the counter back to 0 for the next launch (the host clears the counters once, when it
//     makes them). The partial states are read through volatile loads: they were written by other
//     blocks, perhaps on other multiprocessors, and must come from L2, not a stale L1 line.
// lw_attention_probs: grid (heads, len of one sequence): the probabilities of query row first_row + y
//   over the sequence's context, zero outside the visible positions (for inspection).
//
// Must equal the reference backend's paged_attention / attention_probs within 1e-5 of the largest
// output (the conformance tolerance).
#include "common.cuh"

struct lw_attention_args {
  const float* q;
  float* keys;
  float* values;
  // The step's own keys and values (row r's at new_k[r * kv_stride + kv_head * head_dim ..]) when the
  // kernel writes them into the cache itself (a decoding step: one row per sequence); else null.
  const float* new_k;
  const float* new_v;
  int kv_stride;
  const uint32_t* positions;
  const uint32_t* row_seq;
  const uint32_t* table_start;
  const uint32_t* block_tables;
  int block_size, layer, heads, kv_heads, head_dim, window;
  unsigned long long slots_per_layer;
  int width, q_stride;
  float scale;
};

__device__ __forceinline__ size_t lw_key_at(const lw_attention_args& a, int seq, int pos, int kv_head) {
  uint32_t block = a.block_tables[a.table_start[seq] + pos / a.block_size];
  size_t slot = size_t(block) * a.block_size + pos % a.block_size;
  return (size_t(a.layer) * a.slots_per_layer + slot) * a.width + size_t(kv_head) * a.head_dim;
}

// Scores of row `row`, head `head` for positions [begin, end) into scores[0 .. end - begin); returns
// their max. A warp per key, its lanes across head_dim (coalesced reads of the key row). `at`: the
// positions' cache rows (lw_key_at) when the caller has them in shared memory, else null.
__device__ float lw_scores(const lw_attention_args& a, int row, int head, int begin, int end, const float* q,
                           const size_t* at, float* scores, float* scratch) {
  int seq = int(a.row_seq[row]);
  int kv_head = head / (a.heads / a.kv_heads);
  int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  float m = -LW_INF;
  for (int j = begin + int(threadIdx.x >> 5); j < end; j += warps) {
    const float* k = a.keys + (at ? at[j - begin] : lw_key_at(a, seq, j, kv_head));
    float dot = 0.0f;
    for (int c = lane; c < a.head_dim; c += 32) dot += q[c] * k[c];
    float s = warp_sum(dot) * a.scale;
    if (lane == 0) scores[j - begin] = s;
    m = fmaxf(m, s);
  }
  return block_max(m, scratch);  // its barriers also publish the scores
}

__device__ __forceinline__ void lw_visible(const lw_attention_args& a, int row, int& first, int& last) {
  int pos = int(a.positions[row]);
  first = a.window > 0 ? max(0, pos + 1 - a.window) : 0;
  last = pos + 1;  // exclusive
}

// out[c] = Σ_z o_z[c] exp(m_z - M) / L over the splits' states p[z] = (m_z, l_z, o_z[head_dim]), in
// split order, by the whole block.
__device__ void lw_merge_splits(float* out, const volatile float* p, int splits, int head_dim) {
  int stride = head_dim + 2;
  float M = -LW_INF;
  for (int z = 0; z < splits; ++z) M = fmaxf(M, p[z * stride]);
  float L = 0.0f;
  for (int z = 0; z < splits; ++z) {
    float mz = p[z * stride];
    if (mz != -LW_INF) L += p[z * stride + 1] * expf(mz - M);
  }
  for (int c = threadIdx.x; c < head_dim; c += blockDim.x) {
    float o = 0.0f;
    for (int z = 0; z < splits; ++z) {
      float mz = p[z * stride];
      if (mz != -LW_INF) o += p[z * stride + 2 + c] * expf(mz - M);
    }
    out[c] = o / L;
  }
}

extern "C" __global__ void lw_attention(float* out, float* partial, uint32_t* counters, lw_attention_args a,
                                        int chunk) {
  lw_await_inputs();
  DYNAMIC_SHARED(float, shared);
  __shared__ float scratch[32];
  __shared__ int merges;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  // Shared memory: the chunk's cache rows (8-byte aligned, first), the query, the scores, and a row
  // of weighted-value sums per warp.
  size_t* at = reinterpret_cast<size_t*>(shared);
  float* q = shared + 2 * chunk;
  float* scores = q + a.head_dim;
  float* sums = scores + chunk;  // [warps][head_dim]
  int head = blockIdx.x, row = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
  int seq = int(a.row_seq[row]);
  int kv_head = head / (a.heads / a.kv_heads);
  int first, last;
  lw_visible(a, row, first, last);
  int begin = first + split * chunk;
  int end = min(last, begin + chunk);
  float* dst = out + size_t(row) * a.heads * a.head_dim + size_t(head) * a.head_dim;
  // A decoding step's own key and value go into the cache here, by the blocks whose chunk holds the
  // row's position (each head of a kv group writes the same values), before the barrier below makes
  // them visible to the block's reads: no other block reads this slot in this launch.
  int pos = int(a.positions[row]);
  if (a.new_k && pos >= begin && pos < end) {
    size_t slot = lw_key_at(a, seq, pos, kv_head);
    size_t from = size_t(row) * a.kv_stride + size_t(kv_head) * a.head_dim;
    for (int c = threadIdx.x; c < a.head_dim; c += blockDim.x) {
      a.keys[slot + c] = a.new_k[from + c];
      a.values[slot + c] = a.new_v[from + c];
    }
  }
  size_t state = (size_t(row) * a.heads + head) * splits;  // this (row, head)'s first partial state
  float* mine = partial + (state + split) * (a.head_dim + 2);
  if (begin >= end) {  // uniform across the block; never so with one split (a row sees itself)
    for (int c = threadIdx.x; c < a.head_dim + 2; c += blockDim.x) mine[c] = c == 0 ? -LW_INF : 0.0f;
  } else {
    const float* qr = a.q + size_t(row) * a.q_stride + size_t(head) * a.head_dim;
    for (int c = threadIdx.x; c < a.head_dim; c += blockDim.x) q[c] = qr[c];
    for (int j = begin + threadIdx.x; j < end; j += blockDim.x) at[j - begin] = lw_key_at(a, seq, j, kv_head);
    __syncthreads();
    float m = lw_scores(a, row, head, begin, end, q, at, scores, scratch);
    float l = 0.0f;
    for (int j = threadIdx.x; j < end - begin; j += blockDim.x) {
      float e = expf(scores[j] - m);
      scores[j] = e;
      l += e;
    }
    l = block_sum(l, scratch);  // its barriers also publish the weights in scores
    // o = Σ_j e_j v_j: warp w takes positions begin + w, begin + w + warps, ... (lanes across
    // head_dim, coalesced), into its own row of `sums`, loading four value rows before adding them
    // (in order); then each column adds the warps' rows in order.
    for (int c = lane; c < a.head_dim; c += 32) {
      float o = 0.0f;
      int j = begin + warp;
      for (; j + 3 * warps < end; j += 4 * warps) {
        float v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) v[u] = a.values[at[j + u * warps - begin] + c];
#pragma unroll
        for (int u = 0; u < 4; ++u) o += scores[j + u * warps - begin] * v[u];
      }
      for (; j < end; j += warps) o += scores[j - begin] * a.values[at[j - begin] + c];
      sums[warp * a.head_dim + c] = o;
    }
    __syncthreads();
    for (int c = threadIdx.x; c < a.head_dim; c += blockDim.x) {
      float o = 0.0f;
      for (int w = 0; w < warps; ++w) o += sums[w * a.head_dim + c];
      if (splits == 1) {
        dst[c] = o / l;
      } else {
        mine[2 + c] = o;
      }
    }
    if (splits == 1) return;  // uniform: no partial state, no ticket
    if (threadIdx.x == 0) {
      mine[0] = m;
      mine[1] = l;
    }
  }
  // Publish this split's state, then take a ticket: the last of the splits to finish merges.
  if (!lw_last_block(&counters[size_t(row) * a.heads + head], splits, &merges)) return;
  lw_merge_splits(dst, partial + state * (a.head_dim + 2), splits, a.head_dim);
  if (threadIdx.x == 0) counters[size_t(row) * a.heads + head] = 0;
}

extern "C" __global__ void lw_attention_probs(float* out, lw_attention_args a, int first_row, int context) {
  lw_await_inputs();
  DYNAMIC_SHARED(float, shared);
  __shared__ float scratch[32];
  float* q = shared;
  float* scores = shared + a.head_dim;
  int head = blockIdx.x, row = first_row + blockIdx.y;
  const float* qr = a.q + size_t(row) * a.q_stride + size_t(head) * a.head_dim;
  for (int c = threadIdx.x; c < a.head_dim; c += blockDim.x) q[c] = qr[c];
  __syncthreads();
  int first, last;
  lw_visible(a, row, first, last);
  float m = lw_scores(a, row, head, first, last, q, nullptr, scores, scratch);
  float l = 0.0f;
  for (int j = threadIdx.x; j < last - first; j += blockDim.x) l += expf(scores[j] - m);
  l = block_sum(l, scratch);
  float* dst = out + (size_t(head) * gridDim.y + blockIdx.y) * context;
  for (int j = threadIdx.x; j < context; j += blockDim.x) {
    dst[j] = (j >= first && j < last) ? expf(scores[j - first] - m) / l : 0.0f;
  }
}
