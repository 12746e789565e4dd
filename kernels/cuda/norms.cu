// Norms over the last dimension, one block per row.
//
// lw_layer_norm: out[r][c] = (x[r][c] - mean_r) / sqrt(var_r + eps) * w[c] + b[c], biased variance,
//   two passes over the row (mean, then the squared deviations) as torch computes it.
// lw_rms_norm:   out[r][c] = w[c] * (x[r][c] / sqrt(mean_r(x^2) + eps)) (Llama).
//
// Launch: grid (rows), block (a multiple of 32 threads, 256 suits rows of 1-8k); each thread strides
// over the row. Must equal the reference backend's layer_norm / rms_norm within 1e-5 of the largest
// output (the conformance tolerance for sums).
#include "common.cuh"

extern "C" __global__ void lw_layer_norm(float* out, const float* x, const float* w, const float* b, int cols,
                                         float eps) {
  __shared__ float scratch[32];
  const float* row = x + size_t(blockIdx.x) * cols;
  float* dst = out + size_t(blockIdx.x) * cols;
  float sum = 0.0f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) sum += row[c];
  float mean = block_sum(sum, scratch) / float(cols);
  float squares = 0.0f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    float d = row[c] - mean;
    squares += d * d;
  }
  float inv = 1.0f / sqrtf(block_sum(squares, scratch) / float(cols) + eps);
  for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = (row[c] - mean) * inv * w[c] + b[c];
}

extern "C" __global__ void lw_rms_norm(float* out, const float* x, const float* w, int cols, float eps) {
  __shared__ float scratch[32];
  const float* row = x + size_t(blockIdx.x) * cols;
  float* dst = out + size_t(blockIdx.x) * cols;
  float squares = 0.0f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) squares += row[c] * row[c];
  float inv = 1.0f / sqrtf(block_sum(squares, scratch) / float(cols) + eps);
  for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = w[c] * (row[c] * inv);
}
