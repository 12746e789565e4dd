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
use super::stopping::TextStops;
use super::strategy::{Decode, FinishReason, Job, JobOutputs, Run};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::math::softmax;
use crate::runtime::{Decoder, SeqId, SeqRequest};

impl<B: Backend> Decode<B> for ContrastiveOptions {
    fn job<'t>(&self, prompt: &[u32], run: Run<'t>, _: &Decoder<'_, B>) -> Result<Box<dyn Job<B> + 't>> {
        if !(self.penalty_alpha > 0.0 && self.penalty_alpha <= 1.0) || self.top_k < 2 {
            return Err(Error::invalid(
                "penalty_alpha",
                "contrastive search needs 0 < penalty_alpha <= 1 and top_k > 1",
            ));
        }
        let text_stops = run.text_stops();
        Ok(Box::new(ContrastiveJob {
            run,
            settings: *self,
            prompt: prompt.to_vec(),
            seq: None,
            candidates: Vec::new(),
            order: Vec::new(),
            probs: Vec::new(),
            context: Vec::new(),
            sequence: prompt.to_vec(),
            ids: Vec::new(),
            text_stops,
        }))
    }
}

/// Contrastive search from a prompt: the prompt's step, then per token one step of `top_k` forks.
struct ContrastiveJob<'t> {
    run: Run<'t>,
    settings: ContrastiveOptions,
    prompt: Vec<u32>,
    /// The sequence so far (its cache holds every chosen token).
    seq: Option<SeqId>,
    /// The forks running this step's candidates, in the order of `order`.
    candidates: Vec<SeqId>,
    /// The candidate tokens, most likely first, and the probabilities they were chosen from.
    order: Vec<usize>,
    probs: Vec<f32>,
    /// Normalised states of every position so far (the degeneration penalty's context).
    context: Vec<Vec<f32>>,
    sequence: Vec<u32>,
    ids: Vec<u32>,
    text_stops: Option<TextStops<'t>>,
}

impl ContrastiveJob<'_> {
    /// Picks the `top_k` candidates from the next-token logits and runs each as a fork.
    fn propose<B: Backend>(&mut self, decoder: &mut Decoder<'_, B>, mut logits: Vec<f32>) -> Result<()> {
        let seq = self.seq.ok_or_else(missing)?;
        self.run.process(&self.sequence, self.ids.len(), &mut logits);
        let probs = softmax(&logits);
        let mut order: Vec<usize> = (0..probs.len()).collect();
        let k = self.settings.top_k.min(order.len());
        order.select_nth_unstable_by(k - 1, |&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        order.truncate(k);
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        // Every candidate as a fork of the sequence, run together.
        for &token in &order {
            let fork = decoder.fork(seq)?;
            self.candidates.push(fork);
            decoder.append(fork, token as u32)?;
        }
        self.order = order;
        self.probs = probs;
        Ok(())
    }
}

impl<B: Backend> Job<B> for ContrastiveJob<'_> {
    fn start(&mut self, decoder: &mut Decoder<'_, B>) -> Result<Option<FinishReason>> {
        if self.run.options.max_new_tokens == 0 {
            return Ok(Some(FinishReason::MaxNewTokens));
        }
        let seq = decoder.add_sequence(&self.prompt)?;
        self.seq = Some(seq);
        // Forks inherit the request: every candidate's state comes back.
        decoder.set_request(seq, SeqRequest { normed_states: true, ..Default::default() })?;
        Ok(None)
    }

    fn sequences(&self) -> Vec<SeqId> {
        self.seq.iter().chain(&self.candidates).copied().collect()
    }

    fn waiting_on(&self) -> Vec<SeqId> {
        if self.candidates.is_empty() {
            self.seq.into_iter().collect()
        } else {
            self.candidates.clone()
        }
    }

    fn needs_scores(&self) -> bool {
        true
    }

    fn width(&self) -> usize {
        1 + self.settings.top_k
    }

    fn advance(
        &mut self,
        decoder: &mut Decoder<'_, B>,
        outputs: &mut JobOutputs,
        stream: &mut Vec<u32>,
    ) -> Result<Option<FinishReason>> {
        let seq = self.seq.ok_or_else(missing)?;
        if self.candidates.is_empty() {
            // The prompt's step: every prompt position's state, and the first token's logits.
            let first = outputs.full(seq)?;
            let hidden_size = decoder.model().spec().hidden_size;
            self.context = first.hidden.chunks(hidden_size).map(normalized).collect();
            self.propose(decoder, first.logits)?;
            return Ok(None);
        }
        let alpha = self.settings.penalty_alpha;
        let mut best: Option<(f32, usize)> = None;
        let mut states = Vec::with_capacity(self.candidates.len());
        for (c, &fork) in self.candidates.iter().enumerate() {
            let out = outputs.full(fork)?;
            let hidden = normalized(&out.hidden);
            let penalty = self.context.iter().map(|h| dot(h, &hidden)).fold(f32::NEG_INFINITY, f32::max);
            let score = (1.0 - alpha) * self.probs[self.order[c]] - alpha * penalty;
            if best.is_none_or(|(s, _)| score > s) {
                best = Some((score, c));
            }
            states.push((hidden, out.logits));
        }
        let chosen = best.map_or(0, |(_, c)| c);
        let (hidden, logits) = states.swap_remove(chosen);
        self.context.push(hidden);
        // The chosen fork carries on; the others and the old sequence go.
        let candidates = std::mem::take(&mut self.candidates);
        for (c, &fork) in candidates.iter().enumerate() {
            if c != chosen {
                decoder.release(fork)?;
            }
        }
        decoder.release(seq)?;
        self.seq = Some(candidates[chosen]);

        let token = self.order[chosen] as u32;
        self.ids.push(token);
        self.sequence.push(token);
        stream.push(token);
        if let Some(reason) = self.run.finished(token, &self.sequence, self.ids.len(), self.text_stops.as_mut())? {
            return Ok(Some(reason));
        }
        self.propose(decoder, logits)?;
        Ok(None)
    }

    fn finish(&mut self, decoder: &mut Decoder<'_, B>) -> Vec<Vec<u32>> {
        for seq in self.seq.take().into_iter().chain(self.candidates.drain(..)) {
            decoder.release(seq).ok();
        }
        vec![std::mem::take(&mut self.ids)]
    }
}

fn missing() -> Error {
    Error::invalid("decoder", "contrastive search lost its sequence")
}

/// `v / |v|` (transformers normalises before the cosine matrix).
fn normalized(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / norm).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
