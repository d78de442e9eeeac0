//! Fine-tuning jobs from the outside: the movie-review examples the job tests train on,
//! submitting a job, waiting for it, and reading a published version's bytes.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{get_json, post_json, Server};

/// Short movie reviews, half positive: the sentiment task of `mezo bench mezo` in miniature.
pub const REVIEWS: [(&str, usize); 16] = [
    ("A warm, funny and moving film.", 1),
    ("Dull, slow and far too long.", 0),
    ("The best thing I have seen all year.", 1),
    ("A tedious mess with no redeeming qualities.", 0),
    ("Brilliant acting and a clever script.", 1),
    ("I walked out halfway through.", 0),
    ("A delightful surprise from start to finish.", 1),
    ("Lifeless characters and a predictable plot.", 0),
    ("Charming, smart and beautifully shot.", 1),
    ("An embarrassing waste of a good cast.", 0),
    ("It made me laugh and cry.", 1),
    ("Boring from the first minute.", 0),
    ("A triumph of storytelling.", 1),
    ("Clumsy, loud and forgettable.", 0),
    ("Gripping and full of heart.", 1),
    ("The worst film of the decade.", 0),
];

pub fn review_examples() -> Vec<Value> {
    REVIEWS
        .iter()
        .map(|(text, label)| {
            json!({
                "prompt": format!("Review: {text}\nSentiment:"),
                "candidates": [" negative", " positive"],
                "label": label,
            })
        })
        .collect()
}

/// A job on the reviews whose resume must be exact: `max_steps` steps of 4 examples with
/// momentum (optimizer state that must resume too), publishing every `publish_every` steps.
pub fn resumable_job(adapter: &str, max_steps: u64, publish_every: u64) -> Value {
    json!({
        "adapter": adapter,
        "objective": "classification",
        "examples": review_examples(),
        "hyperparameters": {
            "max_steps": max_steps, "batch_size": 4, "lr": 1e-2, "epsilon": 1e-2, "seed": 11,
            "optimizer": {"type": "momentum", "beta": 0.9},
        },
        "publish_every": publish_every,
    })
}

/// Posts a `/v1/finetune` job and returns it, checking that it was accepted.
pub async fn submit_job(server: &Server, body: Value) -> Value {
    let (status, _, job) = post_json(&server.url("/v1/finetune"), &body).await;
    assert_eq!(status, 202, "{job}");
    job
}

pub async fn wait_for_job(server: &Server, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (status, job) = get_json(&server.url(&format!("/v1/finetune/{id}"))).await;
        assert_eq!(status, 200, "{job}");
        if done(&job) {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} did not get there: {job}\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn finished(job: &Value) -> bool {
    matches!(
        job["status"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

/// The last version's tensors of `adapter`, as bytes on disk.
pub fn version_bytes(server: &Server, adapter: &str, version: u64) -> Vec<u8> {
    let path = server.data_dir.join(format!(
        "adapters/{adapter}/v{version}/adapter_model.safetensors"
    ));
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}
