//! The op interface every model is written against, and its CPU implementation.
//!
//! A model file only wires ops together; where tensors live and how the ops run is the backend's
//! business. Activations are `[rows, cols]` f32 matrices of the backend's own type (on a GPU they stay
//! in device memory between ops: nothing in this interface implies a round trip to the host, except
//! [`Backend::to_host`], which callers use only for what they return to the user).

pub mod cpu;
pub mod simd;

use crate::config::Activation;
use crate::error::Result;
use crate::weights::HostTensor;

pub use cpu::Cpu;

/// How a 2-D weight is laid out in the checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `[out, in]`: torch `nn.Linear`, embeddings, LM heads.
    OutIn,
    /// `[in, out]`: GPT-2's `Conv1D`.
    InOut,
}

/// Parameters of one causal self-attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionParams {
    pub num_heads: usize,
    /// Key/value heads; query head `h` reads kv head `h / (num_heads / num_kv_heads)`.
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies q·k before the softmax (1/sqrt(head_dim) for most models, 1 for GPT-Neo).
    pub scale: f32,
    /// Keys visible to a query: at most this many positions back, itself included (None: all).
    pub window: Option<usize>,
}

/// One sequence's part of a batched attention call.
#[derive(Clone, Copy, Debug)]
pub struct SeqSlice<'a> {
    /// Its query rows in the batch: `first_row .. first_row + len`.
    pub first_row: usize,
    pub len: usize,
    /// Position of its first query row; query row `i` sees keys at positions `..= first_position + i`.
    pub first_position: usize,
    /// Its cache blocks, in position order.
    pub block_table: &'a [u32],
}

/// The ops a forward pass is made of. Shapes are given as `x: [rows, cols]`; `w: [out, in]` means
/// the weight maps `in` features to `out` features whatever its stored [`Layout`].
pub trait Backend: Send + Sync + 'static {
    /// An activation matrix `[rows, cols]`, f32.
    type Tensor: Send + Sync + Clone;
    /// A weight (matrix or vector) resident where the ops run.
    type Weight: Send + Sync;

    /// Short name for messages ("cpu", "cuda").
    fn name(&self) -> &'static str;

    /// Runs `work` (a whole decoding step) where this backend's ops run best. The CPU runs it on a
    /// thread of its pool, with the pool's other threads kept awake for the step: a step makes
    /// about a hundred short parallel calls, and each one made from a thread outside the pool
    /// would hand its work over and wait (1.4 ms per step measured on a 24-layer model with tiny
    /// matrices), as would each one that has to wake a sleeping worker.
    fn run<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        work()
    }

    /// Bytes a full read of `w` touches (for bandwidth accounting).
    fn weight_bytes(&self, w: &Self::Weight) -> usize;

    /// Makes a checkpoint tensor usable by the ops. On the CPU this borrows the mapped bytes.
    fn weight(&self, tensor: &HostTensor, layout: Layout) -> Result<Self::Weight>;

    /// `table: [vocab, d]`, `ids: [t]` -> `[t, d]`. Ids are already checked against the vocabulary.
    fn embed(&self, table: &Self::Weight, ids: &[u32]) -> Self::Tensor;

    /// `x += y`, both `[t, d]`.
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor);

    /// `x *= y` elementwise, both `[t, d]`.
    fn mul_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor);

    /// LayerNorm over the last dimension: `x: [t, d]`, `weight, bias: [d]`.
    fn layer_norm(&self, x: &Self::Tensor, weight: &Self::Weight, bias: &Self::Weight, eps: f32) -> Self::Tensor;

    /// RMSNorm over the last dimension (Llama): `x: [t, d]`, `weight: [d]`.
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Weight, eps: f32) -> Self::Tensor;

    /// `x: [t, in]`, `w: [out, in]`, `bias: [out]` -> `[t, out]`.
    fn linear(&self, x: &Self::Tensor, w: &Self::Weight, bias: Option<&Self::Weight>) -> Self::Tensor;

    /// Applies `act` elementwise in place.
    fn activate(&self, x: &mut Self::Tensor, act: Activation);

    /// Rotary position embedding (rotate-half convention) on `x: [t, heads * head_dim]`, token `i` at
    /// position `positions[i]`.
    fn rope(&self, x: &mut Self::Tensor, head_dim: usize, positions: &[usize], theta: f32);

    /// Splits `x: [t, a + b + ...]` into column blocks of the given widths.
    fn split_columns(&self, x: &Self::Tensor, widths: &[usize]) -> Vec<Self::Tensor>;

    /// Key/value storage of the paged cache ([`crate::kv`]): for each cached layer, one row of keys
    /// and one row of values (`kv_heads * head_dim` wide) per slot.
    type KvStore: Send + Sync;

    /// Storage for `layers` layers of `num_blocks * block_size` slots of width `kv_width`.
    fn kv_store(&self, layers: usize, num_blocks: usize, block_size: usize, kv_width: usize) -> Result<Self::KvStore>;

    /// Writes row `i` of `k` and `v` (`[t, kv_width]`, or narrower for a block with pruned heads:
    /// the start of the slot) into slot `slots[i]` of `layer`.
    fn kv_write(&self, store: &mut Self::KvStore, layer: usize, slots: &[usize], k: &Self::Tensor, v: &Self::Tensor);

    /// Copies block `from` to block `to` in every layer (copy-on-write of a shared block).
    fn kv_copy_block(&self, store: &mut Self::KvStore, from: u32, to: u32);

    /// Causal self-attention of each sequence's new query rows over its cached keys and values:
    /// `q: [t, heads * head_dim]` (all sequences' rows, in order) -> `[t, heads * head_dim]`.
    /// The new tokens' keys and values must already be written.
    fn paged_attention(
        &self,
        q: &Self::Tensor,
        store: &Self::KvStore,
        layer: usize,
        sequences: &[SeqSlice<'_>],
        params: &AttentionParams,
    ) -> Self::Tensor;

    /// The attention probabilities of one sequence's new query rows (the same scores and mask as
    /// [`Backend::paged_attention`]), on the host: `[heads, seq.len, seq.first_position + seq.len]`,
    /// zero outside the causal (and local) window. For inspection, not for decoding.
    fn attention_probs(
        &self,
        q: &Self::Tensor,
        store: &Self::KvStore,
        layer: usize,
        seq: &SeqSlice<'_>,
        params: &AttentionParams,
    ) -> Vec<f32>;

    /// Multiplies head `h`'s columns `h * head_dim .. (h + 1) * head_dim` of every row of `x` by `scales[h]`.
    fn scale_heads(&self, x: &mut Self::Tensor, scales: &[f32], head_dim: usize);

    /// Rows `rows` of `x`, in that order: `[rows.len(), cols]`.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Self::Tensor;

    /// Auto-contrastive decoding on each row (see [`crate::exits::acd_with`]): `upper: [t, vocab]`
    /// logits against the lower exit, whose logits are `lower_features: [t, hidden]` times
    /// `lower_head: [vocab, hidden]`, -> `[t, vocab]` log-probabilities. Only the lower head's rows of
    /// each row's plausible tokens need to be read.
    fn contrast_acd(
        &self,
        upper: &Self::Tensor,
        lower_features: &Self::Tensor,
        lower_head: &Self::Weight,
        alpha: f32,
        min_candidates: usize,
    ) -> Self::Tensor;

    /// A tensor from host data, row-major `[rows, cols]`.
    fn upload(&self, data: Vec<f32>, rows: usize, cols: usize) -> Self::Tensor;

    /// `[rows, cols]` of a tensor.
    fn shape(&self, x: &Self::Tensor) -> (usize, usize);

    /// Copies a tensor back to host memory, row-major.
    fn to_host(&self, x: &Self::Tensor) -> Vec<f32>;
}
