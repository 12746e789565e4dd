//! A backend that counts what crosses between the host and the backend it wraps: tensors uploaded,
//! tensors brought back, step layouts handed over, argmax ids brought back. Used to prove that no
//! step moves activations to the host and back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use layerwise::backend::{AttentionParams, Backend, Layout, Lookup, StepLayout};
use layerwise::model::config::Activation;
use layerwise::{HostTensor, Result};

/// What crossed so far.
#[derive(Debug, Default)]
pub struct Transfers {
    /// `upload` calls: host data made into a tensor.
    pub uploads: AtomicUsize,
    /// `to_host` calls: a tensor brought back.
    pub downloads: AtomicUsize,
    /// `upload_step` calls.
    pub steps: AtomicUsize,
    /// `argmax_rows` calls (only ids come back).
    pub argmaxes: AtomicUsize,
    /// Set once a download happened within the current step: an upload after it is a round trip.
    pub round_trips: AtomicUsize,
    downloaded_this_step: AtomicUsize,
}

impl Transfers {
    pub fn get(&self) -> (usize, usize, usize, usize, usize) {
        (
            self.uploads.load(Ordering::SeqCst),
            self.downloads.load(Ordering::SeqCst),
            self.steps.load(Ordering::SeqCst),
            self.argmaxes.load(Ordering::SeqCst),
            self.round_trips.load(Ordering::SeqCst),
        )
    }
}

/// `B`, counting its host transfers.
pub struct Counting<B> {
    pub inner: B,
    pub transfers: Arc<Transfers>,
}

impl<B: Backend> Counting<B> {
    pub fn new(inner: B) -> (Self, Arc<Transfers>) {
        let transfers = Arc::new(Transfers::default());
        (Counting { inner, transfers: transfers.clone() }, transfers)
    }
}

impl<B: Backend> Backend for Counting<B> {
    type Tensor = B::Tensor;
    type Weight = B::Weight;
    type KvStore = B::KvStore;
    type Step = B::Step;

    fn name(&self) -> &'static str {
        "counting"
    }

    fn run<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        self.inner.run(work)
    }

    fn weight(&self, tensor: &HostTensor, layout: Layout) -> Result<B::Weight> {
        self.inner.weight(tensor, layout)
    }

    fn weight_bytes(&self, w: &B::Weight) -> usize {
        self.inner.weight_bytes(w)
    }

    fn upload(&self, data: Vec<f32>, rows: usize, cols: usize) -> Result<B::Tensor> {
        self.transfers.uploads.fetch_add(1, Ordering::SeqCst);
        if self.transfers.downloaded_this_step.load(Ordering::SeqCst) > 0 {
            self.transfers.round_trips.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.upload(data, rows, cols)
    }

    fn upload_step(&self, layout: StepLayout) -> Result<B::Step> {
        self.transfers.steps.fetch_add(1, Ordering::SeqCst);
        self.transfers.downloaded_this_step.store(0, Ordering::SeqCst);
        self.inner.upload_step(layout)
    }

    fn to_host(&self, x: &B::Tensor) -> Result<Vec<f32>> {
        self.transfers.downloads.fetch_add(1, Ordering::SeqCst);
        self.transfers.downloaded_this_step.fetch_add(1, Ordering::SeqCst);
        self.inner.to_host(x)
    }

    fn shape(&self, x: &B::Tensor) -> (usize, usize) {
        self.inner.shape(x)
    }

    fn copy(&self, x: &B::Tensor) -> Result<B::Tensor> {
        self.inner.copy(x)
    }

    fn split_columns(&self, x: &B::Tensor, widths: &[usize]) -> Result<Vec<B::Tensor>> {
        self.inner.split_columns(x, widths)
    }

    fn gather_output_rows(&self, x: &B::Tensor, step: &B::Step) -> Result<B::Tensor> {
        self.inner.gather_output_rows(x, step)
    }

    fn concat_rows(&self, parts: &[&B::Tensor]) -> Result<B::Tensor> {
        self.inner.concat_rows(parts)
    }

    fn embed(&self, table: &B::Weight, step: &B::Step, lookup: Lookup) -> Result<B::Tensor> {
        self.inner.embed(table, step, lookup)
    }

    fn add_assign(&self, x: &mut B::Tensor, y: &B::Tensor) -> Result<()> {
        self.inner.add_assign(x, y)
    }

    fn mul_assign(&self, x: &mut B::Tensor, y: &B::Tensor) -> Result<()> {
        self.inner.mul_assign(x, y)
    }

    fn layer_norm(&self, x: &B::Tensor, weight: &B::Weight, bias: &B::Weight, eps: f32) -> Result<B::Tensor> {
        self.inner.layer_norm(x, weight, bias, eps)
    }

    fn rms_norm(&self, x: &B::Tensor, weight: &B::Weight, eps: f32) -> Result<B::Tensor> {
        self.inner.rms_norm(x, weight, eps)
    }

    fn linear(&self, x: &B::Tensor, w: &B::Weight, bias: Option<&B::Weight>) -> Result<B::Tensor> {
        self.inner.linear(x, w, bias)
    }

    fn activate(&self, x: &mut B::Tensor, act: Activation) -> Result<()> {
        self.inner.activate(x, act)
    }

    fn rope(&self, x: &mut B::Tensor, head_dim: usize, step: &B::Step, theta: f32) -> Result<()> {
        self.inner.rope(x, head_dim, step, theta)
    }

    fn scale_heads(&self, x: &mut B::Tensor, scales: &B::Weight, head_dim: usize) -> Result<()> {
        self.inner.scale_heads(x, scales, head_dim)
    }

    fn kv_store(&self, layers: usize, num_blocks: usize, block_size: usize, kv_width: usize) -> Result<B::KvStore> {
        self.inner.kv_store(layers, num_blocks, block_size, kv_width)
    }

    fn kv_copy_blocks(&self, store: &mut B::KvStore, step: &B::Step) -> Result<()> {
        self.inner.kv_copy_blocks(store, step)
    }

    fn kv_write(
        &self,
        store: &mut B::KvStore,
        layer: usize,
        step: &B::Step,
        k: &B::Tensor,
        v: &B::Tensor,
    ) -> Result<()> {
        self.inner.kv_write(store, layer, step, k, v)
    }

    fn paged_attention(
        &self,
        q: &B::Tensor,
        store: &B::KvStore,
        layer: usize,
        step: &B::Step,
        params: &AttentionParams,
    ) -> Result<B::Tensor> {
        self.inner.paged_attention(q, store, layer, step, params)
    }

    fn paged_attention_qkv(
        &self,
        qkv: &B::Tensor,
        store: &mut B::KvStore,
        layer: usize,
        step: &B::Step,
        params: &AttentionParams,
    ) -> Result<B::Tensor> {
        self.inner.paged_attention_qkv(qkv, store, layer, step, params)
    }

    fn attention_probs(
        &self,
        q: &B::Tensor,
        store: &B::KvStore,
        layer: usize,
        step: &B::Step,
        seq: usize,
        params: &AttentionParams,
    ) -> Result<B::Tensor> {
        self.inner.attention_probs(q, store, layer, step, seq, params)
    }

    fn contrast_acd(
        &self,
        upper: &B::Tensor,
        lower_features: &B::Tensor,
        lower_head: &B::Weight,
        alpha: f32,
        min_candidates: usize,
    ) -> Result<B::Tensor> {
        self.inner.contrast_acd(upper, lower_features, lower_head, alpha, min_candidates)
    }

    fn argmax_rows(&self, x: &B::Tensor) -> Result<Vec<u32>> {
        self.transfers.argmaxes.fetch_add(1, Ordering::SeqCst);
        self.inner.argmax_rows(x)
    }
}
