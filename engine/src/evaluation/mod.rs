//! Language-modeling evaluation as lm-evaluation-harness scores it: rolling-window log-likelihood
//! of whole documents (`loglikelihood_rolling`: windows of the context length, every token scored
//! exactly once, the first one after the end-of-text token), and the perplexities of its wikitext
//! task (per token, per word, per byte, bits per byte), under any exit plan.
//!
//! ```
//! use layerwise::evaluation::{perplexity, Document};
//!
//! # fn main() -> layerwise::Result<()> {
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/demo-gpt2-multiexit");
//! let loaded = layerwise::load(dir)?;
//! let text = "The benefits of bad advice are many.";
//! let doc = Document::new(text, loaded.encode(text)?);
//! let report = perplexity(&loaded.model, None, &[doc])?;
//! assert!(report.token_perplexity() > 1.0);
//! # Ok(())
//! # }
//! ```
//!
//! Owns: the windows, the scoring and the reports; [`heads`] (one plan, or many heads over one
//! pass), [`last_word`] (LAMBADA's scoring), [`repetition`] (SimCTG's generation metrics). Imports:
//! `model` (the forward pass), `exits`, `math`.

pub mod heads;
pub mod last_word;
pub mod repetition;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::exits::PlanOptions;
use crate::model::Model;
use heads::Heads;

/// One window of a rolling evaluation: `context` (what the model reads before the first scored
/// token) and `continuation` (the tokens scored); lm-eval's `make_disjoint_window` of
/// `get_rolling_token_windows`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
}

/// lm-eval's `get_rolling_token_windows(tokens, prefix, max_len, context_len=1)`, each made
/// disjoint: the first window predicts the first `max_len` tokens after `prefix`; each next one
/// predicts the next `max_len` tokens (fewer at the end) after as much earlier text as fits.
pub fn rolling_windows(tokens: &[u32], prefix: u32, max_len: usize) -> Vec<Window> {
    let mut windows = Vec::new();
    if tokens.is_empty() || max_len == 0 {
        return windows;
    }
    let first = max_len.min(tokens.len());
    let mut input: Vec<u32> = std::iter::once(prefix).chain(tokens[..first - 1].iter().copied()).collect();
    windows.push(disjoint(&mut input, &tokens[..first]));
    let mut predicted = first;
    while predicted < tokens.len() {
        let len = (tokens.len() - predicted).min(max_len);
        let end = predicted + len;
        let mut input = tokens[end.saturating_sub(max_len + 1)..end - 1].to_vec();
        windows.push(disjoint(&mut input, &tokens[end - len..end]));
        predicted += len;
    }
    windows
}

/// `make_disjoint_window`: the input less the part the continuation repeats.
fn disjoint(input: &mut Vec<u32>, continuation: &[u32]) -> Window {
    input.truncate(input.len() + 1 - continuation.len());
    Window { context: std::mem::take(input), continuation: continuation.to_vec() }
}

/// A document to score: its text (for the word and byte counts) and its tokens.
#[derive(Clone, Debug)]
pub struct Document {
    pub text: String,
    pub tokens: Vec<u32>,
}

impl Document {
    pub fn new(text: &str, tokens: Vec<u32>) -> Self {
        Document { text: text.to_string(), tokens }
    }

    /// Words as lm-eval's wikitext task counts them: `len(re.split(r"\s+", text))`.
    pub fn words(&self) -> usize {
        // re.split keeps an empty piece before leading and after trailing whitespace.
        let mut pieces = 1;
        let mut in_space = false;
        for c in self.text.chars() {
            if c.is_whitespace() {
                if !in_space {
                    pieces += 1;
                }
                in_space = true;
            } else {
                in_space = false;
            }
        }
        pieces
    }
}

/// One document's score.
#[derive(Clone, Debug, PartialEq)]
pub struct DocumentScore {
    /// Σ log p(token | everything before it), natural log.
    pub loglikelihood: f64,
    pub tokens: usize,
    pub words: usize,
    pub bytes: usize,
}

/// Scores of a set of documents, and their pooled perplexities (lm-eval's `weighted_perplexity`:
/// exp of minus the summed log-likelihood over the summed counts).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PerplexityReport {
    pub documents: Vec<DocumentScore>,
}

impl PerplexityReport {
    fn total(&self) -> (f64, usize, usize, usize) {
        self.documents
            .iter()
            .fold((0.0, 0, 0, 0), |(ll, t, w, b), d| (ll + d.loglikelihood, t + d.tokens, w + d.words, b + d.bytes))
    }

    pub fn token_perplexity(&self) -> f64 {
        let (ll, tokens, _, _) = self.total();
        (-ll / tokens as f64).exp()
    }

    pub fn word_perplexity(&self) -> f64 {
        let (ll, _, words, _) = self.total();
        (-ll / words as f64).exp()
    }

    pub fn byte_perplexity(&self) -> f64 {
        let (ll, _, _, bytes) = self.total();
        (-ll / bytes as f64).exp()
    }

    pub fn bits_per_byte(&self) -> f64 {
        let (ll, _, _, bytes) = self.total();
        -ll / bytes as f64 / std::f64::consts::LN_2
    }
}

/// Rolling-window log-likelihood of each document under `plan` (the original head when None):
/// windows of the model's context, the end-of-text token (config.json's first `eos_token_id`)
/// before the first token, as lm-eval's `loglikelihood_rolling` runs a Hugging Face model. Scores
/// are `log_softmax` of the plan's output (a contrast's output is already log-probabilities; lm-eval
/// normalises whatever the model returns).
pub fn perplexity<B: Backend>(
    model: &Model<B>,
    plan: Option<&PlanOptions>,
    documents: &[Document],
) -> Result<PerplexityReport> {
    let mut reports = perplexity_of(model, Heads::Plan(plan), documents)?;
    Ok(reports.remove(0))
}

/// [`perplexity`] of every head of `heads` (one report each), each window run once.
pub fn perplexity_of<B: Backend>(
    model: &Model<B>,
    heads: Heads<'_>,
    documents: &[Document],
) -> Result<Vec<PerplexityReport>> {
    let spec = model.spec();
    let prefix = *spec.eos_token_ids.first().ok_or_else(|| {
        Error::invalid("eos_token_id", "the model's config names no end-of-text token to start each document with")
    })?;
    let mut reports = vec![PerplexityReport::default(); heads.count()];
    for (i, doc) in documents.iter().enumerate() {
        if doc.tokens.is_empty() {
            return Err(Error::invalid(format!("document {i}"), "has no tokens"));
        }
        let mut loglikelihood = vec![0.0f64; heads.count()];
        for window in rolling_windows(&doc.tokens, prefix, spec.max_positions) {
            for (total, score) in loglikelihood.iter_mut().zip(score_window(model, heads, &window)?) {
                *total += score.loglikelihood;
            }
        }
        for (report, loglikelihood) in reports.iter_mut().zip(loglikelihood) {
            report.documents.push(DocumentScore {
                loglikelihood,
                tokens: doc.tokens.len(),
                words: doc.words(),
                bytes: doc.text.len(),
            });
        }
    }
    Ok(reports)
}

/// A continuation's score under one head: lm-eval's `(loglikelihood, is_greedy)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ContinuationScore {
    /// Σ log p(continuation token | what precedes it), natural log.
    pub loglikelihood: f64,
    /// Every continuation token is the head's argmax.
    pub greedy: bool,
}

/// Σ log p(continuation | context) for one window under one plan: one forward pass over context +
/// continuation less its last token.
pub fn window_loglikelihood<B: Backend>(model: &Model<B>, plan: Option<&PlanOptions>, window: &Window) -> Result<f64> {
    Ok(score_window(model, Heads::Plan(plan), window)?[0].loglikelihood)
}

/// The window's continuation scored by every head of `heads` (one forward pass).
pub fn score_window<B: Backend>(model: &Model<B>, heads: Heads<'_>, window: &Window) -> Result<Vec<ContinuationScore>> {
    if window.context.is_empty() || window.continuation.is_empty() {
        return Err(Error::invalid("evaluation", "a window needs a context and a continuation"));
    }
    let mut ids = window.context.clone();
    ids.extend_from_slice(&window.continuation[..window.continuation.len() - 1]);
    let vocab = model.spec().vocab_size;
    let first = window.context.len() - 1;
    let all = heads.scores(model, &ids)?;
    Ok(all
        .iter()
        .map(|scores| {
            let mut score = ContinuationScore { loglikelihood: 0.0, greedy: true };
            for (k, &target) in window.continuation.iter().enumerate() {
                let row = &scores[(first + k) * vocab..(first + k + 1) * vocab];
                score.loglikelihood += crate::math::log_softmax(row)[target as usize] as f64;
                score.greedy &= crate::math::argmax(row) == target;
            }
            score
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// lm-evaluation-harness's own test vectors (`test_get_rolling_token_windows_v1`: 34 tokens,
    /// windows of 10, prefix -100 (here u32::MAX)), made disjoint as its `make_disjoint_window` does.
    #[test]
    fn rolling_windows_equal_lm_eval_on_its_own_test_vectors() {
        let prefix = u32::MAX;
        let tokens: Vec<u32> = (0..34).collect();
        let gold: Vec<(Vec<u32>, Vec<u32>)> = vec![
            (std::iter::once(prefix).chain(0..9).collect(), (0..10).collect()),
            ((9..19).collect(), (10..20).collect()),
            ((19..29).collect(), (20..30).collect()),
            ((23..33).collect(), (30..34).collect()),
        ];
        let want: Vec<Window> = gold
            .into_iter()
            .map(|(input, pred)| {
                let keep = input.len() - (pred.len() - 1);
                Window { context: input[..keep].to_vec(), continuation: pred }
            })
            .collect();
        assert_eq!(rolling_windows(&tokens, prefix, 10), want);
        // Every token is predicted once.
        let predicted: Vec<u32> = want.iter().flat_map(|w| w.continuation.clone()).collect();
        assert_eq!(predicted, tokens);
    }

    #[test]
    fn short_documents_take_one_window() {
        let windows = rolling_windows(&[5, 6, 7], 0, 10);
        assert_eq!(windows, vec![Window { context: vec![0], continuation: vec![5, 6, 7] }]);
        assert!(rolling_windows(&[], 0, 10).is_empty());
    }

    #[test]
    fn words_are_counted_as_python_splits_on_whitespace() {
        for (text, words) in [("a b  c", 3), (" a b ", 4), ("", 1), ("one", 1), ("x\n\ny", 2)] {
            assert_eq!(Document::new(text, vec![]).words(), words, "{text:?}");
        }
    }
}
