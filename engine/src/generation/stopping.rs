//! Stopping rules on the generated text: stop strings (transformers' `StopStringCriteria`) and
//! brace matching for code generation.
//!
//! ```
//! use layerwise::generation::stopping::{BraceMatching, TextStops};
//!
//! # fn main() -> layerwise::Result<()> {
//! # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/demo-gpt2-multiexit");
//! let loaded = layerwise::load(dir)?;
//! let tokenizer = loaded.tokenizer.as_ref().expect("the demo checkpoint has a tokenizer");
//! let mut stops = TextStops::new(tokenizer, &["bad adv".to_string()], None);
//! let ids = tokenizer.encode("The benefits of bad advice")?;
//! // The stop string spans " bad" and " advice": it matches once the token completing it arrives.
//! assert!(!stops.should_stop(&ids[..ids.len() - 1])?);
//! assert!(stops.should_stop(&ids)?);
//! let _braces = TextStops::new(tokenizer, &[], Some(BraceMatching { start_level: 1 }));
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;

use crate::error::Result;
use crate::io::tokenizer::Tokenizer;

/// Brace matching: stop once the braces opened during generation are closed again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BraceMatching {
    /// Braces already open in the prompt (e.g. 1 after `fn main() {`): generation stops when the
    /// level falls back to zero. With 0, generation stops when the first brace it opens is closed.
    pub start_level: usize,
}

/// Text-based stopping rules, checked after each new token.
pub struct TextStops<'t> {
    tokenizer: &'t Tokenizer,
    stop_strings: Vec<String>,
    braces: Option<BraceMatching>,
    level: i64,
    opened: bool,
    texts: HashMap<u32, String>,
}

impl<'t> TextStops<'t> {
    pub fn new(tokenizer: &'t Tokenizer, stop_strings: &[String], braces: Option<BraceMatching>) -> Self {
        TextStops {
            tokenizer,
            stop_strings: stop_strings.iter().filter(|s| !s.is_empty()).cloned().collect(),
            braces,
            level: braces.map_or(0, |b| b.start_level as i64),
            opened: false,
            texts: HashMap::new(),
        }
    }

    /// The text of one token on its own, as transformers' stop-string matching sees it.
    fn text(&mut self, id: u32) -> Result<&str> {
        if !self.texts.contains_key(&id) {
            let text = self.tokenizer.decode(&[id])?;
            self.texts.insert(id, text);
        }
        Ok(&self.texts[&id])
    }

    /// Whether generation ends after the last token of `tokens` (prompt and generated so far, the
    /// last one new).
    pub fn should_stop(&mut self, tokens: &[u32]) -> Result<bool> {
        let Some(&last) = tokens.last() else { return Ok(false) };
        let mut stop = false;
        if let Some(braces) = self.braces {
            for c in self.text(last)?.to_owned().chars() {
                match c {
                    '{' => {
                        self.level += 1;
                        self.opened = true;
                    }
                    '}' => self.level -= 1,
                    _ => continue,
                }
                if self.level <= 0 && (self.opened || braces.start_level > 0) {
                    stop = true;
                }
            }
        }
        if !self.stop_strings.is_empty() && self.stop_string_ends_here(tokens)? {
            stop = true;
        }
        Ok(stop)
    }

    /// transformers' rule: a stop string matches when it ends inside the final token's text, wherever
    /// it starts (in that token, or spanning earlier ones, the prompt's too). Checked after every
    /// token, this catches each stop string at the token that completes it.
    fn stop_string_ends_here(&mut self, tokens: &[u32]) -> Result<bool> {
        let longest = self.stop_strings.iter().map(|s| s.chars().count()).max().unwrap_or(0);
        // The final token's text, preceded by enough earlier text to hold any stop string.
        let final_text: Vec<char> = self.text(tokens[tokens.len() - 1])?.chars().collect();
        let mut before: Vec<char> = Vec::new();
        for &id in tokens[..tokens.len() - 1].iter().rev() {
            if before.len() >= longest {
                break;
            }
            let mut text: Vec<char> = self.text(id)?.chars().collect();
            text.extend(before);
            before = text;
        }
        let start_of_final = before.len();
        let mut window = before;
        window.extend(final_text);
        Ok(self.stop_strings.iter().any(|stop| {
            let stop: Vec<char> = stop.chars().collect();
            // Starts s whose match ends past the final token's first character.
            let first = (start_of_final + 1).saturating_sub(stop.len());
            (first..window.len()).any(|s| window.get(s..s + stop.len()) == Some(stop.as_slice()))
        }))
    }
}
