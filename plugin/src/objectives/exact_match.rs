//! Exact match of greedy answers, as a loss (−EM): a non-differentiable objective.
//!
//! Each step decodes greedily under θ+εz and θ−εz (one engine call for both) and grades the
//! answers by exact match of SQuAD-normalised text against the references ([`super::squad`]).

use adapters::LoraAdapter;

use super::squad::{answer_losses, exact_match, AnswerScores};
use super::{Evaluation, Objective};
use crate::{DynEngine, ExampleKind, Result, TrainingExample};

/// −mean exact match of greedy answers, best over references.
#[derive(Debug, Clone, Copy)]
pub struct ExactMatch {
    /// Longest answer decoded, in tokens.
    pub max_new_tokens: usize,
}

impl Objective for ExactMatch {
    fn name(&self) -> &'static str {
        "exact_match"
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
        answer_losses(
            self,
            engine,
            adapters,
            batch,
            self.max_new_tokens,
            exact_match,
        )
    }

    fn evaluate(
        &self,
        engine: &dyn DynEngine,
        adapter: &LoraAdapter,
        examples: &[&TrainingExample],
    ) -> Result<Evaluation> {
        let scores = AnswerScores::compute(self, engine, adapter, examples, self.max_new_tokens)?;
        Ok(scores.evaluation(-scores.exact_match))
    }
}
