// Kernels that exercise the emulator itself (not part of the engine): a missing barrier, a barrier
// that cannot be met, a shuffle among part of a warp, a thread that returns before lw_await_inputs.

// Each thread writes its index to shared memory and reads its neighbour's. Without the barrier the
// result depends on the order threads run in (the emulator shows this by running both orders).
extern "C" __global__ void lw_test_neighbour(int* out, int with_barrier) {
  lw_await_inputs();
  __shared__ int slots[1024];
  int t = threadIdx.x, n = blockDim.x;
  slots[t] = -1;
  if (with_barrier) __syncthreads();
  slots[t] = t;
  if (with_barrier) __syncthreads();
  out[blockIdx.x * n + t] = slots[(t + 1) % n];
}

// Lanes 0-15 wait at a barrier while lanes 16-31 wait at a full-warp shuffle: no thread can go on.
extern "C" __global__ void lw_test_deadlock(float* out) {
  lw_await_inputs();
  float v = float(threadIdx.x);
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

// Lanes 0-15 sum among themselves with a half-warp mask; lanes 16-31 exit first. A ballot of the
// odd lanes among 0-15 follows.
extern "C" __global__ void lw_test_half_warp(float* out, unsigned* ballot) {
  lw_await_inputs();
  if (threadIdx.x >= 16) return;
  float v = float(threadIdx.x);
  for (int offset = 8; offset > 0; offset >>= 1) v += __shfl_down_sync(0x0000ffffu, v, offset, 16);
  out[threadIdx.x] = v;
  unsigned b = __ballot_sync(0x0000ffffu, threadIdx.x & 1);
  if (threadIdx.x == 0) *ballot = b;
}

// Thread `early` returns before lw_await_inputs, as a kernel's bounds check placed above it would:
// the launch must fail, naming the thread (on the device, the kernel could end before the previous
// one).
extern "C" __global__ void lw_test_exit_before_wait(int* out, int early) {
  if (int(threadIdx.x) == early) return;
  lw_await_inputs();
  out[threadIdx.x] = 1;
}
