//! Both tokenizer paths (tokenizer.json, and GPT-2-era vocab.json + merges.txt) give the ids and the
//! decoded text that transformers' GPT2TokenizerFast recorded.

use layerwise::{Tokenizer, TokenizerFiles};
use layerwise_tests::fixture;
use serde_json::Value;

fn recorded_cases() -> Vec<(String, Vec<u32>, String)> {
    let path = fixture("gpt2-tokenizer").join("expected.json");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    json["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            let ids = c["ids"].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id") as u32).collect();
            (c["text"].as_str().expect("text").to_string(), ids, c["decoded"].as_str().expect("decoded").to_string())
        })
        .collect()
}

fn check(tokenizer: &Tokenizer) {
    let cases = recorded_cases();
    assert!(cases.len() >= 5);
    for (text, ids, decoded) in cases {
        assert_eq!(tokenizer.encode(&text).expect("encode"), ids, "encoding {text:?}");
        assert_eq!(tokenizer.decode(&ids).expect("decode"), decoded, "decoding {text:?}");
    }
    assert_eq!(tokenizer.token_id("<|endoftext|>"), Some(50256));
    assert_eq!(tokenizer.vocab_size(), 50257);
}

#[test]
fn tokenizer_json() {
    let tokenizer = Tokenizer::from_json_file(&fixture("gpt2-tokenizer").join("tokenizer.json")).expect("load");
    check(&tokenizer);
}

#[test]
fn vocab_and_merges_of_a_gpt2_era_checkpoint() {
    // The demo checkpoint ships only vocab.json + merges.txt, like many GPT-2-era repos.
    let dir = fixture("demo-gpt2-multiexit");
    let files = layerwise::ModelFiles::from_dir(&dir).expect("files");
    assert!(matches!(files.tokenizer, TokenizerFiles::VocabMerges { .. }));
    let tokenizer = Tokenizer::load(&files.tokenizer).expect("load").expect("has a tokenizer");
    check(&tokenizer);
}
