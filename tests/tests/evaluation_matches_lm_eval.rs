//! Evaluation against lm-evaluation-harness itself (issue #14): `HFLM.loglikelihood` of
//! lambada_openai's context/target pairs and `HFLM.loglikelihood_rolling` of whole texts, recorded by
//! tools/scripts/make_eval_fixtures.py on the random demo fixture and on the trained demo (where some
//! targets are greedy), equal layerwise's last-word and rolling scores; a Parquet column reads as
//! documents.

use layerwise::evaluation::heads::Heads;
use layerwise::evaluation::last_word::{encode_pair, last_word, split_last_word};
use layerwise::evaluation::{perplexity_of, Document};
use layerwise::io::documents::read_documents;
use layerwise::load;
use layerwise_tests::{fixture, fixture_str};

#[test]
fn last_word_and_rolling_scores_equal_lm_evals_own_on_random_weights() {
    check_against_lm_eval("lm-eval.json", &fixture_str("demo-gpt2-multiexit"));
}

#[test]
fn last_word_and_rolling_scores_equal_lm_evals_own_on_the_trained_demo() {
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/kjv-gpt2-multiexit");
    let greedy = check_against_lm_eval("lm-eval-demo.json", demo);
    assert!(greedy >= 2, "the trained demo predicts some targets greedily ({greedy})");
}

/// Compares every recorded row; returns how many targets lm-eval found greedy.
fn check_against_lm_eval(file: &str, model: &str) -> usize {
    let recorded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("evaluation").join(file)).expect("fixture"))
            .expect("json");
    let loaded = load(model).expect("load");
    let tokenizer = loaded.tokenizer.as_ref().expect("tokenizer");
    let rows = recorded["rows"].as_array().expect("rows");
    for row in rows {
        let text = row["text"].as_str().expect("text");
        let (context, target) = split_last_word(text).expect("a last word");
        assert_eq!(
            (context, target.as_str()),
            (row["context"].as_str().expect("c"), row["target"].as_str().expect("t"))
        );
        let pair = encode_pair(tokenizer, context, &target).expect("encode");
        let report = last_word(&loaded.model, Heads::Plan(None), &[pair]).expect("score").remove(0);
        let (got, want) = (report.items[0].loglikelihood, row["loglikelihood"].as_f64().expect("ll"));
        assert!((got - want).abs() <= 1e-4 * want.abs(), "{text:?}: {got} vs lm-eval's {want}");
        assert_eq!(report.items[0].greedy, row["is_greedy"].as_bool().expect("greedy"), "{text:?}");

        let doc = Document::new(text, loaded.encode(text).expect("encode"));
        let rolling = perplexity_of(&loaded.model, Heads::Plan(None), &[doc]).expect("rolling").remove(0);
        let (got, want) = (rolling.documents[0].loglikelihood, row["rolling_loglikelihood"].as_f64().expect("rolling"));
        assert!((got - want).abs() <= 1e-4 * want.abs(), "{text:?} rolling: {got} vs lm-eval's {want}");
    }
    rows.iter().filter(|r| r["is_greedy"].as_bool() == Some(true)).count()
}

#[test]
fn a_parquet_column_reads_as_documents() {
    let path = fixture("evaluation").join("texts.parquet");
    assert_eq!(read_documents(&path, "text").expect("read"), ["first document", "second document"]);
    let err = read_documents(&path, "n").expect_err("integers").to_string();
    assert!(err.contains("texts.parquet") && err.contains("row 0: `n` is not a string"), "{err}");
    let err = read_documents(&path, "body").expect_err("no such column").to_string();
    assert!(err.contains("no column `body` (columns: text, n)"), "{err}");
}
