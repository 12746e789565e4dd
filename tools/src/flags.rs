//! Engine messages name the engine's API (transformers' field names such as `num_beams`); the
//! command line names its flags. This translates the one into the other for display.

/// Generation fields that are also flags (`num_beams` -> `--num-beams`).
const FIELDS: &[&str] = &[
    "max_new_tokens",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "stop_strings",
    "brace_matching",
    "num_beams",
    "length_penalty",
    "early_stopping",
    "num_return_sequences",
    "penalty_alpha",
    "dola_layers",
    "min_candidates",
];

/// `message` with its leading `what:` (an option of the lens: `decoder`, `subblocks`, `top_k`) named
/// as the flag.
pub fn translate_lens(message: &str) -> String {
    for (field, flag) in [("decoder:", "--decoder:"), ("subblocks:", "--subblocks:"), ("top_k:", "--top-k:")] {
        if let Some(rest) = message.strip_prefix(field) {
            return format!("{flag}{rest}");
        }
    }
    message.to_string()
}

/// `message` with every whole-word field name replaced by its flag.
pub fn translate(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if FIELDS.contains(&word.as_str()) {
            let flag = if word == "stop_strings" { "stop".to_string() } else { word.replace('_', "-") };
            out.push_str("--");
            out.push_str(&flag);
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in message.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// A decoder's construction error, blamed on the flags that caused it: the cache size on the flags
/// that size it (`sizing`), anything else on the plan's flag.
pub fn decoder_error(e: layerwise::Error, sizing: &str, plan_flag: &str) -> anyhow::Error {
    let text = e.to_string();
    match text.strip_prefix("cache_tokens: ") {
        Some(reason) => anyhow::anyhow!("{sizing}: {reason}"),
        None => anyhow::Error::new(e).context(plan_flag.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fields_become_flags_and_other_words_stay() {
        assert_eq!(
            super::translate("num_beams: beam search does not combine with dola_layers (num_beamsx)"),
            "--num-beams: beam search does not combine with --dola-layers (num_beamsx)"
        );
    }
}
