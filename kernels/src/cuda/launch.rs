//! How one kernel launch is described and submitted: its arguments marshalled into one buffer the
//! launch owns ([`KernelArgs`]), and the driver call, a programmatic dependent launch
//! (`cuLaunchKernelEx`) on sm_90 and later or a plain `cuLaunchKernel`. A [`Launch`] is plain data,
//! so the backend can hold launches back and replay them from a graph (graphs.rs).

use std::ffi::c_void;
use std::mem::MaybeUninit;

use cudarc::driver::{sys, CudaSlice, CudaStream, CudaView, DevicePtr, LaunchConfig};
use layerwise::Result;

use super::fail;
use super::pool::{DeviceBuffer, Pooled};

/// A kernel's arguments as the driver takes them (`kernelParams`: one pointer per argument, to its
/// value): the values copied, 8-byte aligned, into one buffer of the launch's own. Unused bytes are
/// zero, so two launches with the same arguments have the same bytes ([`KernelArgs::bytes`]).
#[derive(Clone, Copy)]
pub(crate) struct KernelArgs {
    words: [MaybeUninit<u64>; KernelArgs::WORDS],
    /// Where each argument starts in `words`.
    starts: [usize; KernelArgs::MAX_ARGS],
    count: usize,
    used: usize,
}

impl KernelArgs {
    const WORDS: usize = 64;
    const MAX_ARGS: usize = 16;

    pub(crate) fn new() -> Self {
        KernelArgs { words: [MaybeUninit::zeroed(); Self::WORDS], starts: [0; Self::MAX_ARGS], count: 0, used: 0 }
    }

    pub(crate) fn push<A: KernelArg>(&mut self, arg: A, stream: &CudaStream) -> Result<()> {
        arg.push_to(self, stream)
    }

    fn push_value<T: KernelValue>(&mut self, value: &T) -> Result<()> {
        let words = std::mem::size_of::<T>().div_ceil(8);
        if self.count == Self::MAX_ARGS || self.used + words > Self::WORDS || std::mem::align_of::<T>() > 8 {
            return Err(fail("a kernel's arguments exceed the launch buffer (16 arguments, 512 bytes)"));
        }
        // SAFETY: `value` is plain data without padding (`KernelValue`) of size_of::<T>() bytes,
        // copied into words this buffer owns with room for them (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(
                value as *const T as *const u8,
                self.words.as_mut_ptr().add(self.used) as *mut u8,
                std::mem::size_of::<T>(),
            )
        };
        self.starts[self.count] = self.used;
        self.count += 1;
        self.used += words;
        Ok(())
    }

    /// The pointers the driver reads the arguments through (valid while `self` is not moved; the
    /// driver only reads through them).
    fn pointers(&self) -> [*mut c_void; Self::MAX_ARGS] {
        let mut pointers = [std::ptr::null_mut(); Self::MAX_ARGS];
        let base = self.words.as_ptr();
        for (pointer, &start) in pointers.iter_mut().zip(&self.starts[..self.count]) {
            // SAFETY: start < used <= WORDS: inside `words`.
            *pointer = unsafe { base.add(start) } as *mut c_void;
        }
        pointers
    }

    /// The arguments' bytes, for comparing launches.
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: every word is initialised (zeroed in `new`, then overwritten by whole values
        // without padding), and `used <= WORDS`.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.used * 8) }
    }
}

/// The plain values kernels take by value: integers, floats, device addresses, the argument structs.
///
/// # Safety
/// The type must be plain data without padding bytes (a struct spells its padding as fields) and
/// without pointers to host memory, laid out as the CUDA parameter it is passed for (the argument
/// structs are `repr(C)` copies of kernels/cuda's).
pub(crate) unsafe trait KernelValue: Copy {}
// SAFETY: plain integers and floats, as the kernels' int, unsigned, float and unsigned long long.
unsafe impl KernelValue for i32 {}
// SAFETY: as above.
unsafe impl KernelValue for u32 {}
// SAFETY: as above.
unsafe impl KernelValue for f32 {}
// SAFETY: as above (also device addresses).
unsafe impl KernelValue for u64 {}

/// What a kernel argument can be: a plain value, or device memory (passed as its address).
pub(crate) trait KernelArg {
    fn push_to(self, args: &mut KernelArgs, stream: &CudaStream) -> Result<()>;
}

impl<T: KernelValue> KernelArg for &T {
    fn push_to(self, args: &mut KernelArgs, _: &CudaStream) -> Result<()> {
        args.push_value(self)
    }
}

impl<T> KernelArg for &CudaSlice<T> {
    fn push_to(self, args: &mut KernelArgs, stream: &CudaStream) -> Result<()> {
        let (address, _sync) = self.device_ptr(stream);
        args.push_value(&address)
    }
}

impl<T> KernelArg for &mut CudaSlice<T> {
    fn push_to(self, args: &mut KernelArgs, stream: &CudaStream) -> Result<()> {
        let (address, _sync) = self.device_ptr(stream);
        args.push_value(&address)
    }
}

impl<T: Pooled> KernelArg for &DeviceBuffer<T> {
    fn push_to(self, args: &mut KernelArgs, stream: &CudaStream) -> Result<()> {
        (&**self).push_to(args, stream)
    }
}

impl<T: Pooled> KernelArg for &mut DeviceBuffer<T> {
    fn push_to(self, args: &mut KernelArgs, stream: &CudaStream) -> Result<()> {
        (&**self).push_to(args, stream)
    }
}

impl<T> KernelArg for &CudaView<'_, T> {
    fn push_to(self, args: &mut KernelArgs, stream: &CudaStream) -> Result<()> {
        let (address, _sync) = self.device_ptr(stream);
        args.push_value(&address)
    }
}

/// One kernel launch, complete: which kernel, its shape and its arguments.
#[derive(Clone, Copy)]
pub(crate) struct Launch {
    pub name: &'static str,
    pub cfg: LaunchConfig,
    pub args: KernelArgs,
}

impl Launch {
    /// Appends what identifies this launch (kernel, shape, argument bytes) to `key`.
    pub(crate) fn key_into(&self, key: &mut Vec<u8>) {
        key.extend_from_slice(self.name.as_bytes());
        key.push(0);
        let (grid, block) = (self.cfg.grid_dim, self.cfg.block_dim);
        for n in [grid.0, grid.1, grid.2, block.0, block.1, block.2, self.cfg.shared_mem_bytes] {
            key.extend_from_slice(&n.to_le_bytes());
        }
        key.extend_from_slice(&(self.args.used as u32).to_le_bytes());
        key.extend_from_slice(self.args.bytes());
    }

    /// Queues the launch of `function` (this launch's kernel) on `stream`: through
    /// `cuLaunchKernelEx` with the programmatic-serialization attribute when `dependent`, else
    /// `cuLaunchKernel`.
    pub(crate) fn submit(&self, function: sys::CUfunction, stream: &CudaStream, dependent: bool) -> Result<()> {
        let mut pointers = self.args.pointers();
        let (grid, block) = (self.cfg.grid_dim, self.cfg.block_dim);
        let result = if dependent {
            // SAFETY: an all-zero CUlaunchAttribute is a valid value (an id and a union of plain data).
            let mut attribute: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
            attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attribute.value.programmaticStreamSerializationAllowed = 1;
            let config = sys::CUlaunchConfig {
                gridDimX: grid.0,
                gridDimY: grid.1,
                gridDimZ: grid.2,
                blockDimX: block.0,
                blockDimY: block.1,
                blockDimZ: block.2,
                sharedMemBytes: self.cfg.shared_mem_bytes,
                hStream: stream.cu_stream(),
                attrs: &mut attribute,
                numAttrs: 1,
            };
            // SAFETY: `function` is a kernel of the loaded module; `pointers` point at its arguments,
            // pushed in the order and types of its CUDA signature (kernels/cuda/*.cu), alive in
            // `self.args` until the call returns (the driver copies them); the sizes passed describe
            // the buffers given. Every kernel follows lw_await_inputs' rule (common.cuh), which makes
            // the overlap with the previous kernel safe.
            unsafe { sys::cuLaunchKernelEx(&config, function, pointers.as_mut_ptr(), std::ptr::null_mut()) }
        } else {
            // SAFETY: as above, without the overlap.
            unsafe {
                sys::cuLaunchKernel(
                    function,
                    grid.0,
                    grid.1,
                    grid.2,
                    block.0,
                    block.1,
                    block.2,
                    self.cfg.shared_mem_bytes,
                    stream.cu_stream(),
                    pointers.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            }
        };
        result.result().map_err(|e| fail(format!("{}: {e:?}", self.name)))
    }
}
