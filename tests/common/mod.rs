//! Shared helpers of the end-to-end tests: start the real `mezo serve` on a free port with its
//! own data folder, wait until it is ready, speak HTTP to it, and read server-sent events.

#![allow(dead_code)] // each test binary uses a different subset of these helpers

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use adapters::{LoraAdapter, LoraConfig};
use futures_util::StreamExt;
use rand::{Rng, SeedableRng};
use serde_json::Value;

pub const BASE_MODEL: &str = "smollm2-135m-instruct";

// Where the workspace and the real model are: shared with the engine's own tests.
#[path = "../../server/tests/common/mod.rs"]
mod engine_common;
#[allow(unused_imports)] // each test binary uses a different subset
pub use engine_common::{
    gemma_golden, gemma_model_path, model_path, workspace_root, write_model_variant,
};

pub mod jobs;

// A throwaway PostgreSQL server: shared with the storage suite's own tests.
#[path = "../../server/src/training/db/postgres_cluster.rs"]
pub mod postgres_cluster;

/// The Python of `.venv/` (made by `bash tests/setup`, with the openai client and
/// schemathesis), or `MEZO_TEST_PYTHON`.
pub fn test_python() -> PathBuf {
    let python = std::env::var_os("MEZO_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/python"));
    assert!(
        python.exists(),
        "{} is missing: run `bash tests/setup` (it creates .venv with the openai client and \
         schemathesis)",
        python.display()
    );
    python
}

/// A running `mezo serve`; killed when dropped.
pub struct Server {
    child: Child,
    pub base: String,
    pub data_dir: PathBuf,
    log: Arc<Mutex<String>>,
    _temp: Option<tempfile::TempDir>,
}

#[derive(Default)]
pub struct ServerOptions {
    /// TOML layered over the defaults.
    pub config: String,
    pub env: Vec<(&'static str, String)>,
    /// Data folder to use (default: a fresh temporary one).
    pub data_dir: Option<PathBuf>,
    /// Adapters written into the data folder before start: (name, version, seed).
    pub adapters: Vec<(&'static str, Option<u32>, u64)>,
    /// The GGUF to serve (default: the default model).
    pub model: Option<PathBuf>,
    /// A disk of this size (`"3m"`) under the data folder: the server runs in a mount namespace
    /// of its own (`unshare`) with a tmpfs there, so its writes can fill it.
    pub data_disk_size: Option<&'static str>,
}

impl Server {
    pub fn start(options: ServerOptions) -> Server {
        let (temp, data_dir) = match options.data_dir {
            Some(dir) => (None, dir),
            None => {
                let temp = tempfile::tempdir().expect("a temporary folder");
                let dir = temp.path().to_path_buf();
                (Some(temp), dir)
            }
        };
        for &(name, version, seed) in &options.adapters {
            write_random_adapter(&data_dir.join("adapters"), name, version, seed);
        }
        let config_path = data_dir.join("test-config.toml");
        std::fs::create_dir_all(&data_dir).expect("create the data folder");
        std::fs::write(&config_path, &options.config).expect("write the config");
        let mut command = match options.data_disk_size {
            None => Command::new(env!("CARGO_BIN_EXE_mezo")),
            Some(size) => {
                let disk = data_dir.join("disk");
                std::fs::create_dir_all(&disk).expect("create the disk's mount point");
                let mut command = Command::new("unshare");
                command.args(["--user", "--map-root-user", "--mount", "sh", "-c"]);
                command.arg("mount -t tmpfs -o size=\"$1\" tmpfs \"$2\" && shift 2 && exec \"$@\"");
                command
                    .args(["sh", size])
                    .arg(&disk)
                    .arg(env!("CARGO_BIN_EXE_mezo"));
                command
            }
        };
        let served_data_dir = match options.data_disk_size {
            None => data_dir.clone(),
            Some(_) => data_dir.join("disk"),
        };
        command
            .arg("--config")
            .arg(&config_path)
            .arg("--model")
            .arg(options.model.clone().unwrap_or_else(model_path))
            .arg("--data-dir")
            .arg(&served_data_dir)
            .args(["serve", "--port", "0"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("MEZO_API_KEYS")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in &options.env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start mezo serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = mpsc::channel();
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(rest) = line.split("listening on http://").nth(1) {
                        let addr: String =
                            rest.chars().take_while(|c| !c.is_whitespace()).collect();
                        let _ = addr_tx.send(addr);
                    }
                    let mut log = log.lock().expect("the log lock");
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "the server did not start: {}",
                    log.lock().expect("the log lock")
                )
            });
        let server = Server {
            child,
            base: format!("http://{addr}"),
            data_dir,
            log,
            _temp: temp,
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.blocking_status("/ready") == Some(200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the server never became ready: {}", self.log());
    }

    /// The status of a plain GET, over a bare socket (usable outside any async runtime).
    pub fn blocking_status(&self, path: &str) -> Option<u16> {
        use std::io::{Read, Write};
        let addr = self.base.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(addr).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).ok()?;
        std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("the log lock").clone()
    }

    /// Whether the log shows `needle` within `limit`. The log is read from the server's pipe
    /// by another thread, so a line the server wrote before answering a request may reach
    /// [`Server::log`] only after the answer has reached the test.
    pub fn log_shows_within(&self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process at once (SIGKILL: no shutdown code runs, as in a crash).
    pub fn kill(&mut self) {
        self.child.kill().expect("kill the server");
        self.child.wait().expect("reap the server");
    }

    /// Sends SIGTERM and waits up to `limit` for the process to exit; returns its exit code.
    pub fn terminate(&mut self, limit: Duration) -> Option<i32> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("poll the server process") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a PEFT adapter with random A and B (so it visibly changes answers) to
/// `<root>/<name>/v<version>` or, without a version, to `<root>/<name>` (a plain PEFT folder).
pub fn write_random_adapter(root: &Path, name: &str, version: Option<u32>, seed: u64) {
    let dir = match version {
        Some(v) => adapters::store::version_dir(root, name, v),
        None => root.join(name),
    };
    adapters::peft::save(&random_adapter(seed), &dir, BASE_MODEL).expect("save the adapter");
}

/// An adapter for the real model (r = 8 on q and v) with random A and B, the same for a seed.
pub fn random_adapter(seed: u64) -> LoraAdapter {
    let mut adapter = LoraAdapter::new_initialized(LoraConfig::default(), smollm2_dims(), seed)
        .expect("a valid adapter");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    for layer in adapter.layers.values_mut() {
        for b in &mut layer.b {
            *b = rng.gen_range(-0.1..0.1);
        }
    }
    adapter
}

fn smollm2_dims() -> adapters::ModelDims {
    use std::sync::OnceLock;
    static DIMS: OnceLock<adapters::ModelDims> = OnceLock::new();
    *DIMS.get_or_init(|| {
        let file = mezo_server::engine::gguf::GgufFile::open(&model_path()).expect("open");
        mezo_server::engine::transformer::TransformerConfig::of_file(&file)
            .expect("config")
            .dims()
    })
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("an HTTP client")
}

/// The server's `/metrics` text (for a server without API keys).
pub async fn metrics_text(server: &Server) -> String {
    client()
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text")
}

/// The value of the sample written exactly as `sample` (its name and any labels) in
/// Prometheus text; panics naming it when the text has no such sample.
pub fn metric_value(metrics: &str, sample: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {sample} in\n{metrics}"))
}

/// POSTs JSON and returns (status, headers, body as JSON).
pub async fn post_json(url: &str, body: &Value) -> (u16, reqwest::header::HeaderMap, Value) {
    let response = client().post(url).json(body).send().await.expect("POST");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, headers, json)
}

/// Sends `method` with an optional JSON body; returns (status, body as JSON).
pub async fn request_json(
    method: reqwest::Method,
    url: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut request = client().request(method, url);
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The `data:` payloads of a server-sent event stream read to its end (`[DONE]` included).
pub async fn get_event_stream(url: &str) -> Vec<String> {
    let text = client()
        .get(url)
        .send()
        .await
        .expect("GET the event stream")
        .text()
        .await
        .expect("read the event stream");
    text.lines()
        .filter_map(|line| {
            line.strip_prefix("data: ")
                .or_else(|| line.strip_prefix("data:"))
        })
        .map(str::to_string)
        .collect()
}

pub async fn get_json(url: &str) -> (u16, Value) {
    let response = client().get(url).send().await.expect("GET");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// What one streamed request returned.
#[derive(Debug, Default, Clone)]
pub struct StreamResult {
    pub chunks: Vec<Value>,
    pub done: bool,
    pub seconds_to_first_chunk: f64,
}

impl StreamResult {
    /// The concatenated `delta.content` of choice 0 (chat) or `text` (completions).
    pub fn text(&self) -> String {
        self.deltas().concat()
    }

    /// Each content piece in order, for token-by-token comparison.
    pub fn deltas(&self) -> Vec<String> {
        self.chunks
            .iter()
            .filter_map(|c| c["choices"].get(0))
            .filter_map(|choice| {
                choice["delta"]["content"]
                    .as_str()
                    .or_else(|| choice["text"].as_str())
                    .map(str::to_string)
            })
            .filter(|s| !s.is_empty())
            .collect()
    }
}

/// POSTs a streaming request and reads every `data:` event until `[DONE]`.
pub async fn post_stream(url: &str, body: &Value) -> StreamResult {
    post_stream_telling_first_chunk(url, body, None).await
}

/// [`post_stream`], sending on `first_chunk` as soon as the first chunk has arrived (the
/// request is then being generated, not waiting in the queue).
pub async fn post_stream_telling_first_chunk(
    url: &str,
    body: &Value,
    mut first_chunk: Option<tokio::sync::oneshot::Sender<()>>,
) -> StreamResult {
    let started = Instant::now();
    let response = client().post(url).json(body).send().await.expect("POST");
    assert_eq!(response.status().as_u16(), 200, "stream refused");
    let content_type = response.headers()["content-type"]
        .to_str()
        .expect("an ASCII content type")
        .to_string();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let mut bytes = response.bytes_stream();
    let mut buffer = String::new();
    let mut result = StreamResult::default();
    while let Some(piece) = bytes.next().await {
        buffer.push_str(&String::from_utf8_lossy(&piece.expect("stream bytes")));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    result.done = true;
                } else {
                    if result.chunks.is_empty() {
                        result.seconds_to_first_chunk = started.elapsed().as_secs_f64();
                    }
                    result
                        .chunks
                        .push(serde_json::from_str(data).expect("chunks are JSON"));
                    if let Some(tell) = first_chunk.take() {
                        // The test may have stopped listening; the stream is read on regardless.
                        let _ = tell.send(());
                    }
                }
            }
        }
    }
    result
}

/// Runs `promtool check metrics` on `text`: (passed, its output).
pub fn promtool_check(text: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}); install it with `bash tests/setup` (Debian package `prometheus`)")
        });
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let output = child.wait_with_output().expect("promtool runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), report)
}
