//! BERT (Devlin et al. 2019), the encoder: word + position + token-type embeddings and a LayerNorm,
//! then post-LayerNorm blocks (`x = LN(x + attention(x))`, `x = LN(x + mlp(x))`) whose attention
//! sees the whole sequence, and the pooler (`tanh(dense(first token))`) that
//! `BertForSequenceClassification`'s classifier reads. As transformers' `BertModel` (eager attention,
//! absolute positions).
//!
//! A batch is one step of several whole sequences, each unpadded in its own scratch cache block:
//! what transformers computes for a padded batch with `attention_mask`, at the real positions.

use super::config::{Activation, Architecture, AttentionSpan, Details, Fields, ModelSpec};
use super::layers::{Linear, Norm};
use super::probes::HeadScales;
use crate::backend::{AttentionParams, Backend, Layout, Lookup};
use crate::error::{Error, Result};
use crate::io::weights::Weights;

struct Block<B: Backend> {
    query: Linear<B>,
    key: Linear<B>,
    value: Linear<B>,
    attention_output: Linear<B>,
    attention_norm: Norm<B>,
    intermediate: Linear<B>,
    output: Linear<B>,
    output_norm: Norm<B>,
    /// This block's heads (fewer where transformers' `pruned_heads` removed some).
    attention: AttentionParams,
}

/// The encoder's weights.
pub(crate) struct Bert<B: Backend> {
    word_embeddings: B::Weight,
    position_embeddings: B::Weight,
    token_type_embeddings: B::Weight,
    embedding_norm: Norm<B>,
    blocks: Vec<Block<B>>,
    pooler: Option<Linear<B>>,
    activation: Activation,
}

/// A batch on the backend: the step of its sequences, and the same step with the token types as ids
/// (the token-type table is looked up as the word table is).
pub(crate) struct EncoderStep<B: Backend> {
    pub tokens: B::Step,
    pub types: B::Step,
    pub sequences: usize,
}

/// What a forward pass hands back as it goes; each defaults to nothing.
pub(crate) trait Watch<B: Backend> {
    /// The state after the embeddings (`layer` 0) and after each block (`layer` i + 1).
    fn hidden(&mut self, _layer: usize, _x: &B::Tensor) -> Result<()> {
        Ok(())
    }
    /// Whether to compute block `layer`'s attention probabilities.
    fn wants_attention(&self, _layer: usize) -> bool {
        false
    }
    /// Block `layer`'s probabilities of sequence `seq`: `[heads * len, len]`, after the head mask.
    fn attention(&mut self, _layer: usize, _seq: usize, _probs: Vec<f32>) {}
}

/// Checkpoints saved from `BertForSequenceClassification` put the encoder under `bert.`; those saved
/// from `BertModel` do not.
pub(crate) fn prefix(w: &Weights) -> &'static str {
    super::base_prefix(w, "bert.", "embeddings.word_embeddings.weight")
}

/// The tensors of the LayerNorm `name`: `{name}.weight` / `{name}.bias`, or `{name}.gamma` /
/// `{name}.beta` as the original BERT checkpoints name them (transformers renames these on load).
pub(crate) fn layer_norm_names(w: &Weights, name: &str) -> (String, String) {
    if w.contains(&format!("{name}.gamma")) {
        (format!("{name}.gamma"), format!("{name}.beta"))
    } else {
        (format!("{name}.weight"), format!("{name}.bias"))
    }
}

fn layer_norm<B: Backend>(b: &B, w: &Weights, name: &str, dim: usize, eps: f32) -> Result<Norm<B>> {
    let (weight, bias) = layer_norm_names(w, name);
    Norm::layer_norm_named(b, w, (&weight, &bias), dim, eps)
}

impl<B: Backend> Bert<B> {
    pub(crate) fn load(b: &B, w: &Weights, spec: &ModelSpec) -> Result<Self> {
        let p = prefix(w);
        let (d, ff, eps) = (spec.hidden_size, spec.intermediate_size, spec.norm_eps);
        let Details::Bert { type_vocab_size, .. } = spec.details else {
            unreachable!("bert loader called with another architecture's spec")
        };
        let linear = |name: String, shape| Linear::load(b, w, &name, shape, Layout::OutIn, true);
        let blocks = (0..spec.num_layers)
            .map(|i| {
                let l = format!("{p}encoder.layer.{i}");
                let heads = spec.kept_heads(i).len();
                let width = heads * spec.head_dim;
                Ok(Block {
                    query: linear(format!("{l}.attention.self.query"), (width, d))?,
                    key: linear(format!("{l}.attention.self.key"), (width, d))?,
                    value: linear(format!("{l}.attention.self.value"), (width, d))?,
                    attention_output: linear(format!("{l}.attention.output.dense"), (d, width))?,
                    attention_norm: layer_norm(b, w, &format!("{l}.attention.output.LayerNorm"), d, eps)?,
                    intermediate: linear(format!("{l}.intermediate.dense"), (ff, d))?,
                    output: linear(format!("{l}.output.dense"), (d, ff))?,
                    output_norm: layer_norm(b, w, &format!("{l}.output.LayerNorm"), d, eps)?,
                    attention: AttentionParams {
                        num_heads: heads,
                        num_kv_heads: heads,
                        head_dim: spec.head_dim,
                        scale: 1.0 / (spec.head_dim as f32).sqrt(),
                        window: None,
                        causal: false,
                    },
                })
            })
            .collect::<Result<_>>()?;
        let table = |name: &str, rows: usize| {
            b.weight(w.get_shaped(&format!("{p}embeddings.{name}"), &[rows, d])?, Layout::OutIn)
        };
        let pooler = if w.contains(&format!("{p}pooler.dense.weight")) {
            Some(linear(format!("{p}pooler.dense"), (d, d))?)
        } else {
            None
        };
        Ok(Bert {
            word_embeddings: table("word_embeddings.weight", spec.vocab_size)?,
            position_embeddings: table("position_embeddings.weight", spec.max_positions)?,
            token_type_embeddings: table("token_type_embeddings.weight", type_vocab_size)?,
            embedding_norm: layer_norm(b, w, &format!("{p}embeddings.LayerNorm"), d, eps)?,
            blocks,
            pooler,
            activation: spec.activation,
        })
    }

    /// Runs the batch through the embeddings and every block; returns the last block's output
    /// `[t, hidden]` (transformers' `last_hidden_state`, the batch's rows sequence after sequence).
    pub(crate) fn forward(
        &self,
        b: &B,
        step: &EncoderStep<B>,
        kv: &mut B::KvStore,
        head_mask: Option<&HeadScales<B>>,
        watch: &mut dyn Watch<B>,
    ) -> Result<B::Tensor> {
        // x = LN(word + position + token type)
        let mut x = b.embed(&self.word_embeddings, &step.tokens, Lookup::Tokens)?;
        b.add_assign(&mut x, &b.embed(&self.position_embeddings, &step.tokens, Lookup::Positions)?)?;
        b.add_assign(&mut x, &b.embed(&self.token_type_embeddings, &step.types, Lookup::Tokens)?)?;
        let mut x = self.embedding_norm.forward(b, &x)?;
        watch.hidden(0, &x)?;

        for (layer, blk) in self.blocks.iter().enumerate() {
            // x = LN(x + dense(attention(q, k, v))), every position seeing its whole sequence
            let p = &blk.attention;
            let (q, k, v) = (blk.query.forward(b, &x)?, blk.key.forward(b, &x)?, blk.value.forward(b, &x)?);
            b.kv_write(kv, layer, &step.tokens, &k, &v)?;
            let mut heads = b.paged_attention(&q, kv, layer, &step.tokens, p)?;
            let factors = head_mask.map(|scales| scales.block(layer));
            if let Some((_, scales)) = factors {
                b.scale_heads(&mut heads, scales, p.head_dim)?;
            }
            if watch.wants_attention(layer) {
                show_attention(b, layer, p, &q, kv, step, factors.map(|(host, _)| host), watch)?;
            }
            blk.attention_output.accumulate(b, &mut x, &heads)?;
            x = blk.attention_norm.forward(b, &x)?;

            // x = LN(x + output(act(intermediate(x))))
            let h = blk.intermediate.forward_act(b, &x, self.activation)?;
            blk.output.accumulate(b, &mut x, &h)?;
            x = blk.output_norm.forward(b, &x)?;
            watch.hidden(layer + 1, &x)?;
        }
        Ok(x)
    }

    /// The pooler's input rows (each sequence's first token, the step's output rows) through
    /// `dense`, on the backend; the caller applies the tanh. None when the checkpoint has no pooler.
    pub(crate) fn pool(&self, b: &B, x: &B::Tensor, step: &EncoderStep<B>) -> Result<Option<B::Tensor>> {
        let Some(pooler) = &self.pooler else { return Ok(None) };
        let first = b.gather_output_rows(x, &step.tokens)?;
        Ok(Some(pooler.forward(b, &first)?))
    }
}

/// Hands each sequence's attention probabilities of block `layer` to `watch` (after the head
/// mask, as transformers returns them).
#[allow(clippy::too_many_arguments)]
fn show_attention<B: Backend>(
    b: &B,
    layer: usize,
    params: &AttentionParams,
    q: &B::Tensor,
    kv: &B::KvStore,
    step: &EncoderStep<B>,
    factors: Option<&[f32]>,
    watch: &mut dyn Watch<B>,
) -> Result<()> {
    for seq in 0..step.sequences {
        let mut probs = b.to_host(&b.attention_probs(q, kv, layer, &step.tokens, seq, params)?)?;
        if let Some(factors) = factors {
            let per_head = probs.len() / params.num_heads;
            for (head, &m) in probs.chunks_exact_mut(per_head).zip(factors) {
                head.iter_mut().for_each(|p| *p *= m);
            }
        }
        watch.attention(layer, seq, probs);
    }
    Ok(())
}

/// The BERT fields of `config.json` (`BertConfig`'s names and defaults).
pub(crate) fn spec(f: &Fields) -> Result<ModelSpec> {
    let hidden = f.usize("hidden_size")?;
    let heads = f.usize("num_attention_heads")?;
    let layers = f.usize("num_hidden_layers")?;
    let position_type = f.str_or("position_embedding_type", "absolute")?;
    if position_type != "absolute" {
        return Err(f.error("position_embedding_type", format!("`{position_type}` is not supported (absolute)")));
    }
    let type_vocab_size = f.usize_opt("type_vocab_size")?.unwrap_or(2);
    if type_vocab_size == 0 {
        return Err(f.error("type_vocab_size", "must be positive"));
    }
    Ok(ModelSpec {
        architecture: Architecture::Bert,
        vocab_size: f.usize("vocab_size")?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: heads,
        head_dim: hidden / heads.max(1),
        intermediate_size: f.usize_opt("intermediate_size")?.unwrap_or(3072),
        max_positions: f.usize_opt("max_position_embeddings")?.unwrap_or(512),
        norm_eps: f.epsilon_or("layer_norm_eps", 1e-12)? as f32,
        activation: f.activation("hidden_act", "gelu")?,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", true)?,
        attention_spans: vec![AttentionSpan::Global; layers],
        exit_layers: Vec::new(),
        pruned_heads: Default::default(),
        bos_token_id: None,
        eos_token_ids: Vec::new(),
        details: Details::Bert { type_vocab_size, labels: labels(f)? },
        virtual_tokens: 0,
    })
}

/// `id2label` as a list in id order (`{"0": "sadness", ...}`); empty when the config has none.
fn labels(f: &Fields) -> Result<Vec<String>> {
    let key = "id2label";
    let Some(value) = f.present(key) else { return Ok(Vec::new()) };
    let map =
        value.as_object().ok_or_else(|| f.error(key, format!("expected {{\"id\": \"label\"}}, found {value}")))?;
    let mut labels = vec![None; map.len()];
    for (id, label) in map {
        let index: usize = id
            .parse()
            .ok()
            .filter(|&i| i < map.len())
            .ok_or_else(|| f.error(key, format!("ids must be 0..{}, found `{id}`", map.len())))?;
        let name = label.as_str().ok_or_else(|| f.error(key, format!("label of {id} is not a string")))?;
        labels[index] = Some(name.to_string());
    }
    labels.into_iter().collect::<Option<Vec<_>>>().ok_or_else(|| f.error(key, "ids must be distinct"))
}

/// The error for an encoder checkpoint given to a decoder's command.
pub(crate) fn not_a_decoder(spec: &ModelSpec) -> Error {
    debug_assert_eq!(spec.architecture, Architecture::Bert);
    Error::invalid(
        "model",
        "bert is an encoder, with no language-model head to generate or score text with; \
         use `layerwise classify` or layerwise::encoder",
    )
}
