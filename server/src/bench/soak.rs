//! `mezo bench soak`: a long day in minutes. `streams` clients ask streaming chat completions one
//! after another for `minutes`; with training, a fine-tuning job (the movie-review task of
//! `mezo bench mezo`) runs the whole time, and a user rates an answer every few seconds for an
//! adapter that trains continuously on the ratings. Each minute prints the requests that ended
//! in it, the errors, p50/p99 end-to-end latency, the server's resident memory (from
//! `/metrics`) and the MeZO steps trained so far; the summary gives the errors (must be 0) and
//! the memory at the end over the memory after the first minute (the warm-up).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::serve::{get_job, one_request, percentile, start_job, ServeBenchConfig};
use crate::progress::Progress;

/// The adapter users' ratings train.
const FEEDBACK_ADAPTER: &str = "soak-feedback";
/// Seconds between two ratings.
const RATING_EVERY: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
pub struct SoakConfig {
    pub serve: ServeBenchConfig,
    pub minutes: usize,
    pub streams: usize,
    /// The fine-tuning job that runs throughout (none: serving only, no ratings).
    pub job: Option<Value>,
}

/// What happened in one minute.
#[derive(Debug, Clone)]
pub struct Minute {
    pub requests: usize,
    pub errors: usize,
    pub e2e_p50: f64,
    pub e2e_p99: f64,
    /// The server's resident memory at the minute's end.
    pub resident_mib: Option<f64>,
    /// MeZO steps of the job so far.
    pub steps: u64,
}

#[derive(Debug, Clone)]
pub struct SoakResult {
    pub minutes: Vec<Minute>,
    /// The first few errors, as they were seen.
    pub first_errors: Vec<String>,
    pub ratings: usize,
    pub rating_errors: usize,
}

impl SoakResult {
    pub fn errors(&self) -> usize {
        self.minutes.iter().map(|m| m.errors).sum::<usize>() + self.rating_errors
    }

    /// Resident memory at the end over memory after the first minute.
    pub fn memory_growth(&self) -> Option<f64> {
        let first = self.minutes.first()?.resident_mib?;
        let last = self.minutes.last()?.resident_mib?;
        Some(last / first)
    }
}

/// One finished request: when it ended (seconds from the start), its latency, its error.
struct Outcome {
    ended: f64,
    e2e: f64,
    error: Option<String>,
}

type Outcomes = Arc<Mutex<Vec<Outcome>>>;

pub async fn run(config: &SoakConfig) -> Result<SoakResult, String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .map_err(|e| e.to_string())?;
    let base = config.serve.base_url.clone();
    let job_url = match &config.job {
        Some(job) => Some(start_job(&client, &base, job).await?),
        None => None,
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60 * config.minutes as u64);
    let outcomes: Outcomes = Arc::default();
    let count = config.streams;
    let streams: Vec<_> = (0..count)
        .map(|stream| {
            let (client, serve, outcomes) =
                (client.clone(), config.serve.clone(), Arc::clone(&outcomes));
            tokio::spawn(async move {
                // Streams take the prompts in turn, so they do not all ask the same one.
                let mut prompt = stream;
                while Instant::now() < deadline {
                    let asked = Instant::now();
                    let result = one_request(&client, &serve, prompt).await;
                    prompt += count;
                    record(&outcomes, started, asked, result.err());
                }
            })
        })
        .collect();
    let ratings = job_url.as_ref().map(|_| {
        let (client, base, model) = (client.clone(), base.clone(), config.serve.model.clone());
        tokio::spawn(async move { rate_answers(&client, &base, &model, deadline).await })
    });
    let mut minutes = Vec::new();
    let progress = Progress::steps(config.minutes as u64, "minutes", "soaking");
    for minute in 1..=config.minutes {
        let minute_end = started + Duration::from_secs(60 * minute as u64);
        tokio::time::sleep_until(minute_end.into()).await;
        let steps = match &job_url {
            Some(url) => get_job(&client, url)
                .await
                .map_or(0, |job| job["progress"]["steps_done"].as_u64().unwrap_or(0)),
            None => 0,
        };
        let resident_mib = resident_mib(&client, &base).await;
        let summary = summarize(&outcomes, minute, resident_mib, steps);
        progress.set_position(minute as u64);
        progress.println(format!(
            "minute {minute}: {} requests, {} errors, e2e p50 {:.2} s, p99 {:.2} s, {} MiB, {} steps",
            summary.requests,
            summary.errors,
            summary.e2e_p50,
            summary.e2e_p99,
            summary.resident_mib.map_or("?".into(), |m| format!("{m:.0}")),
            summary.steps
        ));
        minutes.push(summary);
    }
    drop(progress);
    for stream in streams {
        stream.await.map_err(|e| e.to_string())?;
    }
    let (ratings, rating_errors) = match ratings {
        Some(task) => task.await.map_err(|e| e.to_string())?,
        None => (0, 0),
    };
    if let Some(url) = &job_url {
        let _ = client.post(format!("{url}/cancel")).send().await;
    }
    let first_errors = outcomes
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter_map(|o| o.error.clone())
        .take(5)
        .collect();
    Ok(SoakResult {
        minutes,
        first_errors,
        ratings,
        rating_errors,
    })
}

fn record(outcomes: &Outcomes, started: Instant, asked: Instant, error: Option<String>) {
    let now = Instant::now();
    outcomes
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Outcome {
            ended: now.duration_since(started).as_secs_f64(),
            e2e: now.duration_since(asked).as_secs_f64(),
            error,
        });
}

fn summarize(outcomes: &Outcomes, minute: usize, resident_mib: Option<f64>, steps: u64) -> Minute {
    let outcomes = outcomes.lock().unwrap_or_else(PoisonError::into_inner);
    let window = ((minute - 1) * 60) as f64..(minute * 60) as f64;
    let in_minute: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| window.contains(&o.ended))
        .collect();
    let latencies: Vec<f64> = in_minute
        .iter()
        .filter(|o| o.error.is_none())
        .map(|o| o.e2e)
        .collect();
    Minute {
        requests: in_minute.len(),
        errors: in_minute.iter().filter(|o| o.error.is_some()).count(),
        e2e_p50: percentile(&latencies, 0.50),
        e2e_p99: percentile(&latencies, 0.99),
        resident_mib,
        steps,
    }
}

/// The server's resident memory, from its `/metrics`.
async fn resident_mib(client: &reqwest::Client, base: &str) -> Option<f64> {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("mezo_process_resident_memory_bytes "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map(|bytes| bytes / (1 << 20) as f64)
}

/// A user who asks a short question every few seconds and rates the answer (up and down in
/// turn) for an adapter that trains on every 20 ratings; returns (ratings, errors).
async fn rate_answers(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    deadline: Instant,
) -> (usize, usize) {
    let (mut ratings, mut errors) = (0, 0);
    let setting = client
        .put(format!(
            "{base}/v1/adapters/{FEEDBACK_ADAPTER}/continuous_training"
        ))
        .json(&json!({"feedback_every": 20, "steps": 5}))
        .send()
        .await;
    if !setting.is_ok_and(|r| r.status().is_success()) {
        errors += 1;
    }
    while Instant::now() + RATING_EVERY < deadline {
        tokio::time::sleep(RATING_EVERY).await;
        let answer: Result<Value, _> = async {
            client
                .post(format!("{base}/v1/chat/completions"))
                .json(&json!({
                    "model": model,
                    "messages": [{"role": "user", "content": "Is this review positive? \"A delight.\""}],
                    "max_tokens": 8,
                }))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await
        }
        .await;
        let Some(id) = answer
            .ok()
            .and_then(|a| a["id"].as_str().map(str::to_string))
        else {
            errors += 1;
            continue;
        };
        let rating = if ratings % 2 == 0 { "up" } else { "down" };
        let sent = client
            .post(format!("{base}/v1/feedback"))
            .json(&json!({"completion_id": id, "rating": rating, "adapter": FEEDBACK_ADAPTER}))
            .send()
            .await;
        match sent {
            Ok(response) if response.status().is_success() => ratings += 1,
            _ => errors += 1,
        }
    }
    (ratings, errors)
}

pub fn render_table(result: &SoakResult) -> String {
    let mut out = String::from(
        "| minute | requests | errors | e2e p50 (s) | e2e p99 (s) | resident memory (MiB) | MeZO steps so far |\n|---|---|---|---|---|---|---|\n",
    );
    for (i, m) in result.minutes.iter().enumerate() {
        out.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.2} | {} | {} |\n",
            i + 1,
            m.requests,
            m.errors,
            m.e2e_p50,
            m.e2e_p99,
            m.resident_mib.map_or("?".into(), |v| format!("{v:.0}")),
            m.steps
        ));
    }
    out
}
