//! Property tests (issue #13) of the logits processors, the sampling warpers and the stopping rules:
//! on any scores and any token history they keep what their definition says they keep, never make a
//! NaN, never remove the best token (but typical-p, by its definition), and stop generation exactly where the rule says (stop strings
//! against a plain search of the decoded text, brace levels against a plain count, lengths and EOS
//! against the options).

use layerwise::generation::processors::{self, ProcessorOptions, SamplingOptions};
use layerwise::generation::stopping::{BraceMatching, TextStops};
use layerwise::generation::{generate, GenerationOptions, SampleOptions, Strategy as Decoding};
use layerwise::runtime::{Decoder, DecoderOptions};
use proptest::prelude::*;

/// Scores over a small vocabulary: finite, with ties now and then (values on a coarse grid).
fn scores() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec((-40i32..40).prop_map(|v| v as f32 / 4.0), 1..48)
}

fn tokens(vocab: u32) -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(0..vocab, 0..24)
}

fn first_argmax(s: &[f32]) -> usize {
    layerwise::math::argmax(s) as usize
}

fn kept(s: &[f32]) -> Vec<usize> {
    (0..s.len()).filter(|&i| s[i] > f32::NEG_INFINITY).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Seen tokens (prompt and generated) are penalised once each, by sign; the rest are untouched.
    #[test]
    fn repetition_penalty_changes_only_seen_tokens_once(s in scores(), history in tokens(60), penalty in 0.1f32..4.0) {
        let mut out = s.clone();
        processors::repetition_penalty(&history, &mut out, penalty);
        for (i, (&before, &after)) in s.iter().zip(&out).enumerate() {
            if history.contains(&(i as u32)) {
                let want = if before < 0.0 { before * penalty } else { before / penalty };
                prop_assert_eq!(after, want, "token {}", i);
            } else {
                prop_assert_eq!(after, before, "token {} was not seen", i);
            }
        }
    }

    /// After the ban, no token left finite completes an n-gram already in the history, and every
    /// banned token would have.
    #[test]
    fn no_repeat_ngram_bans_exactly_the_repeating_completions(s in scores(), history in tokens(6), n in 1usize..4) {
        let mut out = s.clone();
        processors::no_repeat_ngram(&history, &mut out, n);
        for t in 0..s.len() as u32 {
            let mut extended = history.clone();
            extended.push(t);
            let completes = history.len() + 1 >= n && {
                let last = &extended[extended.len() - n..];
                history.windows(n).any(|w| w == last)
            };
            prop_assert_eq!(out[t as usize] == f32::NEG_INFINITY, completes, "token {}", t);
            if !completes {
                prop_assert_eq!(out[t as usize], s[t as usize]);
            }
        }
    }

    /// top-k keeps the scores at or above the k-th largest (ties at the boundary stay): at least k,
    /// the best among them, and nothing kept below anything removed.
    #[test]
    fn top_k_keeps_the_k_best_and_their_ties(s in scores(), k in 1usize..60) {
        let mut out = s.clone();
        processors::top_k(&mut out, k);
        let kept = kept(&out);
        prop_assert!(kept.len() >= k.min(s.len()));
        prop_assert!(kept.contains(&first_argmax(&s)));
        let lowest_kept = kept.iter().map(|&i| s[i]).fold(f32::INFINITY, f32::min);
        for i in 0..s.len() {
            if !kept.contains(&i) {
                prop_assert!(s[i] < lowest_kept, "removed {} above a kept score", s[i]);
            } else {
                prop_assert_eq!(out[i], s[i]);
            }
        }
    }

    /// The warpers keep at least `keep` tokens and never make a NaN; without typical-p, they keep the
    /// best token and remove only a low tail (no kept score below a removed one); top-p keeps at least
    /// its mass.
    #[test]
    fn warpers_keep_the_best_tokens_and_remove_a_low_tail(
        s in scores(),
        temperature in 0.2f32..3.0,
        top_k in 0usize..20,
        top_p in 0.05f32..=1.0,
        min_p in prop::option::of(0.0f32..=1.0),
        typical_p in 0.05f32..=1.0,
        keep in 1usize..4,
    ) {
        let options = SamplingOptions { temperature, top_k, top_p, min_p, typical_p, seed: 0 };
        prop_assert!(options.validate().is_ok());
        let mut out = s.clone();
        options.warp(&mut out, keep);
        prop_assert!(out.iter().all(|v| !v.is_nan()));
        let kept_tokens = kept(&out);
        prop_assert!(kept_tokens.len() >= keep.min(s.len()), "{} kept", kept_tokens.len());
        if typical_p == 1.0 {
            // Without the typical-p warper (which ranks by distance to the entropy, so that the most
            // likely token may go, as in transformers), the best token stays and what goes is a low
            // tail of the scores.
            prop_assert!(kept_tokens.contains(&first_argmax(&s)));
            let lowest_kept = kept_tokens.iter().map(|&i| s[i]).fold(f32::INFINITY, f32::min);
            for i in (0..s.len()).filter(|i| !kept_tokens.contains(i)) {
                prop_assert!(s[i] <= lowest_kept);
            }
        }
        // top-p alone: what stays holds at least top_p of the probability (f32 sums).
        let mut alone = s.iter().map(|v| v / temperature).collect::<Vec<_>>();
        let probs = processors::softmax(&alone);
        processors::top_p(&mut alone, top_p, keep);
        let mass: f32 = kept(&alone).iter().map(|&i| probs[i]).sum();
        prop_assert!(mass >= top_p - 1e-4 || kept(&alone).len() == s.len(), "mass {} < {}", mass, top_p);
    }

    /// The minimum of new tokens: the EOS ids and nothing else go.
    #[test]
    fn suppress_removes_only_the_given_ids(s in scores(), ids in tokens(60)) {
        let mut out = s.clone();
        processors::suppress(&mut out, &ids);
        for i in 0..s.len() {
            let want = if ids.contains(&(i as u32)) { f32::NEG_INFINITY } else { s[i] };
            prop_assert_eq!(out[i], want);
        }
    }

    /// Processor options never panic, whatever the history (ids beyond the vocabulary included).
    #[test]
    fn processors_ignore_ids_beyond_the_vocabulary(s in scores(), history in tokens(1000), penalty in 0.5f32..2.0, n in 0usize..5) {
        let mut out = s.clone();
        ProcessorOptions { repetition_penalty: penalty, no_repeat_ngram_size: n }.apply(&history, &mut out);
        prop_assert!(out.iter().all(|v| !v.is_nan()));
    }
}

/// The demo checkpoint (a real GPT-2 tokenizer and a small multi-exit model).
fn demo() -> &'static layerwise::LoadedModel {
    static LOADED: std::sync::OnceLock<layerwise::LoadedModel> = std::sync::OnceLock::new();
    LOADED.get_or_init(|| layerwise::load(&layerwise_tests::fixture_str("demo-gpt2-multiexit")).expect("demo"))
}

/// Tokens whose texts hold braces, spaces, letters and pieces of the stop strings below.
const PIECES: [&str; 12] = ["{", "}", " {", "}}", "a", "b", " ab", "ba", "\n", "x", " ", " }"];

fn piece_ids() -> Vec<u32> {
    let tokenizer = demo().tokenizer.as_ref().expect("tokenizer");
    PIECES
        .iter()
        .map(|p| {
            let ids = tokenizer.encode(p).expect("encode");
            assert_eq!(ids.len(), 1, "{p:?} is one token of GPT-2's vocabulary");
            ids[0]
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// A stop string stops generation at the first token whose text completes an occurrence of it in
    /// the decoded text so far (the prompt's included), as a plain search of that text finds it.
    #[test]
    fn stop_strings_stop_where_the_text_first_contains_them(
        picks in prop::collection::vec(0..PIECES.len(), 1..30),
        prompt_len in 0usize..4,
        stop in prop::sample::select(vec!["ab", "b b", "}\n", "aba", "x{"]),
    ) {
        let tokenizer = demo().tokenizer.as_ref().expect("tokenizer");
        let ids = piece_ids();
        let tokens: Vec<u32> = picks.iter().map(|&p| ids[p]).collect();
        let prompt_len = prompt_len.min(tokens.len() - 1);
        let mut rule = TextStops::new(tokenizer, &[stop.to_string()], None);
        let text_of = |n: usize| picks[..n].iter().map(|&p| PIECES[p]).collect::<String>();
        for end in prompt_len + 1..=tokens.len() {
            let stopped = rule.should_stop(&tokens[..end]).expect("check");
            let (before, now) = (text_of(end - 1), text_of(end));
            // An occurrence ending inside the last token's text.
            let want = (0..now.len()).filter(|&s| now[s..].starts_with(stop)).any(|s| s + stop.len() > before.len());
            prop_assert_eq!(stopped, want, "after {:?}", now);
        }
    }

    /// Brace matching stops at the first token that brings the level (the prompt's open braces plus
    /// those opened, less those closed, character by character) back to zero or below, once a brace
    /// was opened during generation or the prompt left some open.
    #[test]
    fn brace_matching_stops_when_the_level_returns_to_zero(
        picks in prop::collection::vec(0..PIECES.len(), 1..30),
        start_level in 0usize..3,
    ) {
        let tokenizer = demo().tokenizer.as_ref().expect("tokenizer");
        let ids = piece_ids();
        let mut rule = TextStops::new(tokenizer, &[], Some(BraceMatching { start_level }));
        let (mut level, mut opened) = (start_level as i64, false);
        for end in 1..=picks.len() {
            let mut want = false;
            for c in PIECES[picks[end - 1]].chars() {
                match c {
                    '{' => { level += 1; opened = true; }
                    '}' => level -= 1,
                    _ => continue,
                }
                want |= level <= 0 && (opened || start_level > 0);
            }
            let tokens: Vec<u32> = picks[..end].iter().map(|&p| ids[p]).collect();
            prop_assert_eq!(rule.should_stop(&tokens).expect("check"), want, "token {}", end);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Length and EOS rules on real generation (sampling): never more than `max_new_tokens`, no EOS
    /// before `min_new_tokens`, an early end only at an EOS token; and with no minimum, the same
    /// draws as a run without EOS, cut at its first EOS token. The EOS ids are taken from such a run,
    /// so that they come up.
    #[test]
    fn generation_respects_max_and_min_new_tokens_and_eos(
        max_new in 1usize..12,
        min_new in 0usize..6,
        eos_at in 0usize..12,
        seed in 0u64..1000,
    ) {
        let model = &demo().model;
        let prompt = [464u32, 3290, 286];
        let run = |max_new_tokens: usize, min_new_tokens: usize, eos_token_ids: Vec<u32>| {
            let options = GenerationOptions {
                max_new_tokens,
                min_new_tokens,
                eos_token_ids,
                strategy: Decoding::Sample(SampleOptions {
                    sampling: SamplingOptions { temperature: 1.5, top_k: 0, seed, ..Default::default() },
                    num_return_sequences: 1,
                }),
                ..Default::default()
            };
            let mut decoder = Decoder::new(model, DecoderOptions {
                cache_tokens: Some(options.cache_tokens(prompt.len())),
                ..Default::default()
            }).expect("decoder");
            generate(&mut decoder, &prompt, &options, None, |_| true).expect("generate").ids
        };
        let free = run(max_new, 0, Vec::new());
        prop_assert_eq!(free.len(), max_new);
        let eos = vec![free[eos_at % free.len()]];
        let ids = run(max_new, min_new, eos.clone());
        prop_assert!(ids.len() <= max_new);
        for (i, id) in ids.iter().enumerate() {
            if eos.contains(id) {
                prop_assert!(i >= min_new, "EOS {} at {} before min_new_tokens {}", id, i, min_new);
                prop_assert_eq!(i, ids.len() - 1, "generation went on after EOS");
            }
        }
        if ids.len() < max_new {
            prop_assert!(eos.contains(ids.last().expect("a token")), "ended early without EOS: {:?}", ids);
        }
        if min_new == 0 {
            let first = free.iter().position(|t| eos.contains(t)).expect("EOS from the free run");
            prop_assert_eq!(&ids[..], &free[..=first]);
        }
    }
}
