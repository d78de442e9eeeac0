//! `POST /v1/chat/completions`: a [`ValidChat`] (the messages rendered with the model's chat
//! template, every field checked) generated on the scheduler under the requested model (base or
//! adapter version), answered whole or streamed, and its first choice remembered for feedback.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::engine::generate::TokenEvent;
use crate::engine::loaded_model::LoadedModel;
use crate::scheduler::SequenceRequest;

use super::error::{ApiError, ErrorBody};
use super::extract::ApiJson;
use super::openapi::ChatCompletionBody;
use super::openapi::ServerSentEvent;
use super::protocol::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatDelta,
    ChatLogprobs, ResponseMeta, Usage,
};
use super::state::AppState;
use super::stream::{sse_response, ChunkRenderer};
use super::token_events::{chat_logprob, collect, RequestMetrics};
use super::validate::chat::ValidChat;
use super::ServedModelLabel;
use crate::ids::{new_id, unix_now};
use crate::training::db::StoredCompletion;
use crate::training::Training;

#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "inference",
    summary = "A chat completion, whole or streamed",
    request_body = ChatCompletionBody,
    responses(
        (status = 200, description = "The completion (JSON), or with `stream: true` its chunks as server-sent events ending with `[DONE]`", content((ChatCompletion = "application/json"), (ServerSentEvent = "text/event-stream"))),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn chat_completions(
    State(state): State<AppState>,
    body: ApiJson,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let serving = state.serving()?;
    let chat = ValidChat::new(&body, serving, state.config().max_choices)?;
    let model = chat.model.clone();
    let label = ServedModelLabel(crate::metrics::adapter_label(&model.name));
    let llm = &serving.model;
    let plan = &chat.plan;
    let stop_token_ids = plan.params.stop.token_ids.clone();
    let prompt_tokens = chat.prompt.len();

    let sequences = (0..plan.n)
        .map(|i| SequenceRequest {
            prompt: chat.prompt.clone(),
            adapter: model.view(),
            params: plan.choice(i),
        })
        .collect();
    let receivers = serving.scheduler.submit_sequences(sequences)?;
    let meta = ResponseMeta {
        id: new_id("chatcmpl"),
        object: "chat.completion",
        created: unix_now(),
        model: chat.model_name.clone(),
        system_fingerprint: model.fingerprint(&serving.model_id),
        adapter_version: model.version(),
    };
    let mut metrics = RequestMetrics::new(&model.name, arrived, prompt_tokens);
    let memory = CompletionMemory {
        training: serving.training.clone(),
        id: meta.id.clone(),
        adapter: model.adapter.as_ref().map(|a| a.name.clone()),
        prompt: chat.prompt_text.clone(),
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
            logprobs: chat.logprobs(),
            stop_token_ids,
            model: Arc::clone(llm),
            memory: Some(memory),
            remembering: None,
        };
        sse_response(
            receivers,
            metrics,
            prompt_tokens,
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
                logprobs: chat.logprobs().then(|| ChatLogprobs {
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
            usage: Usage::new(prompt_tokens, completion_tokens),
        })
        .into_response()
    };
    response.extensions_mut().insert(label);
    Ok(response)
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
