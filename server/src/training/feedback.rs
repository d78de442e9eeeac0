//! Feedback on the server's answers, and continuous training on it.
//!
//! Every chat completion is remembered (its rendered prompt and its answer; the oldest are
//! forgotten past `training.remembered_completions`), so that `POST /v1/feedback` can refer to
//! it by id. A rating becomes a `reward` example: +1 pushes the answer's log-probability up,
//! −1 down. A corrected answer becomes an example rewarded +1, which under the reward loss is
//! the teacher-forced completion loss on the correction. An adapter set to train continuously
//! starts a `reward` job each time `every` feedback items have arrived that no job used yet.

use plugin::{ObjectiveKind, TrainerConfig, TrainingExample};

use super::db::{FeedbackItem, PendingFeedback, StoredCompletion};
use super::{Job, JobOrigin, NewJob, Training, TrainingError};
use crate::ids::{new_id, unix_now};
use crate::metrics as m;

/// A validated feedback request.
#[derive(Debug, Clone, PartialEq)]
pub struct Feedback {
    pub completion_id: String,
    /// In [−1, 1].
    pub reward: f32,
    pub corrected_answer: Option<String>,
    /// The adapter to train; needed only for answers of the base model.
    pub adapter: Option<String>,
    /// `up`, `down` or `reward`, for the metric's label.
    pub kind: &'static str,
}

/// What the server did with a feedback item.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedbackReceipt {
    pub id: String,
    pub adapter: String,
    /// Items of this adapter waiting for a job.
    pub pending: u64,
    /// The job this item started, if it completed a batch for continuous training.
    pub job: Option<Job>,
}

impl Training {
    /// Remembers a completion for later feedback. Failures are logged: serving goes on.
    pub fn remember_completion(&self, completion: StoredCompletion) {
        let keep = self.shared.config.remembered_completions;
        if let Err(err) = self
            .shared
            .db
            .insert_completion(&completion, unix_now(), keep)
        {
            tracing::warn!(id = %completion.id, error = %err, "cannot remember the completion for feedback");
        }
    }

    /// Stores a feedback item and, if the adapter trains continuously and enough items are
    /// waiting, starts a `reward` job on them.
    pub fn feedback(&self, feedback: Feedback) -> Result<FeedbackReceipt, TrainingError> {
        let completion = self
            .shared
            .db
            .completion(&feedback.completion_id)?
            .ok_or_else(|| TrainingError::NotFound {
                what: "completion",
                id: feedback.completion_id.clone(),
            })?;
        let adapter = feedback
            .adapter
            .clone()
            .or(completion.adapter)
            .ok_or_else(|| TrainingError::Invalid {
                param: "adapter".into(),
                message: "this completion came from the base model; name the adapter to train with `adapter`".into(),
            })?;
        adapters::store::validate_name(&adapter).map_err(|e| TrainingError::Invalid {
            param: "adapter".into(),
            message: e.to_string(),
        })?;
        let id = new_id("fb");
        let max_stored = self.shared.config.max_stored_examples_per_adapter;
        let pending = self
            .shared
            .db
            .insert_feedback(
                &id,
                unix_now(),
                &feedback.completion_id,
                &adapter,
                feedback.reward,
                feedback.corrected_answer.as_deref(),
                max_stored,
            )?
            .ok_or_else(|| super::adapter_full("adapter", &adapter, max_stored, max_stored))?;
        metrics::counter!(m::FEEDBACK_TOTAL, "adapter" => m::adapter_label(&adapter), "kind" => feedback.kind)
            .increment(1);
        if feedback.corrected_answer.is_some() {
            metrics::counter!(m::FEEDBACK_TOTAL, "adapter" => m::adapter_label(&adapter), "kind" => "correction")
                .increment(1);
        }
        let job = match self.shared.db.continuous(&adapter)? {
            Some((every, steps)) if pending >= u64::from(every) => {
                self.start_feedback_job(&adapter, steps)?
            }
            _ => None,
        };
        Ok(FeedbackReceipt {
            id,
            adapter,
            pending: if job.is_some() { 0 } else { pending },
            job,
        })
    }

    /// Makes `adapter` train on every `every` new feedback items, `steps` steps each time;
    /// `None` stops it.
    pub fn set_continuous(
        &self,
        adapter: &str,
        every: Option<(u32, u64)>,
    ) -> Result<(), TrainingError> {
        adapters::store::validate_name(adapter).map_err(|e| TrainingError::Invalid {
            param: "adapter".into(),
            message: e.to_string(),
        })?;
        if let Some((every, steps)) = every {
            if every == 0 || steps == 0 || steps > self.shared.config.max_steps {
                return Err(TrainingError::Invalid {
                    param: "feedback_every".into(),
                    message: format!(
                        "feedback_every and steps must be at least 1, steps at most {} (given {every} and {steps})",
                        self.shared.config.max_steps
                    ),
                });
            }
        }
        Ok(self.shared.db.set_continuous(adapter, every)?)
    }

    /// The adapter's feedback items, newest first, at most `limit`.
    pub fn feedback_items(
        &self,
        adapter: &str,
        limit: usize,
    ) -> Result<Vec<FeedbackItem>, TrainingError> {
        Ok(self.shared.db.list_feedback(adapter, limit)?)
    }

    pub fn continuous(&self, adapter: &str) -> Result<Option<(u32, u64)>, TrainingError> {
        Ok(self.shared.db.continuous(adapter)?)
    }

    /// A `reward` job on the adapter's waiting feedback, unless one of its jobs is unfinished
    /// (the items wait for the next batch then).
    fn start_feedback_job(&self, adapter: &str, steps: u64) -> Result<Option<Job>, TrainingError> {
        if !self.shared.db.unfinished_jobs_of(adapter)?.is_empty() {
            return Ok(None);
        }
        let pending = self.shared.db.pending_feedback(adapter)?;
        let train: Vec<TrainingExample> = pending.iter().flat_map(reward_examples).collect();
        if train.is_empty() {
            return Ok(None);
        }
        let request = NewJob {
            adapter: adapter.to_string(),
            objective: ObjectiveKind::Reward,
            trainer: TrainerConfig {
                batch_size: train.len().min(TrainerConfig::default().batch_size),
                max_steps: steps,
                ..TrainerConfig::default()
            },
            lora: None,
            publish_every: None,
            publish_only_if_improved: false,
            train,
            held_out: Vec::new(),
            origin: JobOrigin::Feedback {
                items: pending.len(),
            },
            quota: None,
        };
        let job = self.build_job(&request)?;
        let ids: Vec<String> = pending.into_iter().map(|p| p.id).collect();
        self.shared
            .db
            .insert_feedback_job(&job, &request.train, &ids)?;
        self.queued(&job);
        Ok(Some(job))
    }
}

/// The examples one feedback item teaches: its rated answer, and the correction if given.
fn reward_examples(item: &PendingFeedback) -> Vec<TrainingExample> {
    let mut examples = Vec::with_capacity(2);
    // A rating of exactly 0 teaches nothing (it multiplies the loss by 0).
    if item.reward != 0.0 && !item.completion.is_empty() {
        examples.push(TrainingExample::Reward {
            prompt: item.prompt.clone(),
            completion: item.completion.clone(),
            reward: item.reward,
        });
    }
    if let Some(correction) = item.corrected_answer.as_ref().filter(|c| !c.is_empty()) {
        examples.push(TrainingExample::Reward {
            prompt: item.prompt.clone(),
            completion: correction.clone(),
            reward: 1.0,
        });
    }
    examples
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratings_and_corrections_become_reward_examples() {
        let item = PendingFeedback {
            id: "fb-1".into(),
            prompt: "p".into(),
            completion: "bad".into(),
            reward: -1.0,
            corrected_answer: Some("good".into()),
        };
        assert_eq!(
            reward_examples(&item),
            vec![
                TrainingExample::Reward {
                    prompt: "p".into(),
                    completion: "bad".into(),
                    reward: -1.0
                },
                TrainingExample::Reward {
                    prompt: "p".into(),
                    completion: "good".into(),
                    reward: 1.0
                },
            ]
        );
        let neutral = PendingFeedback {
            reward: 0.0,
            corrected_answer: None,
            ..item
        };
        assert!(reward_examples(&neutral).is_empty());
    }
}
