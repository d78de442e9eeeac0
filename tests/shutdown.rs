//! Graceful shutdown: on SIGTERM the server stops accepting, lets running streams finish within
//! the grace period, ends the ones that would not (error event, then `[DONE]`), and exits 0.

mod common;

use std::time::{Duration, Instant};

use common::{post_stream, Server, ServerOptions, BASE_MODEL};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_short_streams_cancels_long_ones_and_exits_zero() {
    let mut server = Server::start(ServerOptions {
        // Long enough for 16 tokens on a loaded 2-core machine, far shorter than 4000 tokens.
        config: "[server]\nshutdown_grace_seconds = 5\n".into(),
        ..ServerOptions::default()
    });
    let url = server.url("/v1/chat/completions");
    let stream = |max_tokens: u64| {
        let url = url.clone();
        tokio::spawn(async move {
            post_stream(
                &url,
                &json!({
                    "model": BASE_MODEL,
                    "messages": [{"role": "user", "content": "Tell me a very long story about a lighthouse keeper."}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "stream": true,
                }),
            )
            .await
        })
    };
    let short = stream(16);
    let long = stream(4000);
    // Let both start generating.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let signalled = Instant::now();
    let code = tokio::task::spawn_blocking(move || {
        let code = server.terminate(Duration::from_secs(20));
        (code, server)
    });
    let short = short.await.unwrap();
    let long = long.await.unwrap();
    let (code, server) = code.await.unwrap();
    let elapsed = signalled.elapsed();

    assert_eq!(code, Some(0), "exit code; log:\n{}", server.log());
    assert!(
        elapsed < Duration::from_secs(14),
        "shutdown took {elapsed:?} with a 5 s grace period"
    );
    assert!(short.done, "the short stream finished");
    let finish = short
        .chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str());
    assert!(
        finish.is_some(),
        "the short stream ended normally: {:?}",
        short.chunks.last()
    );
    assert!(long.done, "the long stream was closed properly");
    let error = long
        .chunks
        .last()
        .and_then(|c| c.get("error"))
        .expect("the cancelled stream ends with an error event");
    assert!(
        error["message"].as_str().unwrap().contains("shut down"),
        "{error}"
    );
    assert!(
        server.blocking_status("/health").is_none(),
        "nothing listens after exit"
    );
}
