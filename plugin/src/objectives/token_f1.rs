//! Token F1 of greedy answers, as a loss (−F1): a non-differentiable objective.
//!
//! Each step decodes greedily under θ+εz and θ−εz (one engine call for both) and grades the
//! answers with SQuAD's token F1 against the best reference ([`super::squad`]).

use adapters::LoraAdapter;

use super::squad::{answer_losses, token_f1, AnswerScores};
use super::{Evaluation, Objective};
use crate::{DynEngine, ExampleKind, Result, TrainingExample};

/// −mean token F1 of greedy answers, best over references.
#[derive(Debug, Clone, Copy)]
pub struct TokenF1 {
    /// Longest answer decoded, in tokens.
    pub max_new_tokens: usize,
}

impl Objective for TokenF1 {
    fn name(&self) -> &'static str {
        "token_f1"
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
        answer_losses(self, engine, adapters, batch, self.max_new_tokens, token_f1)
    }

    fn evaluate(
        &self,
        engine: &dyn DynEngine,
        adapter: &LoraAdapter,
        examples: &[&TrainingExample],
    ) -> Result<Evaluation> {
        let scores = AnswerScores::compute(self, engine, adapter, examples, self.max_new_tokens)?;
        Ok(scores.evaluation(-scores.token_f1))
    }
}
