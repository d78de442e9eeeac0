//! The shape of work the forward pass accepts: a packed batch of rows.
//!
//! Rows of different lengths are concatenated token-wise (no padding): every matrix product runs
//! once over all tokens of all rows, and only attention is done row by row. Each row says which
//! cache it continues, which adapter view it runs under, and at which of its positions it wants
//! logits (the output projection is by far the largest matrix, so it runs only where needed).

use std::ops::Range;

use super::kv_cache::KvCache;
use super::lora::AdapterView;

/// What a row attends to before its own tokens, and whether its keys/values are kept.
pub enum RowCache<'a> {
    /// No history: the row's tokens start at position 0 and nothing is kept.
    None,
    /// Continue this cache and append the row's keys/values to it (prefill and decode).
    Append(&'a mut KvCache),
    /// Attend to this cache as a read-only prefix; the row's own keys/values are discarded.
    /// Used to score several continuations of one prompt without copying its cache.
    Prefix(&'a KvCache),
}

impl RowCache<'_> {
    /// Number of positions before the row's first token.
    pub fn prefix_len(&self) -> usize {
        match self {
            RowCache::None => 0,
            RowCache::Append(cache) => cache.len(),
            RowCache::Prefix(cache) => cache.len(),
        }
    }
}

/// One row of a packed batch.
pub struct BatchRow<'a> {
    pub tokens: &'a [u32],
    pub cache: RowCache<'a>,
    pub adapter: Option<&'a AdapterView>,
    /// Positions (indices into `tokens`) whose next-token logits are wanted.
    pub logits: Range<usize>,
}

impl<'a> BatchRow<'a> {
    /// A row that wants logits for its last token only (prefill before generation, decode).
    pub fn last_logits(
        tokens: &'a [u32],
        cache: RowCache<'a>,
        adapter: Option<&'a AdapterView>,
    ) -> Self {
        let n = tokens.len();
        Self {
            tokens,
            cache,
            adapter,
            logits: n.saturating_sub(1)..n,
        }
    }

    /// A row that wants logits at every position (teacher-forced losses, prompt log-probs).
    pub fn all_logits(
        tokens: &'a [u32],
        cache: RowCache<'a>,
        adapter: Option<&'a AdapterView>,
    ) -> Self {
        Self {
            tokens,
            cache,
            adapter,
            logits: 0..tokens.len(),
        }
    }
}

/// Splits items of lengths `lens` into consecutive chunks of at most `budget` total tokens (at
/// least one item each, so an item longer than the budget runs alone).
pub fn chunks_by_budget(
    lens: impl Iterator<Item = usize>,
    budget: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut chunks = Vec::new();
    let (mut start, mut used, mut i) = (0, 0, 0);
    for len in lens {
        if i > start && used + len > budget {
            chunks.push(start..i);
            start = i;
            used = 0;
        }
        used += len;
        i += 1;
    }
    if i > start {
        chunks.push(start..i);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::chunks_by_budget;

    #[test]
    fn chunks_respect_the_budget_but_never_split_an_item() {
        let chunks = chunks_by_budget([3, 3, 3, 10, 1].into_iter(), 6);
        assert_eq!(chunks, vec![0..2, 2..3, 3..4, 4..5]);
        assert!(chunks_by_budget(std::iter::empty(), 6).is_empty());
    }
}
