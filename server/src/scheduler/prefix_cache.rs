//! Prompt-prefix caching: keys and values of recent prompts, reused by later prompts that start
//! with the same tokens under the same adapter version.
//!
//! Chat prompts share long prefixes (the chat template's default system prompt alone is ~30
//! tokens for SmolLM2), and prefill is the step that delays every running stream, so reusing
//! them cuts both time to first token and the stall others see. An entry is keyed by its
//! tokens *and the exact adapter version* (held by `Arc`, compared by identity, so a freed
//! version's address can never alias a new one): a prefix computed under one version is never
//! served under another, which is the stale-cache bug servers with hot-swapped adapters hit.
//! Training passes (θ ± εz) never come through the scheduler, so they neither read nor fill it.

use std::sync::Arc;

use crate::engine::kv_cache::KvCache;
use crate::engine::lora::AdapterView;

/// Shorter shared prefixes are not worth a copy.
const MIN_REUSED_TOKENS: usize = 8;

struct Entry {
    adapter: Option<Arc<AdapterView>>,
    tokens: Vec<u32>,
    cache: KvCache,
    last_used: u64,
}

pub struct PrefixCache {
    entries: Vec<Entry>,
    max_bytes: usize,
    bytes: usize,
    clock: u64,
}

fn same_adapter(a: &Option<Arc<AdapterView>>, b: &Option<Arc<AdapterView>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    /// A cache holding at most `max_bytes` of keys and values (0 disables it).
    pub fn new(max_bytes: usize) -> Self {
        Self {
            entries: Vec::new(),
            max_bytes,
            bytes: 0,
            clock: 0,
        }
    }

    /// A fresh cache holding the longest cached prefix of `prompt` under `adapter`, leaving at
    /// least one prompt token to feed (the step needs its logits); `None` when nothing useful
    /// is cached.
    pub fn lookup(
        &mut self,
        adapter: &Option<Arc<AdapterView>>,
        prompt: &[u32],
    ) -> Option<KvCache> {
        let limit = prompt.len().saturating_sub(1);
        let best = self
            .entries
            .iter_mut()
            .filter(|e| same_adapter(&e.adapter, adapter))
            .map(|e| (common_prefix(&e.tokens, prompt).min(limit), e))
            .max_by_key(|(len, _)| *len);
        match best {
            Some((len, entry)) if len >= MIN_REUSED_TOKENS => {
                self.clock += 1;
                entry.last_used = self.clock;
                Some(entry.cache.copy_prefix(len))
            }
            _ => None,
        }
    }

    /// Remembers the keys and values of `tokens` (a prompt just prefilled into `cache`).
    pub fn insert(&mut self, adapter: &Option<Arc<AdapterView>>, tokens: &[u32], cache: &KvCache) {
        if tokens.len() < MIN_REUSED_TOKENS || cache.len() < tokens.len() {
            return;
        }
        self.clock += 1;
        if let Some(existing) = self
            .entries
            .iter_mut()
            .find(|e| same_adapter(&e.adapter, adapter) && e.tokens == tokens)
        {
            existing.last_used = self.clock;
            return;
        }
        let copy = cache.copy_prefix(tokens.len());
        let size = copy.size_bytes();
        if size > self.max_bytes {
            return;
        }
        while self.bytes + size > self.max_bytes {
            self.evict_least_recently_used();
        }
        self.bytes += size;
        self.entries.push(Entry {
            adapter: adapter.clone(),
            tokens: tokens.to_vec(),
            cache: copy,
            last_used: self.clock,
        });
    }

    fn evict_least_recently_used(&mut self) {
        if let Some(oldest) = self
            .entries
            .iter()
            .enumerate()
            .min_by_key(|(_, e)| e.last_used)
            .map(|(i, _)| i)
        {
            let entry = self.entries.swap_remove(oldest);
            self.bytes -= entry.cache.size_bytes();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-layer cache whose key at position p is p (so copies can be checked by value).
    fn cache_of(len: usize) -> KvCache {
        let mut cache = KvCache::new(1, 1, 2);
        let values: Vec<f32> = (0..len).flat_map(|p| [p as f32, p as f32]).collect();
        cache.append(0, &values, &values);
        cache.advance(len);
        cache
    }

    fn keys(cache: &KvCache) -> Vec<f32> {
        cache.layer(0).0.to_vec()
    }

    fn view(seed: u64) -> Arc<AdapterView> {
        let dims = adapters::ModelDims {
            n_layer: 1,
            hidden: 4,
            n_head: 1,
            n_kv_head: 1,
            head_dim: 4,
            ffn: 8,
            qk_rows: adapters::QkRowOrder::HuggingFace,
        };
        let lora =
            adapters::LoraAdapter::new_initialized(adapters::LoraConfig::default(), dims, seed)
                .unwrap();
        AdapterView::new(&lora, &dims).unwrap()
    }

    #[test]
    fn the_longest_shared_prefix_is_reused_leaving_one_token_to_feed() {
        let mut prefixes = PrefixCache::new(1 << 20);
        let prompt: Vec<u32> = (0..20).collect();
        prefixes.insert(&None, &prompt, &cache_of(20));
        let mut longer = prompt.clone();
        longer.extend([100, 101]);
        assert_eq!(prefixes.lookup(&None, &longer).unwrap().len(), 20);
        let same = prefixes.lookup(&None, &prompt).unwrap();
        assert_eq!(same.len(), 19, "one prompt token is left to feed");
        assert_eq!(keys(&same)[..4], [0.0, 0.0, 1.0, 1.0]);
        let mut diverging: Vec<u32> = (0..10).collect();
        diverging.extend([7, 7, 7]);
        assert_eq!(prefixes.lookup(&None, &diverging).unwrap().len(), 10);
        let short: Vec<u32> = (0..5).chain([9, 9, 9, 9, 9]).collect();
        assert!(
            prefixes.lookup(&None, &short).is_none(),
            "under the minimum"
        );
    }

    #[test]
    fn entries_are_per_adapter_version_and_independent_copies() {
        let mut prefixes = PrefixCache::new(1 << 20);
        let prompt: Vec<u32> = (0..16).collect();
        let v1 = view(1);
        prefixes.insert(&Some(Arc::clone(&v1)), &prompt, &cache_of(16));
        let v2 = view(1);
        assert!(
            prefixes.lookup(&Some(v2), &prompt).is_none(),
            "same weights, other version"
        );
        assert!(prefixes.lookup(&None, &prompt).is_none(), "the base model");
        let mut hit = prefixes.lookup(&Some(Arc::clone(&v1)), &prompt).unwrap();
        // Extending the copy leaves the cached entry as it was.
        hit.append(0, &[-1.0, -1.0], &[-1.0, -1.0]);
        hit.advance(1);
        let again = prefixes.lookup(&Some(v1), &prompt).unwrap();
        assert_eq!(keys(&again), keys(&cache_of(15)));
    }

    #[test]
    fn least_recently_used_entries_go_first_when_memory_is_full() {
        let entry_bytes = cache_of(16).copy_prefix(16).size_bytes();
        let mut prefixes = PrefixCache::new(2 * entry_bytes);
        let a: Vec<u32> = (0..16).collect();
        let b: Vec<u32> = (100..116).collect();
        let c: Vec<u32> = (200..216).collect();
        prefixes.insert(&None, &a, &cache_of(16));
        prefixes.insert(&None, &b, &cache_of(16));
        assert!(prefixes.lookup(&None, &a).is_some());
        prefixes.insert(&None, &c, &cache_of(16));
        assert!(prefixes.lookup(&None, &a).is_some());
        assert!(
            prefixes.lookup(&None, &b).is_none(),
            "b was least recently used"
        );
        assert!(prefixes.lookup(&None, &c).is_some());
        assert!(prefixes.bytes <= 2 * entry_bytes);
    }
}
