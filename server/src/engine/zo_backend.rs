//! The engine as MeZO sees it: [`plugin::ZoEngine`] for a loaded model.
//!
//! Every call evaluates the same work under several adapters (θ+εz and θ−εz, or one θ for
//! evaluation) as rows of the same packed batches, so the perturbed passes of a MeZO step share
//! every matrix product. The rows are laid out adapter-major (all items under the first adapter,
//! then the second, …), so each adapter's rows form one contiguous LoRA segment.
//!
//! A training run's engine is a [`TrainingEngine`]: that layout, the run's hidden states below
//! the adapted layers ([`super::frozen_layers`]) and their metrics, over a [`ForwardRunner`] that
//! says where the passes run. [`ReusingEngine`] runs them on the caller's thread (benchmarks,
//! tests); the server's jobs run them on the engine thread between serving steps
//! (`crate::training::QueuedEngine`). The model itself is a [`ZoEngine`] too, without kept
//! states.

use std::sync::{Arc, Mutex, PoisonError};

use adapters::LoraAdapter;
use plugin::{LogProbs, ScoreRequest, ZoEngine};

use super::batch::chunks_by_budget;
use super::frozen_layers::{FrozenStates, FrozenStatesBudget, ReuseCounts};
use super::generate::{generate, GenerationParams, GreedyPrompt, Sequence, StopConditions};
use super::loaded_model::LoadedModel;
use super::lora::AdapterView;
use super::sampler::SamplingParams;
use super::scoring::{score_rows, ContinuationLogprobs, ScoreRow};
use super::tokenizer::Tokenizer;
use super::transformer::PACK_TOKENS;
use super::{EngineError, Result};
use crate::metrics as m;

/// Upper bound on tokens per call of the scorer on the caller's thread: one pack of the
/// forward pass (see [`PACK_TOKENS`]), so that a large evaluation's log-probs and kept states
/// are gathered a pack at a time.
pub const MAX_TOKENS_PER_SCORE_CALL: usize = PACK_TOKENS;

impl LoadedModel {
    /// The engine's view of each adapter, in order.
    pub(crate) fn views(&self, adapters: &[&LoraAdapter]) -> Result<Vec<Arc<AdapterView>>> {
        let dims = self.transformer.config.dims();
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
                ignore_eos: false,
                strings: Vec::new(),
            },
            top_logprobs: None,
        }
    }
}

/// Where a training run's forward passes run.
pub trait ForwardRunner {
    /// The model the passes run on.
    fn model(&self) -> &LoadedModel;

    /// `[row][continuation][token]` log-probs of `rows`, in order; from the run's kept hidden
    /// states (filled as they are computed) when `frozen` is given.
    fn score(
        &self,
        rows: Vec<ScoreRow>,
        frozen: Option<&Arc<Mutex<FrozenStates>>>,
    ) -> Result<ContinuationLogprobs>;

    /// The greedy answer to each prompt, in order.
    fn greedy(&self, prompts: Vec<GreedyPrompt>, params: GenerationParams) -> Result<Vec<String>>;
}

/// Passes run on the caller's thread, scored [`MAX_TOKENS_PER_SCORE_CALL`] tokens at a time
/// (bounding the log-probs and kept states of a large evaluation gathered at once).
pub struct OnCallerThread<'m>(pub &'m LoadedModel);

impl ForwardRunner for OnCallerThread<'_> {
    fn model(&self) -> &LoadedModel {
        self.0
    }

    fn score(
        &self,
        rows: Vec<ScoreRow>,
        frozen: Option<&Arc<Mutex<FrozenStates>>>,
    ) -> Result<ContinuationLogprobs> {
        let mut scores = Vec::with_capacity(rows.len());
        for chunk in chunks_by_budget(rows.iter().map(ScoreRow::tokens), MAX_TOKENS_PER_SCORE_CALL)
        {
            scores.extend(score_rows(
                &self.0.transformer,
                &rows[chunk],
                frozen.map(Arc::as_ref),
            )?);
        }
        Ok(scores)
    }

    fn greedy(&self, prompts: Vec<GreedyPrompt>, params: GenerationParams) -> Result<Vec<String>> {
        let model = self.0;
        let mut seqs: Vec<Sequence> = prompts
            .into_iter()
            .map(|p| {
                Sequence::new(
                    &model.transformer,
                    p.prompt,
                    Some(p.adapter),
                    params.clone(),
                )
            })
            .collect::<Result<_>>()?;
        generate(&model.transformer, &model.tokenizer, &mut seqs, |_, _| {})?;
        Ok(seqs.iter().map(|s| s.text().to_string()).collect())
    }
}

/// MeZO's tokenization: a prompt (`special`) as the model reads prompts (special tokens parsed,
/// BOS in front when the model expects it), a completion or candidate as plain text.
fn prompt_or_text(tokenizer: &Tokenizer, text: &str, special: bool) -> Vec<u32> {
    if special {
        tokenizer.encode_prompt(text)
    } else {
        tokenizer.encode(text, false)
    }
}

/// Results computed adapter-major as `[adapter][item]`.
fn per_adapter<T>(results: Vec<T>, adapters: usize, items: usize) -> Vec<Vec<T>> {
    let mut results = results.into_iter();
    (0..adapters)
        .map(|_| results.by_ref().take(items).collect())
        .collect()
}

/// Scores `items` under each adapter, adapter-major, through `runner`.
fn score_under(
    runner: &impl ForwardRunner,
    adapters: &[&LoraAdapter],
    items: &[ScoreRequest],
    frozen: Option<&Arc<Mutex<FrozenStates>>>,
) -> Result<LogProbs> {
    let views = runner.model().views(adapters)?;
    let rows = views
        .iter()
        .flat_map(|view| {
            items.iter().map(move |item| ScoreRow {
                prompt: item.prompt.clone(),
                continuations: item.continuations.clone(),
                adapter: Arc::clone(view),
            })
        })
        .collect();
    let scores = runner.score(rows, frozen)?;
    Ok(per_adapter(scores, adapters.len(), items.len()))
}

/// Greedy answers to `prompts` under each adapter, adapter-major, through `runner`.
fn greedy_under(
    runner: &impl ForwardRunner,
    adapters: &[&LoraAdapter],
    prompts: &[Vec<u32>],
    max_tokens: usize,
) -> Result<Vec<Vec<String>>> {
    let model = runner.model();
    let views = model.views(adapters)?;
    let greedy_prompts = views
        .iter()
        .flat_map(|view| {
            prompts.iter().map(move |prompt| GreedyPrompt {
                prompt: prompt.clone(),
                adapter: Arc::clone(view),
            })
        })
        .collect();
    let answers = runner.greedy(greedy_prompts, model.greedy_params(max_tokens))?;
    Ok(per_adapter(answers, adapters.len(), prompts.len()))
}

impl ZoEngine for LoadedModel {
    type Error = EngineError;

    fn tokenize(&self, text: &str, special: bool) -> Vec<u32> {
        prompt_or_text(&self.tokenizer, text, special)
    }

    fn score(&self, adapters: &[&LoraAdapter], items: &[ScoreRequest]) -> Result<LogProbs> {
        score_under(&OnCallerThread(self), adapters, items, None)
    }

    fn generate_greedy(
        &self,
        adapters: &[&LoraAdapter],
        prompts: &[Vec<u32>],
        max_tokens: usize,
    ) -> Result<Vec<Vec<String>>> {
        greedy_under(&OnCallerThread(self), adapters, prompts, max_tokens)
    }
}

/// One training run's engine: its passes go through `R`, and the hidden states it keeps for
/// frozen-layer reuse are the run's, given back to the budget when it drops.
pub struct TrainingEngine<R> {
    runner: R,
    frozen: Arc<Mutex<FrozenStates>>,
    /// The reuse counts already reported to the metrics.
    reported: Mutex<ReuseCounts>,
}

/// A training run on the caller's thread, with frozen-layer reuse.
pub type ReusingEngine<'m> = TrainingEngine<OnCallerThread<'m>>;

impl<'m> ReusingEngine<'m> {
    pub fn new(model: &'m LoadedModel, budget: Arc<FrozenStatesBudget>) -> Self {
        Self::with_runner(OnCallerThread(model), budget)
    }
}

impl<R: ForwardRunner> TrainingEngine<R> {
    pub fn with_runner(runner: R, budget: Arc<FrozenStatesBudget>) -> Self {
        Self {
            runner,
            frozen: Arc::new(Mutex::new(FrozenStates::new(budget))),
            reported: Mutex::new(ReuseCounts::default()),
        }
    }

    /// Bytes of hidden states this run keeps.
    pub fn frozen_states_bytes(&self) -> usize {
        self.frozen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .held_bytes()
    }

    /// Reports the tokens reused and computed since the last report, and the budget in use.
    fn report_reuse(&self) {
        let (counts, used) = {
            let frozen = self.frozen.lock().unwrap_or_else(PoisonError::into_inner);
            (frozen.counts(), frozen.budget_used_bytes())
        };
        let mut reported = self.reported.lock().unwrap_or_else(PoisonError::into_inner);
        metrics::counter!(m::TRAINING_FROZEN_LAYER_TOKENS_TOTAL, "source" => "reused")
            .increment(counts.reused_tokens - reported.reused_tokens);
        metrics::counter!(m::TRAINING_FROZEN_LAYER_TOKENS_TOTAL, "source" => "computed")
            .increment(counts.computed_tokens - reported.computed_tokens);
        metrics::gauge!(m::TRAINING_FROZEN_STATES_BYTES).set(used as f64);
        *reported = counts;
    }
}

impl<R: ForwardRunner> ZoEngine for TrainingEngine<R> {
    type Error = EngineError;

    fn tokenize(&self, text: &str, special: bool) -> Vec<u32> {
        prompt_or_text(&self.runner.model().tokenizer, text, special)
    }

    fn score(&self, adapters: &[&LoraAdapter], items: &[ScoreRequest]) -> Result<LogProbs> {
        let scores = score_under(&self.runner, adapters, items, Some(&self.frozen))?;
        self.report_reuse();
        Ok(scores)
    }

    fn generate_greedy(
        &self,
        adapters: &[&LoraAdapter],
        prompts: &[Vec<u32>],
        max_tokens: usize,
    ) -> Result<Vec<Vec<String>>> {
        greedy_under(&self.runner, adapters, prompts, max_tokens)
    }
}
