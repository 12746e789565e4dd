//! Device buffers that go back to the backend when dropped, for the backend to reuse.
//!
//! Graph replay (graphs.rs) needs two things of memory: that freeing it is not a call on the
//! stream (launches may be held back, and a free queued before them would pull memory from under
//! them), and that a decoding step gets the same addresses as the step before it (a captured
//! graph replays the addresses it was captured with). So small buffers are kept, by exact length,
//! and handed out again lowest address first from a sorted list ([`Pool::canonicalize`] at each
//! step): the same sequence of requests from the same free set gets the same addresses. Reuse on
//! the one stream is safe: every kernel that used a buffer before it was dropped is queued before
//! any kernel of its next owner. A buffer the pool does not keep (too large, or the pool full) is
//! freed at once, or after the held-back launches are submitted when there are any.
//!
//! With graphs off the backend makes no pool, and buffers are allocated and freed as they come.

use std::any::Any;
use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr};

/// The largest buffer kept (16 MiB: a decoding step's tensors and logits; prefill's large
/// activations are freed) and the most bytes kept in all.
const LARGEST_KEPT: usize = 16 << 20;
const MOST_KEPT: usize = 256 << 20;

/// The element types of device buffers: the pool keeps buffers of f32 (tensors, scratch) and u32
/// (step layouts, counters); u16 and u64 buffers (weights, head addresses) are only ever freed.
pub(crate) trait Pooled: DeviceRepr + Sized + Send + Sync + 'static {
    fn lists(pool: &Pool) -> Option<&Mutex<FreeLists<Self>>>;
}

impl Pooled for f32 {
    fn lists(pool: &Pool) -> Option<&Mutex<FreeLists<f32>>> {
        Some(&pool.floats)
    }
}

impl Pooled for u32 {
    fn lists(pool: &Pool) -> Option<&Mutex<FreeLists<u32>>> {
        Some(&pool.words)
    }
}

impl Pooled for u16 {
    fn lists(_: &Pool) -> Option<&Mutex<FreeLists<u16>>> {
        None
    }
}

impl Pooled for u64 {
    fn lists(_: &Pool) -> Option<&Mutex<FreeLists<u64>>> {
        None
    }
}

/// Free buffers of one element type, by length.
pub(crate) struct FreeLists<T> {
    by_len: HashMap<usize, Vec<CudaSlice<T>>>,
}

impl<T> Default for FreeLists<T> {
    fn default() -> Self {
        FreeLists { by_len: HashMap::new() }
    }
}

/// The backend's kept buffers, and the buffers waiting for held-back launches to be submitted.
#[derive(Default)]
pub(crate) struct Pool {
    floats: Mutex<FreeLists<f32>>,
    words: Mutex<FreeLists<u32>>,
    kept_bytes: AtomicUsize,
    /// Launches held back (graphs.rs sets it): while non-zero, a buffer not kept waits in `deferred`.
    held_back: AtomicUsize,
    deferred: Mutex<Vec<Box<dyn Any + Send>>>,
}

impl Pool {
    /// A kept buffer of exactly `len` elements, lowest address first, if there is one.
    pub(crate) fn take<T: Pooled>(&self, len: usize) -> Option<CudaSlice<T>> {
        let slice = T::lists(self)?.lock().ok()?.by_len.get_mut(&len)?.pop()?;
        self.kept_bytes.fetch_sub(slice.num_bytes(), Ordering::Relaxed);
        Some(slice)
    }

    fn release<T: Pooled>(&self, slice: CudaSlice<T>) {
        let bytes = slice.num_bytes();
        if bytes <= LARGEST_KEPT && self.kept_bytes.load(Ordering::Relaxed) + bytes <= MOST_KEPT {
            if let Some(Ok(mut lists)) = T::lists(self).map(Mutex::lock) {
                lists.by_len.entry(slice.len()).or_default().push(slice);
                self.kept_bytes.fetch_add(bytes, Ordering::Relaxed);
                return;
            }
        }
        if self.held_back.load(Ordering::Acquire) > 0 {
            if let Ok(mut deferred) = self.deferred.lock() {
                deferred.push(Box::new(slice));
                return;
            }
        }
        drop(slice);
    }

    /// Sorts every free list so that the lowest address is handed out first (at the start of a step).
    pub(crate) fn canonicalize(&self, stream: &cudarc::driver::CudaStream) {
        fn sort<T>(lists: &Mutex<FreeLists<T>>, stream: &cudarc::driver::CudaStream) {
            if let Ok(mut lists) = lists.lock() {
                for list in lists.by_len.values_mut() {
                    list.sort_by_key(|s| std::cmp::Reverse(s.device_ptr(stream).0));
                }
            }
        }
        sort(&self.floats, stream);
        sort(&self.words, stream);
    }

    /// Records how many launches are held back (0 after a flush).
    pub(crate) fn set_held_back(&self, launches: usize) {
        self.held_back.store(launches, Ordering::Release);
    }

    /// Frees the buffers that waited for the held-back launches (call after submitting them).
    pub(crate) fn free_deferred(&self) {
        let deferred = self.deferred.lock().map(|mut d| std::mem::take(&mut *d)).unwrap_or_default();
        drop(deferred);
    }
}

/// Device memory the backend hands out: a `CudaSlice` that, when dropped, goes back to the pool it
/// came from (if any) instead of being freed on the stream.
pub(crate) struct DeviceBuffer<T: Pooled> {
    slice: ManuallyDrop<CudaSlice<T>>,
    pool: Option<Arc<Pool>>,
}

impl<T: Pooled> DeviceBuffer<T> {
    pub(crate) fn new(slice: CudaSlice<T>, pool: Option<Arc<Pool>>) -> Self {
        DeviceBuffer { slice: ManuallyDrop::new(slice), pool }
    }
}

impl<T: Pooled> Deref for DeviceBuffer<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

impl<T: Pooled> DerefMut for DeviceBuffer<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }
}

impl<T: Pooled> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        // SAFETY: `slice` is taken once, here, and not touched after.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        match &self.pool {
            Some(pool) => pool.release(slice),
            None => drop(slice),
        }
    }
}
