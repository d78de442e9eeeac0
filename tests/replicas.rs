//! Replicas: three real servers share one PostgreSQL database (a throwaway one). A job posted
//! to one of them runs on one replica; each version it publishes is served by all three within
//! two seconds, with the same greedy answer and log-probabilities; `kill -9` of the replica
//! running the job hands it to another, which resumes it from its step log and ends on the
//! adapter an uninterrupted run ends on, byte for byte; feedback on an answer of one replica
//! is taken by another; rollback and delete on one replica reach the others.

mod common;

use std::time::{Duration, Instant};

use common::jobs::{finished, resumable_job, submit_job, version_bytes, wait_for_job};
use common::postgres_cluster::PostgresCluster;
use common::{get_json, post_json, request_json, Server, ServerOptions};
use reqwest::Method;
use serde_json::json;

/// How long replicas may take to serve what another published, rolled back or deleted.
const REPLICATION_LIMIT: Duration = Duration::from_secs(2);

fn replica(name: &str, database: &str) -> Server {
    Server::start(ServerOptions {
        // A short lease: a killed replica's job is taken over 3 s after its last renewal.
        config: format!("[server]\nreplica_name = \"{name}\"\n[training]\njob_lease_seconds = 3\n"),
        env: vec![("MEZO_DATABASE", database.to_string())],
        ..ServerOptions::default()
    })
}

/// `adapter`'s live version on `server`, `None` when it does not serve the adapter.
async fn live_version(server: &Server, adapter: &str) -> Option<u64> {
    let (status, body) = get_json(&server.url(&format!("/v1/adapters/{adapter}"))).await;
    (status == 200)
        .then(|| body["live_version"].as_u64())
        .flatten()
}

/// Waits until every replica answers `want` for `adapter`'s live version; how long that took.
async fn until_all_serve(replicas: &[&Server], adapter: &str, want: Option<u64>) -> Duration {
    let start = Instant::now();
    loop {
        let mut all = true;
        for server in replicas {
            all &= live_version(server, adapter).await == want;
        }
        if all {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "replicas do not serve {adapter} at {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The greedy answer of `model` on `server` with its tokens' log-probabilities.
async fn greedy_answer(server: &Server, model: &str) -> (String, Vec<f64>) {
    let (status, _, body) = post_json(
        &server.url("/v1/chat/completions"),
        &json!({
            "model": model,
            "messages": [{"role": "user", "content": "Review: Great fun.\nSentiment?"}],
            "max_tokens": 6,
            "temperature": 0,
            "logprobs": true,
        }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    let logprobs = choice["logprobs"]["content"]
        .as_array()
        .expect("log-probabilities")
        .iter()
        .map(|token| token["logprob"].as_f64().expect("a log-probability"))
        .collect();
    let text = choice["message"]["content"].as_str().expect("an answer");
    (text.to_string(), logprobs)
}

/// The replica a job's latest start or resume event names.
async fn running_replica(server: &Server, id: &str) -> Option<String> {
    let (_, events) = get_json(&server.url(&format!("/v1/finetune/{id}/events?limit=1000"))).await;
    events["data"]
        .as_array()?
        .iter()
        .filter_map(|event| event["data"]["replica"].as_str())
        .next_back()
        .map(str::to_string)
}

/// The published version's bytes on `server`, once replication has written them.
async fn replicated_bytes(server: &Server, adapter: &str, version: u64) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while live_version(server, adapter).await < Some(version) {
        assert!(Instant::now() < deadline, "{}", server.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    version_bytes(server, adapter, version)
}

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_share_jobs_versions_and_feedback_and_survive_a_kill_9() {
    let cluster = PostgresCluster::start();
    let database = cluster.create_database("mezo");
    let mut replicas: Vec<(String, Server)> = ["a", "b", "c"]
        .into_iter()
        .map(|name| (name.to_string(), replica(name, &database)))
        .collect();

    // A job posted to `a` runs on one replica; its first version is served by all three.
    let job = submit_job(&replicas[0].1, resumable_job("shared", 32, 8)).await;
    let id = job["id"].as_str().expect("an id").to_string();
    wait_for_job(&replicas[1].1, &id, |j| {
        j["progress"]["published_versions"]
            .as_array()
            .is_some_and(|v| !v.is_empty())
    })
    .await;
    let all: Vec<&Server> = replicas.iter().map(|(_, s)| s).collect();
    let lag = until_all_serve(&all, "shared", Some(1)).await;
    assert!(
        lag < REPLICATION_LIMIT,
        "version 1 reached every replica in {lag:?}"
    );
    let answers = [
        greedy_answer(all[0], "shared@1").await,
        greedy_answer(all[1], "shared@1").await,
        greedy_answer(all[2], "shared@1").await,
    ];
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0], answers[2]);
    // Every replica's metrics: the live version; the job running on one replica, seen
    // fleet-wide by all; the replicas that rebuilt version 1 measured their lag.
    let runner = running_replica(all[0], &id)
        .await
        .expect("a start event naming its replica");
    for ((name, _), server) in replicas.iter().zip(&all) {
        let text = common::metrics_text(server).await;
        let value = |sample: &str| common::metric_value(&text, sample);
        assert_eq!(
            value("mezo_adapter_live_version{adapter=\"shared\"}"),
            1.0,
            "{text}"
        );
        assert_eq!(
            value("mezo_finetune_jobs{status=\"running\"}"),
            1.0,
            "{text}"
        );
        let here = f64::from(u8::from(*name == runner));
        assert_eq!(value("mezo_finetune_jobs_running_here"), here, "{text}");
        if *name != runner {
            assert!(value("mezo_replication_lag_seconds_count") >= 1.0, "{text}");
        }
    }

    // Feedback on `b`'s answer is taken by `c`: completions are in the shared database.
    let (_, _, chat) = post_json(
        &all[1].url("/v1/chat/completions"),
        &json!({"model": "shared", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 3}),
    )
    .await;
    let (status, _, receipt) = post_json(
        &all[2].url("/v1/feedback"),
        &json!({"completion_id": chat["id"], "rating": "up", "adapter": "shared"}),
    )
    .await;
    assert_eq!(status, 200, "{receipt}");

    // `kill -9` of the replica running the job: another takes it over and finishes it.
    drop(all);
    let index = replicas
        .iter()
        .position(|(name, _)| *name == runner)
        .unwrap_or_else(|| panic!("no replica is named {runner}"));
    let (_, mut killed) = replicas.remove(index);
    killed.kill();
    let survivors: Vec<&Server> = replicas.iter().map(|(_, s)| s).collect();
    let done = wait_for_job(survivors[0], &id, finished).await;
    assert_eq!(
        done["status"],
        "succeeded",
        "{done}\n{}",
        survivors[0].log()
    );
    assert_eq!(done["progress"]["published_versions"], json!([1, 2, 3, 4]));
    let resumed_on = running_replica(survivors[0], &id).await;
    assert!(
        resumed_on.as_ref().is_some_and(|name| *name != runner),
        "resumed on {resumed_on:?}, killed {runner}"
    );

    // The resumed job ends on what an uninterrupted run of it ends on, on every survivor.
    let twin = submit_job(survivors[0], resumable_job("shared-twin", 32, 8)).await;
    let twin_id = twin["id"].as_str().expect("an id").to_string();
    let twin = wait_for_job(survivors[1], &twin_id, finished).await;
    assert_eq!(twin["status"], "succeeded", "{twin}");
    let uninterrupted = replicated_bytes(survivors[0], "shared-twin", 4).await;
    for server in &survivors {
        assert_eq!(replicated_bytes(server, "shared", 4).await, uninterrupted);
    }

    // Rollback on one survivor moves the other's live version; delete removes it there.
    let (status, _, body) = post_json(
        &survivors[0].url("/v1/adapters/shared/rollback"),
        &json!({"version": 2}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let lag = until_all_serve(&survivors, "shared", Some(2)).await;
    assert!(
        lag < REPLICATION_LIMIT,
        "the rollback reached the others in {lag:?}"
    );
    let (status, body) = request_json(
        Method::DELETE,
        &survivors[1].url("/v1/adapters/shared"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let lag = until_all_serve(&survivors, "shared", None).await;
    assert!(
        lag < REPLICATION_LIMIT,
        "the delete reached the others in {lag:?}"
    );
}
