//! Rolling-window log-likelihoods (issue #14, `layerwise::evaluation`): a window's score equals the
//! sum of log-softmax of the logits transformers recorded for the same tokens, on each fixture
//! architecture; a document is the sum of its windows, each token scored once; bad input is refused
//! by name. (The windows themselves are checked against lm-evaluation-harness's own test vectors in
//! the module's unit tests.)

use layerwise::evaluation::{perplexity, rolling_windows, window_loglikelihood, Document, Window};
use layerwise::load;
use layerwise_tests::{expected, expected_ids, fixture_str};

fn log_softmax_f64(row: &[f64]) -> Vec<f64> {
    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let log_sum = row.iter().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
    row.iter().map(|v| v - log_sum).collect()
}

#[test]
fn window_loglikelihood_equals_log_softmax_of_the_transformers_logits() {
    for name in ["gpt2-sharded", "gpt-neo-bin", "llama-bf16"] {
        let recorded = expected(name);
        let ids = expected_ids(&recorded);
        let loaded = load(&fixture_str(name)).expect("load");
        let vocab = loaded.model.spec().vocab_size;
        let logits = &recorded["logits"].values;
        // Context: the first token; continuation: the rest (predicted from positions 0..t-1).
        let window = Window { context: ids[..1].to_vec(), continuation: ids[1..].to_vec() };
        let want: f64 =
            (1..ids.len()).map(|k| log_softmax_f64(&logits[(k - 1) * vocab..k * vocab])[ids[k] as usize]).sum();
        let got = window_loglikelihood(&loaded.model, None, &window).expect("score");
        assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{name}: {got} vs transformers' {want}");
    }
}

#[test]
fn a_document_is_the_sum_of_its_windows_each_token_scored_once() {
    let loaded = load(&fixture_str("gpt2-sharded")).expect("load");
    let spec = loaded.model.spec().clone();
    // Longer than the context (64 positions): three windows.
    let tokens: Vec<u32> = (0..150u32).map(|i| (i * 7 + 3) % spec.vocab_size as u32).collect();
    let prefix = spec.eos_token_ids[0];
    let windows = rolling_windows(&tokens, prefix, spec.max_positions);
    assert_eq!(windows.len(), 3);
    assert_eq!(windows.iter().map(|w| w.continuation.len()).sum::<usize>(), tokens.len());
    let want: f64 = windows.iter().map(|w| window_loglikelihood(&loaded.model, None, w).expect("window")).sum();
    let report = perplexity(&loaded.model, None, &[Document::new("a b c", tokens.clone())]).expect("perplexity");
    assert_eq!(report.documents[0].loglikelihood, want);
    assert_eq!((report.documents[0].tokens, report.documents[0].words, report.documents[0].bytes), (150, 3, 5));
    assert!((report.token_perplexity() - (-want / 150.0).exp()).abs() < 1e-9 * report.token_perplexity());
    assert!((report.bits_per_byte() - (-want / 5.0 / std::f64::consts::LN_2)).abs() < 1e-9);
}

#[test]
fn empty_documents_are_refused_by_index() {
    let loaded = load(&fixture_str("gpt2-sharded")).expect("load");
    let docs = [Document::new("x", vec![1, 2]), Document::new("", vec![])];
    let err = perplexity(&loaded.model, None, &docs).expect_err("an empty document").to_string();
    assert!(err.contains("document 1") && err.contains("no tokens"), "{err}");
}
