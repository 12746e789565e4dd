//! Launches held back in chunks, and a chunk seen before replayed from a CUDA graph.
//!
//! A decoding step is ~5 launches a block; on the device each launch pays a gap that a graph's
//! launches do not. The backend does not know where a step begins or ends, and the host must stay
//! free to run ahead, so it does not capture whole steps: it holds launches back, up to `chunk` of
//! them, and submits them when the chunk is full or before any other call on the stream (a copy,
//! a memset, a synchronisation: `Cuda::in_order`). At submission a chunk is compared, launch by
//! launch, with the chunks submitted before (kernel, grid, block, shared memory and every argument
//! byte, device addresses included):
//! - first sight: its launches are submitted one by one, and the chunk is remembered;
//! - second sight: it is captured into a graph (stream capture of the same launches), which is then
//!   launched, and kept;
//! - later sights: the kept graph is launched.
//!
//! A graph is launched only for launches equal, byte for byte, to those the host would have made,
//! so replay cannot change a result; what makes chunks repeat is the backend's memory (pool.rs:
//! the same addresses step after step) and its step layout (padded so that it keeps its place and
//! size while the block tables grow). If capture fails (a driver without graph support for these
//! launches), graphs are turned off for the backend's life with one line on stderr.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use cudarc::driver::{sys, CudaGraph, CudaStream};
use layerwise::Result;

use super::fail;
use super::launch::Launch;

/// Chunks shorter than this are submitted as they are: a graph saves nothing on one or two launches.
const SHORTEST_GRAPH: usize = 4;
/// Chunks remembered before the memory is cleared (graphs included): the chunks of a few hundred
/// distinct steps.
const MOST_REMEMBERED: usize = 512;

/// How many graphs were captured and launched (for the bench and the tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Chunks captured into a graph.
    pub captured: u64,
    /// Graph launches.
    pub replays: u64,
    /// Kernels run through graph launches.
    pub kernels_replayed: u64,
}

/// A captured chunk, launched on the backend's stream.
struct Replay(CudaGraph);

// SAFETY: a CudaGraph is not thread-safe: its calls must not run concurrently. A Replay lives only
// inside `Graphs`, which the backend keeps behind a Mutex, so every call on it is serialised.
unsafe impl Send for Replay {}

/// The held-back launches and the chunks seen so far.
pub(crate) struct Graphs {
    chunk: usize,
    held: Vec<Launch>,
    /// Every chunk seen, by its key (the launches' bytes): None after one sight, its graph after two.
    seen: HashMap<Vec<u8>, Option<Replay>, BuildHasherDefault<KeyHasher>>,
    /// Why graphs were turned off, once a capture failed.
    off: Option<String>,
    stats: GraphStats,
}

impl Graphs {
    /// Chunks of `chunk` launches (at least [`SHORTEST_GRAPH`]).
    pub(crate) fn new(chunk: usize) -> Self {
        Graphs {
            chunk: chunk.max(SHORTEST_GRAPH),
            held: Vec::new(),
            seen: HashMap::default(),
            off: None,
            stats: GraphStats::default(),
        }
    }

    pub(crate) fn stats(&self) -> GraphStats {
        self.stats
    }

    /// Holds `launch` back; true when the chunk is full (the caller then submits it), and always
    /// once graphs are off.
    pub(crate) fn hold(&mut self, launch: Launch) -> bool {
        self.held.push(launch);
        self.held.len() >= self.chunk || self.off.is_some()
    }

    /// Launches held back now.
    pub(crate) fn held(&self) -> usize {
        self.held.len()
    }

    /// Submits the held launches on `stream`: from a graph when this chunk was seen before, else
    /// one by one with `submit`.
    pub(crate) fn submit_held(
        &mut self,
        stream: &Arc<CudaStream>,
        submit: impl Fn(&Launch) -> Result<()>,
    ) -> Result<()> {
        let launches = std::mem::take(&mut self.held);
        if launches.len() < SHORTEST_GRAPH || self.off.is_some() {
            return launches.iter().try_for_each(submit);
        }
        let mut key = Vec::with_capacity(launches.len() * 128);
        for launch in &launches {
            launch.key_into(&mut key);
        }
        match self.seen.get_mut(&key) {
            Some(Some(replay)) => {
                let launched = replay_launch(replay);
                return self.replay(launched, launches.len());
            }
            Some(None) => match capture(stream, &launches, &submit) {
                Ok(replay) => {
                    self.stats.captured += 1;
                    let launched = replay_launch(&replay);
                    self.seen.insert(key, Some(replay));
                    return self.replay(launched, launches.len());
                }
                Err(reason) => {
                    eprintln!("layerwise: CUDA graphs off: {reason}");
                    self.off = Some(reason);
                    self.seen.clear();
                }
            },
            None => {
                if self.seen.len() >= MOST_REMEMBERED {
                    // A graph may still run: let it finish before its memory goes.
                    stream.synchronize().map_err(|e| fail(format!("synchronize: {e:?}")))?;
                    self.seen.clear();
                }
                self.seen.insert(key, None);
            }
        }
        launches.iter().try_for_each(submit)
    }

    fn replay(&mut self, launched: Result<()>, kernels: usize) -> Result<()> {
        launched?;
        self.stats.replays += 1;
        self.stats.kernels_replayed += kernels as u64;
        Ok(())
    }
}

/// A hash of a chunk's key eight bytes at a time (rotate, xor, multiply): keys are kilobytes of
/// arguments hashed a few times a step, where std's SipHash would cost microseconds; the map
/// compares the whole key on a match, so a collision costs a comparison, never a wrong graph.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            self.mix(u64::from_le_bytes([word[0], word[1], word[2], word[3], word[4], word[5], word[6], word[7]]));
        }
        for &byte in words.remainder() {
            self.mix(u64::from(byte));
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl KeyHasher {
    fn mix(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

fn replay_launch(replay: &Replay) -> Result<()> {
    replay.0.launch().map_err(|e| fail(format!("graph launch: {e:?}")))
}

/// `launches` captured from `stream` into an executable graph (nothing runs yet).
fn capture(
    stream: &Arc<CudaStream>,
    launches: &[Launch],
    submit: &impl Fn(&Launch) -> Result<()>,
) -> std::result::Result<Replay, String> {
    let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
    stream.begin_capture(mode).map_err(|e| format!("cannot begin a stream capture: {e:?}"))?;
    let recorded = launches.iter().try_for_each(submit);
    // The capture is ended whatever happened, so that the stream leaves capture mode.
    let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    recorded.map_err(|e| format!("a launch during capture failed: {e}"))?;
    match ended {
        Ok(Some(graph)) => Ok(Replay(graph)),
        Ok(None) => Err("the capture made no graph".into()),
        Err(e) => Err(format!("cannot capture or instantiate a graph: {e:?}")),
    }
}
