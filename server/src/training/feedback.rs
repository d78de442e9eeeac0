//! Feedback on the server's answers, and continuous training on it.
//!
//! Every chat completion is remembered (its rendered prompt and its answer; the oldest are
//! forgotten past `training.remembered_completions`), so that `POST /v1/feedback` can refer to
//! it by id. A rating becomes a `reward` example: +1 pushes the answer's log-probability up,
//! −1 down, centred on the job's mean rating when it has both (see `feedback_examples`). A
//! corrected answer becomes an example rewarded +1, which under the reward loss is the
//! teacher-forced completion loss on the correction. An adapter set to train continuously
//! starts a `reward` job each time `every` feedback items have arrived that no job used yet.

use plugin::{ObjectiveKind, TrainerConfig, TrainingExample};

use super::db::{FeedbackItem, PendingFeedback, StoredCompletion};
use super::{Job, JobOrigin, NewJob, Training, TrainingError};
use crate::ids::{new_id, unix_now};
use crate::metrics as m;

/// Steps per continuous-training job when the request does not say.
pub const DEFAULT_FEEDBACK_STEPS: u64 = 50;

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
            // The item is stored: a job that cannot start now must not turn its receipt into
            // an error (a client would send it again). The items wait, and the next one tries
            // again.
            Some((every, steps)) if pending >= u64::from(every) => {
                self.start_feedback_job(&adapter, steps)
                    .unwrap_or_else(|err| {
                        tracing::warn!(%adapter, error = %err, "feedback stored, but its training job cannot start");
                        None
                    })
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

    /// Makes `adapter` train on every `feedback_every` new feedback items, `steps` steps each
    /// time (default [`DEFAULT_FEEDBACK_STEPS`]); `feedback_every: None` stops it. Returns the
    /// setting now in force.
    pub fn set_continuous(
        &self,
        adapter: &str,
        feedback_every: Option<u32>,
        steps: Option<u64>,
    ) -> Result<Option<(u32, u64)>, TrainingError> {
        adapters::store::validate_name(adapter).map_err(|e| TrainingError::Invalid {
            param: "adapter".into(),
            message: e.to_string(),
        })?;
        // `steps` is checked even when training is being turned off: a request that names it
        // means something by it, and 0 never means anything.
        let max_steps = self.shared.config.max_steps;
        if let Some(steps) = steps.filter(|&s| s == 0 || s > max_steps) {
            return Err(TrainingError::Invalid {
                param: "steps".into(),
                message: format!("`steps` must be between 1 and {max_steps} (given {steps}); training.max_steps sets the limit"),
            });
        }
        if feedback_every == Some(0) {
            return Err(TrainingError::Invalid {
                param: "feedback_every".into(),
                message: "`feedback_every` must be at least 1, or null to stop continuous training"
                    .into(),
            });
        }
        let setting = feedback_every.map(|every| (every, steps.unwrap_or(DEFAULT_FEEDBACK_STEPS)));
        self.shared.db.set_continuous(adapter, setting)?;
        Ok(setting)
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
        let train = feedback_examples(&pending);
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
        if !self
            .shared
            .db
            .insert_feedback_job(&job, &request.train, &ids)?
        {
            // A replica sharing the database started a job on these items a moment ago.
            return Ok(None);
        }
        self.queued(&job);
        Ok(Some(job))
    }
}

/// The examples a feedback job trains on: each rated answer, and each correction.
///
/// When the job holds both approvals and rejections, ratings are centred on their mean (the
/// baseline of REINFORCE): what an approved answer and a rejected one share (the phrasing most
/// answers use) then cancels out, and the steps go to what tells them apart (which label, which
/// fact). Uncentred, a window of mostly approved answers spends its steps making the usual
/// phrasing likelier. With ratings of one sign only there is nothing to contrast, and they are
/// used as given. A correction is the answer the user wanted, so it keeps a reward of +1 (its
/// teacher-forced completion loss) whatever the others are.
fn feedback_examples(pending: &[PendingFeedback]) -> Vec<TrainingExample> {
    // A rating of exactly 0 teaches nothing (it multiplies the loss by 0).
    let rated: Vec<&PendingFeedback> = pending
        .iter()
        .filter(|item| item.reward != 0.0 && !item.completion.is_empty())
        .collect();
    let mixed = rated.iter().any(|i| i.reward > 0.0) && rated.iter().any(|i| i.reward < 0.0);
    let baseline = if mixed {
        rated.iter().map(|i| f64::from(i.reward)).sum::<f64>() / rated.len() as f64
    } else {
        0.0
    };
    // Centred ratings can leave [−1, 1] (one rejection among many approvals: −1 − 0.9); they
    // are scaled back into it as a whole, which keeps their proportions.
    let largest = rated
        .iter()
        .map(|i| (f64::from(i.reward) - baseline).abs())
        .fold(1.0, f64::max);
    let mut examples = Vec::with_capacity(2 * pending.len());
    for item in pending {
        let advantage = ((f64::from(item.reward) - baseline) / largest) as f32;
        if item.reward != 0.0 && advantage != 0.0 && !item.completion.is_empty() {
            examples.push(TrainingExample::Reward {
                prompt: item.prompt.clone(),
                completion: item.completion.clone(),
                reward: advantage,
            });
        }
        if let Some(correction) = item.corrected_answer.as_ref().filter(|c| !c.is_empty()) {
            examples.push(TrainingExample::Reward {
                prompt: item.prompt.clone(),
                completion: correction.clone(),
                reward: 1.0,
            });
        }
    }
    examples
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, completion: &str, reward: f32, correction: Option<&str>) -> PendingFeedback {
        PendingFeedback {
            id: id.into(),
            prompt: format!("prompt {id}"),
            completion: completion.into(),
            reward,
            corrected_answer: correction.map(Into::into),
        }
    }

    fn rewards(examples: &[TrainingExample]) -> Vec<(String, f32)> {
        examples
            .iter()
            .map(|e| match e {
                TrainingExample::Reward {
                    completion, reward, ..
                } => (completion.clone(), *reward),
                other => panic!("not a reward example: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn ratings_of_one_sign_are_used_as_given_and_corrections_are_rewarded() {
        let examples = feedback_examples(&[
            item("1", "bad", -1.0, Some("good")),
            item("2", "worse", -0.5, None),
        ]);
        assert_eq!(
            examples[1],
            TrainingExample::Reward {
                prompt: "prompt 1".into(),
                completion: "good".into(),
                reward: 1.0
            }
        );
        assert_eq!(
            rewards(&examples),
            [
                ("bad".into(), -1.0),
                ("good".into(), 1.0),
                ("worse".into(), -0.5)
            ]
        );
        let neutral = feedback_examples(&[item("1", "meh", 0.0, None)]);
        assert!(neutral.is_empty(), "a rating of 0 teaches nothing");
    }

    #[test]
    fn mixed_ratings_are_centred_on_their_mean_and_corrections_are_not() {
        // Mean of the ratings: (1 + 1 + 1 − 1) / 4 = 0.5, the unrated 0 left out of it;
        // centred, 0.5 and −1.5, scaled by 1/1.5 into [−1, 1].
        let examples = feedback_examples(&[
            item("1", "a", 1.0, None),
            item("2", "b", 1.0, None),
            item("3", "c", 1.0, None),
            item("4", "d", -1.0, Some("fixed")),
            item("5", "e", 0.0, None),
        ]);
        let third = (0.5f64 / 1.5) as f32;
        assert_eq!(
            rewards(&examples),
            [
                ("a".into(), third),
                ("b".into(), third),
                ("c".into(), third),
                ("d".into(), -1.0),
                ("fixed".into(), 1.0)
            ]
        );
        for (ups, downs) in (1..20).flat_map(|u| (1..20).map(move |d| (u, d))) {
            let items: Vec<PendingFeedback> = (0..ups + downs)
                .map(|i| item(&i.to_string(), "x", if i < ups { 1.0 } else { -1.0 }, None))
                .collect();
            for (_, reward) in rewards(&feedback_examples(&items)) {
                assert!(
                    (-1.0..=1.0).contains(&reward) && reward != 0.0,
                    "{ups} up, {downs} down: {reward}"
                );
            }
        }
        let balanced = feedback_examples(&[item("1", "a", 0.5, None), item("2", "b", -0.5, None)]);
        assert_eq!(rewards(&balanced), [("a".into(), 0.5), ("b".into(), -0.5)]);
    }
}
