//! The layers every architecture shares: a linear layer, the two norms, and the one attention
//! (write the new keys and values, attend over the paged cache, apply a head mask, show the
//! probabilities to a probe). An architecture file only wires these.

use super::config::Activation;
use super::probes::{Probe, Site};
use crate::backend::{AttentionParams, Backend, Layout, NormParams};
use crate::error::{Error, Result};
use crate::io::weights::{DType, HostTensor, Weights};

/// A linear layer: `w: [out, in]` and an optional bias `[out]`.
pub(crate) struct Linear<B: Backend> {
    weight: B::Weight,
    bias: Option<B::Weight>,
}

impl<B: Backend> Linear<B> {
    /// Loads `{prefix}.weight` with shape `[out, in]` (or `[in, out]` for `Layout::InOut`) and, when
    /// `bias` is true, `{prefix}.bias` with shape `[out]`.
    pub(crate) fn load(
        b: &B,
        w: &Weights,
        prefix: &str,
        (out_features, in_features): (usize, usize),
        layout: Layout,
        bias: bool,
    ) -> Result<Self> {
        let shape = match layout {
            Layout::OutIn => [out_features, in_features],
            Layout::InOut => [in_features, out_features],
        };
        let weight = b.weight(w.get_shaped(&format!("{prefix}.weight"), &shape)?, layout)?;
        let bias = if bias {
            Some(b.weight(w.get_shaped(&format!("{prefix}.bias"), &[out_features])?, Layout::OutIn)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// The `[out_i, in]` weights `{prefix}.weight` of several bias-free projections of one input
    /// (GPT-Neo's q, k and v) stacked into one layer whose output is theirs side by side: one
    /// product instead of several.
    pub(crate) fn load_stacked(b: &B, w: &Weights, parts: &[(&str, usize)], in_features: usize) -> Result<Self> {
        let tensors = parts
            .iter()
            .map(|&(prefix, out)| w.get_shaped(&format!("{prefix}.weight"), &[out, in_features]))
            .collect::<Result<Vec<_>>>()?;
        let stacked = match HostTensor::stack_rows(&tensors) {
            Some(stacked) => stacked,
            // Parts of different dtypes: stacked in f32.
            None => {
                let wide: Vec<HostTensor> = tensors.iter().map(|t| t.converted(DType::F32)).collect();
                HostTensor::stack_rows(&wide.iter().collect::<Vec<_>>())
                    .ok_or_else(|| Error::invalid(parts[0].0, "cannot stack the projections"))?
            }
        };
        Ok(Linear { weight: b.weight(&stacked, Layout::OutIn)?, bias: None })
    }

    /// `x: [t, in]` -> `[t, out]`.
    pub(crate) fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        b.linear(x, &self.weight, self.bias.as_ref())
    }

    /// `act(linear(x))` (fused where the backend can).
    pub(crate) fn forward_act(&self, b: &B, x: &B::Tensor, act: Activation) -> Result<B::Tensor> {
        b.linear_act(x, &self.weight, self.bias.as_ref(), act)
    }

    /// `x += linear(input)`, in one op (fused where the backend can).
    pub(crate) fn accumulate(&self, b: &B, x: &mut B::Tensor, input: &B::Tensor) -> Result<()> {
        b.linear_add_assign(x, input, &self.weight, self.bias.as_ref())
    }

    /// `x += linear(input)`: a residual branch's last product, whose output is `site` of `block`. A
    /// probe watching that site sees it before the add; otherwise one op, fused where the backend can.
    pub(crate) fn add_to(
        &self,
        b: &B,
        x: &mut B::Tensor,
        input: &B::Tensor,
        probe: &mut dyn Probe<B>,
        block: usize,
        site: Site,
    ) -> Result<()> {
        if probe.watches(block, site) {
            let y = self.forward(b, input)?;
            probe.see(block, site, &y)?;
            b.add_assign(x, &y)
        } else {
            self.accumulate(b, x, input)
        }
    }

    pub(crate) fn bytes(&self, b: &B) -> usize {
        b.weight_bytes(&self.weight) + self.bias.as_ref().map_or(0, |w| b.weight_bytes(w))
    }
}

/// LayerNorm (GPT-2, GPT-Neo) or RMSNorm (Llama) over the hidden dimension.
pub(crate) enum Norm<B: Backend> {
    Layer { weight: B::Weight, bias: B::Weight, eps: f32 },
    Rms { weight: B::Weight, eps: f32 },
}

impl<B: Backend> Norm<B> {
    pub(crate) fn layer_norm(b: &B, w: &Weights, prefix: &str, dim: usize, eps: f32) -> Result<Self> {
        Self::layer_norm_named(b, w, (&format!("{prefix}.weight"), &format!("{prefix}.bias")), dim, eps)
    }

    /// A LayerNorm whose scale and shift tensors have the given names.
    pub(crate) fn layer_norm_named(
        b: &B,
        w: &Weights,
        (weight, bias): (&str, &str),
        dim: usize,
        eps: f32,
    ) -> Result<Self> {
        Ok(Norm::Layer {
            weight: b.weight(w.get_shaped(weight, &[dim])?, Layout::OutIn)?,
            bias: b.weight(w.get_shaped(bias, &[dim])?, Layout::OutIn)?,
            eps,
        })
    }

    pub(crate) fn rms_norm(b: &B, w: &Weights, prefix: &str, dim: usize, eps: f32) -> Result<Self> {
        Ok(Norm::Rms { weight: b.weight(w.get_shaped(&format!("{prefix}.weight"), &[dim])?, Layout::OutIn)?, eps })
    }

    pub(crate) fn bytes(&self, b: &B) -> usize {
        match self {
            Norm::Layer { weight, bias, .. } => b.weight_bytes(weight) + b.weight_bytes(bias),
            Norm::Rms { weight, .. } => b.weight_bytes(weight),
        }
    }

    pub(crate) fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        match self {
            Norm::Layer { weight, bias, eps } => b.layer_norm(x, weight, bias, *eps),
            Norm::Rms { weight, eps } => b.rms_norm(x, weight, *eps),
        }
    }

    fn params(&self) -> NormParams<'_, B::Weight> {
        match self {
            Norm::Layer { weight, bias, eps } => NormParams { weight, bias: Some(bias), eps: *eps },
            Norm::Rms { weight, eps } => NormParams { weight, bias: None, eps: *eps },
        }
    }

    /// `head` applied to the normed `x`, in one op (fused where the backend can).
    pub(crate) fn then_linear(&self, b: &B, x: &B::Tensor, head: &B::Weight) -> Result<B::Tensor> {
        b.norm_linear(x, self.params(), head, None, None)
    }

    /// `act(linear(norm(x)))` (no activation for None): a sub-layer's norm and its first product,
    /// the norm's output being `site` of `block`. A probe watching that site sees it between two
    /// ops; otherwise one op, fused where the backend can.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn feed_linear(
        &self,
        b: &B,
        x: &B::Tensor,
        linear: &Linear<B>,
        act: Option<Activation>,
        probe: &mut dyn Probe<B>,
        block: usize,
        site: Site,
    ) -> Result<B::Tensor> {
        if probe.watches(block, site) {
            let h = self.forward(b, x)?;
            probe.see(block, site, &h)?;
            match act {
                Some(act) => linear.forward_act(b, &h, act),
                None => linear.forward(b, &h),
            }
        } else {
            b.norm_linear(x, self.params(), &linear.weight, linear.bias.as_ref(), act)
        }
    }
}

/// The one attention of every architecture: store the step's new keys and values, then attend over
/// each sequence's cache. `q: [t, heads * head_dim]`, `k, v: [t, kv_heads * head_dim]`. A probe may
/// mask heads (transformers' `head_mask`: each head's probabilities, hence its output, scaled) and
/// read the probabilities.
pub(crate) fn attend<B: Backend>(
    b: &B,
    kv: &mut B::KvStore,
    layer: usize,
    step: &B::Step,
    (q, k, v): (&B::Tensor, &B::Tensor, &B::Tensor),
    params: &AttentionParams,
    probe: &mut dyn Probe<B>,
) -> Result<B::Tensor> {
    b.kv_write(kv, layer, step, k, v)?;
    let mut out = b.paged_attention(q, kv, layer, step, params)?;
    let mask = probe.head_mask(layer);
    if let Some((_, scales)) = mask {
        b.scale_heads(&mut out, scales, params.head_dim)?;
    }
    if probe.wants_attention(layer) {
        let factors = mask.map(|(host, _)| host.to_vec());
        // A prompt pass is one sequence.
        let mut probs = b.to_host(&b.attention_probs(q, kv, layer, step, 0, params)?)?;
        if let Some(factors) = &factors {
            // transformers returns the probabilities after the mask.
            let per_head = probs.len() / params.num_heads;
            for (head, &m) in probs.chunks_exact_mut(per_head).zip(factors) {
                head.iter_mut().for_each(|p| *p *= m);
            }
        }
        probe.attention(layer, probs);
    }
    Ok(out)
}

/// [`attend`] on a fused projection `qkv: [t, (heads + 2 * kv_heads) * head_dim]` (queries, keys,
/// values), in one backend op unless a probe wants the probabilities (which need the queries apart).
pub(crate) fn attend_qkv<B: Backend>(
    b: &B,
    kv: &mut B::KvStore,
    layer: usize,
    step: &B::Step,
    qkv: &B::Tensor,
    params: &AttentionParams,
    probe: &mut dyn Probe<B>,
) -> Result<B::Tensor> {
    if probe.wants_attention(layer) {
        let (q_width, kv_width) = params.qkv_widths();
        let [q, k, v]: [B::Tensor; 3] = b
            .split_columns(qkv, &[q_width, kv_width, kv_width])?
            .try_into()
            .unwrap_or_else(|_| unreachable!("split into three"));
        return attend(b, kv, layer, step, (&q, &k, &v), params, probe);
    }
    let mut out = b.paged_attention_qkv(qkv, kv, layer, step, params)?;
    if let Some((_, scales)) = probe.head_mask(layer) {
        b.scale_heads(&mut out, scales, params.head_dim)?;
    }
    Ok(out)
}
