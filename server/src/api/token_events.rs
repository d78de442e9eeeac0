//! Running a request's sequences on the scheduler and reading their tokens back: collected into
//! whole choices for plain responses, or handed one by one to a stream. Also where a request's
//! serving metrics (time to first token, latency, time per token, token counts) are recorded.

use std::pin::Pin;
use std::time::Instant;

use futures_util::stream::{self, Stream, StreamExt};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::engine::generate::{FinishReason, TokenEvent};
use crate::engine::tokenizer::Tokenizer;
use crate::metrics as m;
use crate::scheduler::GenerationEvent;

use super::error::ApiError;
use super::protocol::{TokenLogprobOut, TopLogprob};

/// Timing and token counts of one request, recorded to metrics when it ends.
pub struct RequestMetrics {
    model: String,
    arrived: Instant,
    first_token: Option<Instant>,
    prompt_tokens: usize,
    generated: usize,
}

impl RequestMetrics {
    pub fn new(model: &str, arrived: Instant, prompt_tokens: usize) -> Self {
        Self {
            model: m::adapter_label(model),
            arrived,
            first_token: None,
            prompt_tokens,
            generated: 0,
        }
    }

    pub fn on_token(&mut self) {
        if self.first_token.is_none() {
            let now = Instant::now();
            self.first_token = Some(now);
            metrics::histogram!(m::TIME_TO_FIRST_TOKEN_SECONDS, "model" => self.model.clone())
                .record((now - self.arrived).as_secs_f64());
        }
        self.generated += 1;
    }

    pub fn generated(&self) -> usize {
        self.generated
    }

    /// Records the request's end (also for requests that failed or were cut short).
    pub fn finish(self) {
        let model = self.model;
        metrics::counter!(m::PROMPT_TOKENS_TOTAL, "model" => model.clone())
            .increment(self.prompt_tokens as u64);
        metrics::counter!(m::GENERATION_TOKENS_TOTAL, "model" => model.clone())
            .increment(self.generated as u64);
        if self.generated == 0 {
            return;
        }
        metrics::histogram!(m::E2E_REQUEST_LATENCY_SECONDS, "model" => model.clone())
            .record(self.arrived.elapsed().as_secs_f64());
        if let (Some(first), true) = (self.first_token, self.generated > 1) {
            let per_token = first.elapsed().as_secs_f64() / (self.generated - 1) as f64;
            metrics::histogram!(m::TIME_PER_OUTPUT_TOKEN_SECONDS, "model" => model)
                .record(per_token);
        }
    }
}

/// The events of all of a request's sequences as one stream of `(choice index, event)`.
pub fn merge_events(
    receivers: Vec<UnboundedReceiver<GenerationEvent>>,
) -> Pin<Box<dyn Stream<Item = (usize, GenerationEvent)> + Send>> {
    let streams = receivers.into_iter().enumerate().map(|(index, rx)| {
        stream::unfold(rx, move |mut rx| async move {
            rx.recv().await.map(|event| ((index, event), rx))
        })
        .boxed()
    });
    stream::select_all(streams).boxed()
}

/// One finished choice.
#[derive(Debug, Clone)]
pub struct ChoiceOutput {
    pub text: String,
    pub tokens: Vec<TokenEvent>,
    pub finish: FinishReason,
}

/// Waits for every sequence to finish.
pub async fn collect(
    receivers: Vec<UnboundedReceiver<GenerationEvent>>,
    request: &mut RequestMetrics,
) -> Result<Vec<ChoiceOutput>, ApiError> {
    let n = receivers.len();
    let mut texts = vec![String::new(); n];
    let mut tokens: Vec<Vec<TokenEvent>> = vec![Vec::new(); n];
    let mut finishes: Vec<Option<FinishReason>> = vec![None; n];
    let mut events = merge_events(receivers);
    while let Some((index, event)) = events.next().await {
        match event {
            GenerationEvent::Token(token) => {
                request.on_token();
                texts[index].push_str(&token.text);
                finishes[index] = token.finish;
                tokens[index].push(token);
            }
            GenerationEvent::Failed(message) => return Err(ApiError::internal(message)),
        }
    }
    texts
        .into_iter()
        .zip(tokens)
        .zip(finishes)
        .map(|((text, tokens), finish)| {
            let finish = finish.ok_or_else(|| {
                ApiError::internal("the engine stopped a sequence without finishing it")
            })?;
            Ok(ChoiceOutput {
                text,
                tokens,
                finish,
            })
        })
        .collect()
}

/// A token as clients show it: its bytes decoded (invalid UTF-8, as in a token holding half a
/// character, becomes U+FFFD, while `bytes` keeps the exact bytes).
pub fn token_string(tokenizer: &Tokenizer, token: u32) -> String {
    String::from_utf8_lossy(tokenizer.token_bytes(token)).into_owned()
}

/// Chat `logprobs.content[]` entry of one generated token; `None` for the end-of-turn token,
/// which is not part of the answer.
pub fn chat_logprob(
    tokenizer: &Tokenizer,
    event: &TokenEvent,
    stop_token_ids: &[u32],
) -> Option<TokenLogprobOut> {
    if stop_token_ids.contains(&event.token) {
        return None;
    }
    let chosen = event.logprob?;
    let entry = |token: u32| {
        (
            token_string(tokenizer, token),
            tokenizer.token_bytes(token).to_vec(),
        )
    };
    let (token, bytes) = entry(chosen.token);
    Some(TokenLogprobOut {
        token,
        logprob: chosen.logprob,
        bytes,
        top_logprobs: event
            .top_logprobs
            .iter()
            .map(|alt| {
                let (token, bytes) = entry(alt.token);
                TopLogprob {
                    token,
                    logprob: alt.logprob,
                    bytes,
                }
            })
            .collect(),
    })
}
