// CPU emulation of the CUDA execution model, so that the host C++ compiler builds the project's .cu
// files unchanged and runs each kernel launch on the CPU (the `emulated_*` tests; the stand-in
// driver of the tests will run its launches here too).
//
// Model: the blocks of a grid run one after another (in reverse order too when the threads are, so
// that a kernel whose blocks meet through atomics, the last to finish doing the rest, is run with
// another block last); the threads of a block are user-level fibers (emulator.cpp: a stack switch of
// its own on x86-64, ucontext elsewhere) scheduled cooperatively, in forward or reverse order of
// their linear index. A fiber runs until it reaches a synchronisation point:
// - __syncthreads(): waits until every thread of the block that has not exited is waiting there;
// - warp operations (__shfl_*_sync, __ballot_sync, __any_sync, __all_sync): wait until every lane
//   named in the mask has arrived at a warp operation with the same mask; lanes outside the mask
//   are neither waited for nor read (reading one is an error, as it is undefined in CUDA);
// - the kernel's end.
// A thread that returns without calling lw_await_inputs (kernels/cuda/common.cuh) fails the launch:
// on the device, such a kernel could finish before the one before it.
// Between synchronisation points a fiber runs alone, so two orders of the same launch differ when
// a kernel reads shared memory another thread writes without a barrier between them. When no fiber
// can run and the block has not finished (a barrier some threads never reach, a shuffle with an
// exited lane), the launch ends with an error message naming the threads and where they wait.
// Atomics are plain read-modify-writes: fibers never interleave inside one.
//
// Shared memory: `__shared__` variables become `static thread_local`, and each block runs on a fresh
// OS thread (blocks still run one after another), so a block's static shared memory starts zeroed,
// never holding another block's values; dynamic shared memory is `emu::dynamic_shared()` (see
// kernels/cuda/common.cuh), filled with 0xA5 bytes at each block's start.
#pragma once

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#define LAYERWISE_EMULATION 1

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// A launch: grid and block shapes, dynamic shared bytes, and the fiber order.
struct EmuLaunch {
  unsigned grid[3];
  unsigned block[3];
  size_t shared_bytes;
  int reverse;
};

namespace emu {

const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
unsigned char* dynamic_shared();
void barrier();
// griddepcontrol.wait (common.cuh, lw_await_inputs): launches here run one after another, so it
// has nothing to wait for; it records that the thread called it, and a block in which a thread
// returns without calling it fails the launch.
void grid_dependency_wait();

enum class WarpOp { Shuffle, Ballot };
// Every lane of `mask` deposits `value`; returns, for this lane, the value of lane `source(lane)`
// (Shuffle) or the mask of lanes whose value was non-zero (Ballot).
uint64_t warp_exchange(WarpOp op, unsigned mask, uint64_t value, int source_lane);
unsigned lane_id();

// Runs `body` as every thread of every block of the launch; 0, or non-zero with a message in `error`.
using Body = void (*)(void*);
int launch(const EmuLaunch& config, Body body, void* context, char* error, size_t error_len);

template <class T>
uint64_t bits_of(T v) {
  static_assert(sizeof(T) <= 8, "warp operations move at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <class T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// Source lane of a shuffle within segments of `width` lanes; `own` when the source is out of range
// (CUDA returns the caller's own value then).
inline int segment_source(int src, int lane, int width, bool in_range) { return in_range ? src : lane; }

}  // namespace emu

#define threadIdx (emu::thread_idx())
#define blockIdx (emu::block_idx())
#define blockDim (emu::block_dim())
#define gridDim (emu::grid_dim())
#define warpSize 32

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __shared__ static thread_local
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

inline void __syncthreads() { emu::barrier(); }
// Blocks run one after another, so every write is seen by the blocks after it: a memory fence has
// nothing to order here (and is no scheduling point).
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  int lane = int(emu::lane_id());
  int base = lane & ~(width - 1);
  int from = base + (src % width);
  return emu::from_bits<T>(emu::warp_exchange(emu::WarpOp::Shuffle, mask, emu::bits_of(v), from));
}

template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  int lane = int(emu::lane_id());
  bool in_range = (lane & (width - 1)) + int(delta) < width;
  int from = emu::segment_source(lane + int(delta), lane, width, in_range);
  return emu::from_bits<T>(emu::warp_exchange(emu::WarpOp::Shuffle, mask, emu::bits_of(v), from));
}

template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  int lane = int(emu::lane_id());
  bool in_range = (lane & (width - 1)) >= int(delta);
  int from = emu::segment_source(lane - int(delta), lane, width, in_range);
  return emu::from_bits<T>(emu::warp_exchange(emu::WarpOp::Shuffle, mask, emu::bits_of(v), from));
}

template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  int lane = int(emu::lane_id());
  int src = lane ^ lane_mask;
  // Lanes may read earlier segments but not later ones (they get their own value).
  bool in_range = src < ((lane / width) + 1) * width;
  int from = emu::segment_source(src, lane, width, in_range);
  return emu::from_bits<T>(emu::warp_exchange(emu::WarpOp::Shuffle, mask, emu::bits_of(v), from));
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return unsigned(emu::warp_exchange(emu::WarpOp::Ballot, mask, predicate != 0, 0));
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == mask; }

template <class T>
T atomicAdd(T* address, T value) {
  T old = *address;
  *address = old + value;
  return old;
}
template <class T>
T atomicMax(T* address, T value) {
  T old = *address;
  *address = old > value ? old : value;
  return old;
}
template <class T>
T atomicMin(T* address, T value) {
  T old = *address;
  *address = old < value ? old : value;
  return old;
}
template <class T>
T atomicExch(T* address, T value) {
  T old = *address;
  *address = value;
  return old;
}
template <class T>
T atomicCAS(T* address, T compare, T value) {
  T old = *address;
  if (old == compare) *address = value;
  return old;
}

inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int __ffs(unsigned x) { return x ? __builtin_ctz(x) + 1 : 0; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
// Round-to-nearest arithmetic that the device never fuses into an fma; the host build does not fuse.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline int __float_as_int(float f) { return emu::from_bits<int>(emu::bits_of(f)); }
inline float __int_as_float(int i) { return emu::from_bits<float>(emu::bits_of(i)); }
inline unsigned __float_as_uint(float f) { return emu::from_bits<unsigned>(emu::bits_of(f)); }
inline float __uint_as_float(unsigned i) { return emu::from_bits<float>(emu::bits_of(i)); }
#include <math.h>  // expf, sqrtf, tanhf, erff, ... in the global namespace, as CUDA has them

// Exports kernel `k` (an `extern "C"` __global__ function of the .cu sources) as
// `int emu_k(const EmuLaunch*, void** params, char* error, size_t error_len)`, the arguments given as
// CUDA's `kernelParams`: params[i] points at argument i; and `int emu_k_parameter_sizes(size_t*, int)`.
namespace emu {
template <class... A, size_t... I>
void call_with(void (*kernel)(A...), void** params, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_reference_t<A>*>(params[I])...);
}
template <class... A>
int launch_kernel(void (*kernel)(A...), const EmuLaunch* config, void** params, char* error, size_t error_len) {
  struct Context {
    void (*kernel)(A...);
    void** params;
  } context{kernel, params};
  Body body = [](void* c) {
    auto* ctx = static_cast<Context*>(c);
    call_with(ctx->kernel, ctx->params, std::index_sequence_for<A...>{});
  };
  return launch(*config, body, &context, error, error_len);
}
// The byte size of each of the kernel's parameters, into sizes[0 .. max); returns their number (as a
// driver reads it from the module: what a launch captured into a graph copies of `kernelParams`).
template <class... A>
int parameter_sizes(void (*)(A...), size_t* sizes, int max) {
  const size_t all[] = {sizeof(A)..., 0};
  int n = int(sizeof...(A));
  for (int i = 0; i < n && i < max; ++i) sizes[i] = all[i];
  return n;
}
}  // namespace emu

#define EMU_EXPORT(kernel)                                                                         \
  extern "C" int emu_##kernel(const EmuLaunch* config, void** params, char* error, size_t error_len) { \
    return emu::launch_kernel(kernel, config, params, error, error_len);                           \
  }                                                                                                \
  extern "C" int emu_##kernel##_parameter_sizes(size_t* sizes, int max) {                          \
    return emu::parameter_sizes(kernel, sizes, max);                                               \
  }
