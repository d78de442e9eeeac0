//! The engine as MeZO sees it: [`plugin::ZoEngine`] for a loaded model.
//!
//! Every call evaluates the same work under several adapters (θ+εz and θ−εz, or one θ for
//! evaluation) as rows of the same packed batches, so the two perturbed passes of a MeZO step
//! share every matrix product. Rows are processed in chunks of at most
//! [`MAX_TOKENS_PER_FORWARD`] prompt tokens to bound activation memory on large evaluations.
//! [`ReusingEngine`] is the same engine for one training run driven on the caller's thread
//! (benchmarks, tests), keeping the run's hidden states below the adapted layers
//! ([`super::frozen_layers`]).

use std::sync::{Arc, Mutex, PoisonError};

use adapters::LoraAdapter;
use plugin::{LogProbs, ScoreRequest, ZoEngine};

use super::batch::chunks_by_budget;
use super::frozen_layers::{FrozenStates, FrozenStatesBudget};
use super::generate::{generate, GenerationParams, Sequence, StopConditions};
use super::loaded_model::LoadedModel;
use super::lora::AdapterView;
use super::sampler::SamplingParams;
use super::scoring::{score_continuations, score_continuations_reusing, ScoreItem};
use super::{EngineError, Result};

/// Upper bound on prompt tokens per packed forward pass.
pub const MAX_TOKENS_PER_FORWARD: usize = 4096;

impl LoadedModel {
    /// The engine's view of each adapter, in order.
    pub(crate) fn views(&self, adapters: &[&LoraAdapter]) -> Result<Vec<Arc<AdapterView>>> {
        let dims = self.llama.config.dims();
        adapters
            .iter()
            .map(|a| AdapterView::new(a, &dims))
            .collect()
    }

    /// Greedy decoding up to `max_tokens` or the model's end of turn.
    pub(crate) fn greedy_params(&self, max_tokens: usize) -> GenerationParams {
        GenerationParams {
            max_tokens,
            sampling: SamplingParams::greedy(),
            stop: StopConditions {
                token_ids: self.tokenizer.eog_ids(),
                strings: Vec::new(),
            },
            top_logprobs: None,
        }
    }
}

/// Results computed adapter-major (all items under the first adapter, then the second, …) as
/// `[adapter][item]`.
pub(crate) fn per_adapter<T>(results: Vec<T>, adapters: usize, items: usize) -> Vec<Vec<T>> {
    let mut results = results.into_iter();
    (0..adapters)
        .map(|_| results.by_ref().take(items).collect())
        .collect()
}

/// Scores `items` under each adapter, with kept hidden states when `frozen` is given.
fn score_under(
    model: &LoadedModel,
    adapters: &[&LoraAdapter],
    items: &[ScoreRequest],
    mut frozen: Option<&mut FrozenStates>,
) -> Result<LogProbs> {
    let views = model.views(adapters)?;
    // Rows ordered adapter-major, so each adapter's rows form one contiguous LoRA segment.
    let rows: Vec<ScoreItem<'_>> = views
        .iter()
        .flat_map(|view| {
            items.iter().map(move |item| ScoreItem {
                prompt: &item.prompt,
                continuations: &item.continuations,
                adapter: Some(view),
            })
        })
        .collect();
    let mut scores = Vec::with_capacity(rows.len());
    let lens = rows
        .iter()
        .map(|r| r.prompt.len() + r.continuations.iter().map(Vec::len).sum::<usize>());
    for chunk in chunks_by_budget(lens, MAX_TOKENS_PER_FORWARD) {
        scores.extend(match frozen.as_deref_mut() {
            Some(frozen) => score_continuations_reusing(&model.llama, &rows[chunk], frozen)?,
            None => score_continuations(&model.llama, &rows[chunk])?,
        });
    }
    Ok(per_adapter(scores, adapters.len(), items.len()))
}

impl ZoEngine for LoadedModel {
    type Error = EngineError;

    fn tokenize(&self, text: &str, special: bool) -> Vec<u32> {
        self.tokenizer.encode(text, special)
    }

    fn score(&self, adapters: &[&LoraAdapter], items: &[ScoreRequest]) -> Result<LogProbs> {
        score_under(self, adapters, items, None)
    }

    fn generate_greedy(
        &self,
        adapters: &[&LoraAdapter],
        prompts: &[Vec<u32>],
        max_tokens: usize,
    ) -> Result<Vec<Vec<String>>> {
        let views = self.views(adapters)?;
        let params = self.greedy_params(max_tokens);
        let mut seqs: Vec<Sequence> = views
            .iter()
            .flat_map(|view| prompts.iter().map(move |p| (view, p)))
            .map(|(view, prompt)| {
                Sequence::new(
                    &self.llama,
                    prompt.clone(),
                    Some(view.clone()),
                    params.clone(),
                )
            })
            .collect::<Result<_>>()?;
        generate(&self.llama, &self.tokenizer, &mut seqs, |_, _| {})?;
        let texts = seqs.iter().map(|s| s.text().to_string()).collect();
        Ok(per_adapter(texts, adapters.len(), prompts.len()))
    }
}

/// One training run's engine on the caller's thread, with frozen-layer reuse: the hidden
/// states it keeps live as long as it does.
pub struct ReusingEngine<'m> {
    model: &'m LoadedModel,
    frozen: Mutex<FrozenStates>,
}

impl<'m> ReusingEngine<'m> {
    pub fn new(model: &'m LoadedModel, budget: Arc<FrozenStatesBudget>) -> Self {
        Self {
            model,
            frozen: Mutex::new(FrozenStates::new(budget)),
        }
    }

    /// Bytes of hidden states this run keeps.
    pub fn held_bytes(&self) -> usize {
        self.frozen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .held_bytes()
    }
}

impl ZoEngine for ReusingEngine<'_> {
    type Error = EngineError;

    fn tokenize(&self, text: &str, special: bool) -> Vec<u32> {
        ZoEngine::tokenize(self.model, text, special)
    }

    fn score(&self, adapters: &[&LoraAdapter], items: &[ScoreRequest]) -> Result<LogProbs> {
        let mut frozen = self.frozen.lock().unwrap_or_else(PoisonError::into_inner);
        score_under(self.model, adapters, items, Some(&mut frozen))
    }

    fn generate_greedy(
        &self,
        adapters: &[&LoraAdapter],
        prompts: &[Vec<u32>],
        max_tokens: usize,
    ) -> Result<Vec<Vec<String>>> {
        ZoEngine::generate_greedy(self.model, adapters, prompts, max_tokens)
    }
}
