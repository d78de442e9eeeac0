//! The engine as MeZO sees it: [`plugin::ZoEngine`] for a loaded model.
//!
//! Every call evaluates the same work under several adapters (θ+εz and θ−εz, or one θ for
//! evaluation) as rows of the same packed batches, so the two perturbed passes of a MeZO step
//! share every matrix product. Rows are processed in chunks of at most
//! [`MAX_TOKENS_PER_FORWARD`] prompt tokens to bound activation memory on large evaluations.

use std::sync::Arc;

use adapters::LoraAdapter;
use plugin::{ScoreRequest, ZoEngine};

use super::batch::chunks_by_budget;
use super::generate::{generate, GenerationParams, Sequence, StopConditions};
use super::loaded_model::LoadedModel;
use super::lora::AdapterView;
use super::sampler::SamplingParams;
use super::scoring::{score_continuations, ScoreItem};
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

impl ZoEngine for LoadedModel {
    type Error = EngineError;

    fn tokenize(&self, text: &str, special: bool) -> Vec<u32> {
        self.tokenizer.encode(text, special)
    }

    fn score(
        &self,
        adapters: &[&LoraAdapter],
        items: &[ScoreRequest],
    ) -> Result<Vec<Vec<Vec<Vec<f32>>>>> {
        let views = self.views(adapters)?;
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
            scores.extend(score_continuations(&self.llama, &rows[chunk])?);
        }
        Ok(per_adapter(scores, adapters.len(), items.len()))
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
