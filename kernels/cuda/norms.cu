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
  lw_await_inputs();
  __shared__ float scratch[32];
  lw_norm_row(out + size_t(blockIdx.x) * cols, x + size_t(blockIdx.x) * cols, w, b, cols, eps, scratch);
}

extern "C" __global__ void lw_rms_norm(float* out, const float* x, const float* w, int cols, float eps) {
  lw_await_inputs();
  __shared__ float scratch[32];
  lw_norm_row(out + size_t(blockIdx.x) * cols, x + size_t(blockIdx.x) * cols, w, nullptr, cols, eps, scratch);
}
