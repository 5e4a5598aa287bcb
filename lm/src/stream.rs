//! Streaming detokenization and stop strings.
//!
//! Text is released only when it ends on a whole character (a byte-fallback or byte-level token
//! can carry half of one), and is held back while it could still be the start of a stop string,
//! so a stop string never reaches the client.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    /// Tokens before the stream (left context), then the stream's own.
    ids: Vec<u32>,
    /// How many of `ids` are left context, and the text they decode to.
    context: usize,
    context_text: String,
    /// Decoded text of `ids` so far (whole characters only).
    text: String,
    /// Bytes of `text` already released.
    released: usize,
    stops: Vec<String>,
    stopped: bool,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer, stop_strings: &[String]) -> Self {
        Self::after(tokenizer, stop_strings, None)
    }

    /// A stream that continues after token `before`: its text is decoded in that context, so a
    /// decoder that strips a leading space at the start of a text (SentencePiece) keeps the
    /// space a continuation begins with.
    pub fn after(tokenizer: &'a Tokenizer, stop_strings: &[String], before: Option<u32>) -> Self {
        let stops = stop_strings
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect();
        let ids: Vec<u32> = before.into_iter().collect();
        let context_text = tokenizer.decode(&ids, true).unwrap_or_default();
        Self {
            tokenizer,
            context: ids.len(),
            context_text,
            ids,
            text: String::new(),
            released: 0,
            stops,
            stopped: false,
        }
    }

    /// Adds a token; returns the newly releasable text (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        self.ids.push(id);
        let decoded = match self.tokenizer.decode(&self.ids, true)? {
            // The context decoded on its own is a prefix of the whole (it can fail to be when
            // the context ends in half a character: then the stream stands alone).
            d if d.starts_with(&self.context_text) => d[self.context_text.len()..].to_string(),
            _ => self.tokenizer.decode(&self.ids[self.context..], true)?,
        };
        if decoded.ends_with('\u{FFFD}') {
            return Ok(String::new()); // a character is still incomplete
        }
        self.text = decoded;
        if let Some(cut) = self
            .stops
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            self.text.truncate(cut);
            return Ok(self.release(cut));
        }
        let hold = self
            .stops
            .iter()
            .map(|s| partial_suffix(&self.text, s))
            .max()
            .unwrap_or(0);
        Ok(self.release(self.text.len() - hold))
    }

    fn release(&mut self, upto: usize) -> String {
        if upto <= self.released {
            return String::new();
        }
        let out = self.text[self.released..upto].to_string();
        self.released = upto;
        out
    }

    /// Whether a stop string appeared.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Releases what was held back at the end of generation (an unfinished stop-string prefix).
    pub fn finish(&mut self) -> String {
        let end = self.text.len();
        self.release(end)
    }

    /// All text so far, stop string excluded.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`, on a char boundary.
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n)
                && stop.is_char_boundary(n)
                && text.ends_with(&stop[..n])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::partial_suffix;

    #[test]
    fn holds_back_possible_stop_prefixes() {
        assert_eq!(partial_suffix("hello wor", "world!"), 3);
        assert_eq!(partial_suffix("hello", "xyz"), 0);
        assert_eq!(partial_suffix("ab", "abc"), 2);
        assert_eq!(partial_suffix("Пар", "ариж"), "ар".len());
    }
}
