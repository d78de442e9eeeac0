//! Greedy answers graded against references, as a loss (−metric): non-differentiable objectives.
//!
//! Each step decodes greedily under θ+εz and θ−εz (one engine call for both) and grades the
//! answers with SQuAD's token F1 or exact match against the best reference ([`super::squad`]).
//! Evaluation reports both metrics, from one decoding.

use adapters::LoraAdapter;

use super::squad::{answer_losses, exact_match, token_f1, AnswerScores};
use super::{Evaluation, Objective};
use crate::{DynEngine, ExampleKind, Result, TrainingExample};

/// How an answer is graded against a reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerMetric {
    /// SQuAD's token F1.
    TokenF1,
    /// SQuAD's exact match of normalised text.
    ExactMatch,
}

/// −mean `metric` of greedy answers, best over references.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GreedyAnswer {
    pub metric: AnswerMetric,
    /// Longest answer decoded, in tokens.
    pub max_new_tokens: usize,
}

impl Objective for GreedyAnswer {
    fn name(&self) -> &'static str {
        match self.metric {
            AnswerMetric::TokenF1 => "token_f1",
            AnswerMetric::ExactMatch => "exact_match",
        }
    }

    fn example_kind(&self) -> ExampleKind {
        ExampleKind::Generation
    }

    fn losses(
        &self,
        engine: &dyn DynEngine,
        adapters: &[&LoraAdapter],
        batch: &[&TrainingExample],
    ) -> Result<Vec<f64>> {
        let grade = match self.metric {
            AnswerMetric::TokenF1 => token_f1,
            AnswerMetric::ExactMatch => exact_match,
        };
        answer_losses(self, engine, adapters, batch, self.max_new_tokens, grade)
    }

    fn evaluate(
        &self,
        engine: &dyn DynEngine,
        adapter: &LoraAdapter,
        examples: &[&TrainingExample],
    ) -> Result<Evaluation> {
        let scores = AnswerScores::compute(self, engine, adapter, examples, self.max_new_tokens)?;
        let graded = match self.metric {
            AnswerMetric::TokenF1 => scores.token_f1,
            AnswerMetric::ExactMatch => scores.exact_match,
        };
        Ok(scores.evaluation(-graded))
    }
}
