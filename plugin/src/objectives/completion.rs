//! Teacher-forced cross-entropy of a completion given its prompt (the MeZO paper's loss for generation tasks).
//!
//! Only the completion's tokens count: per example the mean negative log-prob of its tokens, then
//! the mean over examples, so long and short completions weigh the same.

use adapters::LoraAdapter;

use super::{
    continuation_tokens, mean, mean_log_prob, prompt_tokens, score, wrong_kind, Objective,
};
use crate::{DynEngine, ExampleKind, Result, ScoreRequest, TrainingExample};

/// Mean over examples of the mean NLL of the completion tokens.
#[derive(Debug, Clone, Copy, Default)]
pub struct Completion;

impl Objective for Completion {
    fn name(&self) -> &'static str {
        "completion"
    }

    fn example_kind(&self) -> ExampleKind {
        ExampleKind::Completion
    }

    fn losses(
        &self,
        engine: &dyn DynEngine,
        adapters: &[&LoraAdapter],
        batch: &[&TrainingExample],
    ) -> Result<Vec<f64>> {
        let mut items = Vec::with_capacity(batch.len());
        for (index, example) in batch.iter().enumerate() {
            let TrainingExample::Completion { prompt, completion } = example else {
                return Err(wrong_kind(self, index, example));
            };
            items.push(ScoreRequest {
                prompt: prompt_tokens(engine, prompt)?,
                continuations: vec![continuation_tokens(engine, "completion", completion)?],
            });
        }
        let scores = score(engine, adapters, &items)?;
        Ok(scores
            .iter()
            .map(|per_item| mean(per_item.iter().map(|item| -mean_log_prob(&item[0]))))
            .collect())
    }
}
