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

/// Llama 3's split (also Falcon 3's, Pixtral's): contractions in either case, a letter run with
/// at most one other character in front, numbers in groups of up to three digits, punctuation
/// runs with their line breaks, line-break runs, spaces.
const LLAMA3_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 2's (and StableLM 2's): Llama 3's with every digit on its own.
const QWEN2_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A pre-tokenizer llama.cpp implements, under the `tokenizer.ggml.pre` names it goes by.
struct PreTokenizer {
    names: &'static [&'static str],
    /// Applied in order, each splitting the pieces the previous one produced.
    patterns: &'static [&'static str],
    /// A word that is a token as a whole is that token, whatever the merges would make of it.
    ignore_merges: bool,
    /// Whether the model expects BOS in front of its input when the file does not say.
    add_bos: bool,
}

const PRE_TOKENIZERS: &[PreTokenizer] = &[
    PreTokenizer {
        names: &[
            "smollm",
            "starcoder",
            "refact",
            "command-r",
            "codeshell",
            "exaone",
        ],
        patterns: &[DIGIT_PATTERN, GPT2_PATTERN],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["gpt-2", "mpt", "olmo"],
        patterns: &[GPT2_PATTERN],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &[
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
        ],
        patterns: &[LLAMA3_PATTERN],
        ignore_merges: true,
        add_bos: true,
    },
    PreTokenizer {
        names: &["qwen2", "deepseek-r1-qwen", "stablelm2"],
        patterns: &[QWEN2_PATTERN],
        ignore_merges: false,
        add_bos: false,
    },
];

/// How a `gpt2` vocabulary splits and merges text, from its pre-tokenizer's name.
pub(super) struct PreTokenization {
    pub(super) regexes: Vec<Regex>,
    pub(super) ignore_merges: bool,
    pub(super) add_bos: bool,
}

/// The pre-tokenization `pre_name` stands for; an unknown name is refused with the supported
/// list (a wrong split would silently give the model ids it was not trained on).
pub(super) fn pre_tokenization(pre_name: &str) -> Result<PreTokenization> {
    let Some(pre) = PRE_TOKENIZERS.iter().find(|p| p.names.contains(&pre_name)) else {
        let supported: Vec<&str> = PRE_TOKENIZERS
            .iter()
            .flat_map(|p| p.names)
            .copied()
            .collect();
        return Err(EngineError::Tokenizer(format!(
            "pre-tokenizer `{KEY_PRE}` = `{pre_name}` is not supported; supported: {}",
            supported.join(", ")
        )));
    };
    Ok(PreTokenization {
        regexes: pre
            .patterns
            .iter()
            .map(|p| Regex::new(p).expect("the pre-tokenizer patterns are valid regexes"))
            .collect(),
        ignore_merges: pre.ignore_merges,
        add_bos: pre.add_bos,
    })
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
