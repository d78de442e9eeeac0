//! Frozen-layer reuse in training: the hidden states entering the first adapted layer, computed
//! once per training example and kept for the job.
//!
//! An adapter that leaves the bottom layers alone (PEFT's `layers_to_transform`, e.g. the top
//! third) makes every row of a MeZO step, θ+εz and θ−εz alike, compute exactly the base model's
//! output below its first adapted layer, and a job sees the same examples step after step. So a
//! job keeps those hidden states per token sequence, and each step runs only the adapted layers
//! ([`super::transformer::Transformer::forward_from`]): the step costs the adapted layers twice instead of
//! every layer twice. Rows of the forward pass do not depend on each other, so a reused row is
//! bit for bit the row the full forward computes.
//!
//! Memory: `hidden` f32 values per token (2.25 KiB for SmolLM2-135M), bounded by one budget that
//! every job shares ([`FrozenStatesBudget`], `training.frozen_states_mb`), given back when the
//! job ends. Sequences that do not fit are recomputed whenever they come up. The first sequences
//! keep their place instead of being evicted for newer ones: a job cycles through its training
//! set, and under that pattern least-recently-used eviction would never hit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::batch::{BatchRow, RowCache};
use super::transformer::Transformer;
use super::Result;

/// The memory all jobs together may keep hidden states in.
#[derive(Debug)]
pub struct FrozenStatesBudget {
    limit_bytes: usize,
    used_bytes: AtomicUsize,
}

impl FrozenStatesBudget {
    pub fn new(limit_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            limit_bytes,
            used_bytes: AtomicUsize::new(0),
        })
    }

    pub fn limit_bytes(&self) -> usize {
        self.limit_bytes
    }

    /// Bytes of hidden states kept by every job now.
    pub fn used_bytes(&self) -> usize {
        self.used_bytes.load(Ordering::Acquire)
    }

    fn try_reserve(&self, bytes: usize) -> bool {
        self.used_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&u| u <= self.limit_bytes)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        self.used_bytes.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// How many tokens' hidden states were reused and how many computed, since the start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReuseCounts {
    pub reused_tokens: u64,
    pub computed_tokens: u64,
}

/// The hidden states of one sequence's tokens `skip..`, entering the kept layer.
#[derive(Debug)]
struct KeptStates {
    skip: usize,
    values: Vec<f32>,
}

/// One job's kept hidden states, all entering the same layer.
#[derive(Debug)]
pub struct FrozenStates {
    budget: Arc<FrozenStatesBudget>,
    layer: usize,
    kept: HashMap<Vec<u32>, KeptStates>,
    held_bytes: usize,
    counts: ReuseCounts,
}

impl FrozenStates {
    pub fn new(budget: Arc<FrozenStatesBudget>) -> Self {
        Self {
            budget,
            layer: 0,
            kept: HashMap::new(),
            held_bytes: 0,
            counts: ReuseCounts::default(),
        }
    }

    /// Bytes this job keeps.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    pub fn counts(&self) -> ReuseCounts {
        self.counts
    }

    /// Bytes every job keeps now, this one included.
    pub fn budget_used_bytes(&self) -> usize {
        self.budget.used_bytes()
    }

    /// The base model's hidden states entering `layer` for the tokens `tokens[skip..]` of each
    /// `(tokens, skip)`, packed in order: `[Σ (len − skip), hidden]`. Each sequence is computed
    /// from position 0 as a row of its own, so the states of `tokens[skip..]` are those the
    /// same tokens have after a cached prefix `tokens[..skip]`.
    pub fn entering(
        &mut self,
        model: &Transformer,
        layer: usize,
        sequences: &[(&[u32], usize)],
    ) -> Result<Tensor> {
        if layer != self.layer {
            self.forget();
            self.layer = layer;
        }
        let hidden = model.config.hidden;
        let is_kept = |kept: &HashMap<Vec<u32>, KeptStates>, (tokens, skip): (&[u32], usize)| {
            kept.get(tokens).is_some_and(|k| k.skip == skip)
        };
        // A MeZO step scores each example under θ+εz and θ−εz: compute each sequence once.
        let mut missing: Vec<(&[u32], usize)> = Vec::new();
        for &(tokens, skip) in sequences {
            if !is_kept(&self.kept, (tokens, skip)) && !missing.contains(&(tokens, skip)) {
                missing.push((tokens, skip));
            }
        }
        let mut unkept: HashMap<(&[u32], usize), KeptStates> = HashMap::new();
        if !missing.is_empty() {
            let rows: Vec<BatchRow<'_>> = missing
                .iter()
                .map(|&(tokens, _)| BatchRow {
                    tokens,
                    cache: RowCache::None,
                    adapter: None,
                    logits: 0..0,
                })
                .collect();
            let computed: Vec<f32> = model
                .hidden_states_entering(&rows, layer)?
                .flatten_all()?
                .to_vec1()?;
            let mut offset = 0;
            for &(tokens, skip) in &missing {
                let row = &computed[offset * hidden..(offset + tokens.len()) * hidden];
                offset += tokens.len();
                let states = KeptStates {
                    skip,
                    values: row[skip * hidden..].to_vec(),
                };
                let bytes = states.values.len() * std::mem::size_of::<f32>();
                if !self.kept.contains_key(tokens) && self.budget.try_reserve(bytes) {
                    self.held_bytes += bytes;
                    self.kept.insert(tokens.to_vec(), states);
                } else {
                    unkept.insert((tokens, skip), states);
                }
            }
        }
        let mut packed = Vec::new();
        let mut n_tokens = 0;
        for &(tokens, skip) in sequences {
            let states = match self.kept.get(tokens).filter(|k| k.skip == skip) {
                Some(states) => states,
                None => &unkept[&(tokens, skip)],
            };
            let len = (tokens.len() - skip) as u64;
            if missing.contains(&(tokens, skip)) {
                self.counts.computed_tokens += len;
            } else {
                self.counts.reused_tokens += len;
            }
            packed.extend_from_slice(&states.values);
            n_tokens += tokens.len() - skip;
        }
        Ok(Tensor::from_vec(packed, (n_tokens, hidden), &Device::Cpu)?)
    }

    fn forget(&mut self) {
        self.kept.clear();
        self.budget.release(self.held_bytes);
        self.held_bytes = 0;
    }
}

impl Drop for FrozenStates {
    fn drop(&mut self) {
        self.budget.release(self.held_bytes);
    }
}
