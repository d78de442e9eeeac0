//! What a fine-tuning job is: its specification (fixed when it is accepted), its status, and the
//! progress it reports. The HTTP layer renders these in its two shapes (`/v1/finetune` and
//! OpenAI's `/v1/fine_tuning/jobs`); the database stores them as JSON.

use adapters::LoraConfig;
use plugin::{Evaluation, ObjectiveKind, TrainerConfig};
use serde::{Deserialize, Serialize};

/// Everything needed to run (or resume) a job besides its examples and step log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The adapter trained and published to.
    pub adapter: String,
    pub objective: ObjectiveKind,
    pub trainer: TrainerConfig,
    /// The version the job continues from; `None`: a fresh adapter from `lora` and `init_seed`.
    pub base_version: Option<u32>,
    pub lora: LoraConfig,
    pub init_seed: u64,
    /// Publish a version every this many steps (and at the end); `None`: only at the end.
    pub publish_every: Option<u64>,
    /// Publish only versions whose held-out loss is not worse than the adapter's before the job.
    pub publish_only_if_improved: bool,
    /// Where the job came from, for OpenAI's view of it.
    pub origin: JobOrigin,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobOrigin {
    /// `POST /v1/finetune`.
    Finetune,
    /// `POST /v1/fine_tuning/jobs`.
    OpenAi {
        training_file: String,
        validation_file: Option<String>,
        suffix: Option<String>,
    },
    /// Started by continuous training after enough feedback on the adapter.
    Feedback { items: usize },
}

/// OpenAI's job statuses, used by both APIs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// A job as stored: spec, status and progress.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: String,
    pub created_at: u64,
    pub spec: JobSpec,
    pub status: JobStatus,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    /// Why the job failed, for users.
    pub error: Option<String>,
    pub progress: Progress,
    pub train_examples: usize,
    pub held_out_examples: usize,
}

/// What a job has done so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Progress {
    pub steps_done: u64,
    /// Training loss of the last step, `(L+ + L−)/2` on its minibatch.
    pub train_loss: Option<f64>,
    /// The last held-out evaluation.
    pub held_out: Option<HeldOutPoint>,
    /// The first held-out evaluation, before any step: what "improved" compares against.
    pub held_out_before: Option<HeldOutPoint>,
    /// Versions this job published, in order.
    pub published_versions: Vec<u32>,
    /// Steps done at the last publish (or at the last publish skipped for a worse held-out
    /// loss): a resumed job does not publish the same step twice.
    pub last_published_step: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldOutPoint {
    pub steps_done: u64,
    #[serde(flatten)]
    pub evaluation: Evaluation,
}

/// One entry of a job's event log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobEvent {
    /// 1, 2, 3, … within the job.
    pub seq: u64,
    pub created_at: u64,
    pub level: EventLevel,
    pub kind: EventKind,
    pub message: String,
    /// Step numbers, losses, metrics, versions: depends on `kind`.
    pub data: serde_json::Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventLevel {
    Info,
    Warn,
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Queued, started, resumed, finished, failed, cancelled.
    Status,
    Step,
    HeldOut,
    Publish,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Status => "status",
            EventKind::Step => "step",
            EventKind::HeldOut => "held_out",
            EventKind::Publish => "publish",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            EventKind::Status,
            EventKind::Step,
            EventKind::HeldOut,
            EventKind::Publish,
        ]
        .into_iter()
        .find(|k| k.as_str() == text)
    }
}

impl EventLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            EventLevel::Info => "info",
            EventLevel::Warn => "warn",
            EventLevel::Error => "error",
        }
    }

    pub fn parse(text: &str) -> Self {
        match text {
            "warn" => EventLevel::Warn,
            "error" => EventLevel::Error,
            _ => EventLevel::Info,
        }
    }
}

/// One published adapter version, as the database remembers it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VersionInfo {
    pub version: u32,
    pub created_at: u64,
    pub job_id: Option<String>,
    /// Steps the job had done when it published this version.
    pub step: Option<u64>,
    /// The held-out evaluation it was published with, if the job had held-out examples.
    pub held_out: Option<HeldOutPoint>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_kinds_round_trip_through_their_names() {
        for status in JobStatus::ALL {
            assert_eq!(JobStatus::parse(status.as_str()), Some(status));
            assert_eq!(
                serde_json::to_value(status).unwrap(),
                serde_json::Value::from(status.as_str())
            );
        }
        assert_eq!(JobStatus::parse("validating_files"), None);
        assert_eq!(EventKind::parse("held_out"), Some(EventKind::HeldOut));
    }
}
