//! Accuracy of the argmax candidate, as a loss (−accuracy): a non-differentiable objective.
//!
//! MeZO needs only loss values, so it can follow a metric that has no gradient. The scores are
//! those of [`super::Classification`]; a small ε rarely flips a prediction, so most steps see
//! L+ = L− and move nothing (the paper uses ε up to 1e-1 for such objectives).

use std::collections::BTreeMap;

use adapters::LoraAdapter;

use super::classification::{evaluate_candidates, CandidateScores};
use super::{Evaluation, Objective};
use crate::{DynEngine, ExampleKind, Result, TrainingExample};

/// −(fraction of examples whose highest-scoring candidate is the label).
#[derive(Debug, Clone, Copy, Default)]
pub struct Accuracy;

impl Objective for Accuracy {
    fn name(&self) -> &'static str {
        "accuracy"
    }

    fn example_kind(&self) -> ExampleKind {
        ExampleKind::Classification
    }

    fn losses(
        &self,
        engine: &dyn DynEngine,
        adapters: &[&LoraAdapter],
        batch: &[&TrainingExample],
    ) -> Result<Vec<f64>> {
        let scored = CandidateScores::compute(self, engine, adapters, batch)?;
        Ok(scored
            .per_adapter
            .iter()
            .map(|s| -scored.accuracy(s))
            .collect())
    }

    fn evaluate(
        &self,
        engine: &dyn DynEngine,
        adapter: &LoraAdapter,
        examples: &[&TrainingExample],
    ) -> Result<Evaluation> {
        let (cross_entropy, accuracy) = evaluate_candidates(self, engine, adapter, examples)?;
        Ok(Evaluation {
            loss: -accuracy,
            metrics: BTreeMap::from([
                ("accuracy".to_string(), accuracy),
                ("cross_entropy".to_string(), cross_entropy),
            ]),
        })
    }
}
