//! Fine-tuning end to end, on the real server and model: a `/v1/finetune` job trains while the
//! server serves, publishes versions that chat completions use at once, and is followed through
//! its event stream; versions roll back and adapters delete, even while a job is about to
//! publish; bad requests get their status and field; a `kill -9` in the middle of a job loses
//! nothing and the job resumes bit for bit; and twenty loaded adapters cost their LoRA
//! tensors, not a copy of the model.

mod common;

use std::time::Duration;

use common::jobs::{
    finished, resumable_job, review_examples, submit_job, version_bytes, wait_for_job,
};
use common::{
    get_event_stream, get_json, post_json, post_stream, promtool_check, request_json, Server,
    ServerOptions, BASE_MODEL,
};
use reqwest::Method;
use serde_json::{json, Value};

async fn chat_version(server: &Server, model: &str) -> (u16, Value) {
    let (status, _, body) = post_json(
        &server.url("/v1/chat/completions"),
        &json!({
            "model": model,
            "messages": [{"role": "user", "content": "Review: Great fun.\nSentiment?"}],
            "max_tokens": 4,
            "temperature": 0,
        }),
    )
    .await;
    (status, body["adapter_version"].clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_trains_publishes_versions_and_serves_them_at_once() {
    let server = Server::start(ServerOptions::default());
    let examples = review_examples();
    let job = submit_job(
        &server,
        json!({
            "adapter": "sentiment",
            "objective": "classification",
            "examples": examples[..12],
            "eval_examples": examples[12..],
            "hyperparameters": {"max_steps": 6, "batch_size": 4, "eval_every": 3, "lr": 1e-2, "epsilon": 1e-2},
            "publish_every": 3,
        }),
    )
    .await;
    assert_eq!(job["status"], "queued");
    assert_eq!(job["examples"], json!({"train": 12, "held_out": 4}));
    assert_eq!(job["hyperparameters"]["lr"], json!(0.01));
    let id = job["id"].as_str().expect("a job id").to_string();

    // The event stream runs until the job ends, then says [DONE].
    let stream =
        get_event_stream(&server.url(&format!("/v1/finetune/{id}/events?stream=true"))).await;
    assert_eq!(
        stream.last().map(String::as_str),
        Some("[DONE]"),
        "{stream:?}"
    );
    let events: Vec<Value> = stream[..stream.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("an event is JSON"))
        .collect();
    let of_type = |kind: &str| {
        events
            .iter()
            .filter(|e| e["type"] == kind)
            .collect::<Vec<_>>()
    };
    let steps: Vec<u64> = of_type("step")
        .iter()
        .map(|e| e["data"]["step"].as_u64().expect("a step number"))
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
    assert!(of_type("step")
        .iter()
        .all(|e| e["data"]["train_loss"].as_f64().is_some_and(f64::is_finite)));
    let held_out: Vec<u64> = of_type("held_out")
        .iter()
        .map(|e| e["data"]["steps_done"].as_u64().expect("steps"))
        .collect();
    assert_eq!(held_out, [0, 3, 6]);
    let published: Vec<u64> = of_type("publish")
        .iter()
        .map(|e| e["data"]["version"].as_u64().expect("a version"))
        .collect();
    assert_eq!(published, [1, 2]);
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    // The same events as a page, after a cursor.
    let (_, page) = get_json(&server.url(&format!("/v1/finetune/{id}/events?after=2"))).await;
    assert_eq!(page["data"][0]["seq"], 3);

    let (_, job) = get_json(&server.url(&format!("/v1/finetune/{id}"))).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let progress = &job["progress"];
    assert_eq!(progress["steps_done"], 6);
    assert_eq!(progress["published_versions"], json!([1, 2]));
    assert!(progress["held_out_before"]["metrics"]["accuracy"].is_number());
    assert!(progress["held_out"]["metrics"]["accuracy"].is_number());

    // Each version is served at once; pinned versions stay reachable.
    assert_eq!(chat_version(&server, "sentiment").await, (200, json!(2)));
    assert_eq!(chat_version(&server, "sentiment@1").await, (200, json!(1)));
    let (_, adapter) = get_json(&server.url("/v1/adapters/sentiment")).await;
    assert_eq!(adapter["live_version"], 2);
    let versions = adapter["versions"].as_array().expect("versions");
    assert_eq!(versions.len(), 2);
    assert_eq!(versions[0]["step"], 3);
    assert_eq!(versions[1]["job_id"], json!(id));
    assert!(versions[1]["held_out"]["metrics"]["accuracy"].is_number());
    // The last version is the best adapter the held-out evaluations saw, whichever step it was.
    let (best_step, best_loss) = of_type("held_out")
        .iter()
        .map(|e| {
            let data = &e["data"];
            (data["steps_done"].as_u64(), data["loss"].as_f64())
        })
        .min_by(|a, b| a.1.partial_cmp(&b.1).expect("finite losses"))
        .expect("held-out evaluations");
    assert_eq!(versions[1]["held_out"]["loss"].as_f64(), best_loss);
    assert_eq!(versions[1]["step"].as_u64(), best_step);
    assert!(versions.iter().all(|v| v["size_bytes"].as_u64() > Some(0)));
    // The version folders are PEFT adapters.
    for v in 1..=2 {
        let dir = server.data_dir.join(format!("adapters/sentiment/v{v}"));
        assert!(
            dir.join("adapter_config.json").exists()
                && dir.join("adapter_model.safetensors").exists()
        );
    }

    // Rollback, remembered by the registry at once.
    let url = server.url("/v1/adapters/sentiment/rollback");
    let (status, adapter) = request_json(Method::POST, &url, Some(&json!({"version": 1}))).await;
    assert_eq!((status, adapter["live_version"].clone()), (200, json!(1)));
    assert_eq!(chat_version(&server, "sentiment").await, (200, json!(1)));
    let (status, err) = request_json(Method::POST, &url, Some(&json!({"version": 9}))).await;
    assert_eq!(status, 404, "{err}");

    // A second job continues from the live version; cancel it, then cancelling again is 409.
    let second = submit_job(
        &server,
        json!({
            "adapter": "sentiment",
            "objective": "classification",
            "examples": examples,
            "hyperparameters": {"max_steps": 10000, "batch_size": 4},
        }),
    )
    .await;
    let second_id = second["id"].as_str().expect("an id").to_string();
    let running = wait_for_job(&server, &second_id, |j| {
        j["progress"]["steps_done"].as_u64() >= Some(1)
    })
    .await;
    assert_eq!(running["base_version"], 1);
    let cancel = server.url(&format!("/v1/finetune/{second_id}/cancel"));
    let (status, cancelled) = request_json(Method::POST, &cancel, None).await;
    assert_eq!(
        (status, cancelled["status"].clone()),
        (200, json!("cancelled"))
    );
    let (status, err) = request_json(Method::POST, &cancel, None).await;
    assert_eq!(
        (status, err["error"]["code"].clone()),
        (409, json!("conflict"))
    );
    let (_, list) = get_json(&server.url("/v1/finetune?limit=1")).await;
    assert_eq!(list["data"][0]["id"], json!(second_id));
    assert_eq!(list["has_more"], true);

    // Training shows on /metrics, which stays valid Prometheus text.
    let metrics = common::metrics_text(&server).await;
    for expected in [
        "mezo_training_steps_total{adapter=\"sentiment\"}",
        "mezo_training_loss{adapter=\"sentiment\"}",
        "mezo_training_held_out{adapter=\"sentiment\",metric=\"accuracy\"}",
        "mezo_adapter_publishes_total{adapter=\"sentiment\"} 2",
        "mezo_adapter_live_version{adapter=\"sentiment\"} 1",
        "mezo_finetune_jobs{status=\"succeeded\"} 1",
        "mezo_finetune_jobs{status=\"cancelled\"} 1",
        "mezo_training_step_seconds_bucket",
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected} in\n{metrics}"
        );
    }
    let (ok, report) = promtool_check(&metrics);
    assert!(ok, "{report}");

    // Delete: no longer served or listed; its folder is gone.
    let adapter_url = server.url("/v1/adapters/sentiment");
    let (status, deleted) = request_json(Method::DELETE, &adapter_url, None).await;
    assert_eq!((status, deleted["deleted"].clone()), (200, json!(true)));
    assert_eq!(chat_version(&server, "sentiment").await.0, 404);
    assert!(!server.data_dir.join("adapters/sentiment").exists());
    let (status, _) = request_json(Method::DELETE, &adapter_url, None).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_only_if_improved_keeps_a_worse_adapter_out() {
    let server = Server::start(ServerOptions::default());
    let examples = review_examples();
    // A learning rate this large wrecks the adapter: the held-out loss gets worse.
    let job = submit_job(
        &server,
        json!({
            "adapter": "careful",
            "objective": "classification",
            "examples": examples[..12],
            "eval_examples": examples[12..],
            "hyperparameters": {"max_steps": 2, "batch_size": 4, "lr": 50.0, "epsilon": 1e-2},
            "publish_only_if_improved": true,
        }),
    )
    .await;
    let id = job["id"].as_str().expect("an id").to_string();
    let done = wait_for_job(&server, &id, finished).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let before = done["progress"]["held_out_before"]["loss"]
        .as_f64()
        .expect("a loss");
    let after = done["progress"]["held_out"]["loss"]
        .as_f64()
        .expect("a loss");
    assert!(
        after > before,
        "the held-out loss did not get worse: {before} → {after}"
    );
    assert_eq!(done["progress"]["published_versions"], json!([]));
    let (_, events) = get_json(&server.url(&format!("/v1/finetune/{id}/events"))).await;
    let skipped = events["data"]
        .as_array()
        .expect("events")
        .iter()
        .any(|e| e["type"] == "publish" && e["data"]["published"] == false);
    assert!(skipped, "{events}");
    assert_eq!(chat_version(&server, "careful").await.0, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_on_the_top_layers_reuses_the_frozen_ones_and_publishes_them_as_peft() {
    let server = Server::start(ServerOptions::default());
    let examples = review_examples();
    let job = submit_job(
        &server,
        json!({
            "adapter": "top-layers",
            "objective": "classification",
            "examples": examples[..8],
            "eval_examples": examples[8..12],
            "hyperparameters": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "epsilon": 1e-2},
            // Any order, repeats allowed: a set of layers, as PEFT's layers_to_transform.
            "lora": {"layers": [29, 26, 27, 28, 29]},
        }),
    )
    .await;
    let id = job["id"].as_str().expect("an id").to_string();
    let done = wait_for_job(&server, &id, finished).await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", server.log());
    assert_eq!(done["lora"]["layers"], json!([26, 27, 28, 29]), "{done}");

    let config_path = server
        .data_dir
        .join("adapters/top-layers/v1/adapter_config.json");
    let config: Value =
        serde_json::from_slice(&std::fs::read(&config_path).expect("the published config"))
            .expect("JSON");
    assert_eq!(config["layers_to_transform"], json!([26, 27, 28, 29]));
    assert_eq!(chat_version(&server, "top-layers").await, (200, json!(1)));

    let metrics = common::metrics_text(&server).await;
    let value = |sample: &str| common::metric_value(&metrics, sample);
    // 4 steps of 4 examples under θ+εz and θ−εz, plus held-out evaluations: after the first
    // pass over the 8 training examples, their bottom 26 layers are never computed again.
    let reused = value("mezo_training_frozen_layer_tokens_total{source=\"reused\"}");
    let computed = value("mezo_training_frozen_layer_tokens_total{source=\"computed\"}");
    assert!(reused > computed, "reused {reused}, computed {computed}");
    assert_eq!(
        value("mezo_training_frozen_states_bytes"),
        0.0,
        "the job's states are given back when it ends"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_f1_job_answers_in_the_training_share_and_publishes() {
    let server = Server::start(ServerOptions::default());
    let qa = |question: &str, answer: &str| {
        json!({
            "prompt": format!("Question: {question}\nAnswer:"),
            "references": [answer],
        })
    };
    let job = submit_job(
        &server,
        json!({
            "adapter": "answers",
            "objective": {"type": "f1", "max_new_tokens": 6},
            "examples": [
                qa("What colour is the sky on a clear day?", "blue"),
                qa("How many legs does a spider have?", "eight"),
                qa("What is the capital of France?", "Paris"),
                qa("What do bees make?", "honey"),
            ],
            "eval_examples": [qa("What is frozen water called?", "ice")],
            "hyperparameters": {"max_steps": 2, "batch_size": 2, "epsilon": 0.1},
        }),
    )
    .await;
    let id = job["id"].as_str().expect("an id");
    let done = wait_for_job(&server, id, finished).await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", server.log());
    assert_eq!(done["progress"]["steps_done"], 2, "{done}");
    assert!(
        done["progress"]["held_out"]["metrics"]["token_f1"].is_number(),
        "{done}"
    );
    assert_eq!(done["progress"]["published_versions"], json!([1]), "{done}");
    assert_eq!(chat_version(&server, "answers").await, (200, json!(1)));

    // The job's answers were decoded as training work, not as requests being served: the
    // serving steps are those of the one 4-token chat above.
    let metrics = common::metrics_text(&server).await;
    let serving_steps = common::metric_value(&metrics, "mezo_engine_batch_rows_count");
    assert!(
        (1.0..=4.0).contains(&serving_steps),
        "serving steps: {serving_steps}\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn training_slices_grow_to_the_idle_budget_while_nothing_is_served() {
    let server = Server::start(ServerOptions {
        config: "[training]\nslice_tokens = 16\nidle_slice_tokens = 4096\n".into(),
        ..ServerOptions::default()
    });
    let job = submit_job(
        &server,
        json!({
            "adapter": "idle",
            "objective": "classification",
            "examples": review_examples(),
            "hyperparameters": {"max_steps": 2, "batch_size": 8},
        }),
    )
    .await;
    let id = job["id"].as_str().expect("an id");
    let done = wait_for_job(&server, id, finished).await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", server.log());
    let metrics = common::metrics_text(&server).await;
    let value = |sample: &str| common::metric_value(&metrics, sample);
    // A step's rows (eight reviews of about a dozen tokens, under each of its directions) go
    // in one slice when nothing is served; in slices of 16 tokens none would pass 256.
    let slices = value("mezo_engine_training_slice_tokens_count");
    let small = value("mezo_engine_training_slice_tokens_bucket{le=\"256\"}");
    assert!(slices >= 2.0, "{metrics}");
    assert!(
        small < slices,
        "every slice held at most 256 tokens:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_adapter_deleted_while_its_job_is_about_to_publish_stays_deleted() {
    let server = Server::start(ServerOptions::default());
    let examples = review_examples();
    // After its first step the job evaluates a large held-out set, then publishes v1: the
    // delete lands in that evaluation, between the step and the publish.
    let held_out: Vec<Value> = examples.iter().cycle().take(96).cloned().collect();
    let job = submit_job(
        &server,
        json!({
            "adapter": "doomed",
            "objective": "classification",
            "examples": examples[..8],
            "eval_examples": held_out,
            "hyperparameters": {"max_steps": 2, "batch_size": 4},
            "publish_every": 1,
        }),
    )
    .await;
    let id = job["id"].as_str().expect("an id").to_string();
    wait_for_job(&server, &id, |job| job["progress"]["steps_done"] == 1).await;

    // The adapter has no version yet, but it exists: its job is training it.
    let adapter_url = server.url("/v1/adapters/doomed");
    let (status, deleted) = request_json(Method::DELETE, &adapter_url, None).await;
    assert_eq!((status, deleted["deleted"].clone()), (200, json!(true)));
    // The job reads `cancelled` at once; its run on the worker ends later. Jobs run one after
    // another, so once a job queued after it has finished, the cancelled one has stopped.
    let next = submit_job(
        &server,
        json!({
            "adapter": "next",
            "objective": "classification",
            "examples": examples[..4],
            "hyperparameters": {"max_steps": 1, "batch_size": 4},
        }),
    )
    .await;
    let next_id = next["id"].as_str().expect("an id");
    let next = wait_for_job(&server, next_id, finished).await;
    assert_eq!(next["status"], "succeeded", "{next}");
    let (_, done) = get_json(&server.url(&format!("/v1/finetune/{id}"))).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(done["progress"]["published_versions"], json!([]), "{done}");
    let (status, body) = get_json(&adapter_url).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(chat_version(&server, "doomed").await.0, 404);
    assert!(!server.data_dir.join("adapters/doomed").exists());
    let (status, _) = request_json(Method::DELETE, &adapter_url, None).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_fine_tuning_requests_get_their_status_and_field() {
    let server = Server::start(ServerOptions {
        config: "[training]\nmax_examples = 20\n".into(),
        ..ServerOptions::default()
    });
    let examples = review_examples();
    let job = |patch: Value| {
        let mut body = json!({
            "adapter": "bad",
            "objective": "classification",
            "examples": examples[..4],
        });
        for (k, v) in patch.as_object().expect("an object") {
            body[k] = v.clone();
        }
        body
    };
    let mut broken = examples[..4].to_vec();
    broken[2]["label"] = json!(" neutral");
    let many: Vec<Value> = (0..21).map(|i| examples[i % 16].clone()).collect();
    let cases: Vec<(Value, u16, Option<&str>)> = vec![
        (job(json!({"examples": many})), 413, Some("examples")),
        (
            job(json!({"examples": broken})),
            400,
            Some("examples[2].label"),
        ),
        (
            job(json!({"examples": [{"prompt": "p", "candidates": ["a", "b"], "label": 7}]})),
            400,
            Some("examples[0].label"),
        ),
        (
            job(json!({"examples": [{"prompt": "", "candidates": ["a", "b"], "label": 0}]})),
            400,
            Some("examples[0].prompt"),
        ),
        (
            job(json!({"eval_examples": [{"prompt": "p", "completion": "c"}]})),
            400,
            Some("eval_examples[0]"),
        ),
        (job(json!({"examples": []})), 400, Some("examples")),
        (job(json!({"objective": "bleu"})), 400, Some("objective")),
        (
            job(json!({"objective": "completion"})),
            400,
            Some("examples[0]"),
        ),
        (
            job(json!({"hyperparameters": {"lr": 0}})),
            400,
            Some("hyperparameters.lr"),
        ),
        (
            job(json!({"hyperparameters": {"epsilon": -1}})),
            400,
            Some("hyperparameters.epsilon"),
        ),
        (
            job(json!({"hyperparameters": {"batch_size": 5}})),
            400,
            Some("hyperparameters.batch_size"),
        ),
        (
            job(json!({"hyperparameters": {"max_steps": 0}})),
            400,
            Some("hyperparameters.max_steps"),
        ),
        (
            job(json!({"hyperparameters": {"learning_rate": 1}})),
            400,
            Some("hyperparameters.learning_rate"),
        ),
        (
            job(json!({"hyperparameters": {"optimizer": {"type": "lion"}}})),
            400,
            Some("hyperparameters.optimizer.type"),
        ),
        (
            job(json!({"hyperparameters": {"optimizer": {"type": "momentum", "beta": 1.0}}})),
            400,
            Some("hyperparameters.optimizer.beta"),
        ),
        (
            job(json!({"hyperparameters": {"optimizer": {"type": "conmezo", "angle": 0}}})),
            400,
            Some("hyperparameters.optimizer.angle"),
        ),
        (
            job(json!({"hyperparameters": {"optimizer": "momentum"}})),
            400,
            Some("hyperparameters.optimizer"),
        ),
        (
            job(json!({"hyperparameters": {"trained_tensors": "lora_a"}})),
            400,
            Some("hyperparameters.trained_tensors"),
        ),
        (
            job(json!({"hyperparameters": {"estimator": "forward"}})),
            400,
            Some("hyperparameters.estimator"),
        ),
        (
            job(
                json!({"hyperparameters": {"estimator": "fzoo", "n_perturbations": 2, "split_batch": true}}),
            ),
            400,
            Some("hyperparameters.split_batch"),
        ),
        (job(json!({"publish_every": 0})), 400, Some("publish_every")),
        (job(json!({"adapter": "no spaces"})), 400, Some("adapter")),
        (
            job(json!({"eval_fraction": 1.5})),
            400,
            Some("eval_fraction"),
        ),
        (job(json!({"epochs": 3})), 400, Some("epochs")),
        (
            job(json!({"lora": {"layers": [29, 30]}})),
            400,
            Some("lora.layers"),
        ),
        (
            job(json!({"lora": {"layers": []}})),
            400,
            Some("lora.layers"),
        ),
        (job(json!({"lora": {"layers": [-1]}})), 400, Some("lora")),
        (job(json!({"lora": {"layer": [3]}})), 400, Some("lora")),
    ];
    for (body, status, param) in cases {
        let (got, _, err) = post_json(&server.url("/v1/finetune"), &body).await;
        assert_eq!(got, status, "{body}: {err}");
        assert_eq!(err["error"]["param"].as_str(), param, "{body}: {err}");
    }
    // An unknown optimizer names the ones there are.
    let (_, _, err) = post_json(
        &server.url("/v1/finetune"),
        &job(json!({"hyperparameters": {"optimizer": {"type": "lion"}}})),
    )
    .await;
    let message = err["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("unknown variant `lion`, expected one of `sgd`, `momentum`, `adam`"),
        "{err}"
    );
    let too_big = json!({"adapter": "x", "examples": [{"prompt": "x".repeat(5 << 20)}]});
    let (status, _, err) = post_json(&server.url("/v1/finetune"), &too_big).await;
    assert_eq!(status, 413, "{err}");

    for (method, path, body, status, code) in [
        (
            Method::GET,
            "/v1/finetune/ftjob-nope",
            None,
            404,
            "job_not_found",
        ),
        (
            Method::POST,
            "/v1/finetune/ftjob-nope/cancel",
            None,
            404,
            "job_not_found",
        ),
        (
            Method::GET,
            "/v1/finetune/ftjob-nope/events",
            None,
            404,
            "job_not_found",
        ),
        (
            Method::GET,
            "/v1/fine_tuning/jobs/ftjob-nope",
            None,
            404,
            "job_not_found",
        ),
        (
            Method::GET,
            "/v1/files/file-nope",
            None,
            404,
            "file_not_found",
        ),
        (
            Method::GET,
            "/v1/adapters/nope",
            None,
            404,
            "adapter_not_found",
        ),
        (
            Method::DELETE,
            "/v1/adapters/nope",
            None,
            404,
            "adapter_not_found",
        ),
        (
            Method::POST,
            "/v1/adapters/nope/rollback",
            Some(json!({"version": 1})),
            404,
            "adapter_not_found",
        ),
        (
            Method::POST,
            "/v1/feedback",
            Some(json!({"completion_id": "chatcmpl-nope", "rating": "up"})),
            404,
            "completion_not_found",
        ),
        (
            Method::POST,
            "/v1/feedback",
            Some(json!({"completion_id": "x", "rating": "meh"})),
            400,
            "invalid_value",
        ),
        (
            Method::POST,
            "/v1/feedback",
            Some(json!({"completion_id": "x", "reward": 2})),
            400,
            "invalid_value",
        ),
        (
            Method::GET,
            "/v1/finetune?limit=0",
            None,
            400,
            "invalid_value",
        ),
    ] {
        let (got, err) = request_json(method.clone(), &server.url(path), body.as_ref()).await;
        assert_eq!(
            (got, err["error"]["code"].as_str()),
            (status, Some(code)),
            "{method} {path}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_at_its_cap_of_unfinished_jobs_gets_429_until_one_ends() {
    let server = Server::start(ServerOptions {
        config: "[server]\napi_keys = [\"sk-other\"]\n\
                 [[server.keys]]\nkey = \"sk-tune\"\nscopes = [\"fine_tuning\"]\nmax_queued_jobs = 1\n"
            .into(),
        ..ServerOptions::default()
    });
    let examples = review_examples();
    let body = |adapter: &str| {
        json!({
            "adapter": adapter,
            "objective": "classification",
            "examples": examples[..8],
            "hyperparameters": {"max_steps": 500, "batch_size": 4},
        })
    };
    let submit = |key: &'static str, body: Value| {
        let url = server.url("/v1/finetune");
        async move {
            let response = common::client()
                .post(url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .expect("POST /v1/finetune");
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap_or_default().to_string());
            (
                status,
                retry_after,
                response.json::<Value>().await.expect("json"),
            )
        }
    };
    let (status, _, first) = submit("sk-tune", body("capped-a")).await;
    assert_eq!(status, 202, "{first}");
    let (status, retry_after, refused) = submit("sk-tune", body("capped-b")).await;
    assert_eq!(status, 429, "{refused}");
    assert_eq!(retry_after.as_deref(), Some("60"));
    assert_eq!(refused["error"]["code"], "too_many_jobs", "{refused}");
    // Another key is not held up, and a finished (here cancelled) job frees the place.
    let (status, _, other) = submit("sk-other", body("other")).await;
    assert_eq!(status, 202, "{other}");
    let cancel = common::client()
        .post(server.url(&format!(
            "/v1/finetune/{}/cancel",
            first["id"].as_str().expect("id")
        )))
        .bearer_auth("sk-tune")
        .send()
        .await
        .expect("cancel");
    assert_eq!(cancel.status(), 200);
    let (status, _, again) = submit("sk-tune", body("capped-b")).await;
    assert_eq!(status, 202, "{again}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_adapter_stores_no_more_examples_than_its_cap_until_it_is_deleted() {
    let server = Server::start(ServerOptions {
        config: "[training]\nmax_stored_examples_per_adapter = 10\n".into(),
        ..ServerOptions::default()
    });
    let examples = review_examples();
    let job = |n: usize| {
        json!({
            "adapter": "small",
            "objective": "classification",
            "examples": examples[..n],
            "hyperparameters": {"max_steps": 500, "batch_size": 4},
        })
    };
    submit_job(&server, job(8)).await;
    let (status, _, err) = post_json(&server.url("/v1/finetune"), &job(4)).await;
    assert_eq!(status, 413, "{err}");
    assert_eq!(err["error"]["param"], "examples", "{err}");
    let message = err["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("already stores 8 examples")
            && message.contains("training.max_stored_examples_per_adapter"),
        "{message}"
    );
    // Another adapter has its own room; deleting this one frees its examples.
    let (status, _, other) = post_json(
        &server.url("/v1/finetune"),
        &json!({"adapter": "other", "objective": "classification", "examples": examples[..8],
                "hyperparameters": {"max_steps": 2, "batch_size": 4}}),
    )
    .await;
    assert_eq!(status, 202, "{other}");
    let (status, deleted) =
        request_json(Method::DELETE, &server.url("/v1/adapters/small"), None).await;
    assert_eq!(status, 200, "{deleted}");
    submit_job(&server, job(8)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fine_tuning_endpoints_need_a_key_when_keys_are_set() {
    let server = Server::start(ServerOptions {
        config: "[server]\napi_keys = [\"sk-train\"]\n".into(),
        ..ServerOptions::default()
    });
    for (method, path) in [
        (Method::POST, "/v1/finetune"),
        (Method::GET, "/v1/finetune"),
        (Method::GET, "/v1/fine_tuning/jobs"),
        (Method::GET, "/v1/files"),
        (Method::POST, "/v1/feedback"),
        (Method::GET, "/v1/adapters"),
        (Method::DELETE, "/v1/adapters/x"),
    ] {
        let (status, err) = request_json(method.clone(), &server.url(path), Some(&json!({}))).await;
        assert_eq!(status, 401, "{method} {path}: {err}");
    }
    let listed = common::client()
        .get(server.url("/v1/finetune"))
        .bearer_auth("sk-train")
        .send()
        .await
        .expect("GET with a key");
    assert_eq!(listed.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn feedback_trains_an_adapter_continuously() {
    let server = Server::start(ServerOptions::default());
    let url = server.url("/v1/adapters/helper/continuous_training");
    let settings = json!({"feedback_every": 2, "steps": 2});
    let (status, body) = request_json(Method::PUT, &url, Some(&settings)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["continuous_training"], settings);

    let mut jobs = Vec::new();
    for (i, feedback) in [
        json!({"rating": "up"}),
        json!({"reward": -0.5, "corrected_answer": "Hello! How can I help?"}),
    ]
    .into_iter()
    .enumerate()
    {
        let mut request = json!({"model": BASE_MODEL, "messages": [{"role": "user", "content": format!("Hi {i}")}], "max_tokens": 4});
        let url = server.url("/v1/chat/completions");
        // The first answer as one JSON reply, the second as a stream.
        let completion_id = if i == 0 {
            post_json(&url, &request).await.2["id"].clone()
        } else {
            request["stream"] = json!(true);
            let streamed = post_stream(&url, &request).await;
            assert!(streamed.done, "{:?}", streamed.chunks);
            streamed.chunks[0]["id"].clone()
        };
        let mut body = feedback;
        body["completion_id"] = completion_id;
        body["adapter"] = json!("helper");
        // The completion is stored before the answer leaves: no retry needed.
        let (status, _, receipt) = post_json(&server.url("/v1/feedback"), &body).await;
        assert_eq!(status, 200, "{receipt}");
        jobs.push(receipt["job"].clone());
    }
    assert!(
        jobs[0].is_null(),
        "one item is not a batch yet: {}",
        jobs[0]
    );
    let job = &jobs[1];
    assert_eq!(job["objective"]["type"], "reward", "{job}");
    assert_eq!(job["origin"], json!({"type": "feedback", "items": 2}));
    // Up-rated answer, down-rated answer, and the correction.
    assert_eq!(job["examples"]["train"], 3);
    let id = job["id"].as_str().expect("an id").to_string();
    let done = wait_for_job(&server, &id, finished).await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", server.log());
    assert_eq!(chat_version(&server, "helper").await, (200, json!(1)));
    let (_, items) = get_json(&server.url("/v1/feedback?adapter=helper")).await;
    let used: Vec<&Value> = items["data"]
        .as_array()
        .expect("items")
        .iter()
        .map(|f| &f["job_id"])
        .collect();
    assert_eq!(used, [&json!(id), &json!(id)]);
}

/// A feedback item is stored before its job is started: when the job cannot start (here one
/// item and its correction are more examples than `training.max_examples` allows), the item
/// still gets its receipt, waits for a later job, and the server says why in its log.
#[tokio::test(flavor = "multi_thread")]
async fn feedback_is_kept_when_its_training_job_cannot_start() {
    let server = Server::start(ServerOptions {
        config: "[training]\nmax_examples = 1\n".into(),
        ..ServerOptions::default()
    });
    let url = server.url("/v1/adapters/helper/continuous_training");
    let (status, body) = request_json(
        Method::PUT,
        &url,
        Some(&json!({"feedback_every": 1, "steps": 1})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let request = json!({"model": BASE_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
    let (_, _, answer) = post_json(&server.url("/v1/chat/completions"), &request).await;
    let feedback = json!({
        "completion_id": answer["id"],
        "rating": "down",
        "corrected_answer": "Hello! How can I help?",
        "adapter": "helper",
    });
    let (status, _, receipt) = post_json(&server.url("/v1/feedback"), &feedback).await;
    assert_eq!(status, 200, "{receipt}");
    assert!(receipt["job"].is_null(), "{receipt}");
    assert_eq!(receipt["pending_feedback"], 1, "{receipt}");
    let (_, items) = get_json(&server.url("/v1/feedback?adapter=helper")).await;
    assert_eq!(items["data"][0]["job_id"], Value::Null, "{items}");
    assert!(
        server.log_shows_within("its training job cannot start", Duration::from_secs(10)),
        "{}",
        server.log()
    );
}

/// A server moves from its SQLite file to PostgreSQL: stopped, `mezo copy-database --to`
/// copies its database, and started on PostgreSQL with the same data folder it has its job,
/// its events and its live version, and serves the adapter.
#[tokio::test(flavor = "multi_thread")]
async fn copy_database_moves_a_server_from_sqlite_to_postgresql() {
    let data = tempfile::tempdir().expect("a data folder");
    let mut server = Server::start(ServerOptions {
        data_dir: Some(data.path().to_path_buf()),
        ..ServerOptions::default()
    });
    let job = submit_job(
        &server,
        json!({
            "adapter": "moved",
            "objective": "classification",
            "examples": review_examples(),
            "hyperparameters": {"max_steps": 2, "batch_size": 4, "seed": 5},
        }),
    )
    .await;
    let id = job["id"].as_str().expect("an id").to_string();
    let done = wait_for_job(&server, &id, finished).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let (_, events_before) = get_json(&server.url(&format!("/v1/finetune/{id}/events"))).await;
    assert_eq!(server.terminate(Duration::from_secs(30)), Some(0));

    let cluster = common::postgres_cluster::PostgresCluster::start();
    let url = cluster.create_database("moved");
    let copy = std::process::Command::new(env!("CARGO_BIN_EXE_mezo"))
        .arg("--data-dir")
        .arg(data.path())
        .args(["copy-database", "--to", &url])
        .env_remove("MEZO_DATABASE")
        .output()
        .expect("run mezo copy-database");
    let stderr = String::from_utf8_lossy(&copy.stderr);
    assert!(copy.status.success(), "{stderr}");
    assert!(stderr.contains("jobs: 1 rows"), "{stderr}");
    assert!(
        stderr.contains("--database"),
        "it says what to do next: {stderr}"
    );

    let server = Server::start(ServerOptions {
        data_dir: Some(data.path().to_path_buf()),
        env: vec![("MEZO_DATABASE", url)],
        ..ServerOptions::default()
    });
    let (_, moved) = get_json(&server.url(&format!("/v1/finetune/{id}"))).await;
    assert_eq!(moved, done);
    let (_, events) = get_json(&server.url(&format!("/v1/finetune/{id}/events"))).await;
    assert_eq!(events, events_before);
    let (status, version) = chat_version(&server, "moved").await;
    assert_eq!(
        (status, version),
        (200, done["progress"]["published_versions"][0].clone())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_in_the_middle_of_a_job_loses_nothing_and_the_job_resumes_bit_for_bit() {
    kill_9_loses_nothing_and_the_job_resumes_bit_for_bit(None).await;
}

/// The same with the database in PostgreSQL (a throwaway server): jobs, examples, step logs,
/// feedback and the versions' rows are there, and the adapter folders in the data folder.
#[tokio::test(flavor = "multi_thread")]
async fn on_postgresql_kill_9_loses_nothing_and_the_job_resumes_bit_for_bit() {
    let cluster = common::postgres_cluster::PostgresCluster::start();
    let url = cluster.create_database("mezo");
    kill_9_loses_nothing_and_the_job_resumes_bit_for_bit(Some(url)).await;
}

/// A job with momentum (state that must resume too) is killed after its first version; the
/// server starts again on the same data folder and `database` (`MEZO_DATABASE`; SQLite in the
/// folder when `None`), finds its feedback, versions and job, resumes the job, and ends on the
/// adapter an uninterrupted run of the same job ends on.
async fn kill_9_loses_nothing_and_the_job_resumes_bit_for_bit(database: Option<String>) {
    let data = tempfile::tempdir().expect("a data folder");
    let options = || ServerOptions {
        data_dir: Some(data.path().to_path_buf()),
        // On PostgreSQL the restarted server takes the job over once the killed one's lease
        // lapses (another replica might still be running it).
        config: if database.is_some() {
            "[training]\njob_lease_seconds = 2\n".into()
        } else {
            String::new()
        },
        env: database
            .iter()
            .map(|url| ("MEZO_DATABASE", url.clone()))
            .collect(),
        ..ServerOptions::default()
    };
    let mut server = Server::start(options());
    if let Some(url) = &database {
        assert!(
            server.log_shows_within(&format!("database={url}"), Duration::from_secs(10)),
            "{}",
            server.log()
        );
        assert!(!data.path().join("mezo.sqlite").exists());
    }

    // Feedback the server must keep: on an answer of the base model, for adapter `resume`.
    let (_, _, chat) = post_json(
        &server.url("/v1/chat/completions"),
        &json!({"model": BASE_MODEL, "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 3}),
    )
    .await;
    let completion_id = chat["id"].as_str().expect("a completion id").to_string();
    // Stored before the answer left the server: feedback straight after it is taken.
    let (status, _, receipt) = post_json(
        &server.url("/v1/feedback"),
        &json!({"completion_id": completion_id, "rating": "up", "adapter": "resume"}),
    )
    .await;
    assert_eq!(
        status, 200,
        "feedback on a fresh completion was refused: {receipt}"
    );

    let job = submit_job(&server, resumable_job("resume", 16, 4)).await;
    let id = job["id"].as_str().expect("an id").to_string();
    // The database records a version (with the job's progress) before its folder is renamed
    // into place; the kill waits for both, to compare the folder across the restart.
    let v1_folder = data.path().join("adapters/resume/v1");
    let before = wait_for_job(&server, &id, |j| {
        j["progress"]["published_versions"]
            .as_array()
            .is_some_and(|v| !v.is_empty())
            && v1_folder.exists()
    })
    .await;
    server.kill();
    let published_before = before["progress"]["published_versions"]
        .as_array()
        .expect("versions")
        .len() as u64;
    let v1_before = version_bytes(&server, "resume", 1);
    drop(server);

    let server = Server::start(options());
    let (_, adapter) = get_json(&server.url("/v1/adapters/resume")).await;
    assert!(
        adapter["live_version"].as_u64() >= Some(published_before),
        "{adapter}"
    );
    assert_eq!(version_bytes(&server, "resume", 1), v1_before);
    let (_, feedback) = get_json(&server.url("/v1/feedback?adapter=resume")).await;
    assert_eq!(
        feedback["data"][0]["completion_id"],
        json!(completion_id),
        "{feedback}"
    );
    let (_, job) = get_json(&server.url(&format!("/v1/finetune/{id}"))).await;
    assert_eq!(job["examples"]["train"], 16, "{job}");

    let resumed = wait_for_job(&server, &id, finished).await;
    assert_eq!(
        resumed["status"],
        "succeeded",
        "{resumed}\n{}",
        server.log()
    );
    assert_eq!(resumed["progress"]["steps_done"], 16);
    assert_eq!(
        resumed["progress"]["published_versions"],
        json!([1, 2, 3, 4])
    );
    let (_, events) = get_json(&server.url(&format!("/v1/finetune/{id}/events"))).await;
    let messages: Vec<&str> = events["data"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("job resumed at step")),
        "{messages:?}"
    );
    let steps = events["data"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["type"] == "step")
        .count();
    assert!(
        steps >= 16,
        "every step is recorded once or, if interrupted mid-step, redone"
    );

    // The same job run without interruption ends on the same adapter, bit for bit.
    let twin = submit_job(&server, resumable_job("resume-twin", 16, 4)).await;
    let twin_id = twin["id"].as_str().expect("an id").to_string();
    let twin = wait_for_job(&server, &twin_id, finished).await;
    assert_eq!(twin["status"], "succeeded", "{twin}");
    assert_eq!(
        version_bytes(&server, "resume", 4),
        version_bytes(&server, "resume-twin", 4)
    );
}

async fn resident_and_adapter_bytes(server: &Server) -> (f64, f64, f64) {
    let text = common::metrics_text(server).await;
    let gauge = |name: &str| common::metric_value(&text, name);
    (
        gauge("mezo_process_resident_memory_bytes"),
        gauge("mezo_adapter_weights_bytes"),
        gauge("mezo_model_weights_bytes"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_adapters_cost_their_lora_tensors_not_a_model_copy() {
    let bare = Server::start(ServerOptions::default());
    let names: Vec<&'static str> = (0..20)
        .map(|i| &*Box::leak(format!("a{i}").into_boxed_str()))
        .collect();
    let loaded = Server::start(ServerOptions {
        adapters: names.iter().map(|&n| (n, Some(1), 5)).collect(),
        ..ServerOptions::default()
    });
    let (rss_bare, none, model) = resident_and_adapter_bytes(&bare).await;
    let (rss_loaded, twenty, _) = resident_and_adapter_bytes(&loaded).await;
    assert_eq!(none, 0.0);
    let (_, adapter) = get_json(&loaded.url("/v1/adapters/a0")).await;
    let one = adapter["versions"][0]["size_bytes"]
        .as_f64()
        .expect("a size");
    assert_eq!(twenty, 20.0 * one);
    let growth = rss_loaded - rss_bare;
    println!(
        "resident: {:.1} MiB bare, {:.1} MiB with 20 adapters (+{:.1} MiB; their tensors {:.1} MiB; the model {:.1} MiB)",
        rss_bare / 1048576.0,
        rss_loaded / 1048576.0,
        growth / 1048576.0,
        twenty / 1048576.0,
        model / 1048576.0
    );
    // Twenty model copies would be 20 × the model; allow the tensors plus allocator slack.
    assert!(
        growth < twenty + model / 2.0,
        "20 adapters grew resident memory by {growth} bytes; their tensors are {twenty}"
    );
}

/// A job's learning curves come drawn: `GET /v1/finetune/{id}/curves.svg` is an SVG chart of its
/// training loss per step and its held-out loss and accuracy per evaluation, with titles, axis
/// labels and a legend; an unknown job is a JSON 404.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_serves_its_learning_curves_as_an_svg_chart() {
    let server = Server::start(ServerOptions::default());
    let examples = review_examples();
    let job = submit_job(
        &server,
        json!({
            "adapter": "curves",
            "objective": "classification",
            "examples": examples[..12],
            "eval_examples": examples[12..],
            "hyperparameters": {"max_steps": 4, "eval_every": 2, "batch_size": 4},
        }),
    )
    .await;
    let id = job["id"].as_str().expect("a job id");
    wait_for_job(&server, id, |job| job["status"] == "succeeded").await;
    let response = common::client()
        .get(server.url(&format!("/v1/finetune/{id}/curves.svg")))
        .send()
        .await
        .expect("GET the curves");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "image/svg+xml",
        "{:?}",
        response.headers()
    );
    let svg = response.text().await.expect("the SVG");
    assert!(svg.starts_with("<svg "), "{svg}");
    for text in [
        &format!("{id}: loss"),
        &format!("{id}: held-out metrics"),
        "train loss (the step's minibatch)",
        "held-out loss",
        "held-out accuracy",
        ">step<",
    ] {
        assert!(svg.contains(text), "missing {text:?}: {svg}");
    }
    // Four steps, and three evaluations (before the first step, after 2 and after 4).
    let train_line = svg
        .lines()
        .find(|l| l.contains("<polyline") && l.contains("#c03030"))
        .expect("the train-loss line");
    assert_eq!(train_line.matches(',').count(), 4, "{train_line}");
    let (status, missing) = get_json(&server.url("/v1/finetune/ftjob-nope/curves.svg")).await;
    assert_eq!(status, 404, "{missing}");
    assert_eq!(missing["error"]["code"], "job_not_found", "{missing}");
}
