//! Prompt tuning: the adapter's `prompt_embeddings` `[num_virtual_tokens, hidden]` become rows
//! `vocab_size ..` of the token embedding, and [`ModelSpec::virtual_tokens`] says how many there
//! are; the decoder puts those ids before every prompt. peft feeds the same embeddings before the
//! prompt's (`inputs_embeds`), at positions `0 .. n` (GPT-2 adds its position embeddings to them),
//! so the two compute the same. The LM head keeps the vocabulary's rows only.

use super::Adapter;
use crate::error::Result;
use crate::io::weights::{HostTensor, Weights};
use crate::model::config::ModelSpec;

/// Appends the virtual tokens' embeddings to the token embedding (as f32).
pub fn extend_embedding(adapter: &Adapter, weights: &mut Weights, spec: &mut ModelSpec, n: usize) -> Result<()> {
    let prompts =
        adapter.tensors.get("prompt_embeddings").ok_or_else(|| adapter.bad("no `prompt_embeddings` tensor"))?;
    if prompts.shape() != [n, spec.hidden_size] {
        return Err(adapter.bad(format!(
            "`prompt_embeddings` has shape {:?}, expected [{n}, {}] (num_virtual_tokens, the model's hidden size)",
            prompts.shape(),
            spec.hidden_size
        )));
    }
    let name = crate::model::embedding_name(spec, weights);
    let embedding = weights.get_shaped(name, &[spec.vocab_size, spec.hidden_size])?;
    let mut rows = embedding.data().to_f32_vec();
    rows.extend(prompts.data().to_f32_vec());
    weights.replace(name, HostTensor::from_f32(rows, vec![spec.vocab_size + n, spec.hidden_size]));
    spec.virtual_tokens = n;
    adapter.check_all_used(&["prompt_embeddings"])
}
