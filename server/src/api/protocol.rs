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
use utoipa::ToSchema;

pub mod training;
pub use training::*;

/// `stop`: one string or a list of strings.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Sampling fields shared by chat and text completions, read from the same body as the
/// endpoint's own fields (a second pass rather than `serde(flatten)`, which would lose the
/// field paths that errors name).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
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
    /// vLLM's extension: generate past the model's end-of-sequence tokens, until `max_tokens`
    /// or a `stop` string (those tokens stay out of the text).
    pub ignore_eos: Option<bool>,
    #[schema(ignore)]
    pub logit_bias: Option<Value>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    #[schema(min_length = 1)]
    pub model: String,
    #[schema(min_items = 1)]
    pub messages: Vec<ChatMessageIn>,
    pub max_completion_tokens: Option<u64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u64>,
    // OpenAI features not implemented here: rejected by name when present.
    #[schema(ignore)]
    pub tools: Option<Value>,
    #[schema(ignore)]
    pub tool_choice: Option<Value>,
    #[schema(ignore)]
    pub functions: Option<Value>,
    #[schema(ignore)]
    pub function_call: Option<Value>,
    #[schema(ignore)]
    pub parallel_tool_calls: Option<Value>,
    #[schema(ignore)]
    pub response_format: Option<Value>,
    #[schema(ignore)]
    pub audio: Option<Value>,
    #[schema(ignore)]
    pub modalities: Option<Value>,
    #[schema(ignore)]
    pub prediction: Option<Value>,
    #[schema(ignore)]
    pub web_search_options: Option<Value>,
    #[schema(ignore)]
    pub reasoning_effort: Option<Value>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatMessageIn {
    #[schema(value_type = ChatRole)]
    pub role: String,
    /// Required here (tool calls are not implemented); optional on the wire so that its
    /// absence gets a message naming the message.
    #[serde(default)]
    #[schema(value_type = MessageContent, required = true)]
    pub content: Option<MessageContent>,
    #[schema(ignore)]
    pub tool_calls: Option<Value>,
    #[schema(ignore)]
    pub function_call: Option<Value>,
}

/// The roles a message may have, as the spec lists them (`developer` is `system`).
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChatRole {
    System,
    Developer,
    User,
    Assistant,
}

/// Message content: a string, or a list of parts (only text parts are supported).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionRequest {
    #[schema(min_length = 1)]
    pub model: String,
    /// Read by [`super::validate::completion`], which names the entry at fault.
    #[schema(value_type = PromptShapes)]
    pub prompt: Value,
    /// Legacy log-probs: the number of alternatives per token (0–20), or absent for none.
    pub logprobs: Option<u64>,
    pub echo: Option<bool>,
    #[schema(ignore)]
    pub suffix: Option<Value>,
    #[schema(ignore)]
    pub best_of: Option<u64>,
}

/// `prompt`'s accepted shapes, as the spec describes them.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PromptShapes {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, ToSchema)]
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
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// One generated token in chat log-probs.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct TokenLogprobOut {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprobOut>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// Fields every response and chunk carries.
#[derive(Debug, Clone, Serialize, ToSchema)]
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

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletion {
    #[serde(flatten)]
    pub meta: ResponseMeta,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// A stream chunk (chat) or a text completion: shared fields, the choices, and `usage`, which
/// is absent, `null` (a stream chunk before the last, with `include_usage`) or the counts.
#[derive(Debug, Clone, Serialize, ToSchema)]
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
#[derive(Debug, Clone, Default, Serialize, PartialEq, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<serde_json::Map<String, Value>>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

pub type Completion = ChoicesEnvelope<CompletionChoice>;

#[derive(Debug, Clone, Serialize, ToSchema)]
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

/// `GET /health`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
}

/// `GET /ready` once the model is loaded.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Ready {
    pub status: &'static str,
    pub model: String,
    /// Requests waiting for a place in the batch.
    pub waiting: usize,
}

/// OpenAI's list envelope, `{"object": "list", "data": [...], "has_more": false}`, for every
/// listing.
#[derive(Debug, Clone, Serialize, ToSchema)]
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
