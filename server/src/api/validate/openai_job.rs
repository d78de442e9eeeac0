//! `POST /v1/fine_tuning/jobs`: OpenAI's request ([`OpenAiJobRequest`]) becomes a
//! [`ValidOpenAiJob`] (the base model, the method and the suffix checked, the adapter named
//! `ft:<base>:<suffix>:<tag>`), and then, once its files are read in the training service, the
//! service's [`NewJob`]: OpenAI's `n_epochs`, `batch_size` and `learning_rate_multiplier` mapped
//! onto the trainer's defaults.

use plugin::{ObjectiveKind, TrainerConfig, TrainingExample};
use rand::distributions::Alphanumeric;
use rand::Rng;
use serde_json::{json, Value};

use crate::api::error::ApiError;
use crate::api::protocol::{AutoOr, OpenAiHyperparameters, OpenAiJobRequest};
use crate::api::state::Serving;
use crate::engine::chat_template::ChatTemplate;
use crate::training::{JobOrigin, NewJob, Training, TrainingError};

use super::training_data::parse_example;

/// OpenAI's default number of epochs when `n_epochs` is `auto`.
const AUTO_EPOCHS: u64 = 3;

/// An OpenAI fine-tuning job whose fields are checked; its files are read by [`Self::new_job`].
pub struct ValidOpenAiJob {
    /// `ft:<base>:<suffix>:<tag>`: the adapter the job trains.
    adapter: String,
    origin: JobOrigin,
    training_file: String,
    validation_file: Option<String>,
    hyperparameters: OpenAiHyperparameters,
    seed: Option<u64>,
}

impl ValidOpenAiJob {
    pub fn new(request: OpenAiJobRequest, serving: &Serving) -> Result<Self, ApiError> {
        if request.model != serving.model_id {
            return Err(ApiError::model_not_found(format!(
                "`{}` cannot be fine-tuned here; use the base model `{}`",
                request.model, serving.model_id
            )));
        }
        if let Some(method) = &request.method {
            let kind = method.get("type").and_then(Value::as_str);
            if kind.is_some_and(|k| k != "supervised") {
                return Err(ApiError::unsupported(
                    "method.type",
                    "only `supervised` fine-tuning is implemented (with MeZO)",
                ));
            }
        }
        let suffix = request.suffix.clone().unwrap_or_else(|| "mezo".into());
        if suffix.is_empty()
            || suffix.len() > 64
            || !suffix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(ApiError::invalid(
                "suffix",
                "`suffix` must be 1 to 64 letters, digits, '-', '_' or '.'",
            ));
        }
        let tag: String = rand::thread_rng()
            .sample_iter(&Alphanumeric)
            .take(8)
            .map(|c| char::from(c).to_ascii_lowercase())
            .collect();
        Ok(Self {
            adapter: format!("ft:{}:{suffix}:{tag}", serving.model_id),
            origin: JobOrigin::OpenAi {
                training_file: request.training_file.clone(),
                validation_file: request.validation_file.clone(),
                suffix: request.suffix,
            },
            training_file: request.training_file,
            validation_file: request.validation_file,
            hyperparameters: request.hyperparameters,
            seed: request.seed,
        })
    }

    /// The job, with the examples of its uploaded files (chat examples rendered with
    /// `template`); runs on the training service's thread, which owns the files.
    pub fn new_job(
        self,
        training: &Training,
        template: Option<&ChatTemplate>,
    ) -> Result<NewJob, TrainingError> {
        let train = read_examples(training, &self.training_file, "training_file", template)?;
        let held_out = match &self.validation_file {
            Some(id) => read_examples(training, id, "validation_file", template)?,
            None => Vec::new(),
        };
        let hyper = self.hyperparameters;
        let batch_size = AutoOr::value(hyper.batch_size)
            .unwrap_or_else(|| train.len().min(TrainerConfig::default().batch_size));
        if batch_size == 0 || batch_size > train.len() {
            return Err(TrainingError::Invalid {
                param: "hyperparameters.batch_size".into(),
                message: format!(
                    "`batch_size` must be between 1 and the {} training examples",
                    train.len()
                ),
            });
        }
        let epochs = AutoOr::value(hyper.n_epochs).unwrap_or(AUTO_EPOCHS);
        let multiplier = AutoOr::value(hyper.learning_rate_multiplier).unwrap_or(1.0);
        let steps_per_epoch = (train.len() / batch_size) as u64;
        let trainer = TrainerConfig {
            lr: TrainerConfig::default().lr * multiplier,
            batch_size,
            max_steps: epochs.saturating_mul(steps_per_epoch),
            seed: self.seed.unwrap_or(0),
            eval_every: steps_per_epoch.max(1),
            ..TrainerConfig::default()
        };
        Ok(NewJob {
            adapter: self.adapter,
            objective: ObjectiveKind::Completion,
            trainer,
            lora: None,
            publish_every: (epochs > 1).then_some(steps_per_epoch),
            publish_only_if_improved: false,
            train,
            held_out,
            origin: self.origin,
            quota: None,
        })
    }

    /// OpenAI names the hyperparameters without our `hyperparameters.` prefix for its own ones
    /// only; ours (`max_steps` from `n_epochs`) are reported as `hyperparameters.n_epochs`.
    pub fn openai_params(mut err: ApiError) -> ApiError {
        if err.param.as_deref() == Some("hyperparameters.max_steps") {
            err.param = Some("hyperparameters.n_epochs".into());
        }
        err
    }
}

/// The chat examples of an uploaded file; errors name the file field and the line.
fn read_examples(
    training: &Training,
    id: &str,
    field: &str,
    template: Option<&ChatTemplate>,
) -> Result<Vec<TrainingExample>, TrainingError> {
    let content = training.file_content(id).map_err(|e| match e {
        TrainingError::NotFound { .. } => TrainingError::Invalid {
            param: field.into(),
            message: format!(
                "`{field}` {id:?} is not an uploaded file; upload it with POST /v1/files"
            ),
        },
        other => other,
    })?;
    let text = String::from_utf8_lossy(&content);
    let mut examples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let invalid = |message: String| TrainingError::Invalid {
            param: field.into(),
            message: format!("{field} line {}: {message}", i + 1),
        };
        let value: Value = serde_json::from_str(line).map_err(|e| invalid(e.to_string()))?;
        let messages = json!({ "messages": value.get("messages").cloned().unwrap_or(Value::Null) });
        let example = parse_example(&messages, &format!("line {}", i + 1), template)
            .map_err(|e| invalid(e.message))?;
        examples.push(example);
    }
    Ok(examples)
}
