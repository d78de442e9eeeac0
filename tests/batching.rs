//! Continuous batching must not change answers: 16 concurrent greedy streams with mixed
//! adapters each produce, token for token, what the same request produces alone.

mod common;

use common::{post_stream, Server, ServerOptions, BASE_MODEL};
use serde_json::{json, Value};

const PROMPTS: [&str; 8] = [
    "Name three fruits.",
    "What is the capital of Italy?",
    "Write a haiku about the sea.",
    "Explain what a noun is.",
    "Give me a synonym for happy.",
    "How many legs does a spider have?",
    "Say something kind.",
    "What color is the sky at night?",
];

fn request(i: usize) -> Value {
    let models = [BASE_MODEL, "alpha", "beta", "alpha@1"];
    json!({
        "model": models[i % models.len()],
        "messages": [{"role": "user", "content": PROMPTS[i % PROMPTS.len()]}],
        "max_tokens": 20 + (i % 3) * 4,
        "temperature": 0,
        "stream": true,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_mixed_adapter_streams_match_each_request_alone() {
    let server = Server::start(ServerOptions {
        adapters: vec![
            ("alpha", Some(1), 11),
            ("alpha", Some(2), 12),
            ("beta", None, 13),
        ],
        ..ServerOptions::default()
    });
    let url = server.url("/v1/chat/completions");
    let mut alone = Vec::new();
    for i in 0..16 {
        let result = post_stream(&url, &request(i)).await;
        assert!(result.done);
        alone.push(result.deltas());
    }
    let distinct: std::collections::HashSet<_> = alone.iter().collect();
    assert!(distinct.len() > 8, "requests should differ: {alone:?}");

    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move { post_stream(&url, &request(i)).await })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let together = task.await.expect("the stream task");
        assert!(together.done, "request {i} did not complete");
        assert_eq!(
            together.deltas(),
            alone[i],
            "request {i} ({}) changed when batched",
            request(i)["model"]
        );
    }

    // The engine really batched: some steps ran several rows.
    let metrics = common::metrics_text(&server).await;
    let value = |sample: &str| common::metric_value(&metrics, sample);
    let rows_sum = value("mezo_engine_batch_rows_sum");
    let steps = value("mezo_engine_batch_rows_count");
    assert!(
        rows_sum / steps > 1.5,
        "mean rows per step {} — the concurrent requests were not batched",
        rows_sum / steps
    );
}
