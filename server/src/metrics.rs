//! Prometheus metrics: every name the server exports, its help text and its buckets.
//!
//! Names follow Prometheus conventions (one `mezo_` namespace, base units in names, `_total` on
//! counters); labels come from bounded sets only (route, served model name, status, and adapter
//! names through [`adapter_label`], which gives the first [`MAX_ADAPTER_LABELS`] adapters their
//! own value and the rest `other`). Every
//! histogram gets explicit buckets, which makes the exporter write real histograms (aggregatable
//! across replicas) rather than summaries. The README's metrics table lists the same names.

use std::collections::BTreeSet;
use std::sync::{Mutex, OnceLock, PoisonError};

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const HTTP_REQUESTS_TOTAL: &str = "mezo_http_requests_total";
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "mezo_time_to_first_token_seconds";
pub const E2E_REQUEST_LATENCY_SECONDS: &str = "mezo_e2e_request_latency_seconds";
pub const TIME_PER_OUTPUT_TOKEN_SECONDS: &str = "mezo_time_per_output_token_seconds";
pub const PROMPT_TOKENS_TOTAL: &str = "mezo_prompt_tokens_total";
pub const GENERATION_TOKENS_TOTAL: &str = "mezo_generation_tokens_total";
pub const REQUESTS_RUNNING: &str = "mezo_requests_running";
pub const REQUESTS_WAITING: &str = "mezo_requests_waiting";
pub const ENGINE_BATCH_ROWS: &str = "mezo_engine_batch_rows";
pub const ENGINE_STEP_SECONDS: &str = "mezo_engine_step_seconds";
pub const ENGINE_TRAINING_SLICE_TOKENS: &str = "mezo_engine_training_slice_tokens";
pub const PREFILL_TOKENS_TOTAL: &str = "mezo_prefill_tokens_total";
pub const PREFIX_CACHE_HIT_TOKENS_TOTAL: &str = "mezo_prefix_cache_hit_tokens_total";
pub const MODEL_WEIGHTS_BYTES: &str = "mezo_model_weights_bytes";
pub const ADAPTER_WEIGHTS_BYTES: &str = "mezo_adapter_weights_bytes";
pub const PROCESS_RESIDENT_MEMORY_BYTES: &str = "mezo_process_resident_memory_bytes";
pub const TRAINING_STEPS_TOTAL: &str = "mezo_training_steps_total";
pub const TRAINING_LOSS: &str = "mezo_training_loss";
pub const TRAINING_PROJECTED_GRADIENT: &str = "mezo_training_projected_gradient";
pub const TRAINING_STEP_SECONDS: &str = "mezo_training_step_seconds";
pub const TRAINING_HELD_OUT: &str = "mezo_training_held_out";
pub const FINETUNE_JOBS: &str = "mezo_finetune_jobs";
pub const ADAPTER_PUBLISHES_TOTAL: &str = "mezo_adapter_publishes_total";
pub const ADAPTER_LIVE_VERSION: &str = "mezo_adapter_live_version";
pub const FEEDBACK_TOTAL: &str = "mezo_feedback_total";
pub const TRAINING_FROZEN_STATES_BYTES: &str = "mezo_training_frozen_states_bytes";
pub const TRAINING_FROZEN_LAYER_TOKENS_TOTAL: &str = "mezo_training_frozen_layer_tokens_total";
pub const FINETUNE_JOBS_RUNNING_HERE: &str = "mezo_finetune_jobs_running_here";
pub const REPLICATION_LAG_SECONDS: &str = "mezo_replication_lag_seconds";

/// Adapters with their own `adapter` label value; later ones share [`OTHER_ADAPTERS`]. Adapter
/// names are unbounded (one `ft:…` per OpenAI job), Prometheus series must not be.
pub const MAX_ADAPTER_LABELS: usize = 64;
/// The label value of the adapters past [`MAX_ADAPTER_LABELS`].
pub const OTHER_ADAPTERS: &str = "other";

/// The adapter names that have a label value of their own, in a bounded set.
#[derive(Debug)]
pub struct AdapterLabels {
    capacity: usize,
    named: Mutex<BTreeSet<String>>,
}

impl AdapterLabels {
    pub const fn new(capacity: usize) -> Self {
        Self {
            capacity,
            named: Mutex::new(BTreeSet::new()),
        }
    }

    /// `name` itself if it has a value already or there is room for one (first come, first
    /// served: a series never changes its label later), [`OTHER_ADAPTERS`] otherwise.
    pub fn label(&self, name: &str) -> String {
        let mut named = self.named.lock().unwrap_or_else(PoisonError::into_inner);
        if named.contains(name) {
            return name.to_string();
        }
        if named.len() < self.capacity {
            named.insert(name.to_string());
            return name.to_string();
        }
        OTHER_ADAPTERS.to_string()
    }
}

static ADAPTER_LABELS: AdapterLabels = AdapterLabels::new(MAX_ADAPTER_LABELS);

/// The `adapter` label value of every per-adapter series for `name` (see [`AdapterLabels`]).
pub fn adapter_label(name: &str) -> String {
    ADAPTER_LABELS.label(name)
}

/// vLLM's bucket lists, which dashboards built for LLM servers already expect.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];
const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0,
];
const TPOT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
];
const BATCH_ROWS_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0];
const STEP_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const SLICE_TOKENS_BUCKETS: &[f64] = &[
    16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];
const REPLICATION_LAG_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0,
];
const TRAINING_STEP_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0,
];

/// Installs the process-wide recorder (once; later calls return the same handle).
///
/// # Panics
///
/// If another metrics recorder was installed first, which this program never does.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let histograms = [
                (TIME_TO_FIRST_TOKEN_SECONDS, TTFT_BUCKETS),
                (E2E_REQUEST_LATENCY_SECONDS, E2E_BUCKETS),
                (TIME_PER_OUTPUT_TOKEN_SECONDS, TPOT_BUCKETS),
                (ENGINE_BATCH_ROWS, BATCH_ROWS_BUCKETS),
                (ENGINE_STEP_SECONDS, STEP_BUCKETS),
                (ENGINE_TRAINING_SLICE_TOKENS, SLICE_TOKENS_BUCKETS),
                (TRAINING_STEP_SECONDS, TRAINING_STEP_BUCKETS),
                (REPLICATION_LAG_SECONDS, REPLICATION_LAG_BUCKETS),
            ];
            let mut builder = PrometheusBuilder::new();
            for (name, buckets) in histograms {
                builder = builder
                    .set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)
                    .expect("bucket lists are non-empty");
            }
            let handle = builder
                .install_recorder()
                .expect("no other metrics recorder is installed in this process");
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        HTTP_REQUESTS_TOTAL,
        "HTTP requests answered, by route, served model and status code."
    );
    describe_histogram!(
        TIME_TO_FIRST_TOKEN_SECONDS,
        Unit::Seconds,
        "Time from a request's arrival to its first generated token."
    );
    describe_histogram!(
        E2E_REQUEST_LATENCY_SECONDS,
        Unit::Seconds,
        "Time from a generation request's arrival to its last token."
    );
    describe_histogram!(
        TIME_PER_OUTPUT_TOKEN_SECONDS,
        Unit::Seconds,
        "Mean time per generated token after the first, per request."
    );
    describe_counter!(
        PROMPT_TOKENS_TOTAL,
        "Prompt tokens of generation requests, by served model."
    );
    describe_counter!(
        GENERATION_TOKENS_TOTAL,
        "Tokens generated, by served model."
    );
    describe_gauge!(REQUESTS_RUNNING, "Sequences in the engine's running batch.");
    describe_gauge!(
        REQUESTS_WAITING,
        "Sequences accepted and waiting for a place in the batch."
    );
    describe_histogram!(
        ENGINE_BATCH_ROWS,
        "Sequences per engine step (continuous batching)."
    );
    describe_histogram!(
        ENGINE_STEP_SECONDS,
        Unit::Seconds,
        "Duration of one engine step (one batched forward and sampling)."
    );
    describe_histogram!(
        ENGINE_TRAINING_SLICE_TOKENS,
        "Tokens of forward pass in one slice of training work run between serving steps."
    );
    describe_counter!(
        PREFILL_TOKENS_TOTAL,
        "Prompt tokens the engine computed (prompt tokens minus prefix-cache hits)."
    );
    describe_counter!(
        PREFIX_CACHE_HIT_TOKENS_TOTAL,
        "Prompt tokens whose keys and values came from the prefix cache."
    );
    describe_gauge!(
        MODEL_WEIGHTS_BYTES,
        Unit::Bytes,
        "Memory held by the base model's weights."
    );
    describe_gauge!(
        ADAPTER_WEIGHTS_BYTES,
        Unit::Bytes,
        "Memory held by all loaded adapter versions' LoRA tensors."
    );
    describe_gauge!(
        PROCESS_RESIDENT_MEMORY_BYTES,
        Unit::Bytes,
        "Resident memory of the whole server process."
    );
    describe_counter!(
        TRAINING_STEPS_TOTAL,
        "MeZO steps taken by fine-tuning jobs, by adapter."
    );
    describe_gauge!(
        TRAINING_LOSS,
        "Training loss of the last MeZO step, (L+ + L-)/2 on its minibatch, by adapter."
    );
    describe_gauge!(
        TRAINING_PROJECTED_GRADIENT,
        "Projected gradient (L+ - L-)/(2 eps) of the last MeZO step, by adapter."
    );
    describe_histogram!(
        TRAINING_STEP_SECONDS,
        Unit::Seconds,
        "Wall time of one MeZO step, serving interleaved included."
    );
    describe_gauge!(
        TRAINING_HELD_OUT,
        "Last held-out evaluation of a job, by adapter and metric (loss, accuracy, token_f1, ...)."
    );
    describe_gauge!(
        FINETUNE_JOBS,
        "Fine-tuning jobs in the database, by status: with replicas sharing a PostgreSQL \
         database, the whole fleet's."
    );
    describe_gauge!(
        FINETUNE_JOBS_RUNNING_HERE,
        "Fine-tuning jobs this server is running (0 or 1)."
    );
    describe_histogram!(
        REPLICATION_LAG_SECONDS,
        Unit::Seconds,
        "From an adapter version's publish on another replica to this one serving it."
    );
    describe_counter!(
        ADAPTER_PUBLISHES_TOTAL,
        "Adapter versions published (hot-swapped in), by adapter."
    );
    describe_gauge!(
        ADAPTER_LIVE_VERSION,
        "The version each adapter name serves (0 once deleted)."
    );
    describe_gauge!(
        TRAINING_FROZEN_STATES_BYTES,
        Unit::Bytes,
        "Memory held by fine-tuning jobs' kept hidden states (frozen-layer reuse)."
    );
    describe_counter!(
        TRAINING_FROZEN_LAYER_TOKENS_TOTAL,
        "Training tokens whose layers below the first adapted one were reused from kept hidden \
         states or computed, by source (reused, computed)."
    );
    describe_counter!(
        FEEDBACK_TOTAL,
        "Feedback items received, by adapter and kind (up, down, reward, correction)."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_labels_are_bounded_and_stable() {
        let labels = AdapterLabels::new(2);
        assert_eq!(labels.label("a"), "a");
        assert_eq!(labels.label("b"), "b");
        assert_eq!(labels.label("c"), OTHER_ADAPTERS);
        // The first two keep their own values.
        assert_eq!(labels.label("a"), "a");
        assert_eq!(labels.label("b"), "b");
        assert_eq!(labels.label("d"), OTHER_ADAPTERS);
    }
}
