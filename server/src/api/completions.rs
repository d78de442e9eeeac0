//! `POST /v1/completions`: OpenAI's legacy text completions. One or several prompts (text or
//! token ids), `n` choices each, whole or streamed, and `echo` with `logprobs`: with
//! `max_tokens: 0` the answer is the prompt's own token log-probs, which is how clients score
//! text and compute perplexity.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{Map, Value};

use crate::engine::generate::{FinishReason, TokenEvent};
use crate::engine::loaded_model::LoadedModel;
use crate::engine::sampler::TokenLogprob;
use crate::scheduler::{PromptTokenLogprob, SequenceRequest};

use super::error::{ApiError, ErrorBody};
use super::extract::ApiJson;
use super::openapi::CompletionBody;
use super::openapi::ServerSentEvent;
use super::protocol::{
    ChoicesEnvelope, Completion, CompletionChoice, CompletionLogprobs, ResponseMeta, Usage,
};
use super::state::{AppState, ResolvedModel, Serving};
use super::stream::{sse_response, ChunkRenderer};
use super::token_events::{collect, token_string, RequestMetrics};
use super::validate::completion::ValidCompletion;
use super::validate::GenerationPlan;
use super::ServedModelLabel;
use crate::ids::{new_id, unix_now};

/// One prompt of the request, tokenized, with what `echo` needs.
#[derive(Clone)]
struct Prompt {
    tokens: Vec<u32>,
    text: String,
    /// Its own tokens' log-probs, when `echo` and `logprobs` are both asked for.
    logprobs: Option<Vec<PromptTokenLogprob>>,
}

#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "inference",
    summary = "Text completions (or, with `max_tokens: 0`, `echo` and `logprobs`, the prompt's own log-probs)",
    request_body = CompletionBody,
    responses(
        (status = 200, description = "The completions (JSON), or with `stream: true` chunks as server-sent events ending with `[DONE]`", content((ChoicesEnvelope<CompletionChoice> = "application/json"), (ServerSentEvent = "text/event-stream"))),
        (status = "default", description = "An error in OpenAI's shape (4xx: the request, with `param` naming the field; 503 while the model loads)", body = ErrorBody),
    )
)]
pub async fn completions(
    State(state): State<AppState>,
    body: ApiJson,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let serving = state.serving()?;
    let request = ValidCompletion::new(&body, serving, state.config().max_choices)?;
    let model = request.model.clone();
    let label = ServedModelLabel(crate::metrics::adapter_label(&model.name));
    let llm = &serving.model;
    let (n, include_usage) = (request.n(), request.include_usage());
    let (echo, top_logprobs, max_tokens) = (request.echo, request.top_logprobs, request.max_tokens);
    let mut prompts: Vec<Prompt> = request
        .prompts
        .into_iter()
        .map(|p| Prompt {
            tokens: p.tokens,
            text: p.text,
            logprobs: None,
        })
        .collect();
    let plans = request.plans;
    if echo {
        if let Some(top_n) = top_logprobs {
            for prompt in &mut prompts {
                let reply = serving.scheduler.submit_prompt_logprobs(
                    prompt.tokens.clone(),
                    model.view(),
                    top_n,
                )?;
                let scored = reply
                    .await
                    .map_err(|_| ApiError::internal("the engine stopped before answering"))?
                    .map_err(ApiError::internal)?;
                prompt.logprobs = Some(scored);
            }
        }
    }
    let prompt_tokens: usize = prompts.iter().map(|p| p.tokens.len()).sum();
    let meta = ResponseMeta {
        id: new_id("cmpl"),
        object: "text_completion",
        created: unix_now(),
        model: request.model_name,
        system_fingerprint: model.fingerprint(&serving.model_id),
        adapter_version: model.version(),
    };
    let texts = Arc::new(Texts {
        model: Arc::clone(llm),
        echo,
        logprobs: top_logprobs.is_some(),
        stop_token_ids: llm.tokenizer.eog_ids(),
    });
    let mut metrics = RequestMetrics::new(&model.name, arrived, prompt_tokens);

    let mut response = if max_tokens == 0 {
        metrics.finish();
        let choices = prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p, n))
            .enumerate()
            .map(|(index, prompt)| {
                let mut logprobs = texts.logprobs.then(CompletionLogprobs::default);
                let text = texts.echo_prompt(prompt, logprobs.as_mut());
                CompletionChoice {
                    index,
                    text,
                    logprobs,
                    finish_reason: Some(FinishReason::Length.as_str()),
                }
            })
            .collect();
        Json(Completion {
            meta,
            choices,
            usage: Some(Some(Usage::new(prompt_tokens, 0))),
        })
        .into_response()
    } else {
        let receivers = submit(serving, &model, &prompts, &plans)?;
        if request.stream {
            let renderer = CompletionChunks {
                meta,
                include_usage,
                texts,
                choices: prompts
                    .iter()
                    .flat_map(|p| std::iter::repeat_n(p, n))
                    .map(|p| ChoiceState {
                        prompt: p.clone(),
                        offset: 0,
                    })
                    .collect(),
            };
            sse_response(receivers, metrics, prompt_tokens, include_usage, renderer)
        } else {
            let outputs = collect(receivers, &mut metrics).await;
            let completion_tokens = metrics.generated();
            metrics.finish();
            let choices = outputs?
                .into_iter()
                .enumerate()
                .map(|(index, out)| {
                    let prompt = &prompts[index / n];
                    let mut logprobs = texts.logprobs.then(CompletionLogprobs::default);
                    let mut text = if echo {
                        texts.echo_prompt(prompt, logprobs.as_mut())
                    } else {
                        String::new()
                    };
                    for token in &out.tokens {
                        texts.add_token(&mut text, token, logprobs.as_mut());
                    }
                    CompletionChoice {
                        index,
                        text,
                        logprobs,
                        finish_reason: Some(out.finish.as_str()),
                    }
                })
                .collect();
            Json(Completion {
                meta,
                choices,
                usage: Some(Some(Usage::new(prompt_tokens, completion_tokens))),
            })
            .into_response()
        }
    };
    response.extensions_mut().insert(label);
    Ok(response)
}

fn submit(
    serving: &Serving,
    model: &ResolvedModel,
    prompts: &[Prompt],
    plans: &[GenerationPlan],
) -> Result<Vec<tokio::sync::mpsc::UnboundedReceiver<crate::scheduler::GenerationEvent>>, ApiError>
{
    let sequences = prompts
        .iter()
        .zip(plans)
        .flat_map(|(prompt, plan)| {
            (0..plan.n).map(move |i| SequenceRequest {
                prompt: prompt.tokens.clone(),
                adapter: model.view(),
                params: plan.choice(i),
            })
        })
        .collect();
    Ok(serving.scheduler.submit_sequences(sequences)?)
}

/// Builds completion text and legacy log-probs from tokens.
struct Texts {
    model: Arc<LoadedModel>,
    echo: bool,
    logprobs: bool,
    stop_token_ids: Vec<u32>,
}

impl Texts {
    /// The prompt's text, and its tokens' log-probs when they were computed.
    fn echo_prompt(&self, prompt: &Prompt, logprobs: Option<&mut CompletionLogprobs>) -> String {
        if let (Some(out), Some(scored)) = (logprobs, &prompt.logprobs) {
            let mut text = String::new();
            for entry in scored {
                let token = token_string(&self.model.tokenizer, entry.token);
                out.text_offset.push(text.chars().count());
                out.tokens.push(token.clone());
                out.token_logprobs.push(entry.logprob);
                out.top_logprobs
                    .push(entry.logprob.map(|_| self.top_map(&entry.top_logprobs)));
                text.push_str(&token);
            }
        }
        prompt.text.clone()
    }

    /// Appends one generated token's text and log-prob entry.
    fn add_token(
        &self,
        text: &mut String,
        event: &TokenEvent,
        logprobs: Option<&mut CompletionLogprobs>,
    ) {
        if let (Some(out), Some(chosen)) = (logprobs, event.logprob) {
            if !self.stop_token_ids.contains(&event.token) {
                out.text_offset.push(text.chars().count());
                out.tokens
                    .push(token_string(&self.model.tokenizer, chosen.token));
                out.token_logprobs.push(Some(chosen.logprob));
                out.top_logprobs
                    .push(Some(self.top_map(&event.top_logprobs)));
            }
        }
        text.push_str(&event.text);
    }

    fn top_map(&self, alternatives: &[TokenLogprob]) -> Map<String, Value> {
        alternatives
            .iter()
            .map(|alt| {
                (
                    token_string(&self.model.tokenizer, alt.token),
                    Value::from(alt.logprob),
                )
            })
            .collect()
    }
}

/// Streaming state of one choice: its prompt (for `echo`) and the length of its text so far
/// (for log-prob offsets).
struct ChoiceState {
    prompt: Prompt,
    offset: usize,
}

struct CompletionChunks {
    meta: ResponseMeta,
    include_usage: bool,
    texts: Arc<Texts>,
    choices: Vec<ChoiceState>,
}

impl CompletionChunks {
    fn chunk(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> String {
        Completion::stream_chunk(&self.meta, choices, self.include_usage, usage)
    }
}

impl ChunkRenderer for CompletionChunks {
    fn start(&mut self) -> Vec<String> {
        if !self.texts.echo {
            return Vec::new();
        }
        let mut chunks = Vec::new();
        for index in 0..self.choices.len() {
            let mut logprobs = self.texts.logprobs.then(CompletionLogprobs::default);
            let text = self
                .texts
                .echo_prompt(&self.choices[index].prompt, logprobs.as_mut());
            self.choices[index].offset = text.chars().count();
            chunks.push(self.chunk(
                vec![CompletionChoice {
                    index,
                    text,
                    logprobs,
                    finish_reason: None,
                }],
                None,
            ));
        }
        chunks
    }

    fn token(&mut self, index: usize, event: &TokenEvent) -> Vec<String> {
        let mut logprobs = self.texts.logprobs.then(CompletionLogprobs::default);
        let mut text = String::new();
        self.texts.add_token(&mut text, event, logprobs.as_mut());
        if let (Some(out), Some(state)) = (logprobs.as_mut(), self.choices.get(index)) {
            for offset in &mut out.text_offset {
                *offset += state.offset;
            }
        }
        if let Some(state) = self.choices.get_mut(index) {
            state.offset += text.chars().count();
        }
        if text.is_empty() && event.finish.is_none() && logprobs.is_none() {
            return Vec::new();
        }
        vec![self.chunk(
            vec![CompletionChoice {
                index,
                text,
                logprobs,
                finish_reason: event.finish.map(FinishReason::as_str),
            }],
            None,
        )]
    }

    fn usage(&mut self, usage: Usage) -> String {
        self.chunk(Vec::new(), Some(usage))
    }
}
