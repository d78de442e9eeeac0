//! Faults the server must survive without losing what it accepted: a data folder whose disk
//! fills during a publish, a database another process holds locked, clients that hang up in the
//! middle of an upload or of a job's event stream, and SIGTERM while versions are published.
//!
//! The full disk is a 3 MiB tmpfs over the data folder, mounted in a mount namespace of the
//! server's own (`unshare --user --map-root-user --mount`, no root needed where user namespaces
//! are allowed).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{get_json, model_path, post_json, Server, ServerOptions, BASE_MODEL};
use serde_json::{json, Value};

/// Four labelled examples: a job on them takes a second or two per step.
fn examples() -> Value {
    json!([
        {"prompt": "Great film!", "candidates": [" negative", " positive"], "label": 1},
        {"prompt": "Awful film.", "candidates": [" negative", " positive"], "label": 0},
        {"prompt": "Loved it.", "candidates": [" negative", " positive"], "label": 1},
        {"prompt": "Hated it.", "candidates": [" negative", " positive"], "label": 0},
    ])
}

async fn wait_finished(server: &Server, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (_, job) = get_json(&server.url(&format!("/v1/finetune/{id}"))).await;
        if matches!(
            job["status"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            return job;
        }
        assert!(Instant::now() < deadline, "the job did not finish: {job}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn greedy_answer(server: &Server, model: &str) -> (u16, Value) {
    let (status, _, body) = post_json(
        &server.url("/v1/chat/completions"),
        &json!({
            "model": model,
            "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 4,
            "temperature": 0
        }),
    )
    .await;
    (status, body)
}

/// The disk fills while a job publishes its second version: that publish fails, leaving no
/// half-written folder; the job fails and says why; version 1 keeps serving; and the database
/// still takes new work.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_during_a_publish_fails_the_job_and_keeps_the_last_version_serving() {
    let server = Server::start(ServerOptions {
        data_disk_size: Some("3m"),
        ..ServerOptions::default()
    });
    // Rank 8 on q and v: 1.76 MiB per version, so the first fits and the second does not.
    let (status, _, job) = post_json(
        &server.url("/v1/finetune"),
        &json!({
            "adapter": "tight",
            "objective": "classification",
            "examples": examples(),
            "hyperparameters": {"max_steps": 3},
            "publish_every": 1
        }),
    )
    .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("a job id");
    let job = wait_finished(&server, id).await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"]["message"].as_str().unwrap_or("");
    assert!(
        error.contains("No space left") || error.contains("os error 28"),
        "the job says the disk is full: {job}"
    );
    assert_eq!(job["progress"]["published_versions"], json!([1]), "{job}");

    let (status, adapter) = get_json(&server.url("/v1/adapters/tight")).await;
    assert_eq!(status, 200, "{adapter}");
    assert_eq!(adapter["live_version"], 1, "{adapter}");
    assert_eq!(adapter["versions"].as_array().map(Vec::len), Some(1));
    let (status, answer) = greedy_answer(&server, "tight").await;
    assert_eq!(status, 200, "version 1 still serves: {answer}");
    assert_eq!(answer["adapter_version"], 1, "{answer}");

    // Nothing else is lost: the failed publish left no temporary folder behind (the space it
    // took is free again), so the database still stores a new job and its examples.
    let (status, _, next) = post_json(
        &server.url("/v1/finetune"),
        &json!({
            "adapter": "tight-next",
            "objective": "classification",
            "examples": examples(),
            "hyperparameters": {"max_steps": 1},
            "publish_every": 1
        }),
    )
    .await;
    assert_eq!(status, 202, "{next}");
    let next = wait_finished(&server, next["id"].as_str().expect("an id")).await;
    assert_eq!(
        next["status"], "failed",
        "its publish does not fit either: {next}"
    );
    let (status, list) = get_json(&server.url("/v1/finetune")).await;
    assert_eq!(status, 200);
    assert_eq!(list["data"].as_array().map(Vec::len), Some(2), "{list}");
    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");
}

/// Another process holds the database's write lock (as a second server on the same data
/// folder would): the server stops at start with a message naming the file and the fix,
/// instead of failing each write later.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_locked_by_another_process_stops_the_start_with_a_clear_error() {
    let data = tempfile::tempdir().expect("a data folder");
    {
        // A first run creates the database (in WAL mode), then stops.
        let mut first = Server::start(ServerOptions {
            data_dir: Some(data.path().to_path_buf()),
            ..ServerOptions::default()
        });
        assert_eq!(first.terminate(Duration::from_secs(30)), Some(0));
    }
    let holder = rusqlite::Connection::open(data.path().join("mezo.sqlite")).expect("open");
    holder
        .execute_batch("BEGIN IMMEDIATE; INSERT INTO files (id, created_at, filename, purpose, bytes, content) VALUES ('file-held', 0, 'x', 'fine-tune', 0, x'');")
        .expect("take the write lock");

    let started = Instant::now();
    let stderr = serve_expecting_refusal(data.path(), None);
    assert!(
        stderr.contains("is locked by another process") && stderr.contains("mezo.sqlite"),
        "{stderr}"
    );
    assert!(
        stderr.contains("--data-dir"),
        "the message says the fix: {stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "it gives up after the busy timeout"
    );
    drop(holder);
}

/// `mezo serve` on `data` with `--database` set to `database` (if any): it must not start.
/// Its stderr.
fn serve_expecting_refusal(data: &Path, database: Option<&str>) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mezo"));
    command
        .arg("--model")
        .arg(model_path())
        .arg("--data-dir")
        .arg(data);
    if let Some(database) = database {
        command.args(["--database", database]);
    }
    let output = command
        .args(["serve", "--port", "0"])
        .env("NO_COLOR", "1")
        .env_remove("MEZO_API_KEYS")
        .env_remove("MEZO_DATABASE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run mezo serve");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "the server must not start: {stderr}"
    );
    stderr
}

/// A database URL of an unknown scheme, and a PostgreSQL server that does not answer: the
/// server stops at start, saying which URLs it takes, or naming the URL (never its password)
/// and what to check.
#[test]
fn a_bad_or_unreachable_database_stops_the_start_with_a_clear_error() {
    let data = tempfile::tempdir().expect("a data folder");
    let stderr = serve_expecting_refusal(data.path(), Some("mysql://mezo:hunter2@db/mezo"));
    assert!(
        stderr.contains("sqlite:<path>") && stderr.contains("postgres://"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let url = format!("postgres://mezo:hunter2@127.0.0.1:{port}/mezo");
    let stderr = serve_expecting_refusal(data.path(), Some(&url));
    assert!(
        stderr.contains(&format!("postgres://mezo:***@127.0.0.1:{port}/mezo")),
        "{stderr}"
    );
    assert!(
        stderr.contains("check that PostgreSQL is running"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

/// A client that hangs up in the middle of a multipart upload leaves no file behind, and one
/// that hangs up in the middle of a job's event stream gives its key's place back: the key,
/// capped at one request in flight, is served again at once.
#[tokio::test(flavor = "multi_thread")]
async fn clients_that_hang_up_mid_upload_or_mid_stream_leave_nothing_behind() {
    let server = Server::start(ServerOptions {
        config:
            "[[server.keys]]\nkey = \"sk-one\"\nscopes = [\"admin\"]\nmax_concurrent_requests = 1\n"
                .into(),
        ..ServerOptions::default()
    });
    let address = server.base.trim_start_matches("http://").to_string();

    // Half of a multipart body, then the connection closes.
    let boundary = "mezo-boundary";
    let part = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"train.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{{\"messages\": [{{\"role\": \"user\", \"content\": \"Hi\"}}"
    );
    {
        let mut socket = TcpStream::connect(&address).expect("connect");
        write!(
            socket,
            "POST /v1/files HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer sk-one\r\n\
             Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 100000\r\n\r\n{part}"
        )
        .expect("send half an upload");
        socket.flush().expect("flush");
    }
    let client = common::client();
    let files: Value = wait_for_place(&client, &server.url("/v1/files")).await;
    assert_eq!(files["data"], json!([]), "no file was stored: {files}");

    // A job's event stream, left after its first event.
    let (status, _, job) = post_json_with_key(
        &client,
        &server.url("/v1/finetune"),
        &json!({
            "adapter": "streamed",
            "objective": "classification",
            "examples": examples(),
            "hyperparameters": {"max_steps": 50}
        }),
    )
    .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("an id");
    {
        let mut socket = TcpStream::connect(&address).expect("connect");
        write!(
            socket,
            "GET /v1/finetune/{id}/events?stream=true HTTP/1.1\r\nHost: {address}\r\n\
             Authorization: Bearer sk-one\r\n\r\n"
        )
        .expect("ask for the stream");
        let mut first = [0u8; 256];
        let read = socket.read(&mut first).expect("the stream starts");
        assert!(
            String::from_utf8_lossy(&first[..read]).contains("200 OK"),
            "{}",
            String::from_utf8_lossy(&first[..read])
        );
    }
    let job: Value = wait_for_place(&client, &server.url(&format!("/v1/finetune/{id}"))).await;
    assert_eq!(job["id"], id, "{job}");
    let (status, _, cancelled) = post_json_with_key(
        &client,
        &server.url(&format!("/v1/finetune/{id}/cancel")),
        &json!({}),
    )
    .await;
    assert_eq!(status, 200, "{cancelled}");
    assert!(!server.log().contains("panicked"));
}

/// GETs `url` with the capped key until its place is free (the hung-up request's place must
/// come back within seconds), returning the body.
async fn wait_for_place(client: &reqwest::Client, url: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = client
            .get(url)
            .bearer_auth("sk-one")
            .send()
            .await
            .expect("GET");
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status != 429 {
            assert_eq!(status, 200, "{body}");
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "the key's place was not given back after the client hung up: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn post_json_with_key(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let response = client
        .post(url)
        .bearer_auth("sk-one")
        .json(body)
        .send()
        .await
        .expect("POST");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (
        status,
        headers,
        response.json().await.unwrap_or(Value::Null),
    )
}

/// SIGTERM while a job publishes a version after every step: after a restart on the same data
/// folder, every version the server lists is whole (it serves), and no half-written folder is
/// left beside them.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_while_a_job_publishes_every_step_leaves_only_whole_versions() {
    let data = tempfile::tempdir().expect("a data folder");
    let options = || ServerOptions {
        data_dir: Some(data.path().to_path_buf()),
        ..ServerOptions::default()
    };
    let mut server = Server::start(options());
    let (status, _, job) = post_json(
        &server.url("/v1/finetune"),
        &json!({
            "adapter": "interrupted",
            "objective": "classification",
            "examples": examples(),
            "hyperparameters": {"max_steps": 40},
            "publish_every": 1
        }),
    )
    .await;
    assert_eq!(status, 202, "{job}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, adapter) = get_json(&server.url("/v1/adapters/interrupted")).await;
        if adapter["versions"].as_array().is_some_and(|v| v.len() >= 2) {
            break;
        }
        assert!(Instant::now() < deadline, "no versions were published");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.terminate(Duration::from_secs(30)), Some(0));
    drop(server);

    let server = Server::start(options());
    let (status, adapter) = get_json(&server.url("/v1/adapters/interrupted")).await;
    assert_eq!(status, 200, "{adapter}");
    let versions: Vec<u64> = adapter["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .filter_map(|v| v["version"].as_u64())
        .collect();
    assert!(versions.len() >= 2, "{adapter}");
    for version in &versions {
        let (status, answer) = greedy_answer(&server, &format!("interrupted@{version}")).await;
        assert_eq!(status, 200, "version {version} serves: {answer}");
    }
    let folder = data.path().join("adapters/interrupted");
    let leftovers: Vec<String> = std::fs::read_dir(&folder)
        .expect("the adapter's folder")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with('v'))
        .collect();
    assert_eq!(
        leftovers,
        Vec::<String>::new(),
        "only whole versions remain"
    );
}

/// PostgreSQL goes down under a running server: chat goes on, what needs the database answers
/// 503 with `Retry-After`, and once the database is back the next request connects again.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_postgresql_makes_fine_tuning_answer_503_while_chat_goes_on() {
    let cluster = common::postgres_cluster::PostgresCluster::start();
    let server = Server::start(ServerOptions {
        env: vec![("MEZO_DATABASE", cluster.create_database("mezo"))],
        ..ServerOptions::default()
    });
    let jobs = || async {
        let response = common::client()
            .get(server.url("/v1/finetune"))
            .send()
            .await
            .expect("list jobs");
        let retry_after = response.headers().get("retry-after").cloned();
        let status = response.status().as_u16();
        let body: Value = response.json().await.expect("a JSON body");
        (status, retry_after, body)
    };
    assert_eq!(jobs().await.0, 200);

    cluster.stop();
    let chat = json!({"model": BASE_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
    let (status, _, answer) = post_json(&server.url("/v1/chat/completions"), &chat).await;
    assert_eq!(status, 200, "{answer}");
    let (status, retry_after, body) = jobs().await;
    assert_eq!(status, 503, "{body}");
    assert!(retry_after.is_some(), "{body}");
    assert_eq!(body["error"]["code"], "database_unavailable", "{body}");

    cluster.start_server();
    let (status, _, body) = jobs().await;
    assert_eq!(status, 200, "{body}\n{}", server.log());
}
