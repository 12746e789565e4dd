//! Text <-> token ids, as transformers' tokenizers do it.
//!
//! `tokenizer.json` is loaded by the `tokenizers` crate. GPT-2-era repositories that only ship
//! `vocab.json` + `merges.txt` get the byte-level BPE that transformers' `GPT2Converter` builds from
//! them, with special tokens from `tokenizer_config.json` / `special_tokens_map.json`; BERT
//! repositories with only `vocab.txt` get the WordPiece tokenizer of transformers' `BertConverter`.
//!
//! The `tokenizers` crate panics on some malformed files (fuzzing found one: a decoder whose JSON
//! has a non-string key). Every call into it runs inside [`contained`], which turns such a panic into
//! an error naming the file, and keeps the panic's report off stderr.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::utils::truncation::{truncate_encodings, TruncationDirection, TruncationParams, TruncationStrategy};
use tokenizers::{AddedToken, PostProcessor};

use super::source::TokenizerFiles;
use crate::error::{Error, Result};

/// A loaded tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Prepended by hand when a vocab/merges tokenizer's config says `add_bos_token`.
    bos_to_prepend: Option<u32>,
    path: PathBuf,
}

impl Tokenizer {
    /// Loads the tokenizer described by `files`; `Ok(None)` when the checkpoint has none.
    pub fn load(files: &TokenizerFiles) -> Result<Option<Self>> {
        match files {
            TokenizerFiles::None => Ok(None),
            TokenizerFiles::Json(path) => Self::from_json_file(path).map(Some),
            TokenizerFiles::VocabMerges { vocab, merges, tokenizer_config, special_tokens_map } => {
                Self::from_vocab_merges(vocab, merges, tokenizer_config.as_deref(), special_tokens_map.as_deref())
                    .map(Some)
            }
            TokenizerFiles::WordPiece { vocab, tokenizer_config } => {
                Self::from_wordpiece(vocab, tokenizer_config.as_deref()).map(Some)
            }
        }
    }

    /// Loads a `tokenizer.json`.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let bytes = super::read_bytes_at_most(path, super::MAX_TEXT_FILE_BYTES, "not a tokenizer.json")
            .map_err(|e| Error::io(path, e))?;
        let inner = contained(path, || tokenizers::Tokenizer::from_bytes(bytes))?
            .map_err(|e| Error::Tokenizer { path: path.to_path_buf(), reason: e.to_string() })?;
        check_ids_unique(&inner, path)?;
        Ok(Tokenizer { inner, bos_to_prepend: None, path: path.to_path_buf() })
    }

    /// Builds GPT-2's byte-level BPE from `vocab.json` and `merges.txt`.
    pub fn from_vocab_merges(
        vocab: &Path,
        merges: &Path,
        tokenizer_config: Option<&Path>,
        special_tokens_map: Option<&Path>,
    ) -> Result<Self> {
        let fail = |path: &Path, reason: String| Error::Tokenizer { path: path.to_path_buf(), reason };
        let vocab_str = vocab.to_str().ok_or_else(|| fail(vocab, "path is not UTF-8".into()))?;
        let merges_str = merges.to_str().ok_or_else(|| fail(merges, "path is not UTF-8".into()))?;
        // The BPE reads both files whole itself: refuse what is no file, or too large, first.
        for path in [vocab, merges] {
            match std::fs::metadata(path) {
                Ok(m) if m.is_file() && m.len() <= super::MAX_TEXT_FILE_BYTES => {}
                Ok(m) if m.is_file() => {
                    return Err(fail(path, format!("larger than {} MiB", super::MAX_TEXT_FILE_BYTES >> 20)))
                }
                Ok(_) => return Err(fail(path, "not a regular file".into())),
                Err(e) => return Err(Error::io(path, e)),
            }
        }
        let bpe = contained(vocab, || BPE::from_file(vocab_str, merges_str).build())?
            .map_err(|e| fail(vocab, format!("with {}: {e}", merges.display())))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        check_ids_unique(&inner, vocab)?;
        inner
            .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
            .with_decoder(Some(ByteLevel::default()))
            .with_post_processor(Some(ByteLevel::default().trim_offsets(false)));

        let config = read_json(tokenizer_config)?;
        let map = read_json(special_tokens_map)?;
        let mut specials: Vec<String> = Vec::new();
        for source in [&config, &map].into_iter().flatten() {
            for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
                if let Some(content) = source.get(key).and_then(token_content) {
                    specials.push(content);
                }
            }
            if let Some(added) = source.get("added_tokens_decoder").and_then(Value::as_object) {
                specials.extend(added.values().filter_map(token_content));
            }
        }
        specials.sort();
        specials.dedup();
        let tokens: Vec<AddedToken> = specials.iter().map(|s| AddedToken::from(s.clone(), true)).collect();
        inner.add_special_tokens(&tokens);

        let add_bos = config.as_ref().and_then(|c| c.get("add_bos_token")).and_then(Value::as_bool).unwrap_or(false);
        let bos_to_prepend = if add_bos {
            let bos = config.as_ref().and_then(|c| c.get("bos_token")).and_then(token_content);
            bos.and_then(|b| inner.token_to_id(&b))
        } else {
            None
        };
        Ok(Tokenizer { inner, bos_to_prepend, path: vocab.to_path_buf() })
    }

    /// Builds BERT's WordPiece tokenizer from `vocab.txt` as transformers' `BertConverter` does:
    /// BERT's normaliser (lower-casing, accent stripping and spacing around CJK characters as the
    /// config's `do_lower_case`, `strip_accents` and `tokenize_chinese_chars` say), BERT's
    /// pre-tokeniser, WordPiece with `##` continuations, and `[CLS] A [SEP] (B [SEP])` around the
    /// text with token types 0 for the first part and 1 for the second.
    pub fn from_wordpiece(vocab: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        let fail = |reason: String| Error::Tokenizer { path: vocab.to_path_buf(), reason };
        let bytes = super::read_bytes_at_most(vocab, super::MAX_TEXT_FILE_BYTES, "not a vocab.txt")
            .map_err(|e| Error::io(vocab, e))?;
        let config = read_json(tokenizer_config)?;
        let setting = |key: &str| config.as_ref().and_then(|c| c.get(key)).and_then(Value::as_bool);
        let token = |key: &str, default: &str| {
            config.as_ref().and_then(|c| c.get(key)).and_then(token_content).unwrap_or_else(|| default.to_string())
        };
        let (unk, sep, cls, pad, mask) = (
            token("unk_token", "[UNK]"),
            token("sep_token", "[SEP]"),
            token("cls_token", "[CLS]"),
            token("pad_token", "[PAD]"),
            token("mask_token", "[MASK]"),
        );
        let words = contained(vocab, || WordPiece::read_bytes(&bytes))?.map_err(|e| fail(e.to_string()))?;
        let model =
            WordPiece::builder().vocab(words).unk_token(unk.clone()).build().map_err(|e| fail(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(model);
        check_ids_unique(&inner, vocab)?;
        let id = |token: &str| inner.token_to_id(token).ok_or_else(|| fail(format!("has no `{token}` token")));
        let (sep_id, cls_id) = (id(&sep)?, id(&cls)?);
        id(&unk)?;
        let lowercase = setting("do_lower_case").unwrap_or(true);
        inner
            .with_normalizer(Some(BertNormalizer::new(
                true,
                setting("tokenize_chinese_chars").unwrap_or(true),
                setting("strip_accents"),
                lowercase,
            )))
            .with_pre_tokenizer(Some(BertPreTokenizer))
            .with_post_processor(Some(BertProcessing::new((sep.clone(), sep_id), (cls.clone(), cls_id))))
            .with_decoder(Some(WordPieceDecoder::default()));
        let specials: Vec<AddedToken> = [unk, sep, pad, cls, mask]
            .into_iter()
            .filter(|t| inner.token_to_id(t).is_some())
            .map(|t| AddedToken::from(t, true))
            .collect();
        inner.add_special_tokens(&specials);
        Ok(Tokenizer { inner, bos_to_prepend: None, path: vocab.to_path_buf() })
    }

    /// The ids and token types of a text or a pair of texts with the special tokens around them,
    /// truncated to `max_length` tokens (the longer part first, as transformers'
    /// `truncation="longest_first"`): what `tokenizer(first, second, truncation=True,
    /// max_length=max_length)` gives.
    pub fn encode_pair(&self, first: &str, second: Option<&str>, max_length: usize) -> Result<(Vec<u32>, Vec<u32>)> {
        let encoding = contained(&self.path, || -> tokenizers::Result<_> {
            let a = self.inner.encode(first, false)?;
            let b = second.map(|s| self.inner.encode(s, false)).transpose()?;
            let added = self.inner.get_post_processor().map_or(0, |p| p.added_tokens(b.is_some()));
            let params = TruncationParams {
                max_length: max_length.saturating_sub(added),
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            };
            let (a, b) = truncate_encodings(a, b, &params)?;
            self.inner.post_process(a, b, true)
        })?
        .map_err(|e| self.error(e))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        ids.extend(self.bos_to_prepend);
        ids.extend_from_slice(encoding.get_ids());
        let mut types = vec![0; ids.len() - encoding.len()];
        types.extend_from_slice(encoding.get_type_ids());
        Ok((ids, types))
    }

    /// Token ids of `text`, with the special tokens the tokenizer adds by default (as transformers'
    /// `tokenizer(text)` does).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = contained(&self.path, || self.inner.encode(text, true))?.map_err(|e| self.error(e))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        ids.extend(self.bos_to_prepend);
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Token ids of `text` without special tokens (what lm-eval's causal models encode).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = contained(&self.path, || self.inner.encode(text, false))?.map_err(|e| self.error(e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens included (transformers' `decode` defaults).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, false)
    }

    /// Text of `ids`, leaving out special tokens when asked (transformers' `skip_special_tokens`).
    pub fn decode_with(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        contained(&self.path, || self.inner.decode(ids, skip_special_tokens))?.map_err(|e| self.error(e))
    }

    /// Id of a token string, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary's string for an id (e.g. `##ing`, `[CLS]`), if it has one.
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Trains a byte-level BPE tokenizer as GPT-2's (the `tokenizers` crate's `BpeTrainer`: all 256
    /// byte symbols in the alphabet, GPT-2's pre-tokenizer pattern, no prefix space) of at most
    /// `vocab_size` tokens on `documents`; `special` tokens take the first ids (`<|endoftext|>` is 0).
    /// `what` names the data in errors.
    pub fn train_byte_level_bpe(
        documents: &[String],
        vocab_size: usize,
        min_frequency: u64,
        special: &[&str],
        what: &Path,
    ) -> Result<Self> {
        use tokenizers::models::bpe::BpeTrainer;
        use tokenizers::models::TrainerWrapper;
        use tokenizers::pre_tokenizers::byte_level::ByteLevel as ByteLevelPre;
        if vocab_size < 256 + special.len() {
            return Err(Error::invalid(
                "--vocab-size",
                format!("{vocab_size} is below the 256 byte symbols plus {} special tokens", special.len()),
            ));
        }
        let trainer = BpeTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(min_frequency)
            .show_progress(false)
            .special_tokens(special.iter().map(|t| AddedToken::from(t.to_string(), true)).collect())
            .initial_alphabet(ByteLevelPre::alphabet().into_iter().collect())
            .build();
        let mut inner = tokenizers::Tokenizer::new(BPE::default());
        inner.with_pre_tokenizer(Some(ByteLevelPre::new(false, true, true)));
        inner.with_decoder(Some(ByteLevel::default()));
        inner.with_post_processor(Some(tokenizers::processors::byte_level::ByteLevel::new(false, true, true)));
        let mut trainer = TrainerWrapper::BpeTrainer(trainer);
        contained(what, || inner.train(&mut trainer, documents.iter()).map(|_| ()))?
            .map_err(|e| Error::Tokenizer { path: what.to_path_buf(), reason: format!("training failed: {e}") })?;
        Ok(Tokenizer { inner, bos_to_prepend: None, path: what.to_path_buf() })
    }

    /// Writes `tokenizer.json` to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner.save(path, false).map_err(|e| Error::Tokenizer { path: path.to_path_buf(), reason: e.to_string() })
    }

    fn error(&self, e: impl std::fmt::Display) -> Error {
        Error::Tokenizer { path: self.path.clone(), reason: e.to_string() }
    }
}

/// A vocabulary that gives two tokens one id decodes that id to one of them at random (whichever
/// the map kept): refused, naming both.
fn check_ids_unique(tokenizer: &tokenizers::Tokenizer, path: &Path) -> Result<()> {
    let mut vocab: Vec<(String, u32)> = tokenizer.get_vocab(false).into_iter().collect();
    vocab.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    for pair in vocab.windows(2) {
        if pair[0].1 == pair[1].1 {
            return Err(Error::Tokenizer {
                path: path.to_path_buf(),
                reason: format!("tokens {:?} and {:?} both have id {}", pair[0].0, pair[1].0, pair[0].1),
            });
        }
    }
    Ok(())
}

thread_local! {
    /// Set while [`contained`] runs: its panics are reported as errors, not on stderr.
    static CONTAINING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` (a call into the `tokenizers` crate on `path`'s contents); a panic inside it is an
/// error naming `path`. The first call installs a panic hook that stays silent for panics caught
/// here and hands every other panic to the hook that was there before.
fn contained<T>(path: &Path, f: impl FnOnce() -> T) -> Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CONTAINING.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    let was = CONTAINING.with(|c| c.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CONTAINING.with(|c| c.set(was));
    result.map_err(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("no message");
        Error::Tokenizer {
            path: path.to_path_buf(),
            reason: format!("the tokenizers library failed on this file ({message})"),
        }
    })
}

fn read_json(path: Option<&Path>) -> Result<Option<Value>> {
    let Some(path) = path else { return Ok(None) };
    let text = super::read_config_file(path)?;
    serde_json::from_str(&text).map(Some).map_err(|e| Error::bad_file(path, format!("not valid JSON: {e}")))
}

/// A special token given as `"<|endoftext|>"` or `{"content": "<|endoftext|>", ...}`.
fn token_content(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}
