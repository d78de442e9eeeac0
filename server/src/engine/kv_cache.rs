//! Per-sequence key/value cache.
//!
//! Layout per layer is `[n_kv_head, capacity, head_dim]`: attention reads a head's keys as one
//! strided matrix without copying, and a decode step appends in place (`slice_set`) instead of
//! concatenating the whole history again. Capacity doubles when full, so appends are amortised
//! O(1). A cache belongs to one sequence *and one adapter version*: entries computed under one
//! adapter are never valid under another (the classic stale-cache bug of hot-swapping servers),
//! so callers keep caches next to the adapter view they were filled with.

use candle_core::{DType, Device, Tensor};

use super::Result;

#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

/// Keys and values of every layer for the tokens of one sequence seen so far.
///
/// Not `Clone` on purpose: a clone would share the buffers that `append` writes in place.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    n_kv_head: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
}

impl KvCache {
    pub fn new(n_layer: usize, n_kv_head: usize, head_dim: usize) -> Result<Self> {
        let empty = Tensor::zeros((n_kv_head, 0, head_dim), DType::F32, &Device::Cpu)?;
        Ok(Self {
            layers: (0..n_layer)
                .map(|_| LayerKv {
                    k: empty.clone(),
                    v: empty.clone(),
                })
                .collect(),
            n_kv_head,
            head_dim,
            capacity: 0,
            len: 0,
        })
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the buffers (capacity, not just the used part).
    pub fn size_bytes(&self) -> usize {
        2 * self.layers.len() * self.n_kv_head * self.capacity * self.head_dim * 4
    }

    /// The cached keys and values of `layer`, `[n_kv_head, len, head_dim]` each (views).
    pub fn view(&self, layer: usize) -> Result<(Tensor, Tensor)> {
        let kv = &self.layers[layer];
        Ok((kv.k.narrow(1, 0, self.len)?, kv.v.narrow(1, 0, self.len)?))
    }

    /// Writes `k`, `v` (`[n_kv_head, t, head_dim]`) at positions `len..len + t` of `layer` and
    /// returns that layer's keys and values up to and including them. The cache length itself
    /// advances only in [`Self::advance`], once every layer has been written.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(1)?;
        self.reserve(self.len + t)?;
        let kv = &self.layers[layer];
        kv.k.slice_set(&k.contiguous()?, 1, self.len)?;
        kv.v.slice_set(&v.contiguous()?, 1, self.len)?;
        Ok((
            kv.k.narrow(1, 0, self.len + t)?,
            kv.v.narrow(1, 0, self.len + t)?,
        ))
    }

    /// Marks `t` more positions as filled, after every layer appended them.
    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Forgets positions from `len` on (e.g. to re-use a shared prompt prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    fn reserve(&mut self, needed: usize) -> Result<()> {
        if needed <= self.capacity {
            return Ok(());
        }
        let capacity = needed.max(self.capacity * 2).max(16);
        for kv in &mut self.layers {
            let shape = (self.n_kv_head, capacity, self.head_dim);
            let k = Tensor::zeros(shape, DType::F32, &Device::Cpu)?;
            let v = Tensor::zeros(shape, DType::F32, &Device::Cpu)?;
            if self.len > 0 {
                k.slice_set(&kv.k.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                v.slice_set(&kv.v.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
            }
            *kv = LayerKv { k, v };
        }
        self.capacity = capacity;
        Ok(())
    }
}
