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

use candle_core::Tensor;

use super::batch::{BatchRow, RowCache};
use super::kv_cache::KvCache;
use super::llama::{log_softmax, Llama};
use super::lora::AdapterView;
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
pub fn score_continuations(model: &Llama, items: &[ScoreItem<'_>]) -> Result<ContinuationLogprobs> {
    validate(items)?;
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
    let last_logits = model.forward(&mut rows)?;
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
            }
        }
    }
    if rows.is_empty() {
        return Ok(out);
    }
    let logits = model.forward(&mut rows)?;
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
    model: &Llama,
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
