//! Repetition and diversity of generated text as SimCTG's `measure_repetition_and_diversity`
//! computes them (the metrics of upstream's inference script): words are whitespace-separated;
//! rep-n = 100 · (1 − unique n-grams / n-grams) pooled over the texts, rounded to 2 decimals;
//! diversity = Π_n (1 − rep-n / 100). SimCTG's n-gram loop stops one n-gram short of the end
//! (`while end_idx < len(tokens)`); so does this, to give the same numbers.

use std::collections::HashSet;

/// SimCTG's numbers for a set of texts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Repetition {
    pub rep_2: f64,
    pub rep_3: f64,
    pub rep_4: f64,
    pub diversity: f64,
}

/// SimCTG's `eval_text`: (unique, total) n-grams of one text.
fn ngram_counts(text: &str, n: usize) -> (usize, usize) {
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut end = n;
    while end < words.len() {
        seen.insert(&words[end - n..end]);
        total += 1;
        end += 1;
    }
    (seen.len(), total)
}

/// `measure_repetition_and_diversity(texts)`; `None` when some n has no n-gram at all (SimCTG
/// divides by zero there; upstream's script then reports diversity 0).
pub fn repetition_and_diversity<S: AsRef<str>>(texts: &[S]) -> Option<Repetition> {
    let mut rep = [0.0f64; 3];
    for (slot, n) in rep.iter_mut().zip([2, 3, 4]) {
        let (unique, total) =
            texts.iter().map(|t| ngram_counts(t.as_ref(), n)).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        if total == 0 {
            return None;
        }
        *slot = ((1.0 - unique as f64 / total as f64) * 100.0 * 100.0).round() / 100.0;
    }
    let diversity = rep.iter().map(|r| 1.0 - r / 100.0).product();
    Some(Repetition { rep_2: rep[0], rep_3: rep[1], rep_4: rep[2], diversity })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values worked out by hand from SimCTG's code (`eval_text` skips the last n-gram).
    #[test]
    fn repetition_matches_simctg_by_hand() {
        // 9 words: the first 7 of 8 bigrams are counted: ab ba ab ba ab bc cd -> 4 unique of 7.
        let text = "a b a b a b c d e";
        assert_eq!(ngram_counts(text, 2), (4, 7));
        assert_eq!(ngram_counts(text, 4), (4, 5));
        let r = repetition_and_diversity(&[text]).expect("long enough");
        assert_eq!(r.rep_2, 42.86);
        // trigrams: "a b a", "b a b", "a b a", "b a b", "a b c", "b c d" -> 4 unique of 6.
        assert_eq!(r.rep_3, 33.33);
        assert_eq!(r.rep_4, 20.0);
        assert!((r.diversity - (1.0 - 0.4286) * (1.0 - 0.3333) * 0.8).abs() < 1e-12);
        assert_eq!(repetition_and_diversity(&["too short"]), None);
    }
}
