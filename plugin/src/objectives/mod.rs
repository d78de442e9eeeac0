//! Objectives: what a MeZO step minimises, and how a held-out set is graded.
//!
//! An objective turns a minibatch of examples into one loss per adapter, running the engine once
//! for all the adapters given (θ+εz and θ−εz in the same call, so an engine that batches rows
//! under different adapters shares the forward). Losses are f64 means over the batch: L+ and L−
//! differ by about ε·|∇L|, so they are accumulated in double precision before being subtracted.
//! Adding an objective is adding one file here and one arm to [`ObjectiveKind`]; objectives that
//! differ by one function (the loss of candidate scores, the grade of an answer) are one type
//! with a parameter.

mod classification;
mod completion;
mod greedy_answer;
mod reward;
mod squad;

use std::collections::BTreeMap;

use adapters::LoraAdapter;
use serde::{Deserialize, Serialize};

pub use classification::{CandidateLoss, Classification};
pub use completion::Completion;
pub use greedy_answer::{AnswerMetric, GreedyAnswer};
pub use reward::Reward;
pub use squad::{exact_match, normalize_answer, token_f1};

use crate::engine::LogProbs;
use crate::{DynEngine, ExampleKind, Result, ScoreRequest, TrainError, TrainingExample};

/// A loss over examples, evaluated under several adapters at once.
pub trait Objective: Send + Sync {
    /// The objective's name in configs, logs and metrics (`completion`, `token_f1`, …).
    fn name(&self) -> &'static str;

    /// The kind of example this objective reads; others are rejected before training.
    fn example_kind(&self) -> ExampleKind;

    /// The loss of the batch under each adapter: `result[a]` belongs to `adapters[a]`.
    fn losses(
        &self,
        engine: &dyn DynEngine,
        adapters: &[&LoraAdapter],
        batch: &[&TrainingExample],
    ) -> Result<Vec<f64>>;

    /// Grades `adapter` (unperturbed) on held-out examples. The default reports the loss alone;
    /// objectives with a more telling metric (accuracy, F1) add it.
    fn evaluate(
        &self,
        engine: &dyn DynEngine,
        adapter: &LoraAdapter,
        examples: &[&TrainingExample],
    ) -> Result<Evaluation> {
        let loss = single(self.losses(engine, &[adapter], examples)?)?;
        Ok(Evaluation {
            loss,
            metrics: BTreeMap::new(),
        })
    }
}

/// The result of grading an adapter on held-out examples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// The objective's loss (lower is better); early stopping watches it.
    pub loss: f64,
    /// Further metrics by name (`accuracy`, `token_f1`, `exact_match`), higher is better.
    pub metrics: BTreeMap<String, f64>,
}

/// The objectives by name, as a job's configuration gives them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ObjectiveKind {
    /// Cross-entropy of the completion tokens ([`Completion`]).
    Completion,
    /// Cross-entropy over candidates scored by mean log-prob ([`Classification::CROSS_ENTROPY`]).
    Classification,
    /// −accuracy of the argmax candidate ([`Classification::ACCURACY`]).
    Accuracy,
    /// −token F1 of greedy answers ([`GreedyAnswer`]).
    #[serde(alias = "f1")]
    TokenF1 {
        #[serde(default = "default_max_new_tokens")]
        max_new_tokens: usize,
    },
    /// −exact match of greedy answers ([`GreedyAnswer`]).
    ExactMatch {
        #[serde(default = "default_max_new_tokens")]
        max_new_tokens: usize,
    },
    /// −reward-weighted mean log-prob of completions ([`Reward`]).
    Reward,
}

fn default_max_new_tokens() -> usize {
    32
}

impl ObjectiveKind {
    /// The objective, once its own parameters are checked.
    pub fn build(&self) -> Result<Box<dyn Objective>> {
        let greedy_budget = |max_new_tokens: usize| {
            if max_new_tokens == 0 {
                Err(TrainError::config(
                    "max_new_tokens",
                    "at least 1",
                    max_new_tokens,
                ))
            } else {
                Ok(max_new_tokens)
            }
        };
        Ok(match *self {
            ObjectiveKind::Completion => Box::new(Completion),
            ObjectiveKind::Classification => Box::new(Classification::CROSS_ENTROPY),
            ObjectiveKind::Accuracy => Box::new(Classification::ACCURACY),
            ObjectiveKind::TokenF1 { max_new_tokens } => Box::new(GreedyAnswer {
                metric: AnswerMetric::TokenF1,
                max_new_tokens: greedy_budget(max_new_tokens)?,
            }),
            ObjectiveKind::ExactMatch { max_new_tokens } => Box::new(GreedyAnswer {
                metric: AnswerMetric::ExactMatch,
                max_new_tokens: greedy_budget(max_new_tokens)?,
            }),
            ObjectiveKind::Reward => Box::new(Reward),
        })
    }
}

/// The error for an example of the wrong kind at `index` of what `objective` was given.
pub(crate) fn wrong_kind(
    objective: &dyn Objective,
    index: usize,
    example: &TrainingExample,
) -> TrainError {
    TrainError::WrongExampleKind {
        index,
        objective: objective.name(),
        expected: objective.example_kind().name(),
        given: example.kind().name(),
    }
}

/// Prompt tokens, special tokens parsed: prompts are often a chat template's output.
fn prompt_tokens(engine: &dyn DynEngine, prompt: &str) -> Result<Vec<u32>> {
    tokens(engine, "prompt", prompt, true)
}

/// Tokens of a completion or candidate: user text, so special-token syntax is kept literal.
fn continuation_tokens(
    engine: &dyn DynEngine,
    field: &'static str,
    text: &str,
) -> Result<Vec<u32>> {
    tokens(engine, field, text, false)
}

fn tokens(
    engine: &dyn DynEngine,
    field: &'static str,
    text: &str,
    special: bool,
) -> Result<Vec<u32>> {
    let tokens = engine.tokenize(text, special);
    if tokens.is_empty() {
        return Err(TrainError::NoTokens {
            field,
            text: text.to_string(),
        });
    }
    Ok(tokens)
}

/// [`DynEngine::score`], with the answer's shape checked against the request so that objectives
/// can index it: `[adapter][item][continuation][token]`, one log-prob per continuation token.
fn score(
    engine: &dyn DynEngine,
    adapters: &[&LoraAdapter],
    items: &[ScoreRequest],
) -> Result<LogProbs> {
    let scores = engine.score(adapters, items)?;
    check_len("adapter results", adapters.len(), scores.len())?;
    for per_adapter in &scores {
        check_len("item results", items.len(), per_adapter.len())?;
        for (item, per_item) in items.iter().zip(per_adapter) {
            check_len(
                "continuation results",
                item.continuations.len(),
                per_item.len(),
            )?;
            for (continuation, log_probs) in item.continuations.iter().zip(per_item) {
                check_len("token log-probs", continuation.len(), log_probs.len())?;
            }
        }
    }
    Ok(scores)
}

/// [`DynEngine::generate_greedy`], with the answer's shape checked: `[adapter][prompt]`.
fn generate_greedy(
    engine: &dyn DynEngine,
    adapters: &[&LoraAdapter],
    prompts: &[Vec<u32>],
    max_tokens: usize,
) -> Result<Vec<Vec<String>>> {
    let texts = engine.generate_greedy(adapters, prompts, max_tokens)?;
    check_len("adapter results", adapters.len(), texts.len())?;
    for per_adapter in &texts {
        check_len("generations", prompts.len(), per_adapter.len())?;
    }
    Ok(texts)
}

fn check_len(what: &str, expected: usize, given: usize) -> Result<()> {
    if expected != given {
        return Err(TrainError::EngineOutput {
            expected: format!("{expected} {what}"),
            given: format!("{given} {what}"),
        });
    }
    Ok(())
}

/// Mean log-prob of a continuation's tokens (never empty: tokenization rejects empty text).
fn mean_log_prob(log_probs: &[f32]) -> f64 {
    log_probs.iter().map(|&lp| f64::from(lp)).sum::<f64>() / log_probs.len() as f64
}

/// Mean of per-item values (a batch is never empty: the trainer's batch size is at least 1).
fn mean(values: impl ExactSizeIterator<Item = f64>) -> f64 {
    let n = values.len() as f64;
    values.sum::<f64>() / n
}

/// The one value of a one-adapter result.
fn single<T>(values: Vec<T>) -> Result<T> {
    check_len("results", 1, values.len())?;
    values
        .into_iter()
        .next()
        .ok_or_else(|| TrainError::EngineOutput {
            expected: "1 result".into(),
            given: "none".into(),
        })
}
