// A stand-in for the CUDA driver (libcuda.so) for tests on machines without a GPU: it exports the
// driver API calls cudarc makes, with "device memory" in host memory, and runs each kernel launch
// with the CPU-compiled build of the same kernel (kernels/emulation). It reports one device of
// compute capability 9.0 (LAYERWISE_STANDIN_SM=80: 8.0; LAYERWISE_STANDIN_DEVICES devices, 0 for
// none), no memory pools (so cudarc uses plain cuMemAlloc), and everything runs synchronously at the call: it cannot show
// races between streams, nor between a programmatic dependent launch (cuLaunchKernelEx) and the
// kernel before it; the emulation checks instead that every thread of every kernel awaits its
// inputs (kernels/cuda/common.cuh, lw_await_inputs).
//
// Stream capture and graphs: while a stream captures, each launch on it is recorded (the kernel,
// its shape and a copy of every parameter, sized by the kernel's emu_<k>_parameter_sizes, as the
// driver sizes them from the module) instead of run; cuGraphLaunch runs the records in order. Any
// other call during a capture (copies, memsets, allocation, synchronisation) fails with
// CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: the backend captures launches only, and a call it should
// have made before the capture shows up here as an error.
//
// NVRTC dlopens libcuda.so.1 itself and asks for cuGetExportTable: answered "not supported".

#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_emu.h"

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUcontext;
typedef void* CUmodule;
typedef void* CUfunction;
typedef void* CUstream;
typedef void* CUevent;
typedef void* CUgraph;
typedef void* CUgraphExec;

enum : CUresult {
  CUDA_SUCCESS = 0,
  CUDA_ERROR_INVALID_VALUE = 1,
  CUDA_ERROR_OUT_OF_MEMORY = 2,
  CUDA_ERROR_NO_DEVICE = 100,
  CUDA_ERROR_INVALID_DEVICE = 101,
  CUDA_ERROR_INVALID_IMAGE = 200,
  CUDA_ERROR_ILLEGAL_STATE = 401,
  CUDA_ERROR_NOT_FOUND = 500,
  CUDA_ERROR_LAUNCH_FAILED = 719,
  CUDA_ERROR_NOT_SUPPORTED = 801,
  CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
  CUDA_ERROR_UNKNOWN = 999,
};

namespace {

using Entry = int (*)(const EmuLaunch*, void**, char*, size_t);
using ParameterSizes = int (*)(size_t*, int);

struct Function {
  std::string name;
  Entry entry;
  std::vector<size_t> parameter_sizes;
};

// A launch captured into a graph: its kernel, shape and a copy of each parameter.
struct Recorded {
  Function* function;
  unsigned grid[3], block[3], shared;
  std::vector<std::vector<char>> parameters;
};
using Graph = std::vector<Recorded>;


int g_context_token = 1;
std::mutex g_mutex;
std::string g_last_launch_error;
std::map<std::string, Function*> g_functions;
// The stream being captured (one at a time here), and what it has recorded so far.
CUstream g_capturing = nullptr;
Graph g_recording;

// True while a stream captures: then every call but a launch fails (see the top of this file).
bool capturing() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_capturing != nullptr;
}

int device_count() {
  const char* n = std::getenv("LAYERWISE_STANDIN_DEVICES");
  return n ? std::atoi(n) : 1;
}

// 90, or LAYERWISE_STANDIN_SM (80: a device without programmatic dependent launch).
int compute_capability() {
  const char* sm = std::getenv("LAYERWISE_STANDIN_SM");
  return sm ? std::atoi(sm) : 90;
}

}  // namespace

extern "C" {

CUresult cuInit(unsigned) { return CUDA_SUCCESS; }
CUresult cuDriverGetVersion(int* version) {
  *version = 12060;
  return CUDA_SUCCESS;
}
CUresult cuGetExportTable(const void**, const void*) { return CUDA_ERROR_NOT_SUPPORTED; }

CUresult cuDeviceGetCount(int* count) {
  *count = device_count();
  return CUDA_SUCCESS;
}
CUresult cuDeviceGet(CUdevice* device, int ordinal) {
  if (ordinal < 0 || ordinal >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
  *device = ordinal;
  return CUDA_SUCCESS;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice) {
  std::snprintf(name, size_t(len), "layerwise stand-in (CPU emulation)");
  return CUDA_SUCCESS;
}
CUresult cuDeviceGetAttribute(int* value, int attribute, CUdevice) {
  switch (attribute) {
    case 75: *value = compute_capability() / 10; break;  // compute capability major
    case 76: *value = compute_capability() % 10; break;  // minor
    case 1: *value = 1024; break; // max threads per block
    case 8: *value = 48 * 1024; break;  // shared memory per block
    case 97: *value = 227 * 1024; break;  // shared memory per block, opt-in
    case 16: *value = 1; break;  // multiprocessors
    case 10: *value = 32; break;  // warp size
    case 115: *value = 0; break;  // memory pools supported: no (cudarc then uses cuMemAlloc)
    default: *value = 0; break;
  }
  return CUDA_SUCCESS;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
  *bytes = size_t(8) << 30;
  return CUDA_SUCCESS;
}
CUresult cuDeviceGetUuid(void* uuid, CUdevice) {
  std::memset(uuid, 0, 16);
  return CUDA_SUCCESS;
}
CUresult cuDeviceGetUuid_v2(void* uuid, CUdevice d) { return cuDeviceGetUuid(uuid, d); }

CUresult cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice) {
  *ctx = &g_context_token;
  return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(CUcontext) { return CUDA_SUCCESS; }
CUresult cuCtxGetCurrent(CUcontext* ctx) {
  *ctx = &g_context_token;
  return CUDA_SUCCESS;
}
CUresult cuCtxSynchronize() { return capturing() ? CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED : CUDA_SUCCESS; }
CUresult cuCtxPushCurrent_v2(CUcontext) { return CUDA_SUCCESS; }
CUresult cuCtxPopCurrent_v2(CUcontext* ctx) {
  if (ctx) *ctx = &g_context_token;
  return CUDA_SUCCESS;
}

CUresult cuStreamCreate(CUstream* stream, unsigned) {
  *stream = new int(0);
  return CUDA_SUCCESS;
}
CUresult cuStreamCreateWithPriority(CUstream* stream, unsigned flags, int) { return cuStreamCreate(stream, flags); }
CUresult cuStreamDestroy_v2(CUstream stream) {
  delete static_cast<int*>(stream);
  return CUDA_SUCCESS;
}
CUresult cuStreamSynchronize(CUstream) { return capturing() ? CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED : CUDA_SUCCESS; }
CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned) { return CUDA_SUCCESS; }

CUresult cuEventCreate(CUevent* event, unsigned) {
  *event = new int(0);
  return CUDA_SUCCESS;
}
CUresult cuEventRecord(CUevent, CUstream) { return CUDA_SUCCESS; }
CUresult cuEventSynchronize(CUevent) { return CUDA_SUCCESS; }
CUresult cuEventQuery(CUevent) { return CUDA_SUCCESS; }
CUresult cuEventDestroy_v2(CUevent event) {
  delete static_cast<int*>(event);
  return CUDA_SUCCESS;
}
CUresult cuEventElapsedTime(float* ms, CUevent, CUevent) {
  *ms = 0.0f;
  return CUDA_SUCCESS;
}

CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
  *free_bytes = size_t(8) << 30;
  *total = size_t(8) << 30;
  return CUDA_SUCCESS;
}
CUresult cuMemAlloc_v2(CUdeviceptr* ptr, size_t bytes) {
  if (capturing()) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  if (bytes == 0) return CUDA_ERROR_INVALID_VALUE;  // as the driver answers
  void* p = std::malloc(bytes);
  if (!p) return CUDA_ERROR_OUT_OF_MEMORY;
  // Poisoned, as device memory holds whatever it held: the code must write before it reads. All
  // ones: a float never written reads as NaN, which no comparison and no argmax lets pass.
  std::memset(p, 0xFF, bytes);
  *ptr = CUdeviceptr(p);
  return CUDA_SUCCESS;
}
CUresult cuMemAllocAsync(CUdeviceptr* ptr, size_t bytes, CUstream) { return cuMemAlloc_v2(ptr, bytes); }
CUresult cuMemFree_v2(CUdeviceptr ptr) {
  if (capturing()) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  std::free(reinterpret_cast<void*>(ptr));
  return CUDA_SUCCESS;
}
CUresult cuMemFreeAsync(CUdeviceptr ptr, CUstream) { return cuMemFree_v2(ptr); }
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) {
  if (capturing()) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  std::memcpy(reinterpret_cast<void*>(dst), src, bytes);
  return CUDA_SUCCESS;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, CUstream) { return cuMemcpyHtoD_v2(dst, src, bytes); }
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) {
  if (capturing()) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  std::memcpy(dst, reinterpret_cast<const void*>(src), bytes);
  return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes, CUstream) { return cuMemcpyDtoH_v2(dst, src, bytes); }
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes) {
  if (capturing()) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes);
  return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream) { return cuMemcpyDtoD_v2(dst, src, bytes); }
CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char value, size_t n) {
  if (capturing()) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  std::memset(reinterpret_cast<void*>(dst), value, n);
  return CUDA_SUCCESS;
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t n, CUstream) { return cuMemsetD8_v2(dst, value, n); }

// A module is any image (the CUBIN NVRTC made for this "device"); its functions are the emulation's.
CUresult cuModuleLoadData(CUmodule* module, const void* image) {
  if (!image) return CUDA_ERROR_INVALID_IMAGE;
  *module = new int(0);
  return CUDA_SUCCESS;
}
CUresult cuModuleUnload(CUmodule module) {
  delete static_cast<int*>(module);
  return CUDA_SUCCESS;
}
CUresult cuModuleGetFunction(CUfunction* function, CUmodule, const char* name) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto found = g_functions.find(name);
  if (found == g_functions.end()) {
    std::string symbol = std::string("emu_") + name;
    void* entry = dlsym(RTLD_DEFAULT, symbol.c_str());
    void* sizes = dlsym(RTLD_DEFAULT, (symbol + "_parameter_sizes").c_str());
    if (!entry || !sizes) return CUDA_ERROR_NOT_FOUND;
    std::vector<size_t> parameter_sizes(64);
    int n = reinterpret_cast<ParameterSizes>(sizes)(parameter_sizes.data(), int(parameter_sizes.size()));
    if (n > int(parameter_sizes.size())) return CUDA_ERROR_NOT_SUPPORTED;
    parameter_sizes.resize(size_t(n));
    found = g_functions.emplace(name, new Function{name, reinterpret_cast<Entry>(entry), parameter_sizes}).first;
  }
  *function = found->second;
  return CUDA_SUCCESS;
}
CUresult cuFuncGetAttribute(int* value, int, CUfunction) {
  *value = 0;
  return CUDA_SUCCESS;
}
CUresult cuFuncSetAttribute(CUfunction, int, int) { return CUDA_SUCCESS; }

// A launch the test asked the stand-in to refuse: LAYERWISE_STANDIN_EXPECT_DEPENDENT=1 refuses plain
// launches, =0 programmatic dependent ones, so that a test shows which way the backend launched.
static CUresult refuse_launch(CUfunction f, const char* why) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_last_launch_error = static_cast<Function*>(f)->name + ": " + why;
  std::fprintf(stderr, "layerwise stand-in driver: launch refused: %s\n", g_last_launch_error.c_str());
  return CUDA_ERROR_NOT_SUPPORTED;
}

static bool expecting_dependent(const char* value) {
  const char* expect = std::getenv("LAYERWISE_STANDIN_EXPECT_DEPENDENT");
  return expect && std::strcmp(expect, value) == 0;
}

static CUresult run_launch(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                           unsigned shared, void** params, CUstream stream) {
  auto* function = static_cast<Function*>(f);
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_capturing && g_capturing != stream) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    if (g_capturing) {
      Recorded launch{function, {gx, gy, gz}, {bx, by, bz}, shared, {}};
      for (size_t i = 0; i < function->parameter_sizes.size(); ++i) {
        const char* value = static_cast<const char*>(params[i]);
        launch.parameters.emplace_back(value, value + function->parameter_sizes[i]);
      }
      g_recording.push_back(std::move(launch));
      return CUDA_SUCCESS;
    }
  }
  EmuLaunch config{{gx, gy, gz}, {bx, by, bz}, shared, std::getenv("LAYERWISE_STANDIN_REVERSE") ? 1 : 0};
  char error[1024] = {0};
  if (function->entry(&config, params, error, sizeof error) != 0) {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_last_launch_error = function->name + ": " + error;
    std::fprintf(stderr, "layerwise stand-in driver: launch failed: %s\n", g_last_launch_error.c_str());
    return CUDA_ERROR_LAUNCH_FAILED;
  }
  return CUDA_SUCCESS;
}

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared, CUstream stream, void** params, void** extra) {
  if (extra) return CUDA_ERROR_NOT_SUPPORTED;
  if (expecting_dependent("1")) return refuse_launch(f, "a plain launch where a programmatic dependent one was expected");
  return run_launch(f, gx, gy, gz, bx, by, bz, shared, params, stream);
}

// cuLaunchKernelEx's structures (cuda.h, CUDA 12): an attribute is an id, 4 bytes of padding and a
// 64-byte union; the configuration, the launch shape, the stream and the attribute list.
struct CUlaunchAttribute {
  int id;
  char pad[4];
  unsigned char value[64];
};
struct CUlaunchConfig {
  unsigned gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes;
  CUstream hStream;
  CUlaunchAttribute* attrs;
  unsigned numAttrs;
};
static_assert(sizeof(CUlaunchAttribute) == 72 && sizeof(CUlaunchConfig) == 56, "cuda.h's layout");
constexpr int kProgrammaticStreamSerialization = 6;  // CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION

// Launches run one after another here, so a programmatic dependent launch runs as a plain one; the
// attributes are checked (only programmatic serialization, allowed 0 or 1) so that a malformed
// configuration fails here as it would on the device.
CUresult cuLaunchKernelEx(const CUlaunchConfig* config, CUfunction f, void** params, void** extra) {
  if (!config || extra || (config->numAttrs && !config->attrs)) return CUDA_ERROR_INVALID_VALUE;
  bool dependent = false;
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    const CUlaunchAttribute& attribute = config->attrs[i];
    int allowed;
    std::memcpy(&allowed, attribute.value, sizeof allowed);
    if (attribute.id != kProgrammaticStreamSerialization || (allowed != 0 && allowed != 1)) return CUDA_ERROR_INVALID_VALUE;
    dependent = dependent || allowed == 1;
  }
  if (dependent && expecting_dependent("0")) return refuse_launch(f, "a programmatic dependent launch where a plain one was expected");
  if (!dependent && expecting_dependent("1")) return refuse_launch(f, "a plain launch where a programmatic dependent one was expected");
  return run_launch(f, config->gridDimX, config->gridDimY, config->gridDimZ, config->blockDimX, config->blockDimY,
                    config->blockDimZ, config->sharedMemBytes, params, config->hStream);
}

// Stream capture (CUstreamCaptureMode is ignored: one thread drives the stand-in's streams).
CUresult cuStreamBeginCapture_v2(CUstream stream, int) {
  if (std::getenv("LAYERWISE_STANDIN_NO_CAPTURE")) return CUDA_ERROR_NOT_SUPPORTED;  // as a driver without graphs
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_capturing) return CUDA_ERROR_ILLEGAL_STATE;
  g_capturing = stream;
  g_recording.clear();
  return CUDA_SUCCESS;
}
CUresult cuStreamEndCapture(CUstream stream, CUgraph* graph) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_capturing != stream) return CUDA_ERROR_ILLEGAL_STATE;
  g_capturing = nullptr;
  *graph = new Graph(std::move(g_recording));
  g_recording.clear();
  return CUDA_SUCCESS;
}
CUresult cuGraphInstantiateWithFlags(CUgraphExec* exec, CUgraph graph, unsigned long long) {
  if (!graph) return CUDA_ERROR_INVALID_VALUE;
  *exec = new Graph(*static_cast<Graph*>(graph));
  return CUDA_SUCCESS;
}
CUresult cuGraphUpload(CUgraphExec, CUstream) { return capturing() ? CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED : CUDA_SUCCESS; }
CUresult cuGraphLaunch(CUgraphExec exec, CUstream stream) {
  if (capturing()) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  for (Recorded& launch : *static_cast<Graph*>(exec)) {
    std::vector<void*> params;
    for (auto& parameter : launch.parameters) params.push_back(parameter.data());
    CUresult result = run_launch(launch.function, launch.grid[0], launch.grid[1], launch.grid[2], launch.block[0],
                                 launch.block[1], launch.block[2], launch.shared, params.data(), stream);
    if (result != CUDA_SUCCESS) return result;
  }
  return CUDA_SUCCESS;
}
CUresult cuGraphExecDestroy(CUgraphExec exec) {
  delete static_cast<Graph*>(exec);
  return CUDA_SUCCESS;
}
CUresult cuGraphDestroy(CUgraph graph) {
  delete static_cast<Graph*>(graph);
  return CUDA_SUCCESS;
}

CUresult cuGetErrorString(CUresult error, const char** text) {
  switch (error) {
    case CUDA_SUCCESS: *text = "no error"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: *text = "out of memory"; break;
    case CUDA_ERROR_NO_DEVICE: *text = "no CUDA-capable device is detected"; break;
    case CUDA_ERROR_INVALID_DEVICE: *text = "invalid device ordinal"; break;
    case CUDA_ERROR_NOT_FOUND: *text = "named symbol not found"; break;
    case CUDA_ERROR_LAUNCH_FAILED: *text = "the emulated launch failed (see stderr)"; break;
    case CUDA_ERROR_NOT_SUPPORTED: *text = "operation not supported by the stand-in driver"; break;
    case CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: *text = "operation not permitted when stream is capturing"; break;
    case CUDA_ERROR_ILLEGAL_STATE: *text = "the operation cannot be performed in the present state"; break;
    default: *text = "stand-in driver error"; break;
  }
  return CUDA_SUCCESS;
}
CUresult cuGetErrorName(CUresult error, const char** text) {
  switch (error) {
    case CUDA_SUCCESS: *text = "CUDA_SUCCESS"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: *text = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case CUDA_ERROR_NO_DEVICE: *text = "CUDA_ERROR_NO_DEVICE"; break;
    case CUDA_ERROR_INVALID_DEVICE: *text = "CUDA_ERROR_INVALID_DEVICE"; break;
    case CUDA_ERROR_NOT_FOUND: *text = "CUDA_ERROR_NOT_FOUND"; break;
    case CUDA_ERROR_LAUNCH_FAILED: *text = "CUDA_ERROR_LAUNCH_FAILED"; break;
    case CUDA_ERROR_NOT_SUPPORTED: *text = "CUDA_ERROR_NOT_SUPPORTED"; break;
    case CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: *text = "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"; break;
    case CUDA_ERROR_ILLEGAL_STATE: *text = "CUDA_ERROR_ILLEGAL_STATE"; break;
    default: *text = "CUDA_ERROR_UNKNOWN"; break;
  }
  return CUDA_SUCCESS;
}

}  // extern "C"
