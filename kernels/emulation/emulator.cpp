// The fiber scheduler behind cuda_emu.h: each launch runs its blocks one after another; a block's
// threads are fibers that the scheduler resumes in forward or reverse order, stopping them at
// barriers and warp operations until every thread (or lane) they wait for has arrived.
//
// Switching fibers: on x86-64 a dozen instructions of our own (lw_emu_switch below: the callee-saved
// registers and the stack pointer). glibc's swapcontext also saves and restores the signal mask, a
// system call at every switch: that was ~85% of the stand-in tests' time. Elsewhere ucontext.

#include <pthread.h>
#include <ucontext.h>

#include <atomic>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "cuda_emu.h"

#if defined(__SANITIZE_ADDRESS__)
#define LW_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LW_EMU_ASAN 1
#endif
#endif
#ifndef LW_EMU_ASAN
#define LW_EMU_ASAN 0
#endif
#if LW_EMU_ASAN
#include <sanitizer/asan_interface.h>
#endif

#if defined(__x86_64__)
#define LW_EMU_OWN_SWITCH 1
// lw_emu_switch(save, load): pushes the System V callee-saved registers on the current stack, stores
// the stack pointer in *save, takes `load` as the stack pointer, pops the registers saved there and
// returns to whatever that stack was switched away from (or, the first time, to the fiber's entry;
// see Context::prepare). The floating-point control words (MXCSR, x87) are left alone: no kernel
// changes them, so every fiber runs with the thread's.
extern "C" __attribute__((visibility("hidden"))) void lw_emu_switch(void** save, void* load);
asm(R"(
  .text
  .p2align 4
  .globl lw_emu_switch
  .hidden lw_emu_switch
  .type lw_emu_switch,@function
lw_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size lw_emu_switch,.-lw_emu_switch
)");
#else
#define LW_EMU_OWN_SWITCH 0
#endif

namespace emu {
namespace {

constexpr size_t kStackBytes = 64 * 1024;

void fiber_main();

// emu_use_portable_fibers(1): launches from now on switch with ucontext even where the emulator's
// own switch exists (a test runs kernels both ways and compares).
std::atomic<bool> portable_fibers{false};

// Where a fiber (or the scheduler) was switched away from: resumed by the next switch to it.
struct Context {
  bool portable = !LW_EMU_OWN_SWITCH;  // switches with ucontext
#if LW_EMU_OWN_SWITCH
  void* sp = nullptr;
#endif
  ucontext_t uc;
  // The stack it runs on, for AddressSanitizer's fiber annotations.
  const void* stack = nullptr;
  size_t stack_size = 0;

  // The next switch to this context starts fiber_main on `stack` (16-byte aligned, `size` bytes).
  void prepare(char* stack_base, size_t size, bool use_ucontext) {
    stack = stack_base;
    stack_size = size;
    portable = use_ucontext || !LW_EMU_OWN_SWITCH;
#if LW_EMU_OWN_SWITCH
    if (!portable) {
      // What lw_emu_switch pops: six zeroed registers (rbp = 0 ends debuggers' backtraces), then
      // fiber_main as the return address, above it a null one (fiber_main never returns). fiber_main
      // starts with the stack pointer 8 bytes past a 16-byte boundary, as after a call.
      auto* top = reinterpret_cast<uint64_t*>(stack_base + size);
      top[-1] = 0;
      top[-2] = reinterpret_cast<uint64_t>(&fiber_main);
      for (int r = 3; r <= 8; ++r) top[-r] = 0;
      sp = top - 8;
      return;
    }
#endif
    getcontext(&uc);
    uc.uc_stack.ss_sp = stack_base;
    uc.uc_stack.ss_size = size;
    uc.uc_link = nullptr;
    makecontext(&uc, fiber_main, 0);
  }
};

// Saves the running context in `from` and resumes `to`. `leaving_for_good`: `from` is a fiber
// that has finished and will never be resumed (AddressSanitizer may then free its fake stack).
void switch_context(Context& from, Context& to, bool leaving_for_good = false) {
#if LW_EMU_ASAN
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(leaving_for_good ? nullptr : &fake_stack, to.stack, to.stack_size);
#else
  (void)leaving_for_good;
#endif
#if LW_EMU_OWN_SWITCH
  // The scheduler's context takes the kind of the fiber it switches to.
  if (!to.portable) {
    lw_emu_switch(&from.sp, to.sp);
  } else {
    swapcontext(&from.uc, &to.uc);
  }
#else
  swapcontext(&from.uc, &to.uc);
#endif
#if LW_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
}

enum class State { Runnable, AtBarrier, AtWarp, Done };

struct Fiber {
  Context context;
  dim3 index;
  unsigned linear = 0;
  State state = State::Runnable;
  bool awaited_inputs = false;  // called grid_dependency_wait (lw_await_inputs)
  // At a warp operation: its kind, mask, deposited value and source lane; the result once resolved.
  WarpOp op = WarpOp::Shuffle;
  unsigned mask = 0;
  uint64_t value = 0;
  int source = 0;
  uint64_t result = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  char* stacks = nullptr;  // threads x kStackBytes (fiber_stacks)
  Context scheduler;
  Fiber* current = nullptr;
  dim3 index, shape, grid;
  std::vector<unsigned char> dynamic_shared;
  Body body = nullptr;
  void* body_context = nullptr;
};

thread_local Block* active = nullptr;

// The fiber stacks, kept by each launching thread from launch to launch: a fresh allocation of up
// to 64 MiB per launch cost page faults at every launch.
thread_local std::unique_ptr<char[]> stack_pool;
thread_local size_t stack_pool_bytes = 0;

char* fiber_stacks(size_t bytes) {
  if (stack_pool_bytes < bytes) {
    stack_pool.reset(new char[bytes]);
    stack_pool_bytes = bytes;
  }
  return stack_pool.get();
}

void fiber_main() {
#if LW_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
  Block* block = active;
  block->body(block->body_context);
  block->current->state = State::Done;
  switch_context(block->current->context, block->scheduler, true);
  __builtin_trap();  // never resumed
}

void yield_to_scheduler() { switch_context(active->current->context, active->scheduler); }

const char* state_name(State s) {
  switch (s) {
    case State::Runnable: return "runnable";
    case State::AtBarrier: return "at __syncthreads";
    case State::AtWarp: return "at a warp operation";
    case State::Done: return "exited";
  }
  return "?";
}

// Resolves the warp operations whose lanes have all arrived; returns an error text, or "" if none.
std::string resolve_warps(Block& b, bool& progressed) {
  size_t n = b.fibers.size();
  for (size_t w = 0; w * 32 < n; ++w) {
    size_t first = w * 32, end = std::min(n, first + 32);
    for (size_t i = first; i < end; ++i) {
      Fiber& f = b.fibers[i];
      if (f.state != State::AtWarp) continue;
      unsigned lane = unsigned(i - first);
      if (!(f.mask & (1u << lane))) {
        return "thread " + std::to_string(i) + " calls a warp operation with a mask that leaves out its own lane";
      }
      // Every lane of the mask must be waiting at a warp operation with the same mask and kind.
      bool ready = true;
      for (unsigned l = 0; l < 32; ++l) {
        if (!(f.mask & (1u << l))) continue;
        if (first + l >= end) {
          return "warp " + std::to_string(w) + ": the mask names lane " + std::to_string(l) + ", which the block does not have";
        }
        Fiber& g = b.fibers[first + l];
        if (g.state == State::Done) {
          return "warp " + std::to_string(w) + ": lane " + std::to_string(l) + " exited, but lane " + std::to_string(lane) +
                 " waits for it in a warp operation";
        }
        if (g.state != State::AtWarp) {
          ready = false;
          break;
        }
        if (g.mask != f.mask || g.op != f.op) {
          return "warp " + std::to_string(w) + ": lanes " + std::to_string(lane) + " and " + std::to_string(l) +
                 " meet in warp operations with different masks or kinds";
        }
      }
      if (!ready) continue;
      unsigned ballot = 0;
      for (unsigned l = 0; l < 32; ++l) {
        if ((f.mask & (1u << l)) && b.fibers[first + l].value != 0) ballot |= 1u << l;
      }
      unsigned mask = f.mask;
      for (unsigned l = 0; l < 32; ++l) {
        if (!(mask & (1u << l))) continue;
        Fiber& g = b.fibers[first + l];
        if (g.op == WarpOp::Ballot) {
          g.result = ballot;
        } else {
          int src = g.source;
          if (src < 0 || src >= 32 || !(mask & (1u << src))) {
            return "warp " + std::to_string(w) + ": lane " + std::to_string(l) + " reads lane " + std::to_string(src) +
                   ", outside the shuffle's mask";
          }
          g.result = b.fibers[first + src].value;
        }
        g.state = State::Runnable;
      }
      progressed = true;
    }
  }
  return "";
}

std::string describe(const Block& b) {
  std::string text = "block (" + std::to_string(b.index.x) + "," + std::to_string(b.index.y) + "," + std::to_string(b.index.z) + "): ";
  size_t shown = 0;
  for (const Fiber& f : b.fibers) {
    if (f.state == State::Done) continue;
    if (shown++ == 8) {
      text += "...";
      break;
    }
    text += "thread " + std::to_string(f.linear) + " " + state_name(f.state) + "; ";
  }
  return text;
}

std::string run_block(Block& b, bool reverse) {
  size_t n = b.fibers.size();
#if LW_EMU_ASAN
  // A fiber that finished left its last frames' shadow poisoned; the stacks start clean (as ASan's
  // swapcontext interceptor does for a new context).
  __asan_unpoison_memory_region(b.stacks, n * kStackBytes);
  // The scheduler's own stack, which fibers switch back to.
  pthread_attr_t attr;
  if (pthread_getattr_np(pthread_self(), &attr) == 0) {
    void* base = nullptr;
    size_t size = 0;
    pthread_attr_getstack(&attr, &base, &size);
    b.scheduler.stack = base;
    b.scheduler.stack_size = size;
    pthread_attr_destroy(&attr);
  }
#endif
  bool use_ucontext = portable_fibers.load();
  b.scheduler.portable = use_ucontext || !LW_EMU_OWN_SWITCH;
  for (size_t i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.state = State::Runnable;
    f.awaited_inputs = false;
    // Each stack's top a few cache lines lower than the last one's (up to 4 KiB): stacks 64 KiB
    // apart would otherwise put every fiber's hot frames in the same cache sets.
    f.context.prepare(b.stacks + i * kStackBytes, kStackBytes - (i % 64) * 64, use_ucontext);
  }
  for (;;) {
    bool progressed = false;
    for (size_t k = 0; k < n; ++k) {
      Fiber& f = b.fibers[reverse ? n - 1 - k : k];
      if (f.state != State::Runnable) continue;
      b.current = &f;
      switch_context(b.scheduler, f.context);
      progressed = true;
    }
    std::string error = resolve_warps(b, progressed);
    if (!error.empty()) return error;
    bool all_done = true, all_at_barrier = true, any_at_barrier = false;
    for (const Fiber& f : b.fibers) {
      if (f.state != State::Done) all_done = false;
      if (f.state == State::AtBarrier) any_at_barrier = true;
      if (f.state != State::Done && f.state != State::AtBarrier) all_at_barrier = false;
    }
    if (all_done) {
      for (const Fiber& f : b.fibers) {
        if (!f.awaited_inputs) {
          return "block (" + std::to_string(b.index.x) + "," + std::to_string(b.index.y) + "," + std::to_string(b.index.z) +
                 "): thread " + std::to_string(f.linear) +
                 " returned without lw_await_inputs (griddepcontrol.wait): as a dependent launch, the kernel could finish "
                 "before the one before it";
        }
      }
      return "";
    }
    if (any_at_barrier && all_at_barrier) {
      for (Fiber& f : b.fibers) {
        if (f.state == State::AtBarrier) f.state = State::Runnable;
      }
      progressed = true;
    }
    if (!progressed) return "deadlock: no thread can run. " + describe(b);
  }
}

}  // namespace

const dim3& thread_idx() { return active->current->index; }
const dim3& block_idx() { return active->index; }
const dim3& block_dim() { return active->shape; }
const dim3& grid_dim() { return active->grid; }
unsigned char* dynamic_shared() { return active->dynamic_shared.data(); }
unsigned lane_id() { return active->current->linear % 32; }

void grid_dependency_wait() { active->current->awaited_inputs = true; }

void barrier() {
  active->current->state = State::AtBarrier;
  yield_to_scheduler();
}

uint64_t warp_exchange(WarpOp op, unsigned mask, uint64_t value, int source_lane) {
  Fiber* f = active->current;
  f->state = State::AtWarp;
  f->op = op;
  f->mask = mask;
  f->value = value;
  f->source = source_lane;
  yield_to_scheduler();
  return f->result;
}

int launch(const EmuLaunch& config, Body body, void* context, char* error, size_t error_len) {
  auto fail = [&](const std::string& text) {
    if (error && error_len) std::snprintf(error, error_len, "%s", text.c_str());
    return 1;
  };
  if (active) return fail("a kernel launched a kernel (nested launches are not emulated)");
  size_t threads = size_t(config.block[0]) * config.block[1] * config.block[2];
  size_t blocks = size_t(config.grid[0]) * config.grid[1] * config.grid[2];
  if (threads == 0 || threads > 1024) return fail("a block needs 1 to 1024 threads, got " + std::to_string(threads));
  if (blocks == 0) return fail("the grid is empty");
  if (config.shared_bytes > 228 * 1024) return fail("more dynamic shared memory than a block can have: " + std::to_string(config.shared_bytes));
  Block b;
  b.fibers.resize(threads);
  b.stacks = fiber_stacks(threads * kStackBytes);
  b.shape = dim3(config.block[0], config.block[1], config.block[2]);
  b.grid = dim3(config.grid[0], config.grid[1], config.grid[2]);
  b.body = body;
  b.body_context = context;
  for (size_t i = 0; i < threads; ++i) {
    unsigned x = unsigned(i % config.block[0]);
    unsigned y = unsigned((i / config.block[0]) % config.block[1]);
    unsigned z = unsigned(i / (size_t(config.block[0]) * config.block[1]));
    b.fibers[i].index = dim3(x, y, z);
    b.fibers[i].linear = unsigned(i);
  }
  std::string result;
  for (size_t k = 0; k < blocks && result.empty(); ++k) {
    // Blocks in x, y, z order, or the reverse (see cuda_emu.h).
    size_t linear = config.reverse ? blocks - 1 - k : k;
    unsigned x = unsigned(linear % config.grid[0]);
    unsigned y = unsigned((linear / config.grid[0]) % config.grid[1]);
    unsigned z = unsigned(linear / (size_t(config.grid[0]) * config.grid[1]));
    b.index = dim3(x, y, z);
    // Fresh, poisoned dynamic shared memory for every block: a kernel must write before reading.
    b.dynamic_shared.assign(config.shared_bytes, 0xA5);
    // Each block on an OS thread of its own (one after another): its `__shared__` variables
    // (thread_local) start afresh instead of holding the last block's or launch's values.
    std::thread worker([&] {
      active = &b;
      result = run_block(b, config.reverse != 0);
      active = nullptr;
    });
    worker.join();
  }
  return result.empty() ? 0 : fail(result);
}

}  // namespace emu

extern "C" void emu_use_portable_fibers(int on) { emu::portable_fibers.store(on != 0); }
