//! Scoring: the log-probability of given continuation tokens after a prompt, for a batch of
//! examples, each under its own adapter view. This is what classification losses, teacher-forced
//! completion losses and prompt log-probs (`echo` + `logprobs`) are made of.
//!
//! Work sharing: an example with several continuations computes its prompt once (phase 1, with
//! a key/value cache), then runs every continuation as a row that reads that cache as a read-only
//! prefix (phase 2). A continuation's first token is scored from the prompt's last position, so
//! single-token continuations (" positive" / " negative") need no phase 2 at all. Logits are
//! projected only at scored positions. [`score_continuations_reference`] is the plain twin that
//! runs every (prompt + continuation) as its own full row; a test holds the two equal.
//!
//! Training scores the same examples step after step; [`score_continuations_reusing`] starts
//! both phases at the lowest adapted layer, from hidden states kept per example
//! ([`super::frozen_layers`]).

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::Tensor;

use super::batch::{BatchRow, RowCache};
use super::frozen_layers::FrozenStates;
use super::kv_cache::KvCache;
use super::lora::AdapterView;
use super::transformer::{log_softmax, Start, Transformer};
use super::{EngineError, Result};

/// One example to score: a prompt and the continuations to score after it.
#[derive(Debug, Clone, Copy)]
pub struct ScoreItem<'a> {
    pub prompt: &'a [u32],
    pub continuations: &'a [Vec<u32>],
    pub adapter: Option<&'a AdapterView>,
}

/// `[item][continuation][token]` log-probabilities.
pub type ContinuationLogprobs = Vec<Vec<Vec<f32>>>;

/// A training row that owns its tokens: a prompt and its continuations under one adapter (θ+εz
/// or θ−εz of a MeZO step, or θ for a held-out evaluation), as a training run's forward passes
/// carry them to wherever they run.
pub struct ScoreRow {
    pub prompt: Vec<u32>,
    pub continuations: Vec<Vec<u32>>,
    pub adapter: Arc<AdapterView>,
}

impl ScoreRow {
    /// Tokens this row puts through the forward pass.
    pub fn tokens(&self) -> usize {
        self.prompt.len() + self.continuations.iter().map(Vec::len).sum::<usize>()
    }

    fn item(&self) -> ScoreItem<'_> {
        ScoreItem {
            prompt: &self.prompt,
            continuations: &self.continuations,
            adapter: Some(&self.adapter),
        }
    }
}

/// Scores `rows` in one packed forward, from the run's kept hidden states when `frozen` is given
/// ([`score_continuations_reusing`]), else from the embeddings.
pub fn score_rows(
    model: &Transformer,
    rows: &[ScoreRow],
    frozen: Option<&Mutex<FrozenStates>>,
) -> Result<ContinuationLogprobs> {
    let items: Vec<ScoreItem<'_>> = rows.iter().map(ScoreRow::item).collect();
    match frozen {
        Some(frozen) => {
            let mut frozen = frozen.lock().unwrap_or_else(PoisonError::into_inner);
            score_continuations_reusing(model, &items, &mut frozen)
        }
        None => score_continuations(model, &items),
    }
}

fn validate(items: &[ScoreItem<'_>]) -> Result<()> {
    for (i, item) in items.iter().enumerate() {
        if item.prompt.is_empty() {
            return Err(EngineError::InvalidRequest(format!(
                "item {i}: the prompt is empty; scoring needs at least one prompt token"
            )));
        }
        if let Some(c) = item.continuations.iter().position(Vec::is_empty) {
            return Err(EngineError::InvalidRequest(format!(
                "item {i}: continuation {c} is empty"
            )));
        }
    }
    Ok(())
}

/// Picks `targets[k]`'s log-prob from row `k` of `logits` (`[targets.len(), vocab]`).
fn gather_logprobs(logits: &Tensor, targets: &[u32]) -> Result<Vec<f32>> {
    let lp = log_softmax(logits)?;
    let rows: Vec<Vec<f32>> = lp.to_vec2()?;
    Ok(rows
        .iter()
        .zip(targets)
        .map(|(row, &t)| row[t as usize])
        .collect())
}

/// Scores every continuation of every item, sharing each prompt's computation.
pub fn score_continuations(
    model: &Transformer,
    items: &[ScoreItem<'_>],
) -> Result<ContinuationLogprobs> {
    score(model, items, None)
}

/// [`score_continuations`], running only the layers from the lowest one any item's adapter
/// changes, on hidden states taken from (or computed into) `frozen`.
pub fn score_continuations_reusing(
    model: &Transformer,
    items: &[ScoreItem<'_>],
    frozen: &mut FrozenStates,
) -> Result<ContinuationLogprobs> {
    score(model, items, Some(frozen))
}

/// Where both phases start: at the lowest adapted layer when states are kept, else at the
/// embeddings. A row without an adapter is the base model in every layer.
fn start_layer(
    model: &Transformer,
    items: &[ScoreItem<'_>],
    frozen: Option<&FrozenStates>,
) -> usize {
    match frozen {
        None => 0,
        Some(_) => items
            .iter()
            .map(|item| {
                item.adapter
                    .map_or(model.config.n_layer, |view| view.first_adapted_layer())
            })
            .min()
            .unwrap_or(0),
    }
}

/// The start of a forward pass over `sequences` (`(tokens, skip)`: the rows' tokens are
/// `tokens[skip..]`, after a cached prefix `tokens[..skip]`).
fn start(
    model: &Transformer,
    layer: usize,
    frozen: &mut Option<&mut FrozenStates>,
    sequences: &[(&[u32], usize)],
) -> Result<Start> {
    Ok(match frozen {
        Some(frozen) if layer > 0 => Start::Layer {
            layer,
            hidden: frozen.entering(model, layer, sequences)?,
        },
        _ => Start::Embeddings,
    })
}

fn score(
    model: &Transformer,
    items: &[ScoreItem<'_>],
    mut frozen: Option<&mut FrozenStates>,
) -> Result<ContinuationLogprobs> {
    validate(items)?;
    let layer = start_layer(model, items, frozen.as_deref());
    let c = &model.config;
    let needs_prefix: Vec<bool> = items
        .iter()
        .map(|item| item.continuations.iter().any(|cont| cont.len() > 1))
        .collect();
    let mut caches: Vec<Option<KvCache>> = needs_prefix
        .iter()
        .map(|&needed| needed.then(|| KvCache::new(c.n_layer, c.n_kv_head, c.head_dim)))
        .collect();

    // Phase 1: each prompt once; logits at its last position score every first token.
    let mut rows: Vec<BatchRow<'_>> = items
        .iter()
        .zip(caches.iter_mut())
        .map(|(item, cache)| {
            let cache = match cache {
                Some(cache) => RowCache::Append(cache),
                None => RowCache::None,
            };
            BatchRow::last_logits(item.prompt, cache, item.adapter)
        })
        .collect();
    let prompts: Vec<(&[u32], usize)> = items.iter().map(|item| (item.prompt, 0)).collect();
    let phase_1_start = start(model, layer, &mut frozen, &prompts)?;
    let last_logits = model.forward_from(&mut rows, phase_1_start)?;
    drop(rows);
    let mut out: ContinuationLogprobs = Vec::with_capacity(items.len());
    for (item, logits) in items.iter().zip(&last_logits) {
        let logits = logits
            .as_ref()
            .expect("phase-1 rows request their last logits");
        let lp: Vec<f32> = log_softmax(logits)?.squeeze(0)?.to_vec1()?;
        out.push(
            item.continuations
                .iter()
                .map(|cont| vec![lp[cont[0] as usize]])
                .collect(),
        );
    }

    // Phase 2: the rest of each longer continuation, reading its prompt's cache.
    let mut rows = Vec::new();
    let mut owners = Vec::new();
    // With kept states, each row's hidden states come from its prompt and inputs run alone.
    let mut sequences: Vec<Vec<u32>> = Vec::new();
    for (i, (item, cache)) in items.iter().zip(&caches).enumerate() {
        let Some(cache) = cache else { continue };
        for (j, cont) in item.continuations.iter().enumerate() {
            if cont.len() > 1 {
                let inputs = &cont[..cont.len() - 1];
                rows.push(BatchRow::all_logits(
                    inputs,
                    RowCache::Prefix(cache),
                    item.adapter,
                ));
                owners.push((i, j));
                if frozen.is_some() {
                    sequences.push(item.prompt.iter().chain(inputs).copied().collect());
                }
            }
        }
    }
    if rows.is_empty() {
        return Ok(out);
    }
    let sequences: Vec<(&[u32], usize)> = sequences
        .iter()
        .zip(&owners)
        .map(|(tokens, &(i, _))| (tokens.as_slice(), items[i].prompt.len()))
        .collect();
    let phase_2_start = start(model, layer, &mut frozen, &sequences)?;
    let logits = model.forward_from(&mut rows, phase_2_start)?;
    for ((i, j), logits) in owners.into_iter().zip(logits) {
        let cont = &items[i].continuations[j];
        let logits = logits.expect("phase-2 rows request logits");
        out[i][j].extend(gather_logprobs(&logits, &cont[1..])?);
    }
    Ok(out)
}

/// The plain twin of [`score_continuations`]: each (prompt + continuation) is one full row with
/// no cache sharing. Slower; used to check the fast path.
pub fn score_continuations_reference(
    model: &Transformer,
    items: &[ScoreItem<'_>],
) -> Result<ContinuationLogprobs> {
    validate(items)?;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let mut per_item = Vec::with_capacity(item.continuations.len());
        for cont in item.continuations {
            let tokens: Vec<u32> = item.prompt.iter().chain(cont).copied().collect();
            let p = item.prompt.len();
            let mut rows = [BatchRow {
                tokens: &tokens,
                cache: RowCache::None,
                adapter: item.adapter,
                logits: p - 1..tokens.len() - 1,
            }];
            let logits = model
                .forward(&mut rows)?
                .remove(0)
                .expect("logits requested");
            per_item.push(gather_logprobs(&logits, cont)?);
        }
        out.push(per_item);
    }
    Ok(out)
}

/// Mean log-prob of each continuation's tokens: the paper's classification score.
pub fn mean_logprobs(scores: &ContinuationLogprobs) -> Vec<Vec<f32>> {
    scores
        .iter()
        .map(|item| {
            item.iter()
                .map(|lp| lp.iter().sum::<f32>() / lp.len() as f32)
                .collect()
        })
        .collect()
}
