//! `mezo serve`: binds the port, loads the model and adapters in the background (answering
//! `/health` meanwhile, and `/ready` once loaded), runs the HTTP server, and shuts down
//! gracefully on SIGTERM or Ctrl-C.
//!
//! Shutdown: stop accepting connections and refuse new work (503); running requests get
//! `server.shutdown_grace_seconds` to finish; then whatever still runs is ended (streams get an
//! error event and `[DONE]`), and the process exits 0.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use crate::adapter_versions::AdapterVersions;
use crate::api::access::{KeyLimits, KeyRing};
use crate::api::{app, ApiConfig, AppState, Serving};
use crate::config::Config;
use crate::engine::loaded_model::LoadedModel;
use crate::ids::unix_now;
use crate::metrics as m;
use crate::scheduler::{BatchLimits, Scheduler};
use crate::training::Training;

/// Time given to connections after the grace period's cancellation, before exiting anyway.
const CLOSE_CONNECTIONS_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}; is another server using the port? choose one with --port")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the model: {0}")]
    Load(String),
    #[error("the HTTP server failed: {0}")]
    Http(#[source] std::io::Error),
}

/// Binds `server.host:server.port` and runs the server until a shutdown signal.
pub async fn serve(config: Config, model_path: PathBuf) -> Result<(), ServeError> {
    let listener = bind(&config).await?;
    serve_on(listener, config, model_path).await
}

/// Binds the configured address (port 0: a free port; see the listener's `local_addr`).
pub async fn bind(config: &Config) -> Result<TcpListener, ServeError> {
    let addr = format!("{}:{}", config.server.host, config.server.port);
    TcpListener::bind(&addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

/// Runs the server on `listener` until a shutdown signal; returns once it has stopped.
pub async fn serve_on(
    listener: TcpListener,
    config: Config,
    model_path: PathBuf,
) -> Result<(), ServeError> {
    let metrics = crate::metrics::install();
    let state = AppState::new(
        ApiConfig {
            keys: KeyRing::new(
                &config.server.api_keys,
                &config.server.keys,
                KeyLimits {
                    max_concurrent_requests: config.server.max_concurrent_requests_per_key,
                    max_queued_jobs: config.server.max_queued_jobs_per_key,
                },
            ),
            metrics_require_key: config.server.metrics_require_key,
            max_body_bytes: config.server.max_body_bytes,
            max_file_bytes: config.training.max_file_bytes,
            max_choices: config.scheduler.max_choices,
            lora_load_root: (!config.server.lora_load_root.as_os_str().is_empty())
                .then(|| config.server.lora_load_root.clone()),
        },
        Some(metrics.clone()),
    );

    let local: SocketAddr = listener.local_addr().map_err(ServeError::Http)?;
    tracing::info!("listening on http://{local}");

    let (load_failed_tx, load_failed) = oneshot::channel::<String>();
    {
        let state = state.clone();
        let config = config.clone();
        let replica_name = replica_name(&config, local);
        tokio::task::spawn_blocking(move || {
            match load_serving(&config, &model_path, replica_name) {
                Ok(serving) => {
                    tracing::info!(model = %serving.model_id, "ready");
                    state.set_serving(serving);
                }
                Err(message) => {
                    let _ = load_failed_tx.send(message);
                }
            }
        });
    }
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            metrics.run_upkeep();
        }
    });

    let (signal_tx, signal) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        let _ = signal_tx.send(true);
    });
    let stop_accepting = {
        let state = state.clone();
        let mut signal = signal.clone();
        async move {
            let _ = signal.wait_for(|&s| s).await;
            tracing::info!("shutting down: no new requests; running ones may finish");
            if let Ok(serving) = state.serving() {
                serving.training.shutdown();
                serving.scheduler.close();
            }
        }
    };
    let grace = Duration::from_secs(config.server.shutdown_grace_seconds);
    let deadline = {
        let state = state.clone();
        let mut signal = signal.clone();
        async move {
            let _ = signal.wait_for(|&s| s).await;
            tokio::time::sleep(grace).await;
            tracing::warn!("shutdown grace period over; cancelling running requests");
            if let Ok(serving) = state.serving() {
                serving.scheduler.cancel_all();
            }
            tokio::time::sleep(CLOSE_CONNECTIONS_TIMEOUT).await;
            tracing::warn!("connections still open after cancellation; exiting anyway");
        }
    };
    let server = axum::serve(listener, app(state.clone())).with_graceful_shutdown(stop_accepting);
    tokio::select! {
        result = server => result.map_err(ServeError::Http)?,
        () = deadline => {}
        Ok(message) = load_failed => return Err(ServeError::Load(message)),
    }
    if let Ok(serving) = state.serving() {
        serving.scheduler.cancel_all();
    }
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// This server's name among replicas: `server.replica_name`, or `<host name>:<port>`.
fn replica_name(config: &Config, local: SocketAddr) -> String {
    let configured = config.server.replica_name.trim();
    if !configured.is_empty() {
        return configured.to_string();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| local.ip().to_string());
    format!("{host}:{}", local.port())
}

/// Loads the model and the adapters folder and starts the engine thread.
fn load_serving(
    config: &Config,
    model_path: &Path,
    replica_name: String,
) -> Result<Serving, String> {
    let mut model = LoadedModel::load_with_template(
        model_path,
        config.model.weights,
        config.model.chat_template_file(),
    )
    .map_err(|e| e.to_string())?;
    model.limit_context(config.model.max_model_len);
    metrics::gauge!(m::MODEL_WEIGHTS_BYTES).set(model.transformer.weights_size_bytes() as f64);
    let model_id = model_id(config, &model);
    let db = Training::open_db(&config.data).map_err(|e| e.to_string())?;
    let published = db.published_versions().map_err(|e| e.to_string())?;
    let adapters = Arc::new(AdapterVersions::load(
        config.data.adapters_dir(),
        &model,
        model_id.clone(),
        &published,
    ));
    let model = Arc::new(model);
    let scheduler = Scheduler::start(
        Arc::clone(&model),
        BatchLimits {
            max_batch_rows: config.scheduler.max_batch_rows,
            max_prefill_tokens_per_step: config.scheduler.max_prefill_tokens_per_step,
            prefix_cache_bytes: config.scheduler.prefix_cache_bytes,
            max_training_share: config.training.max_engine_share,
            training_slice_tokens: config.training.slice_tokens,
            idle_training_slice_tokens: config.training.idle_slice_tokens,
        },
        config.scheduler.max_waiting,
    );
    let training = Training::start(
        db,
        config.training.clone(),
        Arc::clone(&model),
        Arc::clone(&adapters),
        scheduler.handle().clone(),
        (model_id.clone(), replica_name),
    )
    .map_err(|e| e.to_string())?;
    Ok(Serving {
        model,
        model_id,
        created: unix_now(),
        adapters,
        scheduler,
        training,
    })
}

/// The base model's id: the configured name, else the GGUF file's name without its
/// quantization suffix, as a slug ("SmolLM2-135M-Instruct.Q4_1.gguf" → "smollm2-135m-instruct").
/// The file name rather than the GGUF's `general.name`, which is often a training run's name.
pub fn model_id(config: &Config, model: &LoadedModel) -> String {
    if !config.model.name.is_empty() {
        return config.model.name.clone();
    }
    let stem = model
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let id = slug(strip_quantization(&stem));
    if id.is_empty() {
        slug(model.name.as_deref().unwrap_or("model"))
    } else {
        id
    }
}

/// "Model.Q4_1" → "Model"; "model-f16" → "model"; names without such a suffix stay whole.
fn strip_quantization(stem: &str) -> &str {
    let Some(cut) = stem.rfind(['.', '-']) else {
        return stem;
    };
    let suffix = stem[cut + 1..].to_ascii_lowercase();
    let is_quant = ["q", "iq", "f", "bf"].iter().any(|p| {
        suffix
            .strip_prefix(p)
            .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
    });
    if is_quant {
        &stem[..cut]
    } else {
        stem
    }
}

fn slug(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    out.trim_end_matches('-').to_string()
}

#[cfg(test)]
mod tests {
    use super::{slug, strip_quantization};

    #[test]
    fn model_names_become_ids() {
        assert_eq!(
            slug(strip_quantization("SmolLM2-135M-Instruct.Q4_1")),
            "smollm2-135m-instruct"
        );
        assert_eq!(strip_quantization("llama-3-8b-f16"), "llama-3-8b");
        assert_eq!(
            strip_quantization("Qwen2.5-0.5B-Instruct"),
            "Qwen2.5-0.5B-Instruct"
        );
        assert_eq!(slug("SmolLM2 135M Instruct"), "smollm2-135m-instruct");
        assert_eq!(slug("  Llama-3.2 (1B)  "), "llama-3.2-1b");
    }
}
