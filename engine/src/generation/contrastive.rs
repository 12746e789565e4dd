//! Contrastive search (Su et al. 2022) as transformers 4.48's `_contrastive_search` runs it: the
//! `top_k` most likely next tokens are run as forks of the sequence in one batch, and the one
//! maximising (1 - alpha) * probability - alpha * (its hidden state's highest cosine similarity to
//! any earlier position's) is kept, with its cache and its logits for the next step.
//!
//! ```
//! use layerwise::generation::contrastive::ContrastiveOptions;
//! use layerwise::generation::{generate, GenerationOptions, Strategy};
//! use layerwise::runtime::{Decoder, DecoderOptions};
//!
//! # fn main() -> layerwise::Result<()> {
//! # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/gpt2-sharded");
//! let loaded = layerwise::load(dir)?;
//! let contrastive = ContrastiveOptions { penalty_alpha: 0.6, top_k: 4 };
//! let options = GenerationOptions { max_new_tokens: 5, strategy: Strategy::Contrastive(contrastive), ..Default::default() };
//! let cache_tokens = Some(options.cache_tokens(3));
//! let mut decoder = Decoder::new(&loaded.model, DecoderOptions { cache_tokens, ..Default::default() })?;
//! let out = generate(&mut decoder, &[5, 17, 42], &options, None, |_| true)?;
//! assert_eq!(out.ids.len(), 5);
//! # Ok(())
//! # }
//! ```

pub use super::options::ContrastiveOptions;
use super::strategy::{Decode, FinishReason, Outcome, Run};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::math::softmax;
use crate::runtime::{Decoder, SeqId, SeqRequest};

impl<B: Backend> Decode<B> for ContrastiveOptions {
    fn decode(&self, decoder: &mut Decoder<'_, B>, prompt: &[u32], run: &mut Run<'_>) -> Result<Outcome> {
        let (ids, finish) = contrastive_search(decoder, prompt, run, *self)?;
        Ok(Outcome { sequences: vec![ids], finish, prefill_s: None })
    }
}

/// Contrastive search from `prompt`: the generated ids and why generation ended.
fn contrastive_search<B: Backend>(
    decoder: &mut Decoder<'_, B>,
    prompt: &[u32],
    run: &mut Run<'_>,
    settings: ContrastiveOptions,
) -> Result<(Vec<u32>, FinishReason)> {
    if !(settings.penalty_alpha > 0.0 && settings.penalty_alpha <= 1.0) || settings.top_k < 2 {
        return Err(Error::invalid("penalty_alpha", "contrastive search needs 0 < penalty_alpha <= 1 and top_k > 1"));
    }
    let mut seq = decoder.add_sequence(prompt)?;
    let mut live: Vec<SeqId> = vec![seq];
    let max_new_tokens = run.options.max_new_tokens;
    let result = (|| {
        // Forks inherit the request: every candidate's state comes back.
        decoder.set_request(seq, SeqRequest { normed_states: true, ..Default::default() })?;
        let first = decoder.step()?.into_iter().find(|o| o.seq == seq).ok_or_else(missing)?;
        let hidden_size = decoder.model().spec().hidden_size;
        let mut context: Vec<Vec<f32>> = first.hidden.chunks(hidden_size).map(normalized).collect();
        let mut logits = first.logits;
        let mut sequence = prompt.to_vec();
        let mut ids = Vec::new();
        while ids.len() < max_new_tokens {
            run.process(&sequence, ids.len(), &mut logits);
            let probs = softmax(&logits);
            let mut order: Vec<usize> = (0..probs.len()).collect();
            let k = settings.top_k.min(order.len());
            order.select_nth_unstable_by(k - 1, |&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
            order.truncate(k);
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));

            // Every candidate as a fork of the sequence, run together.
            let mut candidates = Vec::with_capacity(k);
            for &token in &order {
                let fork = decoder.fork(seq)?;
                live.push(fork);
                decoder.append(fork, token as u32)?;
                candidates.push(fork);
            }
            let outputs = decoder.step()?;
            let mut best: Option<(f32, usize)> = None;
            for (c, &fork) in candidates.iter().enumerate() {
                let out = outputs.iter().find(|o| o.seq == fork).ok_or_else(missing)?;
                let hidden = normalized(&out.hidden);
                let penalty = context.iter().map(|h| dot(h, &hidden)).fold(f32::NEG_INFINITY, f32::max);
                let score = (1.0 - settings.penalty_alpha) * probs[order[c]] - settings.penalty_alpha * penalty;
                if best.map_or(true, |(s, _)| score > s) {
                    best = Some((score, c));
                }
            }
            let chosen = best.map_or(0, |(_, c)| c);
            let out = outputs.into_iter().find(|o| o.seq == candidates[chosen]).ok_or_else(missing)?;
            context.push(normalized(&out.hidden));
            logits = out.logits;
            // The chosen fork carries on; the others and the old sequence go.
            for (c, &fork) in candidates.iter().enumerate() {
                if c != chosen {
                    decoder.release(fork)?;
                }
            }
            decoder.release(seq)?;
            seq = candidates[chosen];
            live = vec![seq];

            let token = order[chosen] as u32;
            ids.push(token);
            sequence.push(token);
            if !run.emit(token) {
                return Ok((ids, FinishReason::Stopped));
            }
            if run.is_eos(token) {
                return Ok((ids, FinishReason::Eos));
            }
        }
        Ok((ids, FinishReason::MaxNewTokens))
    })();
    for seq in live {
        decoder.release(seq).ok();
    }
    result
}

fn missing() -> Error {
    Error::invalid("decoder", "a step returned no output for a contrastive-search candidate")
}

/// `v / |v|` (transformers normalises before the cosine matrix).
fn normalized(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / norm).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
