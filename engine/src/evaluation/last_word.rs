//! Last-word prediction as lm-evaluation-harness's `lambada_openai` task scores it: the context is
//! the text without its last space-separated word, the target is a space and that word (tokenized
//! as lm-eval's `_encode_pair` does: the pair whole, the context alone, the target the remainder);
//! an item is correct when every target token is the head's argmax; perplexity is exp of minus the
//! mean target log-likelihood.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::tokenizer::Tokenizer;
use crate::model::Model;

use super::heads::Heads;
use super::{score_window, ContinuationScore, Window};

/// lm-eval's `doc_to_text` / `doc_to_target` of lambada_openai: `text.split(' ')`, all but the last
/// piece joined by spaces, and `' ' + last`. `None` when the text has no space.
pub fn split_last_word(text: &str) -> Option<(&str, String)> {
    let (context, word) = text.rsplit_once(' ')?;
    Some((context, format!(" {word}")))
}

/// lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation; the pair is
/// encoded whole and the context alone (no special tokens, as lm-eval's causal models encode), and
/// the continuation's tokens are what the whole has beyond the context's.
pub fn encode_pair(tokenizer: &Tokenizer, context: &str, continuation: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    let trimmed = context.trim_end();
    let moved = &context[trimmed.len()..];
    let continuation = format!("{moved}{continuation}");
    let whole = tokenizer.encode_plain(&format!("{trimmed}{continuation}"))?;
    let context_ids = tokenizer.encode_plain(trimmed)?;
    let continuation_ids = whole.get(context_ids.len()..).unwrap_or_default().to_vec();
    Ok((context_ids, continuation_ids))
}

/// Scores of a last-word set under one head.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LastWordReport {
    pub items: Vec<ContinuationScore>,
}

impl LastWordReport {
    /// Fraction of items whose target is the greedy continuation.
    pub fn accuracy(&self) -> f64 {
        self.items.iter().filter(|s| s.greedy).count() as f64 / self.items.len().max(1) as f64
    }

    /// exp(−mean target log-likelihood): lm-eval's `perplexity` aggregation.
    pub fn perplexity(&self) -> f64 {
        let mean = self.items.iter().map(|s| s.loglikelihood).sum::<f64>() / self.items.len().max(1) as f64;
        (-mean).exp()
    }
}

/// Scores each `(context, target)` token pair under every head of `heads` (one forward pass each):
/// the pair is cut to the model's context from the left as lm-eval cuts it; an empty context reads
/// the end-of-text token.
pub fn last_word<B: Backend>(
    model: &Model<B>,
    heads: Heads<'_>,
    items: &[(Vec<u32>, Vec<u32>)],
) -> Result<Vec<LastWordReport>> {
    let spec = model.spec();
    let mut reports = vec![LastWordReport::default(); heads.count()];
    for (i, (context, target)) in items.iter().enumerate() {
        if target.is_empty() {
            return Err(Error::invalid(format!("item {i}"), "the target has no tokens"));
        }
        if target.len() > spec.max_positions {
            return Err(Error::invalid(
                format!("item {i}"),
                format!("a target of {} tokens exceeds the model's context of {}", target.len(), spec.max_positions),
            ));
        }
        let context = if context.is_empty() {
            vec![*spec.eos_token_ids.first().ok_or_else(|| {
                Error::invalid(format!("item {i}"), "an empty context needs the config's eos_token_id")
            })?]
        } else {
            context.clone()
        };
        // (context + target)[-(max_len + 1):]: the context loses its oldest tokens.
        let keep = (spec.max_positions + 1 - target.len()).min(context.len());
        let window = Window { context: context[context.len() - keep..].to_vec(), continuation: target.clone() };
        for (report, score) in reports.iter_mut().zip(score_window(model, heads, &window)?) {
            report.items.push(score);
        }
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_word_is_split_at_the_last_space() {
        assert_eq!(split_last_word("and he went up"), Some(("and he went", " up".to_string())));
        assert_eq!(split_last_word("word"), None);
        // Python's split(' ') keeps empty pieces: a trailing space leaves an empty last word.
        assert_eq!(split_last_word("a b "), Some(("a b", " ".to_string())));
    }
}
