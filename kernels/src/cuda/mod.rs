//! The CUDA backend: the engine's ops as the kernels of `kernels/cuda/`, on one device and one
//! stream, through cudarc with dynamic loading (the project builds and runs where no CUDA exists).
//!
//! Device memory holds every tensor, weight, cache and step layout; ops queue kernels on the stream
//! and return at once; the host waits only in `to_host` and `argmax_rows`. A step's layout is packed
//! into one array of integers and copied once. Matrices are stored `[out, in]` whatever the
//! checkpoint's layout (GPT-2's `[in, out]` weights are transposed once, at upload), in f32, f16 or
//! bf16; vectors (norm weights, biases, head scales) in f32. On sm_90 and later every kernel is
//! launched as a programmatic dependent of the one before it (`cuLaunchKernelEx`): it may start, and
//! issue its first weight loads, while that kernel finishes (kernels/cuda/common.cuh,
//! `lw_await_inputs`). Launches are described in launch.rs, held back in chunks and replayed from
//! CUDA graphs in graphs.rs, over memory kept for reuse in pool.rs.
//!
//! ```no_run
//! let backend = layerwise_kernels::cuda::Cuda::open(0, None)?; // an error when no device is there
//! let loaded = layerwise::load_on("tests/fixtures/gpt2-sharded", backend)?;
//! # Ok::<(), layerwise::Error>(())
//! ```

mod graphs;
mod launch;
mod pool;
pub mod program;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, ValidAsZeroBits};
use cudarc::nvrtc::Ptx;
use layerwise::backend::{AttentionParams, Backend, Layout, Lookup, NormParams, StepLayout};
use layerwise::model::config::Activation;
use layerwise::{DType, Error, HostTensor, Result};

use crate::sources::KERNELS;
pub use graphs::GraphStats;
use graphs::Graphs;
use launch::{KernelArgs, KernelValue, Launch};
use pool::{DeviceBuffer, Pool, Pooled};

fn fail(reason: impl std::fmt::Display) -> Error {
    Error::Backend { backend: "cuda".into(), reason: reason.to_string() }
}

/// The attention kernels are causal (decoders); encoders' bidirectional attention runs on the CPU.
fn check_causal(params: &AttentionParams) -> Result<()> {
    if params.causal {
        Ok(())
    } else {
        Err(fail("bidirectional (encoder) attention has no CUDA kernel yet; run encoders with --device cpu"))
    }
}

/// How many CUDA devices the driver reports; 0 when no driver (libcuda) is installed.
pub fn device_count() -> usize {
    // SAFETY: only opens the library to see whether it is there.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return 0;
    }
    if cudarc::driver::result::init().is_err() {
        return 0;
    }
    CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

/// The CUDA backend on one device.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    weight_dtype: Option<DType>,
    description: String,
    launches: AtomicU64,
    /// Kernels launched as programmatic dependents (`Cuda::dependent_launch`).
    dependent_launch: bool,
    compute_capability: (i32, i32),
    /// Warps per output of every decode matvec, when set (the kernel benchmark's sweep); else
    /// [`matvec_split`] chooses per weight.
    matvec_split: Option<usize>,
    /// Streaming multiprocessors: sizes the grids that sweep a list of work with a fixed number of
    /// blocks.
    multiprocessors: usize,
    /// The tickets of kernels whose blocks split a row (`lw_last_block` in common.cuh: attention's
    /// splits, ACD's slices): zero between launches (each row's last block sets its counter back),
    /// grown, cleared, when a launch needs more.
    counters: Mutex<Option<DeviceBuffer<u32>>>,
    /// Launches held back and replayed from graphs (graphs.rs), with the pool that keeps addresses
    /// steady from step to step (pool.rs); None: every launch submitted at once, memory freed as it
    /// is dropped.
    graphs: Option<Mutex<Graphs>>,
    pool: Option<Arc<Pool>>,
}

/// Launches per graph unless `LAYERWISE_CUDA_GRAPHS` says otherwise: a gpt2-medium decoding step
/// (126 launches) in four graphs, so the device starts on a step after the host has built 32 of
/// its launches.
const GRAPH_CHUNK: usize = 32;

/// Launches per graph from `LAYERWISE_CUDA_GRAPHS`: unset, [`GRAPH_CHUNK`]; `0` or `off`, none
/// (graphs off); else the number (4 or more).
fn graph_chunk_from_env() -> Result<Option<usize>> {
    let Ok(value) = std::env::var("LAYERWISE_CUDA_GRAPHS") else {
        return Ok(Some(GRAPH_CHUNK));
    };
    match value.trim() {
        "0" | "off" => Ok(None),
        n => match n.parse::<usize>() {
            Ok(n) if n >= 4 => Ok(Some(n)),
            _ => Err(fail(format!(
                "LAYERWISE_CUDA_GRAPHS={value}: expected 0 or off (no graphs), or launches per graph (4 or more)"
            ))),
        },
    }
}

/// An activation matrix `[rows, cols]` in device memory.
pub struct CudaTensor {
    data: DeviceBuffer<f32>,
    rows: usize,
    cols: usize,
}

enum Storage {
    F32(DeviceBuffer<f32>),
    F16(DeviceBuffer<u16>),
    Bf16(DeviceBuffer<u16>),
}

/// A weight in device memory: a matrix `[out, in]` in its compute dtype, or an f32 vector.
pub struct CudaWeight {
    storage: Storage,
    out_features: usize,
    in_features: usize,
    bytes: usize,
    /// The matrix's device address in device memory, for kernels that take an array of heads
    /// (made on first use).
    address: OnceLock<DeviceBuffer<u64>>,
}

/// The paged cache: keys and values `[layer][slot][width]`.
pub struct CudaKv {
    keys: DeviceBuffer<f32>,
    values: DeviceBuffer<f32>,
    layers: usize,
    slots_per_layer: usize,
    block_size: usize,
    width: usize,
}

/// A step's layout on the device (one array, copied once), and its host copy for shapes.
pub struct CudaStep {
    layout: StepLayout,
    meta: DeviceBuffer<u32>,
    /// Where each part (`CudaStep::IDS` ..) starts in `meta`, and where the last ends.
    offsets: [usize; 9],
}

impl CudaStep {
    const IDS: usize = 0;
    const POSITIONS: usize = 1;
    const SLOTS: usize = 2;
    const ROW_SEQ: usize = 3;
    const TABLE_START: usize = 4;
    const OUTPUT_ROWS: usize = 5;
    const BLOCK_COPIES: usize = 6;
    /// Last, so that the parts before it keep their places while the tables grow.
    const BLOCK_TABLES: usize = 7;
    /// `meta`'s length is a multiple of this: it keeps its size (and, with graphs on, its address)
    /// while a sequence's block table grows by up to a few hundred blocks.
    const ROUNDING: usize = 256;

    fn part(&self, part: usize) -> std::ops::Range<usize> {
        self.offsets[part]..self.offsets[part + 1]
    }
}

/// `lw_attention_args` of kernels/cuda/attention.cu, with device pointers.
#[repr(C)]
#[derive(Clone, Copy)]
struct AttentionArgs {
    q: u64,
    keys: u64,
    values: u64,
    /// The step's keys and values for the kernel to write itself (a decoding step), or 0.
    new_k: u64,
    new_v: u64,
    kv_stride: i32,
    _pad0: i32,
    positions: u64,
    row_seq: u64,
    table_start: u64,
    block_tables: u64,
    block_size: i32,
    layer: i32,
    heads: i32,
    kv_heads: i32,
    head_dim: i32,
    window: i32,
    slots_per_layer: u64,
    width: i32,
    q_stride: i32,
    scale: f32,
    _pad1: u32,
}

/// `lw_column_parts` of kernels/cuda/memory.cu: up to [`SPLIT_PARTS`] column blocks of one split.
#[repr(C)]
#[derive(Clone, Copy)]
struct SplitArgs {
    out: [u64; SPLIT_PARTS],
    start: [i32; SPLIT_PARTS],
    width: [i32; SPLIT_PARTS],
}

/// `lw_argmax_rows`' id for a row that fails the finite check (`LW_NON_FINITE_ROW`).
const NON_FINITE_ROW: u32 = u32::MAX;

/// Column blocks per `lw_split_columns` launch (`LW_MAX_PARTS`).
const SPLIT_PARTS: usize = 4;

const THREADS: u32 = 256;
/// Positions per split of the decode attention (one block per head, row and split): small enough
/// that a short context still spreads over many blocks.
const ATTENTION_CHUNK: usize = 64;

fn config(grid: (u32, u32, u32), block: u32, shared: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: shared as u32 }
}

/// Bytes of a weight row one warp of the decode matvec reads: 4 KiB is one round of 8 16-byte loads
/// per lane (kernels/cuda/common.cuh, `lw_lane_dots`), so the warp waits one memory latency.
const MATVEC_SLICE_BYTES: usize = 4096;

/// Warps per output feature of the decode matvec (1, 2, 4 or 8): enough that no warp reads more
/// than [`MATVEC_SLICE_BYTES`] of its row, and more for a narrow product (under 2048 outputs) while
/// slices stay at 1 KiB or more. Measured on the H200 (`device_matvec_split_sweep`, every
/// gpt2-medium shape in f32 and bf16): this picks the fastest split, or one within 3% of it,
/// for each; 1 KiB slices on a wide product (1024 -> 3072) were 30% slower than whole 4 KiB rows.
fn matvec_split(n_out: usize, row_bytes: usize) -> usize {
    let mut split = 1;
    while split < 8
        && (row_bytes / split > MATVEC_SLICE_BYTES
            || (n_out * split < 2048 && row_bytes / (2 * split) >= MATVEC_SLICE_BYTES / 4))
    {
        split *= 2;
    }
    split
}

/// What a product does with each output value (`lw_epilogue` in kernels/cuda/common.cuh).
#[derive(Clone, Copy)]
enum Epilogue {
    Store,
    Add,
    Activate(Activation),
}

impl Epilogue {
    fn code(self) -> i32 {
        match self {
            Epilogue::Store => 0,
            Epilogue::Add => 1,
            Epilogue::Activate(Activation::GeluTanh) => 2,
            Epilogue::Activate(Activation::Gelu) => 3,
            Epilogue::Activate(Activation::Relu) => 4,
            Epilogue::Activate(Activation::Silu) => 5,
        }
    }
}

/// Threads for a kernel whose block sweeps a row of `n` values (norms, row copies, argmax, ACD's
/// passes): a warp per 128 values, 32 to 1024, so that a vocabulary-sized row has many loads in
/// flight and a short one starts no idle threads (which the CPU emulation pays for, a fiber each).
/// A 1024-wide row gets the 256 threads it always had.
fn row_threads(n: usize) -> u32 {
    (n.div_ceil(128) * 32).clamp(32, 1024) as u32
}

fn blocks_for(n: usize) -> u32 {
    n.div_ceil(THREADS as usize).clamp(1, 65_535) as u32
}

// SAFETY: a repr(C) struct of integers, floats and device addresses, laid out as
// lw_attention_args, its padding spelled as fields.
unsafe impl KernelValue for AttentionArgs {}
// SAFETY: a repr(C) struct of device addresses and integers (no padding), laid out as lw_column_parts.
unsafe impl KernelValue for SplitArgs {}

macro_rules! launch {
    ($self:ident, $name:expr, $cfg:expr $(, $arg:expr)* $(,)?) => {{
        let mut args = KernelArgs::new();
        $(args.push($arg, &$self.stream)?;)*
        $self.launch_kernel(Launch { name: $name, cfg: $cfg, args })?;
    }};
}

impl Cuda {
    /// The backend on device `ordinal`, its kernels compiled for the device (or taken from the cache).
    /// An error, never a panic, when no driver or no such device exists.
    pub fn open(ordinal: usize, weight_dtype: Option<DType>) -> Result<Self> {
        let count = device_count();
        if count == 0 {
            return Err(fail("no CUDA driver (libcuda) or no CUDA device found"));
        }
        if ordinal >= count {
            return Err(fail(format!("device {ordinal} does not exist ({count} device(s))")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| fail(format!("cannot open device {ordinal}: {e:?}")))?;
        // One stream: ordering is the stream's; no per-buffer events are needed.
        // SAFETY: no other stream of this context touches the backend's buffers.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own (not the legacy default stream, with its implicit synchronisation).
        let stream =
            ctx.new_stream().map_err(|e| fail(format!("cannot create a stream on device {ordinal}: {e:?}")))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| fail(format!("{e:?}")))?;
        let cubin = program::cubin(major, minor).map_err(fail)?;
        let module =
            ctx.load_module(Ptx::from_binary(cubin)).map_err(|e| fail(format!("cannot load the kernels: {e:?}")))?;
        let mut functions = HashMap::new();
        for (_, names) in KERNELS {
            for &name in *names {
                let function = module.load_function(name).map_err(|e| fail(format!("kernel {name}: {e:?}")))?;
                functions.insert(name, function);
            }
        }
        let name = ctx.name().unwrap_or_else(|_| "?".into());
        let multiprocessors = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_or(1, |n| n.max(1) as usize);
        Cuda {
            ctx,
            stream,
            functions,
            weight_dtype,
            description: format!("cuda:{ordinal} ({name}, sm_{major}{minor})"),
            launches: AtomicU64::new(0),
            dependent_launch: major >= 9 && std::env::var("LAYERWISE_CUDA_PDL").map_or(true, |v| v != "0"),
            compute_capability: (major, minor),
            matvec_split: None,
            multiprocessors,
            counters: Mutex::new(None),
            graphs: None,
            pool: None,
        }
        .with_graphs(graph_chunk_from_env()?)
    }

    /// Holds launches back in chunks of `chunk` and replays a chunk seen before from a CUDA graph
    /// (`Some`), or submits every launch at once (`None`). The default is chunks of 32, or what
    /// `LAYERWISE_CUDA_GRAPHS` says (`0`: off). Graphs turn off by themselves, with a line on
    /// stderr, on a driver that cannot capture the launches.
    pub fn with_graphs(mut self, chunk: Option<usize>) -> Result<Self> {
        self.in_order()?; // launches held back under the old setting go first
        self.graphs = chunk.map(|n| Mutex::new(Graphs::new(n)));
        self.pool = chunk.map(|_| Arc::new(Pool::default()));
        Ok(self)
    }

    /// Graphs captured and launched so far (zero when graphs are off).
    pub fn graph_stats(&self) -> GraphStats {
        self.graphs.as_ref().and_then(|g| g.lock().ok().map(|g| g.stats())).unwrap_or_default()
    }

    /// Fixes the decode matvec's warps per output (1, 2, 4 or 8) for every product, or leaves the
    /// choice to the backend (`None`): for the kernel benchmark's sweep, not for decoding.
    pub fn with_matvec_split(mut self, split: Option<usize>) -> Result<Self> {
        if split.is_some_and(|s| ![1, 2, 4, 8].contains(&s)) {
            return Err(fail(format!("matvec split {split:?}: must be 1, 2, 4 or 8")));
        }
        self.matvec_split = split;
        Ok(self)
    }

    /// The device, for messages (`cuda:0 (NVIDIA H200, sm_90)`).
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Kernel launches so far (for launches per token).
    pub fn launches(&self) -> u64 {
        self.launches.load(Ordering::Relaxed)
    }

    /// Whether kernels are launched as programmatic dependents of the one before them (sm_90 and
    /// later, unless `LAYERWISE_CUDA_PDL=0` or [`Cuda::with_dependent_launch`] turned it off).
    pub fn dependent_launch(&self) -> bool {
        self.dependent_launch
    }

    /// Turns programmatic dependent launch on or off (kernels/cuda/common.cuh, `lw_await_inputs`):
    /// with it, each kernel may start, and issue its first weight loads, while the one before it
    /// finishes. An error when asked for on a device before sm_90, which has no such launch.
    pub fn with_dependent_launch(mut self, on: bool) -> Result<Self> {
        if on && self.compute_capability.0 < 9 {
            return Err(fail(format!("{}: programmatic dependent launch needs sm_90 or later", self.description)));
        }
        self.dependent_launch = on;
        Ok(self)
    }

    /// Queues `launch` on the stream: held back in the current chunk when graphs are on (the
    /// chunk submitted when full), else submitted at once.
    fn launch_kernel(&self, launch: Launch) -> Result<()> {
        self.launches.fetch_add(1, Ordering::Relaxed);
        let (Some(graphs), Some(pool)) = (&self.graphs, &self.pool) else {
            return self.submit(&launch);
        };
        let mut graphs = graphs.lock().map_err(|_| fail("graphs: a panic held them"))?;
        if graphs.hold(launch) {
            return self.submit_held(&mut graphs, pool);
        }
        pool.set_held_back(graphs.held());
        Ok(())
    }

    /// Submits the launches held back (from a graph when the chunk was seen before), then frees the
    /// buffers that waited for them.
    fn submit_held(&self, graphs: &mut Graphs, pool: &Pool) -> Result<()> {
        let submitted = graphs.submit_held(&self.stream, |l| self.submit(l));
        pool.set_held_back(graphs.held());
        pool.free_deferred();
        submitted
    }

    /// Submits one launch to the driver (see `Launch::submit`).
    fn submit(&self, launch: &Launch) -> Result<()> {
        let function = self.function(launch.name)?.cu_function();
        self.ctx.bind_to_thread().map_err(|e| fail(format!("{}: {e:?}", launch.name)))?;
        launch.submit(function, &self.stream, self.dependent_launch)
    }

    /// The stream, with every held-back launch submitted: for any call on the stream other than a
    /// launch (copies, memsets), which must come after the launches made before it.
    fn in_order(&self) -> Result<&Arc<CudaStream>> {
        if let (Some(graphs), Some(pool)) = (&self.graphs, &self.pool) {
            let mut graphs = graphs.lock().map_err(|_| fail("graphs: a panic held them"))?;
            if graphs.held() > 0 {
                self.submit_held(&mut graphs, pool)?;
            }
        }
        Ok(&self.stream)
    }

    fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| fail(format!("kernel {name} is not loaded")))
    }

    /// `n` elements (at least one) of device memory, not cleared: a kept buffer of that length
    /// when the pool has one.
    fn buffer<T: Pooled>(&self, n: usize) -> Result<DeviceBuffer<T>> {
        let n = n.max(1);
        if let Some(kept) = self.pool.as_ref().and_then(|p| p.take::<T>(n)) {
            return Ok(DeviceBuffer::new(kept, self.pool.clone()));
        }
        // SAFETY: the callers write every element before a kernel reads it (see `tensor`).
        let slice = unsafe { self.stream.alloc::<T>(n) }
            .map_err(|e| fail(format!("cannot allocate {n} elements of {} bytes: {e:?}", std::mem::size_of::<T>())))?;
        Ok(DeviceBuffer::new(slice, self.pool.clone()))
    }

    /// Device memory holding `data` (copied from the host).
    fn uploaded<T: Pooled>(&self, data: &[T], what: &str) -> Result<DeviceBuffer<T>> {
        let slice = self.in_order()?.clone_htod(data).map_err(|e| fail(format!("cannot upload {what}: {e:?}")))?;
        Ok(DeviceBuffer::new(slice, self.pool.clone()))
    }

    /// `n` elements of device memory, all zero.
    fn zeros<T: Pooled + ValidAsZeroBits>(&self, n: usize) -> Result<DeviceBuffer<T>> {
        let mut buffer = self.buffer::<T>(n)?;
        self.in_order()?.memset_zeros(&mut *buffer).map_err(|e| fail(format!("cannot clear {n} elements: {e:?}")))?;
        Ok(buffer)
    }

    /// Memory a kernel writes before it reads it (partial states, per-row statistics), not cleared.
    fn scratch(&self, n: usize) -> Result<DeviceBuffer<f32>> {
        self.buffer(n)
    }

    /// A new tensor, its memory not cleared: every op that makes one writes all of it before
    /// anything reads it (the stand-in driver fills new memory with NaN, so the tests would see a
    /// hole; with graphs on, a kept buffer holds its last owner's values instead). Clearing would
    /// cost a memset per op.
    fn tensor(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor { data: self.buffer(rows * cols)?, rows, cols })
    }

    /// A tensor holding `data` (copied from the host).
    fn tensor_from(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        let mut tensor = self.tensor(rows, cols)?;
        self.in_order()?.memcpy_htod(data, &mut *tensor.data).map_err(|e| fail(format!("upload: {e:?}")))?;
        Ok(tensor)
    }

    fn ptr<T>(&self, slice: &CudaSlice<T>) -> u64 {
        let (ptr, _sync) = slice.device_ptr(&self.stream);
        ptr
    }

    fn vector<'a>(&self, w: &'a CudaWeight, what: &str) -> Result<&'a CudaSlice<f32>> {
        match &w.storage {
            Storage::F32(data) if w.in_features == 1 => Ok(data),
            _ => Err(fail(format!("{what}: expected a vector weight"))),
        }
    }

    /// A weight's device address, whatever its dtype (kernels take it as a pointer of their type).
    fn matrix_ptr(&self, w: &CudaWeight) -> u64 {
        match &w.storage {
            Storage::F32(m) => self.ptr(m),
            Storage::F16(m) | Storage::Bf16(m) => self.ptr(m),
        }
    }

    /// The `[out, in]` product kernel of a weight's dtype.
    /// The kernels reading `w` in its dtype: (one-row matvec, up-to-8-row matvec, GEMM, ACD's lower
    /// logits).
    fn product_names(w: &CudaWeight) -> (&'static str, &'static str, &'static str, &'static str) {
        match w.storage {
            Storage::F32(_) => ("lw_matvec1_f32", "lw_matvec_f32", "lw_gemm_f32", "lw_acd_lower_f32"),
            Storage::F16(_) => ("lw_matvec1_f16", "lw_matvec_f16", "lw_gemm_f16", "lw_acd_lower_f16"),
            Storage::Bf16(_) => ("lw_matvec1_bf16", "lw_matvec_bf16", "lw_gemm_bf16", "lw_acd_lower_bf16"),
        }
    }

    /// `out (epilogue) x · wᵀ + bias`: the decode matvec for up to 8 rows, the tiled GEMM above.
    fn product(
        &self,
        out: &mut CudaTensor,
        x: &CudaTensor,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
        epilogue: Epilogue,
    ) -> Result<()> {
        if x.cols != w.in_features {
            return Err(fail(format!("linear: input width {} for a weight of {}", x.cols, w.in_features)));
        }
        // The bias as a device address, 0 (a null pointer in the kernel) for none.
        let bias: u64 = match bias {
            Some(b) => self.ptr(self.vector(b, "linear bias")?),
            None => 0,
        };
        if x.rows == 0 {
            return Ok(());
        }
        let (t, n_in, n_out) = (x.rows as i32, w.in_features as i32, w.out_features as i32);
        let (one_row, matvec, gemm, _) = Cuda::product_names(w);
        let weights = self.matrix_ptr(w);
        let epilogue = epilogue.code();
        if x.rows <= 8 {
            let split = self.matvec_split.unwrap_or_else(|| matvec_split(w.out_features, w.bytes / w.out_features));
            let features_per_block = (THREADS / 32) as usize / split;
            let cfg = config((w.out_features.div_ceil(features_per_block) as u32, 1, 1), THREADS, 0);
            let split = split as i32;
            let kernel = if x.rows == 1 { one_row } else { matvec };
            launch!(self, kernel, cfg, &mut out.data, &x.data, &weights, &bias, &t, &n_in, &n_out, &split, &epilogue);
        } else {
            let cfg = config((w.out_features.div_ceil(16) as u32, x.rows.div_ceil(16) as u32, 1), 256, 0);
            launch!(self, gemm, cfg, &mut out.data, &x.data, &weights, &bias, &t, &n_in, &n_out, &epilogue);
        }
        Ok(())
    }

    /// The attention's arguments for queries at device address `q`, `q_stride` floats from row to row.
    fn attention_args(
        &self,
        (q, q_stride): (u64, usize),
        store: &CudaKv,
        layer: usize,
        step: &CudaStep,
        p: &AttentionParams,
    ) -> AttentionArgs {
        let meta = self.ptr(&step.meta);
        let at = |part: usize| meta + 4 * step.offsets[part] as u64;
        AttentionArgs {
            q,
            keys: self.ptr(&store.keys),
            values: self.ptr(&store.values),
            new_k: 0,
            new_v: 0,
            kv_stride: 0,
            positions: at(CudaStep::POSITIONS),
            row_seq: at(CudaStep::ROW_SEQ),
            table_start: at(CudaStep::TABLE_START),
            block_tables: at(CudaStep::BLOCK_TABLES),
            block_size: store.block_size as i32,
            layer: layer as i32,
            heads: p.num_heads as i32,
            kv_heads: p.num_kv_heads as i32,
            head_dim: p.head_dim as i32,
            window: p.window.unwrap_or(0) as i32,
            slots_per_layer: store.slots_per_layer as u64,
            width: store.width as i32,
            q_stride: q_stride as i32,
            scale: p.scale,
            _pad0: 0,
            _pad1: 0,
        }
    }

    /// The device address of `n` counters, all zero (see `counters`).
    fn counters(&self, n: usize) -> Result<u64> {
        let mut counters = self.counters.lock().map_err(|_| fail("counters: a panic held them"))?;
        if counters.as_ref().is_none_or(|c| c.len() < n) {
            *counters = Some(self.zeros(n.next_power_of_two())?);
        }
        Ok(counters.as_ref().map_or(0, |c| self.ptr(c)))
    }

    /// Writes `rows` key and value rows of `cols` floats, at device addresses `k` and `v`, `stride`
    /// floats apart, into the step's slots of `layer`.
    #[allow(clippy::too_many_arguments)]
    fn write_cache(
        &self,
        store: &mut CudaKv,
        layer: usize,
        step: &CudaStep,
        (k, v): (u64, u64),
        rows: usize,
        cols: usize,
        stride: usize,
    ) -> Result<()> {
        if cols > store.width || layer >= store.layers || step.layout.slots.len() != rows {
            return Err(fail(format!("kv_write: [{rows}, {cols}] rows into layer {layer}")));
        }
        if rows == 0 {
            return Ok(());
        }
        let slots = step.meta.slice(step.part(CudaStep::SLOTS));
        let (cols, stride, width) = (cols as i32, stride as i32, store.width as i32);
        let (l, spl) = (layer as i32, store.slots_per_layer as u64);
        let cfg = config((rows as u32, 1, 1), row_threads(cols as usize), 0);
        launch!(
            self,
            "lw_kv_write",
            cfg,
            &mut store.keys,
            &mut store.values,
            &k,
            &v,
            &slots,
            &cols,
            &stride,
            &width,
            &l,
            &spl
        );
        Ok(())
    }

    /// Attention of `rows` query rows at `q` (`q_stride` floats apart) over the cache: one launch
    /// of `lw_attention`, its splits merged by their last block. `new_kv`: the step's keys and
    /// values (addresses and row stride) for the kernel to write first, in a decoding step.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: (u64, usize),
        rows: usize,
        store: &CudaKv,
        layer: usize,
        step: &CudaStep,
        params: &AttentionParams,
        new_kv: Option<(u64, u64, usize)>,
    ) -> Result<CudaTensor> {
        check_causal(params)?;
        let mut out = self.tensor(rows, params.num_heads * params.head_dim)?;
        if rows == 0 {
            return Ok(out);
        }
        let longest = step.layout.positions.iter().map(|&p| p as usize + 1).max().unwrap_or(1);
        let splits = longest.div_ceil(ATTENTION_CHUNK);
        // With one split the blocks write the output at once: no partial states, no counters.
        let states = if splits > 1 { rows * params.num_heads * splits * (params.head_dim + 2) } else { 0 };
        let mut partial = self.scratch(states)?;
        let counters = if splits > 1 { self.counters(rows * params.num_heads)? } else { 0 };
        let mut args = self.attention_args(q, store, layer, step, params);
        if let Some((k, v, stride)) = new_kv {
            (args.new_k, args.new_v, args.kv_stride) = (k, v, stride as i32);
        }
        let chunk = ATTENTION_CHUNK as i32;
        // The chunk's cache rows (8 bytes each), the query, the chunk's scores, a row of
        // weighted-value sums per warp.
        let shared =
            ATTENTION_CHUNK * 8 + (params.head_dim + ATTENTION_CHUNK + THREADS as usize / 32 * params.head_dim) * 4;
        let cfg = config((params.num_heads as u32, rows as u32, splits as u32), THREADS, shared);
        launch!(self, "lw_attention", cfg, &mut out.data, &mut partial, &counters, &args, &chunk);
        Ok(out)
    }
}

/// A weight's values in `[out, in]` order in `dtype`, as raw little-endian bytes.
fn out_in_bytes(tensor: &HostTensor, layout: Layout, dtype: DType, out: usize, inp: usize) -> Vec<u8> {
    let converted;
    let source = if tensor.dtype() == dtype {
        tensor
    } else {
        converted = tensor.converted(dtype);
        &converted
    };
    let bytes = source.bytes();
    if layout == Layout::OutIn {
        return bytes.to_vec();
    }
    let size = dtype.size();
    let mut transposed = vec![0u8; bytes.len()];
    for i in 0..inp {
        for o in 0..out {
            let from = (i * out + o) * size;
            let to = (o * inp + i) * size;
            transposed[to..to + size].copy_from_slice(&bytes[from..from + size]);
        }
    }
    transposed
}

impl Backend for Cuda {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type KvStore = CudaKv;
    type Step = CudaStep;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn bidirectional_attention(&self) -> bool {
        false
    }

    fn launches(&self) -> Option<u64> {
        Some(Cuda::launches(self))
    }

    fn graph_launches(&self) -> Option<u64> {
        Some(self.graph_stats().replays)
    }

    fn weight(&self, tensor: &HostTensor, layout: Layout) -> Result<CudaWeight> {
        let (out_features, in_features) = layerwise::backend::logical_shape(tensor, layout)?;
        if in_features == 1 {
            let data = self.uploaded(&tensor.data().to_f32_vec(), "a weight")?;
            let storage = Storage::F32(data);
            return Ok(CudaWeight {
                storage,
                out_features,
                in_features,
                bytes: out_features * 4,
                address: OnceLock::new(),
            });
        }
        let dtype = self.weight_dtype.unwrap_or(tensor.dtype());
        let bytes = out_in_bytes(tensor, layout, dtype, out_features, in_features);
        let storage = match dtype {
            DType::F32 => Storage::F32(self.uploaded(bytemuck_f32(&bytes).as_slice(), "a weight")?),
            DType::F16 => Storage::F16(self.uploaded(bytemuck_u16(&bytes).as_slice(), "a weight")?),
            DType::BF16 => Storage::Bf16(self.uploaded(bytemuck_u16(&bytes).as_slice(), "a weight")?),
        };
        Ok(CudaWeight { storage, out_features, in_features, bytes: bytes.len(), address: OnceLock::new() })
    }

    fn weight_bytes(&self, w: &CudaWeight) -> usize {
        w.bytes
    }

    fn upload(&self, data: Vec<f32>, rows: usize, cols: usize) -> Result<CudaTensor> {
        if data.len() != rows * cols {
            return Err(fail(format!("{} values do not make a [{rows}, {cols}] matrix", data.len())));
        }
        self.tensor_from(&data, rows, cols)
    }

    fn upload_step(&self, layout: StepLayout) -> Result<CudaStep> {
        let row_seq: Vec<u32> =
            layout.sequences.iter().enumerate().flat_map(|(s, seq)| std::iter::repeat_n(s as u32, seq.len)).collect();
        let table_start: Vec<u32> = layout.sequences.iter().map(|s| s.table_start as u32).collect();
        let pairs: Vec<u32> = layout.block_copies.iter().flat_map(|&(from, to)| [from, to]).collect();
        // In the order of CudaStep's part numbers.
        let parts: [&[u32]; 8] = [
            &layout.ids,
            &layout.positions,
            &layout.slots,
            &row_seq,
            &table_start,
            &layout.output_rows,
            &pairs,
            &layout.block_tables,
        ];
        let mut offsets = [0usize; 9];
        let mut packed = Vec::with_capacity(parts.iter().map(|p| p.len()).sum::<usize>() + CudaStep::ROUNDING);
        for (i, part) in parts.iter().enumerate() {
            offsets[i] = packed.len();
            packed.extend_from_slice(part);
        }
        offsets[8] = packed.len();
        packed.resize((packed.len() + 1).next_multiple_of(CudaStep::ROUNDING), 0);
        // A new step: hand out kept memory in its canonical order (pool.rs), so that this step's
        // buffers are the last step's when it asks for the same.
        let stream = self.in_order()?;
        if let Some(pool) = &self.pool {
            pool.canonicalize(stream);
        }
        let mut meta = self.buffer::<u32>(packed.len())?;
        stream.memcpy_htod(&packed, &mut *meta).map_err(|e| fail(format!("step layout: {e:?}")))?;
        Ok(CudaStep { layout, meta, offsets })
    }

    fn to_host(&self, x: &CudaTensor) -> Result<Vec<f32>> {
        let mut all = self.in_order()?.clone_dtoh(&*x.data).map_err(|e| fail(format!("to_host: {e:?}")))?;
        all.truncate(x.rows * x.cols);
        Ok(all)
    }

    fn shape(&self, x: &CudaTensor) -> (usize, usize) {
        (x.rows, x.cols)
    }

    fn copy(&self, x: &CudaTensor) -> Result<CudaTensor> {
        let mut out = self.tensor(x.rows, x.cols)?;
        self.in_order()?.memcpy_dtod(&*x.data, &mut *out.data).map_err(|e| fail(format!("copy: {e:?}")))?;
        Ok(out)
    }

    fn split_columns(&self, x: &CudaTensor, widths: &[usize]) -> Result<Vec<CudaTensor>> {
        if widths.iter().sum::<usize>() != x.cols {
            return Err(fail(format!("split_columns: widths {widths:?} do not cover {} columns", x.cols)));
        }
        let parts = widths.iter().map(|&w| self.tensor(x.rows, w)).collect::<Result<Vec<_>>>()?;
        if x.rows == 0 {
            return Ok(parts);
        }
        // Up to SPLIT_PARTS column blocks per launch (a fused q|k|v projection: one).
        let (mut start, cols) = (0, x.cols as i32);
        for group in parts.chunks(SPLIT_PARTS) {
            let mut args = SplitArgs { out: [0; SPLIT_PARTS], start: [0; SPLIT_PARTS], width: [0; SPLIT_PARTS] };
            let mut widest = 0;
            for (p, part) in group.iter().enumerate() {
                args.out[p] = self.ptr(&part.data);
                args.start[p] = start as i32;
                args.width[p] = part.cols as i32;
                start += part.cols;
                widest = widest.max(part.cols);
            }
            let cfg = config((x.rows as u32, group.len() as u32, 1), row_threads(widest), 0);
            launch!(self, "lw_split_columns", cfg, &args, &x.data, &cols);
        }
        Ok(parts)
    }

    fn gather_output_rows(&self, x: &CudaTensor, step: &CudaStep) -> Result<CudaTensor> {
        let n = step.layout.output_rows.len();
        if step.layout.output_rows.iter().any(|&r| r as usize >= x.rows) {
            return Err(fail("gather_output_rows: a row outside the tensor"));
        }
        let mut out = self.tensor(n, x.cols)?;
        if n > 0 {
            let rows = step.meta.slice(step.part(CudaStep::OUTPUT_ROWS));
            let cols = x.cols as i32;
            launch!(
                self,
                "lw_gather_rows",
                config((n as u32, 1, 1), row_threads(x.cols), 0),
                &mut out.data,
                &x.data,
                &rows,
                &cols
            );
        }
        Ok(out)
    }

    fn concat_rows(&self, parts: &[&CudaTensor]) -> Result<CudaTensor> {
        let cols = parts.first().map_or(0, |p| p.cols);
        if parts.iter().any(|p| p.cols != cols) {
            return Err(fail("concat_rows: parts of different widths"));
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let mut out = self.tensor(rows, cols)?;
        let mut at = 0;
        for part in parts {
            let n = part.rows * cols;
            let mut dst = out.data.slice_mut(at..at + n);
            self.in_order()?
                .memcpy_dtod(&part.data.slice(0..n), &mut dst)
                .map_err(|e| fail(format!("concat_rows: {e:?}")))?;
            at += n;
        }
        Ok(out)
    }

    fn embed(&self, table: &CudaWeight, step: &CudaStep, lookup: Lookup) -> Result<CudaTensor> {
        let (index, range) = match lookup {
            Lookup::Tokens => (&step.layout.ids, step.part(CudaStep::IDS)),
            Lookup::Positions => (&step.layout.positions, step.part(CudaStep::POSITIONS)),
        };
        if let Some(&i) = index.iter().find(|&&i| i as usize >= table.out_features) {
            return Err(fail(format!("embed: row {i} of a table of {}", table.out_features)));
        }
        let (t, d) = (index.len(), table.in_features);
        let mut out = self.tensor(t, d)?;
        if t == 0 {
            return Ok(out);
        }
        let rows = step.meta.slice(range);
        let dd = d as i32;
        let cfg = config((t as u32, 1, 1), row_threads(d), 0);
        match &table.storage {
            Storage::F32(w) => launch!(self, "lw_embed_f32", cfg, &mut out.data, w, &rows, &dd),
            Storage::F16(w) => launch!(self, "lw_embed_f16", cfg, &mut out.data, w, &rows, &dd),
            Storage::Bf16(w) => launch!(self, "lw_embed_bf16", cfg, &mut out.data, w, &rows, &dd),
        }
        Ok(out)
    }

    fn add_assign(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        if (x.rows, x.cols) != (y.rows, y.cols) {
            return Err(fail("add_assign: shapes differ"));
        }
        let n = (x.rows * x.cols) as u64;
        launch!(self, "lw_add", config((blocks_for(n as usize), 1, 1), THREADS, 0), &mut x.data, &y.data, &n);
        Ok(())
    }

    fn mul_assign(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        if (x.rows, x.cols) != (y.rows, y.cols) {
            return Err(fail("mul_assign: shapes differ"));
        }
        let n = (x.rows * x.cols) as u64;
        launch!(self, "lw_mul", config((blocks_for(n as usize), 1, 1), THREADS, 0), &mut x.data, &y.data, &n);
        Ok(())
    }

    fn layer_norm(&self, x: &CudaTensor, weight: &CudaWeight, bias: &CudaWeight, eps: f32) -> Result<CudaTensor> {
        let (w, b) = (self.vector(weight, "layer_norm")?, self.vector(bias, "layer_norm")?);
        if weight.out_features != x.cols || bias.out_features != x.cols {
            return Err(fail("layer_norm: weights of another width"));
        }
        let mut out = self.tensor(x.rows, x.cols)?;
        let cols = x.cols as i32;
        if x.rows > 0 {
            launch!(
                self,
                "lw_layer_norm",
                config((x.rows as u32, 1, 1), row_threads(x.cols), 0),
                &mut out.data,
                &x.data,
                w,
                b,
                &cols,
                &eps
            );
        }
        Ok(out)
    }

    fn norm_linear(
        &self,
        x: &CudaTensor,
        norm: NormParams<'_, CudaWeight>,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
        act: Option<Activation>,
    ) -> Result<CudaTensor> {
        // One launch (lw_norm_head) while the normed rows fit the 48 KiB of shared memory a block gets
        // without opting in; else the ops one by one.
        let shared = x.rows * x.cols * 4 + 256;
        if x.rows == 0 || x.rows > 8 || shared > 48 * 1024 || w.in_features != x.cols || w.in_features == 1 {
            return layerwise::backend::norm_then_linear(self, x, norm, w, bias, act);
        }
        let norm_w = self.vector(norm.weight, "norm_linear")?;
        if norm.weight.out_features != x.cols || norm.bias.is_some_and(|b| b.out_features != x.cols) {
            return Err(fail("norm_linear: norm weights of another width"));
        }
        // Biases as device addresses, 0 (a null pointer) for none: no norm bias means RMSNorm.
        let norm_b = match norm.bias {
            Some(b) => self.ptr(self.vector(b, "norm_linear norm bias")?),
            None => 0,
        };
        let product_b = match bias {
            Some(b) => self.ptr(self.vector(b, "norm_linear bias")?),
            None => 0,
        };
        let matrix = self.matrix_ptr(w);
        let heads = match w.address.get() {
            Some(heads) => heads,
            None => {
                let made = self.uploaded(&[matrix], "norm_linear's head address")?;
                w.address.get_or_init(|| made)
            }
        };
        let name = match (&w.storage, x.rows) {
            (Storage::F32(_), 1) => "lw_norm_head1_f32",
            (Storage::F16(_), 1) => "lw_norm_head1_f16",
            (Storage::Bf16(_), 1) => "lw_norm_head1_bf16",
            (Storage::F32(_), _) => "lw_norm_head_f32",
            (Storage::F16(_), _) => "lw_norm_head_f16",
            (Storage::Bf16(_), _) => "lw_norm_head_bf16",
        };
        let mut out = self.tensor(x.rows, w.out_features)?;
        let (t, hidden, n_out) = (x.rows as i32, x.cols as i32, w.out_features as i32);
        let epilogue = act.map_or(Epilogue::Store, Epilogue::Activate).code();
        let warps = (THREADS / 32) as usize;
        let cfg = config((w.out_features.div_ceil(warps) as u32, 1, 1), THREADS, shared);
        let eps = norm.eps;
        launch!(
            self,
            name,
            cfg,
            &mut out.data,
            &x.data,
            norm_w,
            &norm_b,
            heads,
            &product_b,
            &t,
            &hidden,
            &n_out,
            &eps,
            &epilogue
        );
        Ok(out)
    }

    fn rms_norm(&self, x: &CudaTensor, weight: &CudaWeight, eps: f32) -> Result<CudaTensor> {
        let w = self.vector(weight, "rms_norm")?;
        if weight.out_features != x.cols {
            return Err(fail("rms_norm: a weight of another width"));
        }
        let mut out = self.tensor(x.rows, x.cols)?;
        let cols = x.cols as i32;
        if x.rows > 0 {
            launch!(
                self,
                "lw_rms_norm",
                config((x.rows as u32, 1, 1), row_threads(x.cols), 0),
                &mut out.data,
                &x.data,
                w,
                &cols,
                &eps
            );
        }
        Ok(out)
    }

    fn linear(&self, x: &CudaTensor, w: &CudaWeight, bias: Option<&CudaWeight>) -> Result<CudaTensor> {
        let mut out = self.tensor(x.rows, w.out_features)?;
        self.product(&mut out, x, w, bias, Epilogue::Store)?;
        Ok(out)
    }

    fn linear_act(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
        act: Activation,
    ) -> Result<CudaTensor> {
        let mut out = self.tensor(x.rows, w.out_features)?;
        self.product(&mut out, x, w, bias, Epilogue::Activate(act))?;
        Ok(out)
    }

    fn linear_add_assign(
        &self,
        x: &mut CudaTensor,
        input: &CudaTensor,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
    ) -> Result<()> {
        if (x.rows, x.cols) != (input.rows, w.out_features) {
            return Err(fail(format!(
                "linear_add_assign: a [{}, {}] product added to [{}, {}]",
                input.rows, w.out_features, x.rows, x.cols
            )));
        }
        self.product(x, input, w, bias, Epilogue::Add)
    }

    fn activate(&self, x: &mut CudaTensor, act: Activation) -> Result<()> {
        let name = match act {
            Activation::GeluTanh => "lw_gelu_tanh_inplace",
            Activation::Gelu => "lw_gelu_erf_inplace",
            Activation::Relu => "lw_relu_inplace",
            Activation::Silu => "lw_silu_inplace",
        };
        let n = (x.rows * x.cols) as u64;
        launch!(self, name, config((blocks_for(n as usize), 1, 1), THREADS, 0), &mut x.data, &n);
        Ok(())
    }

    fn rope(&self, x: &mut CudaTensor, head_dim: usize, step: &CudaStep, theta: f32) -> Result<()> {
        if step.layout.positions.len() != x.rows {
            return Err(fail("rope: one position per row"));
        }
        let positions = step.meta.slice(step.part(CudaStep::POSITIONS));
        let (t, cols, d) = (x.rows as i32, x.cols as i32, head_dim as i32);
        let pairs = x.rows * x.cols / 2;
        launch!(
            self,
            "lw_rope",
            config((blocks_for(pairs), 1, 1), THREADS, 0),
            &mut x.data,
            &positions,
            &t,
            &cols,
            &d,
            &theta
        );
        Ok(())
    }

    fn scale_heads(&self, x: &mut CudaTensor, scales: &CudaWeight, head_dim: usize) -> Result<()> {
        let s = self.vector(scales, "scale_heads")?;
        let (n, cols, d) = ((x.rows * x.cols) as u64, x.cols as i32, head_dim as i32);
        launch!(
            self,
            "lw_scale_heads",
            config((blocks_for(n as usize), 1, 1), THREADS, 0),
            &mut x.data,
            s,
            &n,
            &cols,
            &d
        );
        Ok(())
    }

    fn kv_store(&self, layers: usize, num_blocks: usize, block_size: usize, kv_width: usize) -> Result<CudaKv> {
        let slots_per_layer = num_blocks * block_size;
        let elements = layers
            .checked_mul(slots_per_layer)
            .and_then(|n| n.checked_mul(kv_width))
            .ok_or_else(|| fail("KV cache: requested size overflows"))?;
        let (free, _) = self.ctx.mem_get_info().map_err(|e| fail(format!("{e:?}")))?;
        if elements.saturating_mul(8) > free {
            return Err(fail(format!(
                "KV cache: {} MiB asked for keys and values, {} MiB free on the device",
                (elements * 8) >> 20,
                free >> 20
            )));
        }
        Ok(CudaKv {
            keys: self.zeros(elements)?,
            values: self.zeros(elements)?,
            layers,
            slots_per_layer,
            block_size,
            width: kv_width,
        })
    }

    fn kv_copy_blocks(&self, store: &mut CudaKv, step: &CudaStep) -> Result<()> {
        let n = step.layout.block_copies.len();
        if n == 0 || store.layers == 0 {
            return Ok(());
        }
        let pairs = step.meta.slice(step.part(CudaStep::BLOCK_COPIES));
        let (bs, width, spl) = (store.block_size as i32, store.width as i32, store.slots_per_layer as u64);
        let cfg = config((n as u32, store.layers as u32, 1), THREADS, 0);
        launch!(self, "lw_copy_blocks", cfg, &mut store.keys, &mut store.values, &pairs, &bs, &width, &spl);
        Ok(())
    }

    fn kv_write(
        &self,
        store: &mut CudaKv,
        layer: usize,
        step: &CudaStep,
        k: &CudaTensor,
        v: &CudaTensor,
    ) -> Result<()> {
        if (k.rows, k.cols) != (v.rows, v.cols) {
            return Err(fail(format!("kv_write: keys [{}, {}], values [{}, {}]", k.rows, k.cols, v.rows, v.cols)));
        }
        self.write_cache(store, layer, step, (self.ptr(&k.data), self.ptr(&v.data)), k.rows, k.cols, k.cols)
    }

    fn paged_attention(
        &self,
        q: &CudaTensor,
        store: &CudaKv,
        layer: usize,
        step: &CudaStep,
        params: &AttentionParams,
    ) -> Result<CudaTensor> {
        if q.cols != params.num_heads * params.head_dim {
            return Err(fail(format!("paged_attention: queries of width {} for {params:?}", q.cols)));
        }
        self.attend((self.ptr(&q.data), q.cols), q.rows, store, layer, step, params, None)
    }

    /// One launch in a decoding step (the attention writes the new keys and values itself), else two
    /// (the cache write, then the attention); both read their column blocks of `qkv` in place.
    fn paged_attention_qkv(
        &self,
        qkv: &CudaTensor,
        store: &mut CudaKv,
        layer: usize,
        step: &CudaStep,
        params: &AttentionParams,
    ) -> Result<CudaTensor> {
        check_causal(params)?;
        let (q_width, kv_width) = params.qkv_widths();
        if qkv.cols != q_width + 2 * kv_width {
            return Err(fail(format!("paged_attention_qkv: a fused projection of width {} for {params:?}", qkv.cols)));
        }
        let base = self.ptr(&qkv.data);
        let (k, v) = (base + 4 * q_width as u64, base + 4 * (q_width + kv_width) as u64);
        let decoding = step.layout.sequences.iter().all(|s| s.len == 1);
        if decoding {
            if kv_width > store.width || layer >= store.layers || step.layout.slots.len() != qkv.rows {
                return Err(fail(format!("paged_attention_qkv: [{}, {kv_width}] rows into layer {layer}", qkv.rows)));
            }
            return self.attend((base, qkv.cols), qkv.rows, store, layer, step, params, Some((k, v, qkv.cols)));
        }
        self.write_cache(store, layer, step, (k, v), qkv.rows, kv_width, qkv.cols)?;
        self.attend((base, qkv.cols), qkv.rows, store, layer, step, params, None)
    }

    fn attention_probs(
        &self,
        q: &CudaTensor,
        store: &CudaKv,
        layer: usize,
        step: &CudaStep,
        seq: usize,
        params: &AttentionParams,
    ) -> Result<CudaTensor> {
        check_causal(params)?;
        let s = *step.layout.sequences.get(seq).ok_or_else(|| fail("attention_probs: no such sequence"))?;
        let context = s.first_position + s.len;
        let mut out = self.tensor(params.num_heads * s.len, context)?;
        if s.len == 0 {
            return Ok(out);
        }
        let args = self.attention_args((self.ptr(&q.data), q.cols), store, layer, step, params);
        let (first_row, ctx) = (s.first_row as i32, context as i32);
        let cfg = config((params.num_heads as u32, s.len as u32, 1), THREADS, (params.head_dim + context) * 4);
        launch!(self, "lw_attention_probs", cfg, &mut out.data, &args, &first_row, &ctx);
        Ok(out)
    }

    fn contrast_acd(
        &self,
        upper: &CudaTensor,
        lower_features: &CudaTensor,
        lower_head: &CudaWeight,
        alpha: f32,
        min_candidates: usize,
    ) -> Result<CudaTensor> {
        if lower_head.out_features != upper.cols || lower_head.in_features != lower_features.cols {
            return Err(fail("contrast_acd: the lower head does not fit the rows"));
        }
        let mut out = self.tensor(upper.rows, upper.cols)?;
        if upper.rows == 0 {
            return Ok(out);
        }
        let (_, _, _, lower_kernel) = Cuda::product_names(lower_head);
        let rows = upper.rows;
        let (vocab, hidden, k) = (upper.cols as i32, lower_features.cols as i32, min_candidates as i32);
        // Blocks per row: for the select, a slice of ~2048 logits each (8 a thread); for the lower
        // logits, eight blocks per multiprocessor (the whole head read at the device's bandwidth when
        // every token is plausible), fewer for a small vocabulary; for the finish, 1024 logits each.
        let select_blocks = upper.cols.div_ceil(2048).clamp(1, 1024);
        let warps_per_block = THREADS as usize / 32;
        let lower_blocks = upper.cols.div_ceil(warps_per_block).clamp(1, 8 * self.multiprocessors);
        let finish_blocks = upper.cols.div_ceil(1024).clamp(1, 65_535);
        // Per row: (norm, threshold, log of the plausible share); per row and block a partial state.
        let mut stats = self.scratch(3 * rows)?;
        let mut partial = self.scratch(3 * rows * select_blocks.max(lower_blocks))?;
        let counters = self.counters(rows)?;
        let select = config((select_blocks as u32, rows as u32, 1), THREADS, 256 * 4);
        launch!(self, "lw_acd_select", select, &mut stats, &mut partial, &counters, &upper.data, &vocab, &alpha, &k);
        let lower = config((lower_blocks as u32, rows as u32, 1), THREADS, lower_features.cols * 4);
        let h = self.matrix_ptr(lower_head);
        launch!(
            self,
            lower_kernel,
            lower,
            &mut out.data,
            &mut stats,
            &mut partial,
            &counters,
            &upper.data,
            &lower_features.data,
            &h,
            &vocab,
            &hidden
        );
        let finish = config((finish_blocks as u32, rows as u32, 1), THREADS, 0);
        launch!(self, "lw_acd_finish", finish, &mut out.data, &upper.data, &stats, &vocab);
        Ok(out)
    }

    fn argmax_rows(&self, x: &CudaTensor) -> Result<Vec<u32>> {
        if x.rows == 0 {
            return Ok(Vec::new());
        }
        // Every row's id is written by the kernel.
        let mut ids = self.buffer::<u32>(x.rows)?;
        let cols = x.cols as i32;
        launch!(
            self,
            "lw_argmax_rows",
            config((x.rows as u32, 1, 1), row_threads(x.cols), 0),
            &mut ids,
            &x.data,
            &cols
        );
        let mut ids = self.in_order()?.clone_dtoh(&*ids).map_err(|e| fail(format!("argmax_rows: {e:?}")))?;
        ids.truncate(x.rows);
        // The kernel's mark for a row that fails the finite check (LW_NON_FINITE_ROW): the reference's
        // error, named by the row's own fault.
        if let Some(row) = ids.iter().position(|&id| id == NON_FINITE_ROW) {
            let host = self.to_host(x)?;
            let fault = layerwise::math::scores_fault(&host[row * x.cols..(row + 1) * x.cols]).unwrap_or("NaN");
            return Err(layerwise::math::non_finite_row(row, fault));
        }
        Ok(ids)
    }
}

fn bytemuck_f32(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn bytemuck_u16(bytes: &[u8]) -> Vec<u16> {
    bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
}
