//! `POST /v1/chat/completions`: messages rendered with the model's chat template, generated on
//! the scheduler under the requested model (base or adapter version), answered whole or
//! streamed.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::engine::chat_template::ChatMessage;
use crate::engine::generate::TokenEvent;
use crate::engine::loaded_model::LoadedModel;
use crate::scheduler::SequenceRequest;

use super::error::ApiError;
use super::extract::ApiJson;
use super::generation::{chat_logprob, collect, RequestMetrics};
use super::protocol::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
    ChatCompletionRequest, ChatDelta, ChatLogprobs, ChatMessageIn, MessageContent, ResponseMeta,
    SamplingFields, Usage,
};
use super::state::AppState;
use super::stream::{sse_response, ChunkRenderer};
use super::validate::{logprobs_count, plan, positive_max_tokens, reject_if_set, PlanInputs};
use super::ServedModelLabel;
use crate::ids::{new_id, unix_now};
use crate::training::db::StoredCompletion;
use crate::training::Training;

pub async fn chat_completions(
    State(state): State<AppState>,
    body: ApiJson,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let request: ChatCompletionRequest = body.parse()?;
    let sampling: SamplingFields = body.parse()?;
    reject_unsupported(&request)?;
    let serving = state.serving()?;
    let model = serving.resolve_model(&request.model)?;
    let label = ServedModelLabel(crate::metrics::adapter_label(&model.name));

    let messages = convert_messages(&request.messages, "")?;
    let llm = &serving.model;
    let text = llm
        .chat_template
        .render(&messages, true)
        .map_err(|err| ApiError::invalid("messages", err.to_string()))?;
    let prompt = llm.tokenizer.encode(&text, true);

    let top_logprobs = match (request.logprobs.unwrap_or(false), request.top_logprobs) {
        (true, n) => Some(logprobs_count("top_logprobs", n.unwrap_or(0))?),
        (false, Some(n)) if n > 0 => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            ))
        }
        (false, _) => None,
    };
    let context_length = llm.llama.config.context_length;
    let (max_tokens, max_tokens_field) = match (request.max_completion_tokens, sampling.max_tokens)
    {
        (Some(v), _) => (
            positive_max_tokens("max_completion_tokens", v)?,
            "max_completion_tokens",
        ),
        (None, Some(v)) => (positive_max_tokens("max_tokens", v)?, "max_tokens"),
        // OpenAI's default: until the model stops or the context is full.
        (None, None) => (context_length.saturating_sub(prompt.len()), "max_tokens"),
    };
    let stop_token_ids = llm.tokenizer.eog_ids();
    let plan = plan(
        &sampling,
        PlanInputs {
            prompt_tokens: prompt.len(),
            context_length,
            max_tokens,
            max_tokens_field,
            top_logprobs,
            stop_token_ids: stop_token_ids.clone(),
            max_choices: state.config().max_choices,
        },
    )?;

    let sequences = (0..plan.n)
        .map(|i| SequenceRequest {
            prompt: prompt.clone(),
            adapter: model.view(),
            params: plan.choice(i),
        })
        .collect();
    let receivers = serving.scheduler.submit_sequences(sequences)?;
    let meta = ResponseMeta {
        id: new_id("chatcmpl"),
        object: "chat.completion",
        created: unix_now(),
        model: request.model.clone(),
        system_fingerprint: model.fingerprint(&serving.model_id),
        adapter_version: model.version(),
    };
    let mut metrics = RequestMetrics::new(&model.name, arrived, prompt.len());
    let memory = CompletionMemory {
        training: serving.training.clone(),
        id: meta.id.clone(),
        adapter: model.adapter.as_ref().map(|a| a.name.clone()),
        prompt: text,
        answer: String::new(),
    };

    let mut response = if plan.stream {
        let renderer = ChatChunks {
            meta: ResponseMeta {
                object: "chat.completion.chunk",
                ..meta
            },
            n: plan.n,
            include_usage: plan.include_usage,
            logprobs: top_logprobs.is_some(),
            stop_token_ids,
            model: Arc::clone(llm),
            memory: Some(memory),
            remembering: None,
        };
        sse_response(
            receivers,
            metrics,
            prompt.len(),
            plan.include_usage,
            renderer,
        )
    } else {
        let outputs = collect(receivers, &mut metrics).await;
        let completion_tokens = metrics.generated();
        metrics.finish();
        let choices = outputs?
            .into_iter()
            .enumerate()
            .map(|(index, out)| ChatChoice {
                index,
                logprobs: top_logprobs.map(|_| ChatLogprobs {
                    content: out
                        .tokens
                        .iter()
                        .filter_map(|t| chat_logprob(&llm.tokenizer, t, &stop_token_ids))
                        .collect(),
                }),
                message: AssistantMessage {
                    role: "assistant",
                    content: out.text,
                },
                finish_reason: Some(out.finish.as_str()),
            })
            .collect::<Vec<ChatChoice>>();
        if let Some(first) = choices.first() {
            // Stored before the reply leaves: feedback sent right after it finds the completion.
            let _ = memory.remember(first.message.content.clone()).await;
        }
        Json(ChatCompletion {
            meta,
            choices,
            usage: Usage::new(prompt.len(), completion_tokens),
        })
        .into_response()
    };
    response.extensions_mut().insert(label);
    Ok(response)
}

fn reject_unsupported(request: &ChatCompletionRequest) -> Result<(), ApiError> {
    const TOOLS: &str = "tool and function calling are not implemented";
    reject_if_set("tools", &request.tools, TOOLS)?;
    reject_if_set("tool_choice", &request.tool_choice, TOOLS)?;
    reject_if_set("functions", &request.functions, TOOLS)?;
    reject_if_set("function_call", &request.function_call, TOOLS)?;
    reject_if_set("parallel_tool_calls", &request.parallel_tool_calls, TOOLS)?;
    if let Some(format) = &request.response_format {
        if format.get("type").and_then(|t| t.as_str()) != Some("text") && !format.is_null() {
            return Err(ApiError::unsupported(
                "response_format",
                "structured outputs and JSON mode are not implemented; only {\"type\": \"text\"}",
            ));
        }
    }
    reject_if_set("audio", &request.audio, "audio output is not implemented")?;
    if let Some(modalities) = &request.modalities {
        let text_only = modalities
            .as_array()
            .is_some_and(|m| m.iter().all(|x| x == "text"));
        if !text_only && !modalities.is_null() {
            return Err(ApiError::unsupported(
                "modalities",
                "only text output is implemented",
            ));
        }
    }
    reject_if_set(
        "prediction",
        &request.prediction,
        "predicted outputs are not implemented",
    )?;
    reject_if_set(
        "web_search_options",
        &request.web_search_options,
        "web search is not implemented",
    )?;
    reject_if_set(
        "reasoning_effort",
        &request.reasoning_effort,
        "this model has no reasoning mode",
    )?;
    Ok(())
}

/// OpenAI messages → chat-template messages: text only; tools and images are refused by name.
/// `prefix` is the path of the list's owner in error params (`examples[3].` for training data).
pub(crate) fn convert_messages(
    messages: &[ChatMessageIn],
    prefix: &str,
) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            format!("{prefix}messages"),
            format!("`{prefix}messages` must hold at least one message"),
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, message)| {
            let role = match message.role.as_str() {
                // OpenAI's newer name for system instructions.
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                "tool" | "function" => {
                    return Err(ApiError::unsupported(
                        &format!("{prefix}messages[{i}].role"),
                        "tool results need tool calling, which is not implemented",
                    ))
                }
                other => {
                    return Err(ApiError::invalid(
                        format!("{prefix}messages[{i}].role"),
                        format!("`{prefix}messages[{i}].role` is `{other}`; use system, developer, user or assistant"),
                    ))
                }
            };
            if message.tool_calls.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(ApiError::unsupported(
                    &format!("{prefix}messages[{i}].tool_calls"),
                    "tool calling is not implemented",
                ));
            }
            if message.function_call.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(ApiError::unsupported(
                    &format!("{prefix}messages[{i}].function_call"),
                    "function calling is not implemented",
                ));
            }
            let content = match &message.content {
                Some(MessageContent::Text(text)) => text.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => text.push_str(t),
                            ("text", None) => {
                                return Err(ApiError::invalid(
                                    format!("{prefix}messages[{i}].content[{j}].text"),
                                    format!("text part `{prefix}messages[{i}].content[{j}]` has no `text`"),
                                ))
                            }
                            (other, _) => {
                                return Err(ApiError::unsupported(
                                    &format!("{prefix}messages[{i}].content[{j}].type"),
                                    &format!("`{other}` content parts are not implemented; this model reads text only"),
                                ))
                            }
                        }
                    }
                    text
                }
                None => {
                    return Err(ApiError::invalid(
                        format!("{prefix}messages[{i}].content"),
                        format!("`{prefix}messages[{i}].content` is missing; give the message's text"),
                    ))
                }
            };
            Ok(ChatMessage {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

/// Chat stream chunks: a role chunk per choice, content deltas, a finish chunk per choice.
struct ChatChunks {
    meta: ResponseMeta,
    n: usize,
    include_usage: bool,
    logprobs: bool,
    stop_token_ids: Vec<u32>,
    model: Arc<LoadedModel>,
    /// Collects the first choice's text, remembered for feedback once it finishes.
    memory: Option<CompletionMemory>,
    /// The store of that text, which `[DONE]` waits for.
    remembering: Option<tokio::task::JoinHandle<()>>,
}

/// What `POST /v1/feedback` needs of an answer: kept once the answer is complete.
struct CompletionMemory {
    training: Training,
    id: String,
    adapter: Option<String>,
    /// The prompt as the model saw it.
    prompt: String,
    answer: String,
}

impl CompletionMemory {
    /// Stores the completion off the async threads; the reply waits for the returned handle.
    fn remember(self, answer: String) -> tokio::task::JoinHandle<()> {
        let completion = StoredCompletion {
            id: self.id,
            adapter: self.adapter,
            prompt: self.prompt,
            completion: answer,
        };
        let training = self.training;
        tokio::task::spawn_blocking(move || training.remember_completion(completion))
    }
}

impl ChatChunks {
    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> String {
        ChatCompletionChunk::stream_chunk(&self.meta, choices, self.include_usage, usage)
    }
}

impl ChunkRenderer for ChatChunks {
    fn start(&mut self) -> Vec<String> {
        (0..self.n)
            .map(|index| {
                self.chunk(
                    vec![ChatChunkChoice {
                        index,
                        delta: ChatDelta {
                            role: Some("assistant"),
                            content: Some(String::new()),
                        },
                        logprobs: None,
                        finish_reason: None,
                    }],
                    None,
                )
            })
            .collect()
    }

    fn token(&mut self, index: usize, event: &TokenEvent) -> Vec<String> {
        if index == 0 {
            if let Some(memory) = self.memory.as_mut() {
                memory.answer.push_str(&event.text);
            }
            if event.finish.is_some() {
                if let Some(mut memory) = self.memory.take() {
                    let answer = std::mem::take(&mut memory.answer);
                    self.remembering = Some(memory.remember(answer));
                }
            }
        }
        let mut chunks = Vec::new();
        let logprob = self
            .logprobs
            .then(|| chat_logprob(&self.model.tokenizer, event, &self.stop_token_ids))
            .flatten();
        if !event.text.is_empty() || logprob.is_some() {
            chunks.push(self.chunk(
                vec![ChatChunkChoice {
                    index,
                    delta: ChatDelta {
                        role: None,
                        content: Some(event.text.clone()),
                    },
                    logprobs: logprob.map(|entry| ChatLogprobs {
                        content: vec![entry],
                    }),
                    finish_reason: None,
                }],
                None,
            ));
        }
        if let Some(finish) = event.finish {
            chunks.push(self.chunk(
                vec![ChatChunkChoice {
                    index,
                    delta: ChatDelta::default(),
                    logprobs: None,
                    finish_reason: Some(finish.as_str()),
                }],
                None,
            ));
        }
        chunks
    }

    fn usage(&mut self, usage: Usage) -> String {
        self.chunk(Vec::new(), Some(usage))
    }

    fn before_done(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        self.remembering.take()
    }
}
