//! Server-sent events for `stream: true`, in OpenAI's framing: `data: {json}` chunks, an optional
//! final usage chunk, then `data: [DONE]`; an error after the headers went out is sent as
//! `data: {"error": …}` before `[DONE]`. `: ping` comments keep idle connections open.
//!
//! A task forwards engine events to the client. When the client goes away the next send fails,
//! the task ends and drops the engine channels, and the scheduler drops the sequences at its
//! next step: a disconnected client costs at most one more token.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, StreamExt};
use tokio::sync::mpsc::{self, UnboundedReceiver};

use crate::engine::generate::TokenEvent;
use crate::scheduler::GenerationEvent;

use super::error::ApiError;
use super::protocol::Usage;
use super::token_events::{merge_events, RequestMetrics};

/// Turns a request's events into its endpoint's chunk objects (already serialized JSON).
pub trait ChunkRenderer: Send + 'static {
    /// Chunks before any token (chat's role announcement).
    fn start(&mut self) -> Vec<String>;
    /// Chunks for one token of choice `index` (possibly none while text is held back).
    fn token(&mut self, index: usize, event: &TokenEvent) -> Vec<String>;
    /// The final chunk with `choices: []` and the request's usage.
    fn usage(&mut self, usage: Usage) -> String;
    /// Work the stream waits for before `[DONE]` (storing the answer for feedback, so that a
    /// client that rates it straight after the stream finds it).
    fn before_done(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        None
    }
}

/// Chunks buffered between the forwarding task and the connection.
const CHUNK_BUFFER: usize = 64;

pub fn sse_response(
    receivers: Vec<UnboundedReceiver<GenerationEvent>>,
    mut request: RequestMetrics,
    prompt_tokens: usize,
    include_usage: bool,
    mut renderer: impl ChunkRenderer,
) -> Response {
    let (tx, rx) = mpsc::channel::<String>(CHUNK_BUFFER);
    tokio::spawn(async move {
        let mut events = merge_events(receivers);
        let mut ok = send_all(&tx, renderer.start()).await;
        while ok {
            let Some((index, event)) = events.next().await else {
                break;
            };
            match event {
                GenerationEvent::Token(token) => {
                    request.on_token();
                    ok = send_all(&tx, renderer.token(index, &token)).await;
                }
                GenerationEvent::Failed(message) => {
                    let error = ApiError::internal(message);
                    let body = serde_json::to_string(&error.body()).unwrap_or_default();
                    let _ = tx.send(body).await;
                    ok = false;
                    let _ = tx.send("[DONE]".into()).await;
                }
            }
        }
        if ok {
            if include_usage {
                let usage = Usage::new(prompt_tokens, request.generated());
                ok = send_all(&tx, vec![renderer.usage(usage)]).await;
            }
            if ok {
                if let Some(pending) = renderer.before_done() {
                    let _ = pending.await;
                }
                let _ = tx.send("[DONE]".into()).await;
            }
        }
        request.finish();
    });
    sse_from_channel(rx)
}

/// A server-sent event response sending each string of `rx` as one `data:` event, with `: ping`
/// keep-alives every 15 s; it ends when the sending side is dropped.
pub fn sse_from_channel(rx: mpsc::Receiver<String>) -> Response {
    let body = stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|data| (Ok::<_, Infallible>(Event::default().data(data)), rx))
    });
    Sse::new(body)
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(15))
                .text("ping"),
        )
        .into_response()
}

async fn send_all(tx: &mpsc::Sender<String>, chunks: Vec<String>) -> bool {
    for chunk in chunks {
        if tx.send(chunk).await.is_err() {
            return false;
        }
    }
    true
}
