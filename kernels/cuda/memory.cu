// Data movement: embedding lookups, row gathers, column blocks, rotary embeddings, and the paged
// cache's writes and copy-on-write block copies.
//
// lw_embed_*: out[r] = table[index[r]] widened to f32 (a block per row).
// lw_gather_rows: out[i] = x[rows[i]] (a block per output row).
// lw_split_columns: parts.out[p][r][c] = x[r][parts.start[p] + c], c < parts.width[p], for up to
//   LW_MAX_PARTS column blocks in one launch (grid (rows, parts)): a fused q|k|v projection's three
//   parts at once.
// lw_rope: rotate-half rotary embedding in place, x: [t, heads * head_dim], row r at positions[r],
//   inv_freq_j = 1 / theta^(2j / head_dim) in f32, as transformers (and the reference) compute it.
// lw_kv_write: keys[layer][slots[r]][0..cols) = k[r * stride ..], the same for values (a block per
//   row); stride = cols for k and v of their own, more when they are column blocks of a fused q|k|v
//   projection read in place.
// lw_copy_blocks: for every layer, block pairs[2i + 1] of keys and values becomes a copy of block
//   pairs[2i] (grid (pairs, layers)).
//
// Launch: block 256 (lw_rope: any 1-D grid covering t * heads * head_dim / 2 threads). Must equal the
// reference backend: exactly, lw_rope included (see its comment), but for the rare argument where
// f64 pow or sin rounded to f32 differs from the host's f32 libm (the conformance allows 1e-6).
#include "common.cuh"

template <class T>
__device__ void lw_embed(float* out, const T* table, const uint32_t* index, int d) {
  const T* row = table + size_t(index[blockIdx.x]) * d;
  for (int c = threadIdx.x; c < d; c += blockDim.x) out[size_t(blockIdx.x) * d + c] = lw_load(row, c);
}
extern "C" __global__ void lw_embed_f32(float* out, const float* table, const uint32_t* index, int d) {
  lw_await_inputs();
  lw_embed(out, table, index, d);
}
extern "C" __global__ void lw_embed_f16(float* out, const lw_f16* table, const uint32_t* index, int d) {
  lw_await_inputs();
  lw_embed(out, table, index, d);
}
extern "C" __global__ void lw_embed_bf16(float* out, const lw_bf16* table, const uint32_t* index, int d) {
  lw_await_inputs();
  lw_embed(out, table, index, d);
}

extern "C" __global__ void lw_gather_rows(float* out, const float* x, const uint32_t* rows, int cols) {
  lw_await_inputs();
  const float* src = x + size_t(rows[blockIdx.x]) * cols;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) out[size_t(blockIdx.x) * cols + c] = src[c];
}

#define LW_MAX_PARTS 4
// The column blocks of one split (passed by value; the host's `SplitArgs`).
struct lw_column_parts {
  float* out[LW_MAX_PARTS];
  int start[LW_MAX_PARTS];
  int width[LW_MAX_PARTS];
};

extern "C" __global__ void lw_split_columns(lw_column_parts parts, const float* x, int cols) {
  lw_await_inputs();
  int p = blockIdx.y, width = parts.width[p];
  const float* src = x + size_t(blockIdx.x) * cols + parts.start[p];
  float* dst = parts.out[p] + size_t(blockIdx.x) * width;
  for (int c = threadIdx.x; c < width; c += blockDim.x) dst[c] = src[c];
}

extern "C" __global__ void lw_rope(float* x, const uint32_t* positions, int t, int cols, int head_dim, float theta) {
  lw_await_inputs();
  int half = head_dim / 2;
  size_t pairs = size_t(t) * (cols / head_dim) * half;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < pairs; i += size_t(gridDim.x) * blockDim.x) {
    int j = int(i % half);
    size_t head = i / half;  // row * heads + head
    int heads = cols / head_dim;
    int r = int(head / heads);
    float* h = x + size_t(r) * cols + (head % heads) * head_dim;
    // pow, sin and cos in f64, rounded once to f32: the correctly rounded f32 values the host's libm
    // gives the reference (the device's powf and sinf may be 1-2 ulp off, and at angles of thousands
    // of radians one ulp of inv_freq moves sin by 1e-4). No fused multiply-adds: as the reference.
    float inv_freq = 1.0f / float(pow(double(theta), double(float(2 * j) / float(head_dim))));
    float angle = float(positions[r]) * inv_freq;
    float s = float(sin(double(angle))), c = float(cos(double(angle)));
    float a = h[j], b = h[half + j];
    h[j] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    h[half + j] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
  }
}

extern "C" __global__ void lw_kv_write(float* keys, float* values, const float* k, const float* v, const uint32_t* slots,
                                       int cols, int stride, int width, int layer,
                                       unsigned long long slots_per_layer) {
  lw_await_inputs();
  size_t at = (size_t(layer) * slots_per_layer + slots[blockIdx.x]) * width;
  size_t from = size_t(blockIdx.x) * stride;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    keys[at + c] = k[from + c];
    values[at + c] = v[from + c];
  }
}

extern "C" __global__ void lw_copy_blocks(float* keys, float* values, const uint32_t* pairs, int block_size, int width,
                                          unsigned long long slots_per_layer) {
  lw_await_inputs();
  size_t span = size_t(block_size) * width;
  size_t layer_base = size_t(blockIdx.y) * slots_per_layer * width;
  size_t from = layer_base + size_t(pairs[2 * blockIdx.x]) * span;
  size_t to = layer_base + size_t(pairs[2 * blockIdx.x + 1]) * span;
  for (size_t c = threadIdx.x; c < span; c += blockDim.x) {
    keys[to + c] = keys[from + c];
    values[to + c] = values[from + c];
  }
}
