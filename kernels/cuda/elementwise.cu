// Elementwise ops over n values, grid-stride loops.
//
// lw_add: x += y; lw_mul: x *= y; lw_gelu_tanh, lw_gelu_erf, lw_silu, lw_relu: x = act(x) with the
// formulas of the engine's `math` module; lw_scale_heads: x[r][c] *= scales[c / head_dim].
//
// Launch: any grid and block (e.g. block 256, grid ceil(n / 256) capped at a few thousand). Must
// equal the reference backend: add, mul, relu and scale_heads exactly; the activations within 1e-6
// of the largest output (library exp/tanh/erf may differ in the last bit).
#include "common.cuh"

#define LW_GRID_STRIDE(i, n) \
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < size_t(n); i += size_t(gridDim.x) * blockDim.x)

extern "C" __global__ void lw_add(float* x, const float* y, unsigned long long n) {
  LW_GRID_STRIDE(i, n) x[i] += y[i];
}

extern "C" __global__ void lw_mul(float* x, const float* y, unsigned long long n) {
  LW_GRID_STRIDE(i, n) x[i] *= y[i];
}

extern "C" __global__ void lw_gelu_tanh(float* x, unsigned long long n) {
  LW_GRID_STRIDE(i, n) {
    float v = x[i];
    x[i] = 0.5f * v * (1.0f + tanhf(0.7978846f * (v + 0.044715f * v * v * v)));
  }
}

extern "C" __global__ void lw_gelu_erf(float* x, unsigned long long n) {
  LW_GRID_STRIDE(i, n) {
    float v = x[i];
    x[i] = 0.5f * v * (1.0f + erff(v * 0.70710678f));
  }
}

extern "C" __global__ void lw_silu(float* x, unsigned long long n) {
  LW_GRID_STRIDE(i, n) {
    float v = x[i];
    x[i] = v / (1.0f + expf(-v));
  }
}

extern "C" __global__ void lw_relu(float* x, unsigned long long n) {
  LW_GRID_STRIDE(i, n) x[i] = fmaxf(x[i], 0.0f);
}

extern "C" __global__ void lw_scale_heads(float* x, const float* scales, unsigned long long n, int cols, int head_dim) {
  LW_GRID_STRIDE(i, n) x[i] *= scales[int(i % size_t(cols)) / head_dim];
}
