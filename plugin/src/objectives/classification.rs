//! Classification by candidate completions, the MeZO paper's loss for classification tasks.
//!
//! Each candidate (" positive", " negative") is scored by the mean log-prob of its tokens after the
//! prompt; the loss is the cross-entropy of the label under the softmax of those scores, and the
//! prediction is their argmax. All candidates of an example go in one [`ScoreRequest`], so an
//! engine can share the prompt's work between them.
//!
//! The same scores also give a non-differentiable loss, −accuracy of the argmax candidate: MeZO
//! needs only loss values, so it can follow a metric that has no gradient. A small ε rarely flips
//! a prediction, so most steps see L+ = L− and move nothing (the paper uses ε up to 1e-1 there).

use std::collections::BTreeMap;

use adapters::LoraAdapter;

use super::{
    continuation_tokens, mean, mean_log_prob, prompt_tokens, score, wrong_kind, Evaluation,
    Objective,
};
use crate::{DynEngine, ExampleKind, Result, ScoreRequest, TrainingExample};

/// What a classification objective minimises, from the same candidate scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CandidateLoss {
    /// Mean over examples of the cross-entropy of the label under the softmax of the scores.
    CrossEntropy,
    /// −(fraction of examples whose highest-scoring candidate is the label).
    Accuracy,
}

/// Classification by candidate completions, minimising `loss`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classification {
    pub loss: CandidateLoss,
}

impl Classification {
    /// The MeZO paper's loss for classification tasks.
    pub const CROSS_ENTROPY: Self = Self {
        loss: CandidateLoss::CrossEntropy,
    };
    /// −accuracy: a non-differentiable objective.
    pub const ACCURACY: Self = Self {
        loss: CandidateLoss::Accuracy,
    };
}

impl Objective for Classification {
    fn name(&self) -> &'static str {
        match self.loss {
            CandidateLoss::CrossEntropy => "classification",
            CandidateLoss::Accuracy => "accuracy",
        }
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
            .map(|scores| scored.loss(self.loss, scores))
            .collect())
    }

    fn evaluate(
        &self,
        engine: &dyn DynEngine,
        adapter: &LoraAdapter,
        examples: &[&TrainingExample],
    ) -> Result<Evaluation> {
        let scored = CandidateScores::compute(self, engine, &[adapter], examples)?;
        // One adapter in, so one set of scores out: `score` checked the engine's answer's shape.
        let scores = &scored.per_adapter[0];
        Ok(Evaluation {
            loss: scored.loss(self.loss, scores),
            metrics: BTreeMap::from([
                ("accuracy".to_string(), scored.accuracy(scores)),
                ("cross_entropy".to_string(), scored.cross_entropy(scores)),
            ]),
        })
    }
}

/// Every candidate's score under every adapter, with the labels.
struct CandidateScores {
    /// `per_adapter[a][example][candidate]`: mean log-prob of the candidate's tokens.
    per_adapter: Vec<Vec<Vec<f64>>>,
    labels: Vec<usize>,
}

impl CandidateScores {
    /// Scores the candidates of `batch` under each adapter, in one engine call.
    fn compute(
        objective: &dyn Objective,
        engine: &dyn DynEngine,
        adapters: &[&LoraAdapter],
        batch: &[&TrainingExample],
    ) -> Result<Self> {
        let mut items = Vec::with_capacity(batch.len());
        let mut labels = Vec::with_capacity(batch.len());
        for (index, example) in batch.iter().enumerate() {
            let TrainingExample::Classification {
                prompt,
                candidates,
                label,
            } = example
            else {
                return Err(wrong_kind(objective, index, example));
            };
            items.push(ScoreRequest {
                prompt: prompt_tokens(engine, prompt)?,
                continuations: candidates
                    .iter()
                    .map(|c| continuation_tokens(engine, "candidates", c))
                    .collect::<Result<_>>()?,
            });
            labels.push(*label);
        }
        let per_adapter = score(engine, adapters, &items)?
            .iter()
            .map(|per_item| {
                per_item
                    .iter()
                    .map(|candidates| candidates.iter().map(|lp| mean_log_prob(lp)).collect())
                    .collect()
            })
            .collect();
        Ok(Self {
            per_adapter,
            labels,
        })
    }

    /// `loss` of one adapter's scores.
    fn loss(&self, loss: CandidateLoss, scores: &[Vec<f64>]) -> f64 {
        match loss {
            CandidateLoss::CrossEntropy => self.cross_entropy(scores),
            CandidateLoss::Accuracy => -self.accuracy(scores),
        }
    }

    /// Mean over examples of `−log softmax(scores)[label]`.
    fn cross_entropy(&self, scores: &[Vec<f64>]) -> f64 {
        mean(
            scores
                .iter()
                .zip(&self.labels)
                .map(|(candidates, &label)| log_sum_exp(candidates) - candidates[label]),
        )
    }

    /// Fraction of examples whose highest-scoring candidate is the label.
    fn accuracy(&self, scores: &[Vec<f64>]) -> f64 {
        mean(scores.iter().zip(&self.labels).map(|(candidates, &label)| {
            if argmax(candidates) == label {
                1.0
            } else {
                0.0
            }
        }))
    }
}

/// `log Σ exp(x)`, shifted by the maximum so that it cannot overflow.
fn log_sum_exp(values: &[f64]) -> f64 {
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    max + values.iter().map(|v| (v - max).exp()).sum::<f64>().ln()
}

/// Index of the largest value; the first one on ties, so predictions are deterministic.
fn argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_sum_exp_is_stable_and_exact_on_known_values() {
        // ln(e^-2 + e^-0.5) = ln(0.1353353 + 0.6065307) = ln(0.7418660) = -0.2985867
        // (Python: math.log(math.exp(-2) + math.exp(-0.5)) = -0.29858672201724756).
        assert!((log_sum_exp(&[-2.0, -0.5]) - (-0.298_586_722_017_247_6)).abs() < 1e-15);
        // Large values would overflow a naive sum of exponentials.
        assert!((log_sum_exp(&[1000.0, 1000.0]) - (1000.0 + 2f64.ln())).abs() < 1e-9);
    }

    #[test]
    fn argmax_takes_the_first_of_equal_scores() {
        assert_eq!(argmax(&[-1.0, -0.5, -0.5]), 1);
        assert_eq!(argmax(&[0.0]), 0);
    }
}
