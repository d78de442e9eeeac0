//! The wire format of fine-tuning: jobs (this server's and OpenAI's), files, feedback and
//! adapters, requests as clients send them and responses as they are answered. Parts that have
//! readers of their own (examples, objectives, hyperparameters) stay JSON in the requests and are
//! described here for the spec.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

pub use crate::api::validate::training_data::{ExampleIn, LabelIn};
use crate::training::job::{EventKind, EventLevel, JobStatus};

/// `objective`: a name, or an object with `type` and the objective's options.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ObjectiveField {
    Name(ObjectiveName),
    #[schema(value_type = Object)]
    Options(Value),
}

#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ObjectiveName {
    Completion,
    Classification,
    Accuracy,
    F1,
    TokenF1,
    ExactMatch,
    Reward,
}

/// `POST /v1/finetune`. The objective, the examples and `lora` stay JSON here: each has a
/// reader of its own whose errors name the path inside (`examples[3].label`,
/// `hyperparameters.lr`), see [`crate::api::validate::mezo_job`].
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FinetuneRequest {
    /// The adapter to train: a new name creates it, an existing one continues from its live
    /// version.
    pub adapter: Option<String>,
    /// A name, or `{"type": name, ...}` with the objective's options.
    #[schema(value_type = Option<ObjectiveField>)]
    pub objective: Option<Value>,
    #[schema(value_type = Option<Vec<ExampleIn>>)]
    pub examples: Option<Value>,
    #[schema(value_type = Option<Vec<ExampleIn>>)]
    pub eval_examples: Option<Value>,
    #[schema(exclusive_minimum = 0.0, exclusive_maximum = 1.0)]
    pub eval_fraction: Option<f64>,
    /// The trainer's settings over its defaults (`lr`, `max_steps`, `batch_size`, `epsilon`,
    /// `estimator`, `optimizer`, `seed`, …).
    #[schema(value_type = Option<Object>)]
    pub hyperparameters: Option<Value>,
    /// `{r, alpha, target_modules, layers}`.
    #[schema(value_type = Option<Object>)]
    pub lora: Option<Value>,
    pub publish_every: Option<u64>,
    pub publish_only_if_improved: Option<bool>,
}

/// `POST /v1/feedback`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FeedbackRequest {
    #[schema(min_length = 1)]
    pub completion_id: String,
    pub reward: Option<f32>,
    pub rating: Option<String>,
    pub corrected_answer: Option<String>,
    pub adapter: Option<String>,
}

/// `POST /v1/adapters/{name}/rollback`.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    pub version: u32,
}

/// `PUT /v1/adapters/{name}/continuous_training`; `feedback_every: null` stops it.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContinuousTrainingRequest {
    #[schema(minimum = 1)]
    pub feedback_every: Option<u32>,
    /// Steps per job (default 50, at most `training.max_steps`).
    #[schema(minimum = 1)]
    pub steps: Option<u64>,
}

/// `POST /v1/load_lora_adapter`, vLLM's: serve the PEFT folder `lora_path` as `lora_name`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadLoraRequest {
    pub lora_name: String,
    pub lora_path: String,
    /// Replace an adapter already served under that name (as its next version).
    #[serde(default)]
    pub load_inplace: bool,
}

/// `POST /v1/unload_lora_adapter`, vLLM's.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UnloadLoraRequest {
    pub lora_name: String,
    /// vLLM's internal id, which some clients send; names identify adapters here.
    #[serde(default)]
    pub lora_int_id: Option<u64>,
}

/// `POST /v1/fine_tuning/jobs`, OpenAI's.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct OpenAiJobRequest {
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub suffix: Option<String>,
    #[serde(default)]
    pub hyperparameters: OpenAiHyperparameters,
    pub seed: Option<u64>,
    /// Only `{"type": "supervised"}` is accepted.
    #[schema(value_type = Option<Object>)]
    pub method: Option<Value>,
}

#[derive(Debug, Clone, Copy, Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenAiHyperparameters {
    pub n_epochs: Option<AutoOr<u64>>,
    pub batch_size: Option<AutoOr<usize>>,
    pub learning_rate_multiplier: Option<AutoOr<f32>>,
}

/// `"auto"` or a value.
#[derive(Debug, Deserialize, Clone, Copy, ToSchema)]
#[serde(untagged)]
pub enum AutoOr<T: ToSchema> {
    Value(T),
    Auto(Auto),
}

#[derive(Debug, Deserialize, Clone, Copy, ToSchema)]
pub enum Auto {
    #[serde(rename = "auto")]
    Auto,
}

impl<T: Copy + ToSchema> AutoOr<T> {
    /// The value given, or `None` for `"auto"` and absent.
    pub fn value(this: Option<Self>) -> Option<T> {
        match this {
            Some(AutoOr::Value(v)) => Some(v),
            Some(AutoOr::Auto(Auto::Auto)) | None => None,
        }
    }
}

/// `{"id", "object", "deleted": true}`: what a delete answers.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Deleted {
    pub id: String,
    pub object: &'static str,
    pub deleted: bool,
}

impl Deleted {
    pub fn new(id: String, object: &'static str) -> Self {
        Self {
            id,
            object,
            deleted: true,
        }
    }
}

/// A job in `/v1/finetune`'s shape.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FinetuneJob {
    pub id: String,
    /// `finetune.job`.
    pub object: &'static str,
    pub adapter: String,
    /// `{"type": name, ...}`.
    #[schema(value_type = Object)]
    pub objective: Value,
    pub status: JobStatus,
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub error: Option<JobFailure>,
    /// The trainer's settings the job runs with.
    #[schema(value_type = Object)]
    pub hyperparameters: Value,
    #[schema(value_type = Object)]
    pub lora: Value,
    /// The adapter version it started from (absent for a new adapter).
    pub base_version: Option<u32>,
    pub publish_every: Option<u64>,
    pub publish_only_if_improved: bool,
    pub examples: ExampleCounts,
    pub progress: JobProgress,
    /// Who queued it: `{"type": "finetune" | "open_ai" | "feedback", ...}`.
    #[schema(value_type = Object)]
    pub origin: Value,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobFailure {
    pub message: String,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct ExampleCounts {
    pub train: usize,
    pub held_out: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobProgress {
    pub steps_done: u64,
    pub max_steps: u64,
    /// The last step's training loss.
    pub train_loss: Option<f64>,
    /// The last held-out evaluation: `{steps_done, loss, metrics}`.
    #[schema(value_type = Option<Object>)]
    pub held_out: Option<Value>,
    /// The held-out evaluation before the first step.
    #[schema(value_type = Option<Object>)]
    pub held_out_before: Option<Value>,
    pub published_versions: Vec<u32>,
}

/// One entry of a job's event log (`/v1/finetune/{id}/events`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobEventOut {
    pub seq: u64,
    pub created_at: u64,
    pub level: EventLevel,
    #[serde(rename = "type")]
    pub kind: EventKind,
    pub message: String,
    #[schema(value_type = Object)]
    pub data: Value,
}

/// A job in OpenAI's `fine_tuning.job` shape.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OpenAiJob {
    /// `fine_tuning.job`.
    pub object: &'static str,
    pub id: String,
    /// The base model.
    pub model: String,
    pub created_at: u64,
    pub finished_at: Option<u64>,
    /// The model name to chat with, once the job has succeeded.
    pub fine_tuned_model: Option<String>,
    pub organization_id: &'static str,
    pub result_files: Vec<String>,
    pub status: JobStatus,
    pub training_file: Option<String>,
    pub validation_file: Option<String>,
    pub hyperparameters: OpenAiJobHyperparameters,
    pub trained_tokens: Option<u64>,
    pub error: Option<OpenAiJobError>,
    pub seed: u64,
    pub estimated_finish: Option<u64>,
    pub integrations: Vec<String>,
    pub user_provided_suffix: Option<String>,
    /// `{"type": "supervised"}`.
    #[schema(value_type = Object)]
    pub method: Value,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct OpenAiJobHyperparameters {
    pub n_epochs: u64,
    pub batch_size: usize,
    pub learning_rate_multiplier: f32,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OpenAiJobError {
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
}

/// `fine_tuning.job.event`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OpenAiJobEvent {
    pub object: &'static str,
    pub id: String,
    pub created_at: u64,
    pub level: EventLevel,
    pub message: String,
    #[schema(value_type = Object)]
    pub data: Value,
    /// `metrics` for a step, `message` otherwise.
    #[serde(rename = "type")]
    pub kind: &'static str,
}

/// `fine_tuning.job.checkpoint`: a version the job published.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OpenAiCheckpoint {
    pub object: &'static str,
    pub id: String,
    pub created_at: u64,
    /// `<adapter>@<version>`, usable as `model`.
    pub fine_tuned_model_checkpoint: String,
    pub fine_tuning_job_id: String,
    pub step_number: Option<u64>,
    pub metrics: CheckpointMetrics,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct CheckpointMetrics {
    pub step: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid_loss: Option<f64>,
}

/// An uploaded file, in OpenAI's shape.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FileObject {
    pub id: String,
    /// `file`.
    pub object: &'static str,
    pub bytes: u64,
    pub created_at: u64,
    pub filename: String,
    pub purpose: String,
    pub status: &'static str,
    pub status_details: Option<String>,
    pub expires_at: Option<u64>,
}

/// `POST /v1/files`: multipart form fields.
#[derive(Debug, ToSchema)]
pub struct FileUpload {
    /// JSONL in OpenAI's chat format, one `{"messages": [...]}` per line.
    #[schema(value_type = String, format = Binary)]
    pub file: Vec<u8>,
    /// `fine-tune`.
    pub purpose: String,
}

/// An adapter with every version and which one is live.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdapterOut {
    pub id: String,
    /// `adapter`.
    pub object: &'static str,
    pub live_version: u32,
    pub versions: Vec<AdapterVersionOut>,
    pub continuous_training: Option<ContinuousTraining>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdapterVersionOut {
    pub version: u32,
    /// `<adapter>@<version>`, usable as `model`.
    pub id: String,
    pub created_at: u64,
    pub live: bool,
    pub size_bytes: usize,
    pub job_id: Option<String>,
    pub step: Option<u64>,
    /// The held-out evaluation it was published with: `{steps_done, loss, metrics}`.
    #[schema(value_type = Option<Object>)]
    pub held_out: Option<Value>,
}

/// An adapter's continuous training: a `reward` job of `steps` steps on every
/// `feedback_every` feedback items.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct ContinuousTraining {
    pub feedback_every: u32,
    pub steps: u64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ContinuousTrainingOut {
    pub adapter: String,
    pub continuous_training: Option<ContinuousTraining>,
}

/// What `POST /v1/feedback` answers: the stored item, and the job it started, if any.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FeedbackReceiptOut {
    pub id: String,
    /// `feedback`.
    pub object: &'static str,
    pub completion_id: String,
    pub adapter: String,
    pub reward: f32,
    /// Items waiting for the adapter's next continuous-training job.
    pub pending_feedback: u64,
    pub job: Option<FinetuneJob>,
}

/// One stored feedback item (`GET /v1/feedback?adapter=`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FeedbackItem {
    pub id: String,
    pub object: &'static str,
    pub created_at: u64,
    pub completion_id: String,
    pub adapter: String,
    pub reward: f32,
    pub corrected_answer: Option<String>,
    /// The job that trained on it, once one has.
    pub job_id: Option<String>,
}
