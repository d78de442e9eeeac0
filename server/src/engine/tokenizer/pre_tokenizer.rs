//! Pre-tokenization: the text between special tokens is split into words by the regexes that
//! `tokenizer.ggml.pre` names, as llama.cpp splits it; BPE then merges within each word.

use fancy_regex::Regex;

use super::bpe::Bpe;
use super::KEY_PRE;
use crate::engine::{EngineError, Result};

/// GPT-2's word-splitting regex. llama.cpp writes it without the final `|\s+` and instead
/// keeps unmatched gaps as words of their own; both split every text identically.
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Isolates every digit, so numbers are tokenized digit by digit.
const DIGIT_PATTERN: &str = r"\p{N}";

/// `tokenizer.ggml.pre` values that llama.cpp pre-tokenizes with [`DIGIT_PATTERN`] and then
/// [`GPT2_PATTERN`].
const DIGITS_THEN_GPT2: &[&str] = &[
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
];

/// `tokenizer.ggml.pre` values that llama.cpp pre-tokenizes with [`GPT2_PATTERN`] alone.
const GPT2_ONLY: &[&str] = &["gpt-2", "mpt", "olmo"];

/// The regexes of pre-tokenizer `pre_name`, applied in order; an unknown name is refused with
/// the supported list (a wrong split would silently give the model ids it was not trained on).
pub(super) fn pre_tokenizer_regexes(pre_name: &str) -> Result<Vec<Regex>> {
    let patterns: &[&str] = if DIGITS_THEN_GPT2.contains(&pre_name) {
        &[DIGIT_PATTERN, GPT2_PATTERN]
    } else if GPT2_ONLY.contains(&pre_name) {
        &[GPT2_PATTERN]
    } else {
        return Err(EngineError::Tokenizer(format!(
            "pre-tokenizer `{KEY_PRE}` = `{pre_name}` is not supported; supported: {}",
            [DIGITS_THEN_GPT2, GPT2_ONLY].concat().join(", ")
        )));
    };
    Ok(patterns
        .iter()
        .map(|p| Regex::new(p).expect("the pre-tokenizer patterns are valid regexes"))
        .collect())
}

impl Bpe {
    /// Splits text into the words BPE runs on: each regex splits the previous pieces further,
    /// and text between matches stays a word of its own (llama.cpp's `unicode_regex_split`).
    pub(super) fn pre_tokenize<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut pieces = vec![text];
        for regex in &self.pre_regexes {
            let mut split = Vec::with_capacity(pieces.len() * 2);
            for piece in pieces {
                let mut last = 0;
                for found in regex.find_iter(piece) {
                    let m = match found {
                        Ok(m) => m,
                        Err(e) => {
                            // Only a backtracking limit can fail here; the rest of the piece
                            // then stays one word, which BPE still tokenizes losslessly.
                            tracing::warn!(
                                "pre-tokenizer regex gave up on a {} byte piece: {e}",
                                piece.len()
                            );
                            break;
                        }
                    };
                    if m.start() > last {
                        split.push(&piece[last..m.start()]);
                    }
                    if m.end() > m.start() {
                        split.push(m.as_str());
                    }
                    last = m.end();
                }
                if last < piece.len() {
                    split.push(&piece[last..]);
                }
            }
            pieces = split;
        }
        pieces
    }
}
