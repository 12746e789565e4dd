//! The backend boundary: the ops every model is written against, and where they run.
//!
//! A model file only wires ops together; where tensors live and how the ops run is the backend's
//! business. Activations are `[rows, cols]` f32 matrices of the backend's own type: on a GPU they stay
//! in device memory between ops and ops may run asynchronously on a stream. Nothing in this interface
//! implies a round trip to the host:
//! - a step's host-side facts (token ids, positions, cache slots, block tables, the rows whose outputs
//!   are returned, blocks to copy) are built once into a [`StepLayout`] and handed over once
//!   ([`Backend::upload_step`]);
//! - weights are made resident once ([`Backend::weight`]);
//! - only what a caller asks for comes back ([`Backend::to_host`], [`Backend::argmax_rows`]).
//!
//! Every op returns a [`Result`]: a device error is an error, not a panic.
//!
//! Owns: the trait, the step layout, the [`reference`] backend (plain Rust, the definition of every
//! op), the [`conformance`] suite every backend is held to, the optimised [`cpu`] backend, and the
//! 8-bit weight format ([`q8`]) with its on-disk cache ([`q8_cache`]).
//! Imports: `io` (checkpoint tensors), `math` (shared host numerics), `model::config` (activations).

pub mod conformance;
pub mod cpu;
pub mod q8;
pub mod q8_cache;
pub mod reference;

use crate::error::{Error, Result};
use crate::io::weights::{DType, HostTensor};
use crate::model::config::Activation;

pub use cpu::Cpu;
pub use reference::Reference;

/// What a backend computes weight matrices in (`--dtype`): a float dtype, converted on first use
/// when the checkpoint stores another, or 8-bit blocks ([`q8`], quantised on first use). Vectors
/// (norm weights, biases) are always read as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    Float(DType),
    Q8,
}

impl WeightFormat {
    /// Parses a dtype ([`DType::parse`]) or `q8` (also `q8_0`).
    pub fn parse(text: &str) -> Option<WeightFormat> {
        match text {
            "q8" | "q8_0" => Some(WeightFormat::Q8),
            _ => DType::parse(text).map(WeightFormat::Float),
        }
    }

    /// The float dtype, if this is one.
    pub fn dtype(self) -> Option<DType> {
        match self {
            WeightFormat::Float(dtype) => Some(dtype),
            WeightFormat::Q8 => None,
        }
    }
}

impl From<DType> for WeightFormat {
    fn from(dtype: DType) -> Self {
        WeightFormat::Float(dtype)
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WeightFormat::Float(dtype) => dtype.fmt(f),
            WeightFormat::Q8 => f.write_str("q8"),
        }
    }
}

/// Deterministic values in [-1, 1) for the kernels' tests (weights and inputs of any length).
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f32> {
    (0..n as u64).map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed) >> 5) % 1000) as f32 / 500.0 - 1.0).collect()
}

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
    /// Causal attention only.
    pub window: Option<usize>,
    /// Whether a query sees only its own and earlier positions (decoders) or every position of its
    /// sequence, later ones of the same step included (encoders such as BERT).
    pub causal: bool,
}

impl AttentionParams {
    /// The key positions the query at position `pos` sees in a sequence whose context (cached and
    /// new positions) is `context` long: `..= pos` within the window when causal, all otherwise.
    pub fn visible(&self, pos: usize, context: usize) -> std::ops::Range<usize> {
        if !self.causal {
            return 0..context;
        }
        let first = self.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        first..pos + 1
    }

    /// The widths of the query block and of the key (and value) block of a fused q|k|v projection.
    pub fn qkv_widths(&self) -> (usize, usize) {
        (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim)
    }
}

/// One sequence's part of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqLayout {
    /// Its rows in the step: `first_row .. first_row + len`.
    pub first_row: usize,
    pub len: usize,
    /// Position of its first row; row `i` sees keys at positions `..= first_position + i`.
    pub first_position: usize,
    /// Its cache blocks, in position order: `StepLayout::block_tables[table_start .. table_start + table_len]`.
    pub table_start: usize,
    pub table_len: usize,
}

/// Everything a step needs from the host, built once per step: the tokens of every running sequence
/// (rows of the step, sequence after sequence) and where their keys and values live in the paged cache.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepLayout {
    /// `[t]`: the token of each row.
    pub ids: Vec<u32>,
    /// `[t]`: the position of each row in its sequence.
    pub positions: Vec<u32>,
    /// `[t]`: the cache slot (`block * block_size + offset`) each row's keys and values go to.
    pub slots: Vec<u32>,
    /// The sequences, in row order.
    pub sequences: Vec<SeqLayout>,
    /// Every sequence's block table, concatenated.
    pub block_tables: Vec<u32>,
    /// Slots per cache block.
    pub block_size: usize,
    /// Rows whose outputs the step returns (usually each sequence's last row), in order.
    pub output_rows: Vec<u32>,
    /// Cache blocks to copy before the step writes (`from`, `to`): copy-on-write of shared blocks.
    pub block_copies: Vec<(u32, u32)>,
}

impl StepLayout {
    /// One sequence of `t` tokens at positions `0..t` over one scratch block of `t` slots, every
    /// row an output: a prompt run as a whole.
    pub fn prompt(ids: &[u32]) -> Self {
        let t = ids.len();
        StepLayout {
            ids: ids.to_vec(),
            positions: (0..t as u32).collect(),
            slots: (0..t as u32).collect(),
            sequences: vec![SeqLayout { first_row: 0, len: t, first_position: 0, table_start: 0, table_len: 1 }],
            block_tables: vec![0],
            block_size: t.max(1),
            output_rows: (0..t as u32).collect(),
            block_copies: Vec::new(),
        }
    }

    /// Several sequences, each whole at positions `0..len` in its own scratch block (block `s` for
    /// sequence `s`, as long as the longest), every sequence's first row an output: an encoder's
    /// batch, whose pooler reads the first token.
    pub fn whole_sequences<'a>(sequences: impl IntoIterator<Item = &'a [u32]>) -> Self {
        let sequences: Vec<&[u32]> = sequences.into_iter().collect();
        let block_size = sequences.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let mut layout = StepLayout { block_size, ..Default::default() };
        for (s, ids) in sequences.iter().enumerate() {
            let first_row = layout.ids.len();
            layout.sequences.push(SeqLayout {
                first_row,
                len: ids.len(),
                first_position: 0,
                table_start: s,
                table_len: 1,
            });
            layout.block_tables.push(s as u32);
            layout.output_rows.push(first_row as u32);
            layout.ids.extend_from_slice(ids);
            layout.positions.extend(0..ids.len() as u32);
            layout.slots.extend((0..ids.len()).map(|i| (s * block_size + i) as u32));
        }
        layout
    }

    /// Rows of the step.
    pub fn rows(&self) -> usize {
        self.ids.len()
    }

    /// The block table of sequence `s`.
    pub fn table(&self, s: usize) -> &[u32] {
        let seq = &self.sequences[s];
        &self.block_tables[seq.table_start..seq.table_start + seq.table_len]
    }

    /// The cache slot of position `pos` of sequence `s`.
    pub fn slot_of(&self, s: usize, pos: usize) -> usize {
        self.table(s)[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }
}

/// Which embedding table rows a step looks up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The step's token ids.
    Tokens,
    /// The step's positions (learned position embeddings).
    Positions,
}

/// The ops a forward pass is made of. Shapes are given as `x: [rows, cols]`; `w: [out, in]` means
/// the weight maps `in` features to `out` features whatever its stored [`Layout`]. The
/// [`reference`] backend defines what each op computes; [`conformance`] checks a backend against it.
pub trait Backend: Send + Sync + 'static {
    /// An activation matrix `[rows, cols]`, f32.
    type Tensor: Send + Sync;
    /// A weight (matrix or vector) resident where the ops run.
    type Weight: Send + Sync;
    /// Key/value storage of the paged cache: for each cached layer, one row of keys and one row of
    /// values (`kv_heads * head_dim` wide) per slot.
    type KvStore: Send + Sync;
    /// A [`StepLayout`] where the ops run.
    type Step: Send + Sync;

    /// Short name for messages ("cpu", "reference", "cuda").
    fn name(&self) -> &'static str;

    /// Whether [`Backend::paged_attention`] and [`Backend::attention_probs`] take
    /// `AttentionParams { causal: false }` (an encoder's attention, every position seeing its whole
    /// sequence). Default: yes.
    fn bidirectional_attention(&self) -> bool {
        true
    }

    /// Memory the backend's tensors and cache live in, in bytes, where known (sizes are checked
    /// against it before allocating). Default: the host's physical memory.
    fn memory_bytes(&self) -> Option<u64> {
        host_memory_bytes()
    }

    /// Kernel launches so far, for a backend that launches kernels (reported per step by `bench`).
    fn launches(&self) -> Option<u64> {
        None
    }

    /// Graph launches so far, for a backend that replays launches from captured graphs (the
    /// kernels they run count in [`Backend::launches`] too).
    fn graph_launches(&self) -> Option<u64> {
        None
    }

    /// Runs `work` (a whole decoding step) where this backend's ops run best.
    fn run<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        work()
    }

    // --- weights and transfers -------------------------------------------------------------

    /// Makes a checkpoint tensor usable by the ops (a vector `[n]` or a matrix in `layout`).
    fn weight(&self, tensor: &HostTensor, layout: Layout) -> Result<Self::Weight>;

    /// Bytes a full read of `w` touches (for bandwidth accounting).
    fn weight_bytes(&self, w: &Self::Weight) -> usize;

    /// A tensor from host data, row-major `[rows, cols]`.
    fn upload(&self, data: Vec<f32>, rows: usize, cols: usize) -> Result<Self::Tensor>;

    /// The step's layout, handed over once.
    fn upload_step(&self, layout: StepLayout) -> Result<Self::Step>;

    /// Copies a tensor back to host memory, row-major.
    fn to_host(&self, x: &Self::Tensor) -> Result<Vec<f32>>;

    /// `[rows, cols]` of a tensor.
    fn shape(&self, x: &Self::Tensor) -> (usize, usize);

    // --- tensors -----------------------------------------------------------------------------

    /// A copy of `x`.
    fn copy(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// Splits `x: [t, a + b + ...]` into column blocks of the given widths.
    fn split_columns(&self, x: &Self::Tensor, widths: &[usize]) -> Result<Vec<Self::Tensor>>;

    /// The step's output rows of `x: [step rows, d]` -> `[output rows, d]`.
    fn gather_output_rows(&self, x: &Self::Tensor, step: &Self::Step) -> Result<Self::Tensor>;

    /// `parts` stacked: `[Σ rows, d]`; every part has `d` columns.
    fn concat_rows(&self, parts: &[&Self::Tensor]) -> Result<Self::Tensor>;

    // --- the forward pass ----------------------------------------------------------------------

    /// `table: [vocab or positions, d]` -> `[t, d]`: row `ids[i]` (or `positions[i]`) for each row.
    fn embed(&self, table: &Self::Weight, step: &Self::Step, lookup: Lookup) -> Result<Self::Tensor>;

    /// `x += y`, both `[t, d]`.
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;

    /// `x *= y` elementwise, both `[t, d]`.
    fn mul_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;

    /// LayerNorm over the last dimension (biased variance): `x: [t, d]`, `weight, bias: [d]`.
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        weight: &Self::Weight,
        bias: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Tensor>;

    /// RMSNorm over the last dimension (Llama): `x: [t, d]`, `weight: [d]`.
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Weight, eps: f32) -> Result<Self::Tensor>;

    /// `x: [t, in]`, `w: [out, in]`, `bias: [out]` -> `[t, out]`.
    fn linear(&self, x: &Self::Tensor, w: &Self::Weight, bias: Option<&Self::Weight>) -> Result<Self::Tensor>;

    /// `act(linear(x, w, bias))`: an MLP's up-projection and its activation. The default runs the two
    /// ops; a backend may apply the activation as the product stores each output (CUDA: one launch).
    fn linear_act(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
        act: Activation,
    ) -> Result<Self::Tensor> {
        let mut y = self.linear(x, w, bias)?;
        self.activate(&mut y, act)?;
        Ok(y)
    }

    /// `x += linear(input, w, bias)`: a residual branch's last product added to the stream. The
    /// default runs the two ops; a backend may add each output as the product stores it (CUDA: one
    /// launch, the branch's output never written out).
    fn linear_add_assign(
        &self,
        x: &mut Self::Tensor,
        input: &Self::Tensor,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
    ) -> Result<()> {
        let y = self.linear(input, w, bias)?;
        self.add_assign(x, &y)
    }

    /// `act(linear(norm(x), w, bias))` (no activation when `act` is None): a norm and the product
    /// that reads it, as every exit's logits are made (the final norm and a vocabulary head) and as
    /// a block's sub-layers start (its norm and the first product). The default runs the ops one by
    /// one; a backend may fuse them (CUDA: one launch for up to 8 rows, the normed rows never written
    /// out).
    fn norm_linear(
        &self,
        x: &Self::Tensor,
        norm: NormParams<'_, Self::Weight>,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
        act: Option<Activation>,
    ) -> Result<Self::Tensor> {
        norm_then_linear(self, x, norm, w, bias, act)
    }

    /// Applies `act` elementwise in place.
    fn activate(&self, x: &mut Self::Tensor, act: Activation) -> Result<()>;

    /// Rotary position embedding (rotate-half convention) on `x: [t, heads * head_dim]`, row `i` at
    /// the step's position `i`, `inv_freq = 1 / theta^(2j / head_dim)` in f32 as transformers has it.
    fn rope(&self, x: &mut Self::Tensor, head_dim: usize, step: &Self::Step, theta: f32) -> Result<()>;

    /// Multiplies head `h`'s columns `h * head_dim .. (h + 1) * head_dim` of every row by `scales[h]`
    /// (`scales: [heads]`, a vector weight).
    fn scale_heads(&self, x: &mut Self::Tensor, scales: &Self::Weight, head_dim: usize) -> Result<()>;

    // --- the paged cache ---------------------------------------------------------------------------

    /// Storage for `layers` layers of `num_blocks * block_size` slots of width `kv_width`.
    fn kv_store(&self, layers: usize, num_blocks: usize, block_size: usize, kv_width: usize) -> Result<Self::KvStore>;

    /// Copies the step's `block_copies` in every layer (copy-on-write of shared blocks).
    fn kv_copy_blocks(&self, store: &mut Self::KvStore, step: &Self::Step) -> Result<()>;

    /// Writes row `i` of `k` and `v` (`[t, kv_width]`, or narrower for a block with pruned heads:
    /// the start of the slot) into the step's slot `i` of `layer`.
    fn kv_write(
        &self,
        store: &mut Self::KvStore,
        layer: usize,
        step: &Self::Step,
        k: &Self::Tensor,
        v: &Self::Tensor,
    ) -> Result<()>;

    /// Causal self-attention of each sequence's rows over its cached keys and values:
    /// `q: [t, heads * head_dim]` -> `[t, heads * head_dim]`. The step's keys and values must
    /// already be written.
    fn paged_attention(
        &self,
        q: &Self::Tensor,
        store: &Self::KvStore,
        layer: usize,
        step: &Self::Step,
        params: &AttentionParams,
    ) -> Result<Self::Tensor>;

    /// [`Backend::kv_write`] then [`Backend::paged_attention`] on a fused projection: `qkv: [t,
    /// (heads + 2 * kv_heads) * head_dim]`, its column blocks the queries, the keys and the values
    /// (GPT-2's `c_attn`) -> `[t, heads * head_dim]`. The default splits the columns first; a
    /// backend that can read the three blocks in place saves the copies (and on a GPU, launches).
    fn paged_attention_qkv(
        &self,
        qkv: &Self::Tensor,
        store: &mut Self::KvStore,
        layer: usize,
        step: &Self::Step,
        params: &AttentionParams,
    ) -> Result<Self::Tensor> {
        let (q_width, kv_width) = params.qkv_widths();
        let [q, k, v]: [Self::Tensor; 3] = self
            .split_columns(qkv, &[q_width, kv_width, kv_width])?
            .try_into()
            .map_err(|_| Error::Backend { backend: self.name().into(), reason: "split_columns: not 3 parts".into() })?;
        self.kv_write(store, layer, step, &k, &v)?;
        self.paged_attention(&q, store, layer, step, params)
    }

    /// The attention probabilities of sequence `seq`'s rows (the same scores and mask as
    /// [`Backend::paged_attention`]): `[heads * len, first_position + len]`, head-major, zero outside
    /// the causal (and local) window. For inspection, not for decoding.
    fn attention_probs(
        &self,
        q: &Self::Tensor,
        store: &Self::KvStore,
        layer: usize,
        step: &Self::Step,
        seq: usize,
        params: &AttentionParams,
    ) -> Result<Self::Tensor>;

    // --- what a step outputs ---------------------------------------------------------------------

    /// Auto-contrastive decoding of each row ([`crate::math::acd`]): `upper: [t, vocab]` logits
    /// against the lower exit, whose logits are `lower_features: [t, hidden]` times
    /// `lower_head: [vocab, hidden]`, -> `[t, vocab]` log-probabilities. Only the lower head's rows
    /// of each row's plausible tokens need to be read.
    fn contrast_acd(
        &self,
        upper: &Self::Tensor,
        lower_features: &Self::Tensor,
        lower_head: &Self::Weight,
        alpha: f32,
        min_candidates: usize,
    ) -> Result<Self::Tensor>;

    /// The first index of the largest value of each row of `x: [t, n]`, on the host (torch.argmax's
    /// choice among ties). The step's finite check rides on this reduction: a row holding NaN or
    /// +inf, or nothing above -inf ([`crate::math::scores_fault`]), is an
    /// [`Error::NonFinite`](crate::Error::NonFinite) naming the first such row.
    fn argmax_rows(&self, x: &Self::Tensor) -> Result<Vec<u32>>;
}

/// A norm as [`Backend::norm_linear`] takes it: LayerNorm when `bias` is there, else RMSNorm.
#[derive(Debug)]
pub struct NormParams<'a, W> {
    pub weight: &'a W,
    pub bias: Option<&'a W>,
    pub eps: f32,
}

// References only: copyable whatever the weight type (a derive would ask `W: Copy`).
impl<W> Clone for NormParams<'_, W> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<W> Copy for NormParams<'_, W> {}

/// [`Backend::norm_linear`] as separate ops: the norm, then the product (and its activation) (the
/// default, and a fusing backend's fallback for shapes its fused kernel does not take).
pub fn norm_then_linear<B: Backend + ?Sized>(
    b: &B,
    x: &B::Tensor,
    norm: NormParams<'_, B::Weight>,
    w: &B::Weight,
    bias: Option<&B::Weight>,
    act: Option<Activation>,
) -> Result<B::Tensor> {
    let normed = match norm.bias {
        Some(norm_bias) => b.layer_norm(x, norm.weight, norm_bias, norm.eps)?,
        None => b.rms_norm(x, norm.weight, norm.eps)?,
    };
    match act {
        Some(act) => b.linear_act(&normed, w, bias, act),
        None => b.linear(&normed, w, bias),
    }
}

/// The host's physical memory (`MemTotal` of /proc/meminfo), where the system says.
pub fn host_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 =
        info.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// A row-major `[rows, cols]` f32 matrix in host memory: the tensor of the CPU and reference backends.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl Matrix {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Matrix { data: vec![0.0; rows * cols], rows, cols }
    }

    /// `data` seen as `[rows, cols]`; an error if the sizes disagree.
    pub fn new(data: Vec<f32>, rows: usize, cols: usize) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(crate::error::Error::invalid(
                "tensor",
                format!("{} values do not make a [{rows}, {cols}] matrix", data.len()),
            ));
        }
        Ok(Matrix { data, rows, cols })
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    pub(crate) fn rows_mut(&mut self) -> std::slice::ChunksExactMut<'_, f32> {
        self.data.chunks_exact_mut(self.cols.max(1))
    }
}

/// `(out, in)` of a checkpoint tensor used as a weight in `layout`: a vector `[n]` is `(n, 1)`; an
/// error for any other rank.
pub fn logical_shape(tensor: &HostTensor, layout: Layout) -> Result<(usize, usize)> {
    match (tensor.shape(), layout) {
        ([n], _) => Ok((*n, 1)),
        ([out, inp], Layout::OutIn) => Ok((*out, *inp)),
        ([inp, out], Layout::InOut) => Ok((*out, *inp)),
        (shape, _) => {
            Err(crate::error::Error::invalid("weight", format!("expected a vector or a matrix, got shape {shape:?}")))
        }
    }
}

/// Elements of one of a cache's two stores (keys or values), refused when it cannot be addressed.
pub(crate) fn kv_elements(layers: usize, slots: usize, width: usize) -> Result<usize> {
    layers
        .checked_mul(slots)
        .and_then(|n| n.checked_mul(width))
        .filter(|&n| n < isize::MAX as usize / 8)
        .ok_or_else(|| crate::error::Error::invalid("KV cache", "requested size overflows memory"))
}
