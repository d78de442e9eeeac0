//! What every handler can reach: the settings, and — once the model is loaded — the serving
//! state (model, adapter registry, scheduler).
//!
//! The server answers `/health` (and `/ready` with 503) while the model loads; handlers that
//! need the model get a 503 with `Retry-After` until [`AppState::set_serving`] runs.

use std::sync::{Arc, OnceLock};

use adapters::registry::ResolveError;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::adapter_versions::AdapterVersions;
pub use crate::adapter_versions::{ServedAdapter, ServedAdapterVersion};
use crate::engine::loaded_model::LoadedModel;
use crate::engine::lora::AdapterView;
use crate::scheduler::Scheduler;
use crate::training::{Training, TrainingError};

use super::error::ApiError;

/// The HTTP layer's settings (from `[server]` and `[scheduler]`).
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// The keys `/v1/*` accepts and their scopes; empty: no authentication.
    pub keys: super::access::KeyRing,
    pub metrics_require_key: bool,
    pub max_body_bytes: usize,
    /// Largest upload to `POST /v1/files`.
    pub max_file_bytes: usize,
    pub max_choices: usize,
    /// Where `POST /v1/load_lora_adapter` may read adapters from; `None`: it is off.
    pub lora_load_root: Option<std::path::PathBuf>,
}

/// Everything serving needs once the model is loaded.
pub struct Serving {
    pub model: Arc<LoadedModel>,
    /// The base model's id in requests and `/v1/models`.
    pub model_id: String,
    /// Unix seconds the model was loaded (`created` in `/v1/models`).
    pub created: u64,
    pub adapters: Arc<AdapterVersions>,
    pub scheduler: Scheduler,
    /// Fine-tuning jobs, feedback and uploaded files.
    pub training: Training,
}

/// What a request's `model` resolved to, once, on arrival: a later publish never changes it.
#[derive(Clone)]
pub struct ResolvedModel {
    /// The name used as the metrics label and in responses: the base id or the adapter name.
    pub name: String,
    pub adapter: Option<Arc<ServedAdapterVersion>>,
}

impl ResolvedModel {
    pub fn view(&self) -> Option<Arc<AdapterView>> {
        self.adapter.as_ref().map(|a| Arc::clone(&a.payload.view))
    }

    pub fn version(&self) -> Option<u32> {
        self.adapter.as_ref().map(|a| a.version)
    }

    /// OpenAI's `system_fingerprint`: changes whenever the weights that answered change.
    pub fn fingerprint(&self, base: &str) -> String {
        match &self.adapter {
            Some(a) => format!("mezo-{base}+{}@{}", a.name, a.version),
            None => format!("mezo-{base}"),
        }
    }
}

impl Serving {
    pub fn resolve_model(&self, model: &str) -> Result<ResolvedModel, ApiError> {
        if model == self.model_id {
            return Ok(ResolvedModel {
                name: self.model_id.clone(),
                adapter: None,
            });
        }
        match self.adapters.resolve(model) {
            Ok(version) => Ok(ResolvedModel {
                name: version.name.clone(),
                adapter: Some(version),
            }),
            Err(ResolveError::UnknownAdapter(_)) => Err(ApiError::model_not_found(format!(
                "the model `{model}` does not exist; GET /v1/models lists the base model `{}` and every adapter",
                self.model_id
            ))),
            Err(err) => Err(ApiError::model_not_found(err.to_string())),
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    inner: Arc<AppInner>,
}

struct AppInner {
    config: ApiConfig,
    serving: OnceLock<Serving>,
    metrics: Option<PrometheusHandle>,
}

impl AppState {
    pub fn new(config: ApiConfig, metrics: Option<PrometheusHandle>) -> Self {
        Self {
            inner: Arc::new(AppInner {
                config,
                serving: OnceLock::new(),
                metrics,
            }),
        }
    }

    pub fn config(&self) -> &ApiConfig {
        &self.inner.config
    }

    pub fn metrics(&self) -> Option<&PrometheusHandle> {
        self.inner.metrics.as_ref()
    }

    /// Makes the loaded model available to requests (and `/ready` answer 200).
    pub fn set_serving(&self, serving: Serving) {
        if self.inner.serving.set(serving).is_err() {
            tracing::warn!("the serving state was set twice; keeping the first");
        }
    }

    pub fn serving(&self) -> Result<&Serving, ApiError> {
        self.inner.serving.get().ok_or_else(ApiError::loading)
    }

    pub fn is_ready(&self) -> bool {
        self.inner.serving.get().is_some()
    }

    /// Runs `work` on the fine-tuning service off the async threads (it reads and writes the
    /// database, which may wait on the disk).
    pub async fn training<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Training) -> Result<T, TrainingError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let training = self.serving()?.training.clone();
        tokio::task::spawn_blocking(move || work(&training))
            .await
            .map_err(|e| ApiError::internal(format!("a fine-tuning task failed: {e}")))?
            .map_err(ApiError::from)
    }
}
