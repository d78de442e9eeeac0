//! `mezo bench serve`: concurrent streaming chat clients over real HTTP. For each concurrency
//! level it prints aggregate generated tokens/s, per-stream tokens/s, and p50/p99 time to first
//! token and end-to-end latency; the summary compares 8 streams with 1.
//!
//! With `--with-training` it measures the same levels twice: idle, then while a fine-tuning job
//! (MeZO steps of 16 movie reviews, the `mezo bench mezo` task) runs in the engine's background
//! share, and prints the latency ratios.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::datasets::sentiment::{Snippet, CANDIDATES};

/// Prompts that make the model write at length, so every request decodes its full budget or
/// close to it.
const PROMPTS: [&str; 8] = [
    "Write a long story about a dragon who learns to cook.",
    "Describe, in detail, a walk through a busy city market.",
    "Explain how a bicycle works, part by part.",
    "Write a long letter to a friend about your summer holiday.",
    "Tell the history of a small fishing village over a hundred years.",
    "Describe the life cycle of a butterfly in detail.",
    "Write a long story about a robot who wants to be a gardener.",
    "Explain how bread is made, from wheat field to table.",
];

#[derive(Debug, Clone)]
pub struct ServeBenchConfig {
    pub base_url: String,
    pub model: String,
    pub concurrency: Vec<usize>,
    pub requests_per_client: usize,
    pub max_tokens: usize,
}

/// One request's timings.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sample {
    ttft: f64,
    e2e: f64,
    tokens: usize,
}

#[derive(Debug, Clone)]
pub struct LevelResult {
    pub concurrency: usize,
    pub requests: usize,
    pub generated_tokens: usize,
    pub wall_seconds: f64,
    pub ttft_p50: f64,
    pub ttft_p99: f64,
    pub e2e_p50: f64,
    pub e2e_p99: f64,
}

impl LevelResult {
    pub fn tokens_per_s(&self) -> f64 {
        self.generated_tokens as f64 / self.wall_seconds
    }
}

/// Runs every concurrency level in turn (after one warm-up request).
pub async fn run(config: &ServeBenchConfig) -> Result<Vec<LevelResult>, String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .map_err(|e| e.to_string())?;
    one_request(&client, config, 0).await?;
    let mut results = Vec::new();
    for &concurrency in &config.concurrency {
        eprintln!("{concurrency} concurrent streams …");
        let started = Instant::now();
        let clients: Vec<_> = (0..concurrency)
            .map(|c| {
                let client = client.clone();
                let config = config.clone();
                tokio::spawn(async move {
                    let mut samples = Vec::new();
                    for r in 0..config.requests_per_client {
                        samples.push(one_request(&client, &config, c + r).await?);
                    }
                    Ok::<_, String>(samples)
                })
            })
            .collect();
        let mut samples = Vec::new();
        for task in clients {
            samples.extend(task.await.map_err(|e| e.to_string())??);
        }
        let wall_seconds = started.elapsed().as_secs_f64();
        let ttft: Vec<f64> = samples.iter().map(|s| s.ttft).collect();
        let e2e: Vec<f64> = samples.iter().map(|s| s.e2e).collect();
        results.push(LevelResult {
            concurrency,
            requests: samples.len(),
            generated_tokens: samples.iter().map(|s| s.tokens).sum(),
            wall_seconds,
            ttft_p50: percentile(&ttft, 0.50),
            ttft_p99: percentile(&ttft, 0.99),
            e2e_p50: percentile(&e2e, 0.50),
            e2e_p99: percentile(&e2e, 0.99),
        });
    }
    Ok(results)
}

pub(super) async fn one_request(
    client: &reqwest::Client,
    config: &ServeBenchConfig,
    prompt: usize,
) -> Result<Sample, String> {
    let body = json!({
        "model": config.model,
        "messages": [{"role": "user", "content": PROMPTS[prompt % PROMPTS.len()]}],
        "max_tokens": config.max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let started = Instant::now();
    let response = client
        .post(format!("{}/v1/chat/completions", config.base_url))
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    if !response.status().is_success() {
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        return Err(format!("the server answered {status}: {text}"));
    }
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let mut ttft = None;
    let mut tokens = 0;
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| format!("the stream broke: {e}"))?;
        buffer.push_str(&String::from_utf8_lossy(&piece));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let chunk: Value =
                serde_json::from_str(data).map_err(|e| format!("bad chunk {data}: {e}"))?;
            if let Some(error) = chunk.get("error") {
                return Err(format!("the stream failed: {error}"));
            }
            let has_content = chunk["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty());
            if has_content && ttft.is_none() {
                ttft = Some(started.elapsed().as_secs_f64());
            }
            if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
                tokens = n as usize;
            }
        }
    }
    let e2e = started.elapsed().as_secs_f64();
    Ok(Sample {
        ttft: ttft.unwrap_or(e2e),
        e2e,
        tokens,
    })
}

/// The same load measured idle and with a fine-tuning job running.
#[derive(Debug, Clone)]
pub struct WithTraining {
    pub idle: Vec<LevelResult>,
    pub training: Vec<LevelResult>,
    /// MeZO steps the job took while the loaded levels ran, and how long they ran.
    pub steps_during: u64,
    pub seconds_during: f64,
}

/// A fine-tuning job that keeps the engine's background share busy for the whole benchmark:
/// MeZO steps on batches of 16 of `reviews` (classification, as `mezo bench mezo`), more steps
/// than the benchmark lasts; it is cancelled at the end.
pub fn sentiment_job(reviews: &[Snippet]) -> Value {
    let examples: Vec<Value> = reviews
        .iter()
        .map(|r| json!({"prompt": r.prompt(), "candidates": CANDIDATES, "label": r.label()}))
        .collect();
    json!({
        "adapter": "bench-training",
        "objective": "classification",
        "examples": examples,
        "hyperparameters": {"max_steps": 100000, "batch_size": 16},
    })
}

/// Runs the levels idle, starts `job`, waits for its first step, runs the levels again, and
/// cancels the job.
pub async fn run_with_training(
    config: &ServeBenchConfig,
    job: &Value,
) -> Result<WithTraining, String> {
    let client = reqwest::Client::new();
    let idle = run(config).await?;
    eprintln!("starting the fine-tuning job …");
    let job_url = start_job(&client, &config.base_url, job).await?;
    let steps_done = || async {
        let job = get_job(&client, &job_url).await?;
        if job["status"] != "running" && job["status"] != "queued" {
            return Err(format!("the fine-tuning job stopped: {job}"));
        }
        Ok::<u64, String>(job["progress"]["steps_done"].as_u64().unwrap_or(0))
    };
    while steps_done().await? == 0 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = steps_done().await?;
    let started = Instant::now();
    let training = run(config).await?;
    let seconds_during = started.elapsed().as_secs_f64();
    let steps_during = steps_done().await? - before;
    client
        .post(format!("{job_url}/cancel"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    Ok(WithTraining {
        idle,
        training,
        steps_during,
        seconds_during,
    })
}

/// Submits `job` to `/v1/finetune`; returns the job's URL.
pub(super) async fn start_job(
    client: &reqwest::Client,
    base_url: &str,
    job: &Value,
) -> Result<String, String> {
    let created: Value = client
        .post(format!("{base_url}/v1/finetune"))
        .json(job)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let id = created["id"]
        .as_str()
        .ok_or_else(|| format!("the server refused the job: {created}"))?;
    Ok(format!("{base_url}/v1/finetune/{id}"))
}

/// The job at `job_url`, as the server reports it.
pub(super) async fn get_job(client: &reqwest::Client, job_url: &str) -> Result<Value, String> {
    client
        .get(job_url)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())
}

/// Latency with training over latency idle, per level.
pub fn render_comparison(result: &WithTraining) -> String {
    let mut out = String::from(
        "| streams | e2e p50 idle | e2e p50 training | ratio | e2e p99 idle | e2e p99 training | ratio | TTFT p50 ratio | TTFT p99 ratio | tok/s ratio |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (idle, busy) in result.idle.iter().zip(&result.training) {
        out.push_str(&format!(
            "| {} | {:.2} s | {:.2} s | {:.2}x | {:.2} s | {:.2} s | {:.2}x | {:.2}x | {:.2}x | {:.2}x |\n",
            idle.concurrency,
            idle.e2e_p50,
            busy.e2e_p50,
            busy.e2e_p50 / idle.e2e_p50,
            idle.e2e_p99,
            busy.e2e_p99,
            busy.e2e_p99 / idle.e2e_p99,
            busy.ttft_p50 / idle.ttft_p50,
            busy.ttft_p99 / idle.ttft_p99,
            busy.tokens_per_s() / idle.tokens_per_s(),
        ));
    }
    out.push_str(&format!(
        "\ntraining meanwhile: {} MeZO steps (batch 16) in {:.0} s, {:.1} s per step\n",
        result.steps_during,
        result.seconds_during,
        result.seconds_during / result.steps_during.max(1) as f64
    ));
    out
}

/// Nearest-rank percentile.
pub(super) fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub fn render_table(results: &[LevelResult]) -> String {
    let mut out = String::from(
        "| streams | requests | generated tok/s | per stream | TTFT p50 | TTFT p99 | e2e p50 | e2e p99 |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        out.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.2} s | {:.2} s | {:.2} s | {:.2} s |\n",
            r.concurrency,
            r.requests,
            r.tokens_per_s(),
            r.tokens_per_s() / r.concurrency as f64,
            r.ttft_p50,
            r.ttft_p99,
            r.e2e_p50,
            r.e2e_p99
        ));
    }
    let single = results.iter().find(|r| r.concurrency == 1);
    let most = results.iter().max_by_key(|r| r.concurrency);
    if let (Some(one), Some(many)) = (single, most) {
        if many.concurrency > 1 {
            out.push_str(&format!(
                "\naggregate decode at {} streams = {:.2}x the single-stream rate\n",
                many.concurrency,
                many.tokens_per_s() / one.tokens_per_s()
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&xs, 0.5), 50.0);
        assert_eq!(percentile(&xs, 0.99), 99.0);
        assert_eq!(percentile(&[3.0], 0.99), 3.0);
    }
}
