//! SentencePiece (`tokenizer.ggml.model = "llama"`: Llama 1/2, Gemma, Mistral's older files) as
//! llama.cpp tokenizes it: spaces become `▁` (with one in front when `add_space_prefix` says so
//! and the text starts the input or follows a special token), the text starts as one symbol per
//! character, and the adjacent pair whose concatenation is the highest-scoring token (the
//! leftmost among equals) is merged until no pair is a token. A symbol that is not a token
//! falls back to the `<0xXX>` tokens of its bytes.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use candle_core::quantized::gguf_file::Value;

use super::{to_id, TokenKind, NO_TOKEN};
use crate::engine::gguf::Metadata;
use crate::engine::{EngineError, Result};

const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";

/// SentencePiece's stand-in for a space.
pub(super) const SPACE: char = '\u{2581}';

/// A SentencePiece model: every token's score, and the byte tokens of the fallback.
#[derive(Clone)]
pub(super) struct SentencePiece {
    scores: Vec<f32>,
    /// The `<0xXX>` token of each byte, or [`NO_TOKEN`].
    byte_tokens: [u32; 256],
    add_space_prefix: bool,
}

/// A candidate merge of the symbols `left` and `right` into a token of `score`.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Bytes of the merged text, to notice a symbol that changed since the pair was queued.
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bigram {
    /// The heap's top is the highest score, the leftmost pair among equal scores.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// One symbol of the text: a byte range, linked to its neighbours; `len == 0` once merged away.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl SentencePiece {
    pub(super) fn from_gguf(
        meta: &Metadata,
        tokens: &[String],
        kinds: &[TokenKind],
    ) -> Result<Self> {
        let scores = meta
            .array(KEY_SCORES)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::F32(score) => Ok(*score),
                other => Err(EngineError::Metadata {
                    key: KEY_SCORES.into(),
                    reason: format!("entry {i} is {other:?}, not an f32"),
                }),
            })
            .collect::<Result<Vec<f32>>>()?;
        if scores.len() != tokens.len() {
            return Err(EngineError::Metadata {
                key: KEY_SCORES.into(),
                reason: format!("{} scores for {} tokens", scores.len(), tokens.len()),
            });
        }
        let mut byte_tokens = [NO_TOKEN; 256];
        for (i, (text, kind)) in tokens.iter().zip(kinds).enumerate() {
            if let (TokenKind::Byte, Some(byte)) = (kind, byte_of(text)) {
                byte_tokens[usize::from(byte)] = to_id(i);
            }
        }
        let add_space_prefix = match meta.get(KEY_ADD_SPACE_PREFIX) {
            Some(Value::Bool(add)) => *add,
            // llama.cpp's default for SentencePiece vocabularies.
            _ => true,
        };
        Ok(Self {
            scores,
            byte_tokens,
            add_space_prefix,
        })
    }

    /// Appends the tokens of `text`, a piece of input between special tokens; `after_special`:
    /// it starts the input or follows a special token (where the space prefix goes).
    pub(super) fn encode(
        &self,
        ids: &HashMap<String, u32>,
        text: &str,
        after_special: bool,
        out: &mut Vec<u32>,
    ) {
        let mut escaped = String::with_capacity(text.len() + 3);
        if self.add_space_prefix && after_special {
            escaped.push(SPACE);
        }
        escaped.extend(text.chars().map(|c| if c == ' ' { SPACE } else { c }));
        let text = escaped.as_str();
        let mut symbols: Vec<Symbol> = text
            .char_indices()
            .map(|(start, c)| Symbol {
                start,
                len: c.len_utf8(),
                prev: None,
                next: None,
            })
            .collect();
        let n = symbols.len();
        for (i, symbol) in symbols.iter_mut().enumerate() {
            symbol.prev = i.checked_sub(1);
            symbol.next = (i + 1 < n).then_some(i + 1);
        }
        let mut queue = BinaryHeap::new();
        let push_pair = |queue: &mut BinaryHeap<Bigram>, symbols: &[Symbol], left: usize| {
            let Some(right) = symbols[left].next else {
                return;
            };
            let (l, r) = (symbols[left], symbols[right]);
            let merged = &text[l.start..r.start + r.len];
            if let Some(&id) = ids.get(merged) {
                queue.push(Bigram {
                    score: self.scores[id as usize],
                    left,
                    right,
                    len: merged.len(),
                });
            }
        };
        for left in 0..n.saturating_sub(1) {
            push_pair(&mut queue, &symbols, left);
        }
        while let Some(pair) = queue.pop() {
            let (l, r) = (symbols[pair.left], symbols[pair.right]);
            // A pair queued before one of its symbols merged with another is stale.
            if l.len == 0 || r.len == 0 || l.len + r.len != pair.len {
                continue;
            }
            symbols[pair.left].len += r.len;
            symbols[pair.left].next = r.next;
            symbols[pair.right].len = 0;
            if let Some(next) = r.next {
                symbols[next].prev = Some(pair.left);
            }
            if let Some(prev) = l.prev {
                push_pair(&mut queue, &symbols, prev);
            }
            push_pair(&mut queue, &symbols, pair.left);
        }
        let mut at = (n > 0).then_some(0);
        while let Some(i) = at {
            let symbol = symbols[i];
            let piece = &text[symbol.start..symbol.start + symbol.len];
            match ids.get(piece) {
                Some(&id) => out.push(id),
                None => out.extend(
                    piece
                        .bytes()
                        .map(|b| self.byte_tokens[usize::from(b)])
                        .filter(|&id| id != NO_TOKEN),
                ),
            }
            at = symbol.next;
        }
    }
}

/// The byte a `<0xXX>` token stands for.
pub(super) fn byte_of(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}
