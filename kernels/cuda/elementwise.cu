// Elementwise ops over n values, grid-stride loops.
//
// lw_add: x += y; lw_mul: x *= y; lw_gelu_tanh_inplace, lw_gelu_erf_inplace, lw_silu_inplace,
// lw_relu_inplace: x = act(x) (common.cuh's formulas, the engine's `math` module's);
// lw_scale_heads: x[r][c] *= scales[c / head_dim].
//
// Launch: any grid and block (e.g. block 256, grid ceil(n / 256) capped at a few thousand). Must
// equal the reference backend: add, mul, relu and scale_heads exactly; the activations within 1e-6
// of the largest output (library exp/tanh/erf may differ in the last bit).
#include "common.cuh"

#define LW_GRID_STRIDE(i, n) \
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < size_t(n); i += size_t(gridDim.x) * blockDim.x)

extern "C" __global__ void lw_add(float* x, const float* y, unsigned long long n) {
  lw_await_inputs();
  LW_GRID_STRIDE(i, n) x[i] += y[i];
}

extern "C" __global__ void lw_mul(float* x, const float* y, unsigned long long n) {
  lw_await_inputs();
  LW_GRID_STRIDE(i, n) x[i] *= y[i];
}

extern "C" __global__ void lw_gelu_tanh_inplace(float* x, unsigned long long n) {
  lw_await_inputs();
  LW_GRID_STRIDE(i, n) x[i] = lw_gelu_tanh(x[i]);
}

extern "C" __global__ void lw_gelu_erf_inplace(float* x, unsigned long long n) {
  lw_await_inputs();
  LW_GRID_STRIDE(i, n) x[i] = lw_gelu_erf(x[i]);
}

extern "C" __global__ void lw_silu_inplace(float* x, unsigned long long n) {
  lw_await_inputs();
  LW_GRID_STRIDE(i, n) x[i] = lw_silu(x[i]);
}

extern "C" __global__ void lw_relu_inplace(float* x, unsigned long long n) {
  lw_await_inputs();
  LW_GRID_STRIDE(i, n) x[i] = lw_relu(x[i]);
}

extern "C" __global__ void lw_scale_heads(float* x, const float* scales, unsigned long long n, int cols, int head_dim) {
  lw_await_inputs();
  LW_GRID_STRIDE(i, n) x[i] *= scales[int(i % size_t(cols)) / head_dim];
}
