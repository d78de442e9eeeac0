//! Graceful shutdown: on SIGTERM the server stops accepting, lets running streams finish within
//! the grace period, ends the ones that would not (error event, then `[DONE]`), and exits 0.

mod common;

use std::time::{Duration, Instant};

use common::{post_stream_telling_first_chunk, Server, ServerOptions, BASE_MODEL};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_short_streams_cancels_long_ones_and_exits_zero() {
    let mut server = Server::start(ServerOptions {
        // Long enough for 24 tokens on a loaded 2-core machine, far shorter than 4000 tokens.
        config: "[server]\nshutdown_grace_seconds = 8\n".into(),
        ..ServerOptions::default()
    });
    let url = server.url("/v1/chat/completions");
    let stream = |max_tokens: u64| {
        let url = url.clone();
        let (tell, started) = tokio::sync::oneshot::channel();
        let stream = tokio::spawn(async move {
            post_stream_telling_first_chunk(
                &url,
                &json!({
                    "model": BASE_MODEL,
                    "messages": [{"role": "user", "content": "Tell me a very long story about a lighthouse keeper."}],
                    "max_tokens": max_tokens,
                    "ignore_eos": true,
                    "temperature": 0,
                    "stream": true,
                }),
                Some(tell),
            )
            .await
        });
        (stream, started)
    };
    let (short, short_started) = stream(24);
    let (long, long_started) = stream(4000);
    // Both are generating when the signal comes.
    for started in [short_started, long_started] {
        tokio::time::timeout(Duration::from_secs(60), started)
            .await
            .expect("a stream's first chunk within a minute")
            .expect("the stream's first chunk");
    }
    assert!(
        !short.is_finished(),
        "the short stream ended before the signal: nothing left to finish in the grace period"
    );

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
        elapsed < Duration::from_secs(16),
        "shutdown took {elapsed:?} with an 8 s grace period"
    );
    assert!(short.done, "the short stream finished");
    let finish = short
        .chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str());
    assert!(
        finish.is_some(),
        "the short stream ended normally: {:?} after {} chunks ({:.1} s to the first)",
        short.chunks.last(),
        short.chunks.len(),
        short.seconds_to_first_chunk
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
