//! The wire format: request bodies as clients send them (OpenAI's, as sent by the `openai`
//! clients, and this server's own `/v1/finetune`), and response bodies, list envelopes and
//! stream chunks with OpenAI's field names. Only shapes live here; checking values and building
//! what the engine and the training service run is [`super::validate`]'s job.
//!
//! Unknown request fields are ignored (newer SDKs send fields older servers never heard of);
//! known OpenAI fields this server does not implement are captured as raw JSON so validation can
//! reject them by name instead of silently ignoring them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `stop`: one string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Sampling fields shared by chat and text completions, read from the same body as the
/// endpoint's own fields (a second pass rather than `serde(flatten)`, which would lose the
/// field paths that errors name).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingFields {
    pub max_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// vLLM's extension; 0 or absent disables it.
    pub top_k: Option<u64>,
    pub seed: Option<i64>,
    pub stop: Option<StopField>,
    pub n: Option<u64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub user: Option<String>,
    pub logit_bias: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessageIn>,
    pub max_completion_tokens: Option<u64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u64>,
    // OpenAI features not implemented here: rejected by name when present.
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub parallel_tool_calls: Option<Value>,
    pub response_format: Option<Value>,
    pub audio: Option<Value>,
    pub modalities: Option<Value>,
    pub prediction: Option<Value>,
    pub web_search_options: Option<Value>,
    pub reasoning_effort: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    pub tool_calls: Option<Value>,
    pub function_call: Option<Value>,
}

/// Message content: a string, or a list of parts (only text parts are supported).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Value,
    /// Legacy log-probs: the number of alternatives per token (0–20), or absent for none.
    pub logprobs: Option<u64>,
    pub echo: Option<bool>,
    pub suffix: Option<Value>,
    pub best_of: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// `{token, logprob, bytes}`: one alternative in chat log-probs.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// One generated token in chat log-probs.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TokenLogprobOut {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprobOut>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// Fields every response and chunk carries.
#[derive(Debug, Clone, Serialize)]
pub struct ResponseMeta {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    /// The adapter version that answered (absent for the base model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter_version: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletion {
    #[serde(flatten)]
    pub meta: ResponseMeta,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// A stream chunk (chat) or a text completion: shared fields, the choices, and `usage`, which
/// is absent, `null` (a stream chunk before the last, with `include_usage`) or the counts.
#[derive(Debug, Clone, Serialize)]
pub struct ChoicesEnvelope<C> {
    #[serde(flatten)]
    pub meta: ResponseMeta,
    pub choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

impl<C: Serialize> ChoicesEnvelope<C> {
    /// One stream chunk as JSON text: `usage` appears (as `null` unless given) only when the
    /// client asked for `include_usage`.
    pub fn stream_chunk(
        meta: &ResponseMeta,
        choices: Vec<C>,
        include_usage: bool,
        usage: Option<Usage>,
    ) -> String {
        let chunk = Self {
            meta: meta.clone(),
            choices,
            usage: include_usage.then_some(usage),
        };
        serde_json::to_string(&chunk).unwrap_or_default()
    }
}

pub type ChatCompletionChunk = ChoicesEnvelope<ChatChunkChoice>;

/// Legacy completions log-probs: parallel lists, one entry per token.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<serde_json::Map<String, Value>>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

pub type Completion = ChoicesEnvelope<CompletionChoice>;

#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// For adapters: the base model they apply to (vLLM's and LoRAX's convention).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// For adapters: the adapter's name (its alias).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
    /// For adapters: the live version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_version: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub versions: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<usize>,
}

/// OpenAI's list envelope, `{"object": "list", "data": [...], "has_more": false}`, for every
/// listing.
#[derive(Debug, Clone, Serialize)]
pub struct ListPage<T> {
    pub object: &'static str,
    pub data: Vec<T>,
    /// More items follow the last one (ask again with `?after=<its id>`).
    pub has_more: bool,
}

impl<T> ListPage<T> {
    /// A whole listing: nothing more follows.
    pub fn all(data: Vec<T>) -> Self {
        Self::page(data, false)
    }

    pub fn page(data: Vec<T>, has_more: bool) -> Self {
        Self {
            object: "list",
            data,
            has_more,
        }
    }
}

/// `POST /v1/finetune`. The objective, the examples and `lora` stay JSON here: each has a
/// reader of its own whose errors name the path inside (`examples[3].label`,
/// `hyperparameters.lr`), see [`super::validate::mezo_job`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneRequest {
    pub adapter: Option<String>,
    pub objective: Option<Value>,
    pub examples: Option<Value>,
    pub eval_examples: Option<Value>,
    pub eval_fraction: Option<f64>,
    pub hyperparameters: Option<Value>,
    pub lora: Option<Value>,
    pub publish_every: Option<u64>,
    pub publish_only_if_improved: Option<bool>,
}

/// `POST /v1/feedback`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackRequest {
    pub completion_id: String,
    pub reward: Option<f32>,
    pub rating: Option<String>,
    pub corrected_answer: Option<String>,
    pub adapter: Option<String>,
}

/// `POST /v1/adapters/{name}/rollback`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    pub version: u32,
}

/// `PUT /v1/adapters/{name}/continuous_training`; `feedback_every: null` stops it.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContinuousTrainingRequest {
    pub feedback_every: Option<u32>,
    pub steps: Option<u64>,
}

/// `POST /v1/load_lora_adapter`, vLLM's: serve the PEFT folder `lora_path` as `lora_name`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadLoraRequest {
    pub lora_name: String,
    pub lora_path: String,
    /// Replace an adapter already served under that name (as its next version).
    #[serde(default)]
    pub load_inplace: bool,
}

/// `POST /v1/unload_lora_adapter`, vLLM's.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnloadLoraRequest {
    pub lora_name: String,
    /// vLLM's internal id, which some clients send; names identify adapters here.
    #[serde(default)]
    pub lora_int_id: Option<u64>,
}

/// `POST /v1/fine_tuning/jobs`, OpenAI's.
#[derive(Debug, Clone, Deserialize)]
pub struct OpenAiJobRequest {
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub suffix: Option<String>,
    #[serde(default)]
    pub hyperparameters: OpenAiHyperparameters,
    pub seed: Option<u64>,
    pub method: Option<Value>,
}

#[derive(Debug, Clone, Copy, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OpenAiHyperparameters {
    pub n_epochs: Option<AutoOr<u64>>,
    pub batch_size: Option<AutoOr<usize>>,
    pub learning_rate_multiplier: Option<AutoOr<f32>>,
}

/// `"auto"` or a value.
#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(untagged)]
pub enum AutoOr<T> {
    Value(T),
    Auto(Auto),
}

#[derive(Debug, Deserialize, Clone, Copy)]
pub enum Auto {
    #[serde(rename = "auto")]
    Auto,
}

impl<T: Copy> AutoOr<T> {
    /// The value given, or `None` for `"auto"` and absent.
    pub fn value(this: Option<Self>) -> Option<T> {
        match this {
            Some(AutoOr::Value(v)) => Some(v),
            Some(AutoOr::Auto(Auto::Auto)) | None => None,
        }
    }
}
