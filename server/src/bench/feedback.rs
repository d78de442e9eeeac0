//! `mezo bench feedback`: users who rate the answers they get. Over HTTP, it asks the server
//! (`/v1/chat/completions`, greedy) for the sentiment of movie reviews in free text, rates each
//! answer up when it names the right label and down otherwise (`/v1/feedback`, with a
//! `corrected_answer` on a seeded share of the wrong ones: by default the answer as a user would
//! edit it, the wrong label word replaced by the right one), while the adapter trains
//! continuously on that feedback (`PUT /v1/adapters/{name}/continuous_training`) and its
//! versions go live. It prints the share of right answers per window of requests and, on a
//! separate set of reviews nobody rated, the base model's answers against the last version's.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use crate::datasets::sentiment::Snippet;
use crate::progress::Progress;

/// What each simulated user asks, `{text}` standing for the review.
pub const QUESTION: &str =
    "Is the sentiment of this movie review positive or negative?\n\nReview: {text}";

#[derive(Debug, Clone)]
pub struct FeedbackBenchConfig {
    pub base_url: String,
    /// The base model's id, which answers until the adapter has a version.
    pub base_model: String,
    /// The adapter trained on the feedback (created by its first job).
    pub adapter: String,
    /// Reviews asked about and rated, one request each.
    pub rated: Vec<Snippet>,
    /// Reviews nobody rates, answered by the base model before and the last version after.
    pub probe: Vec<Snippet>,
    /// A `reward` job starts each time this many items have arrived.
    pub feedback_every: u32,
    /// Steps of each job; `None`: the server's default.
    pub steps: Option<u64>,
    /// The share of wrong answers that also get a `corrected_answer`.
    pub correction_rate: f64,
    pub corrections: CorrectionStyle,
    /// Requests per line of the report.
    pub window: usize,
    pub max_tokens: usize,
    pub seed: u64,
    /// Wait for each job to finish before the next request (users slower than training), so
    /// the curve shows what each batch of feedback taught; otherwise requests go on at full
    /// speed and are answered by whichever version is live.
    pub wait_for_training: bool,
}

/// How an answer is judged: it names the right label, the wrong one, or neither (or both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Right,
    Wrong,
    NoLabel,
}

/// `answer` names exactly one of the words `positive` and `negative` (any case, as a whole
/// word); it is right when that is the review's label.
pub fn judge(answer: &str, positive: bool) -> Verdict {
    let lower = answer.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let names = |label: &str| words.contains(&label);
    match (names("positive"), names("negative")) {
        (true, false) => verdict(positive),
        (false, true) => verdict(!positive),
        _ => Verdict::NoLabel,
    }
}

fn verdict(right: bool) -> Verdict {
    if right {
        Verdict::Right
    } else {
        Verdict::Wrong
    }
}

/// What a user who corrects a wrong answer sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CorrectionStyle {
    /// The answer edited: each wrong label word replaced by the right one, the rest kept (an
    /// answer that names no label gets the right word alone).
    Edit,
    /// The right label word alone.
    Label,
}

impl CorrectionStyle {
    pub fn describe(self) -> &'static str {
        match self {
            CorrectionStyle::Edit => "the answer edited",
            CorrectionStyle::Label => "the label word",
        }
    }
}

fn label_word(positive: bool) -> &'static str {
    if positive {
        "positive"
    } else {
        "negative"
    }
}

/// The correction of `answer` for a review whose label is `positive`.
pub fn correction(style: CorrectionStyle, answer: &str, positive: bool) -> String {
    let (right, wrong) = (label_word(positive), label_word(!positive));
    let wrong_words = whole_words(answer, wrong);
    if style == CorrectionStyle::Label || wrong_words.is_empty() {
        return right.to_string();
    }
    let mut edited = String::with_capacity(answer.len());
    let mut copied = 0;
    for start in wrong_words {
        let word = &answer[start..start + wrong.len()];
        edited.push_str(&answer[copied..start]);
        edited.push_str(&if word.chars().all(|c| c.is_ascii_uppercase()) {
            right.to_ascii_uppercase()
        } else if word.starts_with(|c: char| c.is_ascii_uppercase()) {
            right[..1].to_ascii_uppercase() + &right[1..]
        } else {
            right.to_string()
        });
        copied = start + wrong.len();
    }
    edited.push_str(&answer[copied..]);
    edited
}

/// Byte offsets of `word` (ASCII, any case) in `text` as a whole word. ASCII bytes never occur
/// inside a multi-byte character, so every offset is a character boundary.
fn whole_words(text: &str, word: &str) -> Vec<usize> {
    let bytes = text.as_bytes();
    let is_word_byte = |i: usize| bytes.get(i).is_some_and(u8::is_ascii_alphanumeric);
    bytes
        .windows(word.len())
        .enumerate()
        .filter(|&(start, window)| {
            window.eq_ignore_ascii_case(word.as_bytes())
                && (start == 0 || !is_word_byte(start - 1))
                && !is_word_byte(start + word.len())
        })
        .map(|(start, _)| start)
        .collect()
}

/// One window of rated requests.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// 1-based numbers of its first and last request.
    pub first: usize,
    pub last: usize,
    pub right: usize,
    pub named_a_label: usize,
    pub corrections: usize,
    /// The models that answered (the base id, or `adapter@version`), in order of first use.
    pub served_by: Vec<String>,
}

impl Window {
    fn requests(&self) -> usize {
        self.last + 1 - self.first
    }
}

/// One continuous-training job the feedback started.
#[derive(Debug, Clone, PartialEq)]
pub struct JobReport {
    pub id: String,
    /// The request whose feedback started it.
    pub after_request: usize,
    pub status: String,
    pub steps: u64,
    pub seconds: f64,
    pub published: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FeedbackBenchResult {
    pub windows: Vec<Window>,
    pub jobs: Vec<JobReport>,
    /// Right answers on the probe reviews: the base model, the adapter's last version (if any).
    pub probe_before: usize,
    pub probe_after: Option<(String, usize)>,
    pub seconds: f64,
}

/// The HTTP side of the benchmark.
struct Client {
    http: reqwest::Client,
    base_url: String,
}

impl Client {
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value, String> {
        let response = request.send().await.map_err(|e| e.to_string())?;
        let status = response.status();
        let body: Value = response.json().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("the server answered {status}: {body}"));
        }
        Ok(body)
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value, String> {
        let url = format!("{}{path}", self.base_url);
        self.send(self.http.post(url).json(body)).await
    }

    async fn put(&self, path: &str, body: &Value) -> Result<Value, String> {
        let url = format!("{}{path}", self.base_url);
        self.send(self.http.put(url).json(body)).await
    }

    async fn get(&self, path: &str) -> Result<Value, String> {
        let url = format!("{}{path}", self.base_url);
        self.send(self.http.get(url)).await
    }

    /// The greedy answer of `model` about `review`: (completion id, text, who answered).
    async fn ask(
        &self,
        model: &str,
        review: &Snippet,
        max_tokens: usize,
    ) -> Result<(String, String, String), String> {
        let body = json!({
            "model": model,
            "messages": [{"role": "user", "content": QUESTION.replace("{text}", &review.text)}],
            "max_tokens": max_tokens,
            "temperature": 0,
        });
        let reply = self.post("/v1/chat/completions", &body).await?;
        let id = reply["id"].as_str().unwrap_or_default().to_string();
        let text = reply["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let served_by = match reply["adapter_version"].as_u64() {
            Some(version) => format!("{model}@{version}"),
            None => model.to_string(),
        };
        Ok((id, text, served_by))
    }

    /// The adapter's live version, if it has one.
    async fn live_version(&self, adapter: &str) -> Result<Option<u64>, String> {
        let url = format!("{}/v1/adapters/{adapter}", self.base_url);
        let response = self.http.get(url).send().await.map_err(|e| e.to_string())?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let body: Value = response.json().await.map_err(|e| e.to_string())?;
        Ok(body["live_version"].as_u64())
    }

    /// The job once it is finished: polled until then with `wait`, else `None` while it runs.
    async fn finished_job(&self, id: &str, wait: bool) -> Result<Option<Value>, String> {
        loop {
            let job = self.get(&format!("/v1/finetune/{id}")).await?;
            if !matches!(job["status"].as_str(), Some("queued" | "running")) {
                return Ok(Some(job));
            }
            if !wait {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Right answers of `model` on `reviews`.
    async fn right_answers(
        &self,
        model: &str,
        reviews: &[Snippet],
        max_tokens: usize,
    ) -> Result<usize, String> {
        let mut right = 0;
        for review in reviews {
            let (_, text, _) = self.ask(model, review, max_tokens).await?;
            right += usize::from(judge(&text, review.positive) == Verdict::Right);
        }
        Ok(right)
    }
}

pub async fn run(config: &FeedbackBenchConfig) -> Result<FeedbackBenchResult, String> {
    let client = Client {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(3600))
            .build()
            .map_err(|e| e.to_string())?,
        base_url: config.base_url.clone(),
    };
    let started = Instant::now();
    eprintln!(
        "the base model answers {} reviews nobody rates …",
        config.probe.len()
    );
    let probe_before = client
        .right_answers(&config.base_model, &config.probe, config.max_tokens)
        .await?;
    let mut continuous = json!({"feedback_every": config.feedback_every});
    if let Some(steps) = config.steps {
        continuous["steps"] = json!(steps);
    }
    client
        .put(
            &format!("/v1/adapters/{}/continuous_training", config.adapter),
            &continuous,
        )
        .await?;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut live = client.live_version(&config.adapter).await?;
    let mut windows: Vec<Window> = Vec::new();
    let mut jobs = Vec::new();
    let mut running: Option<(String, usize, Instant)> = None;
    let progress = Progress::steps(config.rated.len() as u64, "rated answers", "users rating");
    let mut right_so_far = 0;
    for (index, review) in config.rated.iter().enumerate() {
        let number = index + 1;
        let model = if live.is_some() {
            &config.adapter
        } else {
            &config.base_model
        };
        let (completion_id, answer, served_by) =
            client.ask(model, review, config.max_tokens).await?;
        let verdict = judge(&answer, review.positive);
        right_so_far += usize::from(verdict == Verdict::Right);
        progress.set_position(number as u64);
        progress.set_message(format!(
            "{:.1}% right, served by {served_by}",
            100.0 * right_so_far as f64 / number as f64
        ));
        let correct = verdict != Verdict::Right && rng.gen_bool(config.correction_rate);
        let mut feedback = json!({
            "completion_id": completion_id,
            "rating": if verdict == Verdict::Right { "up" } else { "down" },
            "adapter": config.adapter,
        });
        if correct {
            feedback["corrected_answer"] =
                json!(correction(config.corrections, &answer, review.positive));
        }
        let receipt = client.post("/v1/feedback", &feedback).await?;
        if (number - 1) % config.window == 0 {
            windows.push(Window {
                first: number,
                last: number,
                right: 0,
                named_a_label: 0,
                corrections: 0,
                served_by: Vec::new(),
            });
        }
        let window = windows.last_mut().expect("a window was opened");
        window.last = number;
        window.right += usize::from(verdict == Verdict::Right);
        window.named_a_label += usize::from(verdict != Verdict::NoLabel);
        window.corrections += usize::from(correct);
        if !window.served_by.contains(&served_by) {
            window.served_by.push(served_by);
        }
        if number % config.window == 0 {
            progress.println(window_row(window));
        }
        if let Some(id) = receipt["job"]["id"].as_str() {
            running = Some((id.to_string(), number, Instant::now()));
        }
        let last = number == config.rated.len();
        if let Some((id, after_request, job_started)) = running.take() {
            // The last request's feedback is always waited for: the probe needs its version.
            let wait = config.wait_for_training || last;
            match client.finished_job(&id, wait).await? {
                Some(job) => {
                    let report = job_report(&job, id, after_request, job_started);
                    progress.println(job_line(&report));
                    jobs.push(report);
                    live = client.live_version(&config.adapter).await?;
                }
                None => running = Some((id, after_request, job_started)),
            }
        }
    }
    drop(progress);
    let probe_after = match live {
        Some(version) => {
            let model = format!("{}@{version}", config.adapter);
            eprintln!(
                "{model} answers the {} reviews nobody rated …",
                config.probe.len()
            );
            let right = client
                .right_answers(&model, &config.probe, config.max_tokens)
                .await?;
            Some((model, right))
        }
        None => None,
    };
    Ok(FeedbackBenchResult {
        windows,
        jobs,
        probe_before,
        probe_after,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn job_report(job: &Value, id: String, after_request: usize, started: Instant) -> JobReport {
    JobReport {
        id,
        after_request,
        status: job["status"].as_str().unwrap_or("unknown").to_string(),
        steps: job["progress"]["steps_done"].as_u64().unwrap_or(0),
        seconds: started.elapsed().as_secs_f64(),
        published: job["progress"]["published_versions"]
            .as_array()
            .map(|versions| versions.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default(),
    }
}

fn percent(count: usize, of: usize) -> f64 {
    100.0 * count as f64 / of.max(1) as f64
}

/// A window as a row of the report's table.
fn window_row(window: &Window) -> String {
    format!(
        "| {}–{} | {:.1}% | {:.1}% | {} | {} |",
        window.first,
        window.last,
        percent(window.right, window.requests()),
        percent(window.named_a_label, window.requests()),
        window.corrections,
        window.served_by.join(", ")
    )
}

fn job_line(job: &JobReport) -> String {
    format!(
        "job {} (feedback up to request {}): {}, {} steps in {:.0} s, published {:?}",
        job.id, job.after_request, job.status, job.steps, job.seconds, job.published
    )
}

/// The report: one row per window, the jobs, and the probe before and after.
pub fn render(config: &FeedbackBenchConfig, result: &FeedbackBenchResult) -> String {
    let mut out = String::from(
        "| requests | right answers | named a label | corrections sent | served by |\n|---|---|---|---|---|\n",
    );
    for window in &result.windows {
        out.push_str(&window_row(window));
        out.push('\n');
    }
    let trained: u64 = result.jobs.iter().map(|j| j.steps).sum();
    let training_seconds: f64 = result.jobs.iter().map(|j| j.seconds).sum();
    out.push_str(&format!(
        "\n{} jobs, {trained} steps, {training_seconds:.0} s of training; {:.0} s in all\n",
        result.jobs.len(),
        result.seconds
    ));
    let probe = config.probe.len();
    out.push_str(&format!(
        "reviews nobody rated ({probe}): base model {:.1}% right",
        percent(result.probe_before, probe)
    ));
    match &result.probe_after {
        Some((model, right)) => {
            out.push_str(&format!(", {model} {:.1}% right\n", percent(*right, probe)))
        }
        None => out.push_str(", no version was published\n"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_right_when_it_names_only_the_label() {
        assert_eq!(judge("Positive.", true), Verdict::Right);
        assert_eq!(
            judge("The sentiment of this review is negative.", false),
            Verdict::Right
        );
        assert_eq!(judge("NEGATIVE", true), Verdict::Wrong);
        assert_eq!(
            judge("It is not negative but positive", true),
            Verdict::NoLabel
        );
        assert_eq!(judge("The review is about a film.", true), Verdict::NoLabel);
        // Whole words only: "positively" names no label.
        assert_eq!(judge("positively charming", true), Verdict::NoLabel);
    }

    #[test]
    fn an_edited_correction_swaps_only_the_wrong_label_words() {
        let edit = |answer| correction(CorrectionStyle::Edit, answer, false);
        assert_eq!(
            edit("The sentiment of this review is positive. Positive overall!"),
            "The sentiment of this review is negative. Negative overall!"
        );
        assert_eq!(edit("POSITIVE, positively"), "NEGATIVE, positively");
        // Both words: the wrong one goes, so the edit names only the right one.
        assert_eq!(
            edit("Positive, with a hint of negative"),
            "Negative, with a hint of negative"
        );
        assert_eq!(edit("I cannot tell."), "negative");
        assert_eq!(
            correction(CorrectionStyle::Label, "It is positive.", false),
            "negative"
        );
        // Multi-byte text before and after a word.
        assert_eq!(edit("Überall positive — ja"), "Überall negative — ja");
    }
}
