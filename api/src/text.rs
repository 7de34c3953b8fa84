//! Turning generated ids into the text a client sees: incremental detokenization and stop
//! strings, with text that might begin a stop string held back until it is decided.

use shoal_model_shards::tokenizer::{IncrementalDecoder, Tokenizer};

/// Assembles a completion's text from generated ids.
pub struct TextAssembler {
    decoder: IncrementalDecoder,
    stops: Vec<String>,
    text: String,
    emitted: usize,
    stopped: bool,
    /// The stop string that ended the text, once one has.
    matched: Option<usize>,
}

impl TextAssembler {
    /// An assembler for `tokenizer`'s ids that ends the text before the first of `stops`.
    pub fn new(tokenizer: &Tokenizer, stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            decoder: tokenizer.incremental_decoder(),
            stops,
            text: String::new(),
            emitted: 0,
            stopped: false,
            matched: None,
        }
    }

    /// Adds one id; returns the text that is now safe to show, and whether a stop string
    /// ended the completion.
    pub fn push(&mut self, id: u32) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        if let Ok(Some(piece)) = self.decoder.push(id) {
            self.text.push_str(&piece);
        }
        self.release(false)
    }

    /// Flushes what the decoder held back; returns the rest of the text.
    pub fn finish(&mut self) -> String {
        if !self.stopped
            && let Ok(tail) = self.decoder.finish()
        {
            self.text.push_str(&tail);
        }
        self.release(true).0
    }

    /// The stop string that ended the text, if one did.
    pub fn matched_stop(&self) -> Option<&str> {
        self.matched.and_then(|i| self.stops.get(i)).map(String::as_str)
    }

    /// The whole text so far (what has been released).
    pub fn text(&self) -> &str {
        &self.text[..self.emitted]
    }

    fn release(&mut self, last: bool) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        // A stop string can only end in text added since the last release, but may start
        // up to its length before it.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.emitted.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        // The earliest match; among matches at one place, the first stop string given.
        let hit = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(k, s)| self.text[from..].find(s.as_str()).map(|i| (from + i, k)))
            .min();
        if let Some((at, k)) = hit {
            self.matched = Some(k);
            let at = at.max(self.emitted);
            let out = self.text[self.emitted..at].to_owned();
            self.text.truncate(at);
            self.emitted = at;
            self.stopped = true;
            return (out, true);
        }
        let mut end = self.text.len();
        if !last {
            // Hold back a suffix that is a prefix of some stop string.
            let hold = self
                .stops
                .iter()
                .map(|s| {
                    (1..s.len().min(self.text.len() + 1))
                        .rev()
                        .find(|&k| s.is_char_boundary(k) && self.text.ends_with(&s[..k]))
                        .unwrap_or(0)
                })
                .max()
                .unwrap_or(0);
            end -= hold;
        }
        let end = end.max(self.emitted);
        let out = self.text[self.emitted..end].to_owned();
        self.emitted = end;
        (out, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> Option<Tokenizer> {
        let p =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf_tokenizer/smollm2");
        Tokenizer::from_hf_dir(&p).ok()
    }

    #[test]
    fn stop_strings_cut_the_text_and_held_text_is_released() {
        let tok = smollm2().expect("the committed SmolLM2 tokenizer fixture loads");
        let ids = tok.encode("Hello world. The end is near.", false).unwrap();
        // No stop: everything comes out, in pieces that concatenate to the text.
        let mut a = TextAssembler::new(&tok, vec![]);
        let mut out: String = ids.iter().map(|&id| a.push(id).0).collect();
        out.push_str(&a.finish());
        assert_eq!(out, "Hello world. The end is near.");
        // A stop string spanning tokens: text before it only, never a piece of it.
        for stop in [" The end", "d. T", "near.", "zzz"] {
            let mut a = TextAssembler::new(&tok, vec!["unused".into(), stop.into()]);
            let mut out = String::new();
            let mut stopped = false;
            for &id in &ids {
                let (piece, s) = a.push(id);
                assert!(!piece.contains(stop));
                out.push_str(&piece);
                if s {
                    stopped = true;
                    break;
                }
            }
            out.push_str(&a.finish());
            let want = "Hello world. The end is near.";
            let want = want.find(stop).map_or(want, |i| &want[..i]);
            assert_eq!(out, want, "stop {stop:?}");
            assert_eq!(stopped, stop != "zzz");
            assert_eq!(a.text(), want);
            assert_eq!(a.matched_stop(), stopped.then_some(stop));
        }
    }
}
