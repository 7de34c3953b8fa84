//! The text and bytes of single tokens, for logprobs: OpenAI reports each token as a string
//! plus its UTF-8 `bytes` (a token may hold part of a character, whose string is lossy).

use std::collections::HashMap;
use std::sync::OnceLock;

use shoal_model_shards::tokenizer::Tokenizer;
use tokenizers::decoders::DecoderWrapper;

/// GPT-2's byte-level alphabet, inverted: the character that spells each byte → the byte.
fn byte_level_inverse() -> &'static HashMap<char, u8> {
    static MAP: OnceLock<HashMap<char, u8>> = OnceLock::new();
    MAP.get_or_init(|| {
        let printable =
            |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        let mut map = HashMap::with_capacity(256);
        let mut extra = 0u32;
        for b in 0u32..256 {
            let c = if printable(b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            if let (Some(c), Ok(byte)) = (char::from_u32(c), u8::try_from(b)) {
                map.insert(c, byte);
            }
        }
        map
    })
}

/// Decodes the tokens of one choice into the bytes of each token.
pub(crate) struct TokenText {
    tokenizer: Tokenizer,
    byte_level: bool,
    added: HashMap<u32, String>,
}

impl TokenText {
    /// For `tokenizer`'s vocabulary.
    pub(crate) fn new(tokenizer: &Tokenizer) -> Self {
        let inner = tokenizer.inner();
        let byte_level = matches!(inner.get_decoder(), Some(DecoderWrapper::ByteLevel(_)));
        let added = inner.get_added_tokens_decoder().into_iter().map(|(id, t)| (id, t.content)).collect();
        Self { tokenizer: tokenizer.clone(), byte_level, added }
    }

    /// The bytes token `id` contributes to the text.
    pub(crate) fn bytes(&self, id: u32) -> Vec<u8> {
        if let Some(t) = self.added.get(&id) {
            return t.clone().into_bytes();
        }
        let Some(piece) = self.tokenizer.id_to_token(id) else { return Vec::new() };
        if self.byte_level {
            let inv = byte_level_inverse();
            if let Some(bytes) = piece.chars().map(|c| inv.get(&c).copied()).collect::<Option<Vec<u8>>>() {
                return bytes;
            }
            return piece.into_bytes();
        }
        // SentencePiece: byte-fallback tokens spell one byte, `▁` is a space.
        if let Some(hex) = piece.strip_prefix("<0x").and_then(|r| r.strip_suffix('>'))
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            return vec![b];
        }
        piece.replace('\u{2581}', " ").into_bytes()
    }

    /// The token as a string (lossy when it holds part of a character) and its bytes.
    pub(crate) fn text(&self, id: u32) -> (String, Vec<u8>) {
        let bytes = self.bytes(id);
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bytes_concatenate_to_the_decoded_text() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf_tokenizer/smollm2");
        let tok = Tokenizer::from_hf_dir(&dir).expect("the committed SmolLM2 tokenizer fixture loads");
        let tt = TokenText::new(&tok);
        for text in ["Hello, world!", "  spaces\tand\nlines", "naïve café 日本語 🦀👩‍💻", "<|im_end|> x"]
        {
            let ids = tok.encode(text, false).unwrap();
            let bytes: Vec<u8> = ids.iter().flat_map(|&id| tt.bytes(id)).collect();
            assert_eq!(String::from_utf8(bytes).unwrap(), tok.decode(&ids).unwrap(), "{text:?}");
        }
        // A token that is part of a character: its string is lossy, its bytes are exact.
        let ids = tok.encode("🦀", false).unwrap();
        assert!(ids.len() > 1, "the crab is several byte tokens");
        let (s, b) = tt.text(ids[0]);
        assert!(s.contains('\u{fffd}'));
        assert_eq!(b, &"🦀".as_bytes()[..b.len()]);
    }
}
