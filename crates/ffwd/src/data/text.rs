//! Text for the language model: a character-level tokenizer and the embedded tiny-shakespeare
//! corpus (public domain; see `assets/tinyshakespeare.md`).

use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

static SHAKESPEARE_GZ: &[u8] = include_bytes!("../../assets/tinyshakespeare.txt.gz");

/// The embedded tiny-shakespeare text (1,115,394 characters).
pub fn tiny_shakespeare() -> Result<String> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(SHAKESPEARE_GZ).read_to_string(&mut text).map_err(|e| Error::format("<embedded tiny-shakespeare>", e.to_string()))?;
    Ok(text)
}

/// Reads a UTF-8 text file (a training corpus).
pub fn read_text(path: &std::path::Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    text_from_bytes(bytes, &path.display().to_string())
}

/// The text of a file's bytes: UTF-8 and not empty, else an error naming `name`.
pub fn text_from_bytes(bytes: Vec<u8>, name: &str) -> Result<String> {
    let text = String::from_utf8(bytes).map_err(|e| Error::format(name, format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to())))?;
    if text.is_empty() {
        return Err(Error::format(name, "empty text"));
    }
    Ok(text)
}

/// A character-level vocabulary: token `i` is the `i`-th distinct character of the training
/// text in sorted order. Characters outside it are refused at encoding time (an error that
/// names the character), not mapped to a stand-in. Deserialising checks the order (a
/// checkpoint's vocabulary must be sorted and without duplicates).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "TokenizerRepr")]
pub struct CharTokenizer {
    chars: Vec<char>,
}

#[derive(Deserialize)]
struct TokenizerRepr {
    chars: Vec<char>,
}

impl TryFrom<TokenizerRepr> for CharTokenizer {
    type Error = Error;
    fn try_from(r: TokenizerRepr) -> Result<Self> {
        CharTokenizer::from_chars(r.chars)
    }
}

impl CharTokenizer {
    /// The vocabulary of `text`; an empty text is an error.
    pub fn from_text(text: &str) -> Result<Self> {
        let mut chars: Vec<char> = text.chars().collect();
        if chars.is_empty() {
            return Err(Error::Invalid("text is empty: nothing to build a vocabulary from".into()));
        }
        chars.sort_unstable();
        chars.dedup();
        Ok(CharTokenizer { chars })
    }

    /// A vocabulary from its characters in token order (as stored in a checkpoint).
    pub fn from_chars(chars: Vec<char>) -> Result<Self> {
        let mut sorted = chars.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if chars.is_empty() || sorted != chars {
            return Err(Error::Invalid("vocabulary must be non-empty, sorted and without duplicates".into()));
        }
        Ok(CharTokenizer { chars })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.chars.len()
    }

    /// Never true (a vocabulary has at least one character).
    pub fn is_empty(&self) -> bool {
        self.chars.is_empty()
    }

    /// The characters in token order.
    pub fn chars(&self) -> &[char] {
        &self.chars
    }

    /// Token ids of `text`; an unknown character is an error naming it and its position.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.chars()
            .enumerate()
            .map(|(i, c)| {
                self.chars
                    .binary_search(&c)
                    .map(|t| t as u32)
                    .map_err(|_| Error::Invalid(format!("character {c:?} at position {i} is not in the model's vocabulary of {} characters", self.chars.len())))
            })
            .collect()
    }

    /// Text of token ids (ids out of range become U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter().map(|&i| self.chars.get(i as usize).copied().unwrap_or('\u{FFFD}')).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_unknown_characters() {
        let t = CharTokenizer::from_text("hello world").unwrap();
        assert_eq!(t.len(), 8);
        let ids = t.encode("low").unwrap();
        assert_eq!(t.decode(&ids), "low");
        let e = t.encode("hex").unwrap_err().to_string();
        assert!(e.contains("'x'") && e.contains("position 2"), "{e}");
        assert!(CharTokenizer::from_text("").is_err());
        assert!(CharTokenizer::from_chars(vec!['b', 'a']).is_err());
    }

    #[test]
    fn embedded_corpus_is_tiny_shakespeare() {
        let text = tiny_shakespeare().unwrap();
        assert_eq!(text.chars().count(), 1_115_394);
        assert_eq!(CharTokenizer::from_text(&text).unwrap().len(), 65);
    }
}
