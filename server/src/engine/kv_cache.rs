//! Per-sequence key/value cache.
//!
//! Layout per layer is position-major, `[positions, n_kv_head, head_dim]`, in plain `Vec`s: a
//! step appends its new positions at the end (amortised O(1)), and attention
//! ([`super::attention`]) reads a layer's history in place. A cache belongs to one sequence
//! *and one adapter version*: entries computed under one adapter are never valid under another
//! (the classic stale-cache bug of hot-swapping servers), so callers keep caches next to the
//! adapter view they were filled with.

#[derive(Debug, Clone, Default)]
struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// Keys and values of every layer for the tokens of one sequence seen so far.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    n_kv_head: usize,
    head_dim: usize,
    len: usize,
}

impl KvCache {
    pub fn new(n_layer: usize, n_kv_head: usize, head_dim: usize) -> Self {
        Self {
            layers: vec![LayerKv::default(); n_layer],
            n_kv_head,
            head_dim,
            len: 0,
        }
    }

    /// Number of positions cached (in every layer, once a forward has completed).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the buffers (their capacity, not just the used part).
    pub fn size_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.k.capacity() + l.v.capacity()) * std::mem::size_of::<f32>())
            .sum()
    }

    /// Appends keys and values `[t, n_kv_head, head_dim]` to `layer`. The cache length itself
    /// advances only in [`Self::advance`], once every layer has been written.
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let kv = &mut self.layers[layer];
        kv.k.extend_from_slice(k);
        kv.v.extend_from_slice(v);
    }

    /// Every key and value written to `layer` so far, `[positions, n_kv_head, head_dim]`.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        let kv = &self.layers[layer];
        (&kv.k, &kv.v)
    }

    /// Marks `t` more positions as filled, after every layer appended them.
    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// An independent cache holding a copy of the first `len` positions (at most `self.len()`),
    /// with room for exactly those: for the prompt-prefix cache, whose entries must not share
    /// buffers with the sequences that later extend them.
    pub fn copy_prefix(&self, len: usize) -> KvCache {
        let len = len.min(self.len);
        let n = len * self.n_kv_head * self.head_dim;
        KvCache {
            layers: self
                .layers
                .iter()
                .map(|l| LayerKv {
                    k: l.k[..n].to_vec(),
                    v: l.v[..n].to_vec(),
                })
                .collect(),
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim,
            len,
        }
    }
}
