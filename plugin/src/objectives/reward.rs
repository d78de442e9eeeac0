//! Reward-weighted log-likelihood: learning from graded completions (feedback, thumbs up/down).
//!
//! Each example is a completion with a reward r in [−1, 1]; the loss is −mean(r × mean log-prob
//! of the completion's tokens), so minimising it makes rewarded completions likelier and
//! penalised ones less likely, in proportion to the reward.

use adapters::LoraAdapter;

use super::{
    continuation_tokens, mean, mean_log_prob, prompt_tokens, score, wrong_kind, Objective,
};
use crate::{DynEngine, ExampleKind, Result, ScoreRequest, TrainingExample};

/// −mean over examples of reward × mean log-prob of the completion.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reward;

impl Objective for Reward {
    fn name(&self) -> &'static str {
        "reward"
    }

    fn example_kind(&self) -> ExampleKind {
        ExampleKind::Reward
    }

    fn losses(
        &self,
        engine: &dyn DynEngine,
        adapters: &[&LoraAdapter],
        batch: &[&TrainingExample],
    ) -> Result<Vec<f64>> {
        let mut items = Vec::with_capacity(batch.len());
        let mut rewards = Vec::with_capacity(batch.len());
        for (index, example) in batch.iter().enumerate() {
            let TrainingExample::Reward {
                prompt,
                completion,
                reward,
            } = example
            else {
                return Err(wrong_kind(self, index, example));
            };
            items.push(ScoreRequest {
                prompt: prompt_tokens(engine, prompt)?,
                continuations: vec![continuation_tokens(engine, "completion", completion)?],
            });
            rewards.push(f64::from(*reward));
        }
        let scores = score(engine, adapters, &items)?;
        Ok(scores
            .iter()
            .map(|per_item| {
                mean(
                    per_item
                        .iter()
                        .zip(&rewards)
                        .map(|(item, reward)| -reward * mean_log_prob(&item[0])),
                )
            })
            .collect())
    }
}
