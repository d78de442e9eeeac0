//! Byte-level BPE: a word's bytes start as the tokens of single bytes (GPT-2's byte-to-character
//! alphabet) and the lowest-ranked merge of two adjacent symbols is applied until none applies.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use candle_core::quantized::gguf_file::Value;

use fancy_regex::Regex;

use super::{KEY_MERGES, NO_TOKEN};
use crate::engine::gguf::Metadata;
use crate::engine::{EngineError, Result};

/// A merge rule, keyed by the ids of its two halves.
#[derive(Clone, Copy)]
pub(super) struct Merge {
    rank: u32,
    merged: u32,
}

/// A merge that BPE could apply to two adjacent symbols. The derived order (rank, then
/// position) is the order merges are applied in.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Candidate {
    rank: u32,
    left: usize,
    left_id: u32,
    right_id: u32,
    merged: u32,
}

/// A byte-level BPE model: the merges, the tokens of single bytes, the pre-tokenizer.
#[derive(Clone)]
pub(super) struct Bpe {
    pub(super) merges: HashMap<(u32, u32), Merge>,
    /// The token of each single byte, the starting symbols of BPE, or [`NO_TOKEN`].
    pub(super) byte_tokens: [u32; 256],
    pub(super) pre_name: String,
    /// Applied in order, each splitting the pieces the previous one produced.
    pub(super) pre_regexes: Vec<Regex>,
    /// A word that is a token as a whole is that token (Llama 3), not what merges make of it.
    pub(super) ignore_merges: bool,
    /// GPT-2's byte-to-character alphabet, in which the vocabulary stores whole words.
    pub(super) alphabet: Box<[char; 256]>,
    /// Whether the model expects BOS when the file does not say (llama.cpp's default for the
    /// pre-tokenizer).
    pub(super) add_bos: bool,
}

impl Bpe {
    /// Byte-level BPE of one word: start from one symbol per byte and repeatedly apply the
    /// lowest-ranked merge, leftmost first on ties. A heap of candidate pairs keeps long words
    /// at O(n log n); a candidate is stale once either of its symbols has changed.
    pub(super) fn encode_word(&self, ids: &HashMap<String, u32>, word: &[u8], out: &mut Vec<u32>) {
        if self.ignore_merges {
            let as_stored: String = word
                .iter()
                .map(|b| self.alphabet[usize::from(*b)])
                .collect();
            if let Some(&id) = ids.get(&as_stored) {
                out.push(id);
                return;
            }
        }
        const NONE: usize = usize::MAX;
        let n = word.len();
        let mut symbols: Vec<u32> = word
            .iter()
            .map(|b| self.byte_tokens[usize::from(*b)])
            .collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.checked_sub(1).unwrap_or(NONE)).collect();
        let mut next: Vec<usize> = (1..=n).map(|i| if i < n { i } else { NONE }).collect();
        let mut alive = vec![true; n];
        // A min-heap: the lowest rank first, the leftmost on ties.
        let mut heap: BinaryHeap<Reverse<Candidate>> = BinaryHeap::new();
        let candidate = |symbols: &[u32], left: usize, right: usize| {
            let (left_id, right_id) = (symbols[left], symbols[right]);
            self.merges.get(&(left_id, right_id)).map(|m| {
                Reverse(Candidate {
                    rank: m.rank,
                    left,
                    left_id,
                    right_id,
                    merged: m.merged,
                })
            })
        };
        for left in 0..n.saturating_sub(1) {
            heap.extend(candidate(&symbols, left, left + 1));
        }
        while let Some(Reverse(c)) = heap.pop() {
            let (left, right) = (c.left, next[c.left]);
            if !alive[left]
                || right == NONE
                || symbols[left] != c.left_id
                || symbols[right] != c.right_id
            {
                continue;
            }
            symbols[left] = c.merged;
            alive[right] = false;
            next[left] = next[right];
            if next[left] != NONE {
                prev[next[left]] = left;
                heap.extend(candidate(&symbols, left, next[left]));
            }
            if prev[left] != NONE {
                heap.extend(candidate(&symbols, prev[left], left));
            }
        }
        let mut i = if n == 0 { NONE } else { 0 };
        while i != NONE {
            if symbols[i] != NO_TOKEN {
                out.push(symbols[i]);
            }
            i = next[i];
        }
    }
}

/// GPT-2's reversible map from bytes to printable characters: printable Latin-1 bytes map to
/// themselves and the rest to U+0100 onwards, so every token is a printable string.
pub(super) fn byte_to_unicode() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut map = ['\0'; 256];
    let mut shifted = 256u32;
    for b in 0..=255u8 {
        map[usize::from(b)] = if printable(b) {
            char::from(b)
        } else {
            let c = char::from_u32(shifted).expect("U+0100..U+0143 are characters");
            shifted += 1;
            c
        };
    }
    map
}

/// Merge rules `"left right"` ranked by position. A rule whose halves or result are not
/// vocabulary entries can never yield a token and is dropped (and counted in the log).
pub(super) fn read_merges(
    meta: &Metadata,
    ids: &HashMap<String, u32>,
) -> Result<HashMap<(u32, u32), Merge>> {
    let entries = meta.array(KEY_MERGES)?;
    let mut merges = HashMap::with_capacity(entries.len());
    let mut unusable = 0usize;
    for (rank, entry) in entries.iter().enumerate() {
        let Value::String(rule) = entry else {
            return Err(EngineError::Metadata {
                key: KEY_MERGES.into(),
                reason: format!("entry {rank} is {entry:?}, not a string"),
            });
        };
        // The separator is the first space after the first character: a half may itself be
        // a space in vocabularies that do not byte-map it.
        let first_len = rule.chars().next().map_or(0, char::len_utf8);
        let Some(space) = rule[first_len..].find(' ').map(|at| at + first_len) else {
            return Err(EngineError::Metadata {
                key: KEY_MERGES.into(),
                reason: format!("entry {rank} `{rule}` is not two space-separated halves"),
            });
        };
        let (left, right) = (&rule[..space], &rule[space + 1..]);
        let merged = format!("{left}{right}");
        let rank = u32::try_from(rank).map_err(|_| EngineError::Metadata {
            key: KEY_MERGES.into(),
            reason: "more than u32::MAX merges".into(),
        })?;
        match (ids.get(left), ids.get(right), ids.get(merged.as_str())) {
            (Some(&l), Some(&r), Some(&m)) => {
                // A repeated pair keeps its first (best) rank.
                merges.entry((l, r)).or_insert(Merge { rank, merged: m });
            }
            _ => unusable += 1,
        }
    }
    if unusable > 0 {
        tracing::warn!(
            "{unusable} of {} BPE merges name tokens missing from the vocabulary and are ignored",
            entries.len()
        );
    }
    Ok(merges)
}
