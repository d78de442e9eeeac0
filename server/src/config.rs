//! Configuration: `config/default.toml` documents every key; a user file given with `--config`
//! overrides it, and command-line flags override both. Unknown keys are errors, so a typo
//! never silently falls back to a default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::api::access::ScopedKey;
use crate::engine::weights::WeightMode;
use crate::fetch::{known_model, ModelSource, DEFAULT_MODEL};

/// The documented defaults, compiled in so the binary works from any directory.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}; see config/default.toml for every key")]
    Parse { path: PathBuf, message: String },
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    pub server: ServerConfig,
    pub scheduler: SchedulerConfig,
    pub training: TrainingConfig,
    pub data: DataConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Empty: the default model in `dir`.
    #[serde(default)]
    pub path: PathBuf,
    pub dir: PathBuf,
    pub weights: WeightMode,
    /// Empty: derived from the GGUF's `general.name`.
    #[serde(default)]
    pub name: String,
    /// A Jinja chat template file replacing the GGUF's own (or giving a base model one); empty:
    /// the GGUF's.
    #[serde(default)]
    pub chat_template: PathBuf,
    /// The longest sequence (prompt and completion) served, as vLLM's `--max-model-len`; 0:
    /// the model's own context length. Bounds memory and time per request.
    #[serde(default)]
    pub max_model_len: usize,
}

impl ModelConfig {
    /// The template file to use instead of the GGUF's, when one is configured.
    pub fn chat_template_file(&self) -> Option<&Path> {
        (!self.chat_template.as_os_str().is_empty()).then_some(self.chat_template.as_path())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    pub api_keys: Vec<String>,
    /// Keys limited to some scopes (`[[server.keys]]`).
    #[serde(default)]
    pub keys: Vec<ScopedKey>,
    /// Most requests of one key in flight at once, for keys that set no cap of their own; 0:
    /// no cap.
    pub max_concurrent_requests_per_key: usize,
    /// Most fine-tuning jobs of one key queued or running at once, for keys that set no cap
    /// of their own; 0: no cap.
    pub max_queued_jobs_per_key: usize,
    pub metrics_require_key: bool,
    pub max_body_bytes: usize,
    pub shutdown_grace_seconds: u64,
    /// The folder under which `POST /v1/load_lora_adapter` may read adapters; empty: loading
    /// adapters at runtime is off.
    #[serde(default)]
    pub lora_load_root: PathBuf,
    /// Empty: `<host name>:<port>`.
    pub replica_name: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    pub max_batch_rows: usize,
    pub max_waiting: usize,
    pub max_prefill_tokens_per_step: usize,
    pub max_choices: usize,
    pub prefix_cache_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    pub max_engine_share: f64,
    pub slice_tokens: usize,
    pub idle_slice_tokens: usize,
    pub max_examples: usize,
    /// Most examples stored for one adapter (its jobs' and its unused feedback); 0: no cap.
    pub max_stored_examples_per_adapter: usize,
    pub max_steps: u64,
    pub remembered_completions: usize,
    pub max_file_bytes: usize,
    pub frozen_states_bytes: usize,
    pub job_lease_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub dir: PathBuf,
    /// `sqlite:<path>` or `postgres://…`; empty: `mezo.sqlite` in `dir`.
    pub database: String,
}

impl DataConfig {
    /// Where PEFT adapter folders are served from.
    pub fn adapters_dir(&self) -> PathBuf {
        self.dir.join("adapters")
    }
}

impl ModelConfig {
    /// The GGUF file to load, and the known model it is when `path` is empty (the default
    /// model) or a known model's name (`gemma3-270m`), which may be fetched into `dir`.
    pub fn resolved_path(&self) -> (PathBuf, Option<&'static ModelSource>) {
        let known = if self.path.as_os_str().is_empty() {
            Some(&DEFAULT_MODEL)
        } else {
            self.path.to_str().and_then(known_model)
        };
        match known {
            Some(source) => (self.dir.join(source.file_name), Some(source)),
            None => (self.path.clone(), None),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        toml::from_str(DEFAULT_TOML).expect("config/default.toml is valid and complete")
    }
}

impl Config {
    /// The defaults, overridden by `file` when given.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = file else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_over_defaults(&text)
            .and_then(|config| config.validate().map(|()| config))
            .map_err(|message| ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            })
    }

    /// Checks values that parse but cannot work, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        let s = &self.scheduler;
        for (key, value) in [
            ("scheduler.max_batch_rows", s.max_batch_rows),
            ("scheduler.max_waiting", s.max_waiting),
            (
                "scheduler.max_prefill_tokens_per_step",
                s.max_prefill_tokens_per_step,
            ),
            ("scheduler.max_choices", s.max_choices),
            ("server.max_body_bytes", self.server.max_body_bytes),
            ("training.slice_tokens", self.training.slice_tokens),
            (
                "training.idle_slice_tokens",
                self.training.idle_slice_tokens,
            ),
            ("training.max_examples", self.training.max_examples),
            ("training.max_steps", self.training.max_steps as usize),
            ("training.max_file_bytes", self.training.max_file_bytes),
            (
                "training.job_lease_seconds",
                self.training.job_lease_seconds as usize,
            ),
        ] {
            if value == 0 {
                return Err(format!("`{key}` must be at least 1"));
            }
        }
        let share = self.training.max_engine_share;
        if !(0.0..=1.0).contains(&share) {
            return Err(format!(
                "`training.max_engine_share` must be in [0, 1] (given {share})"
            ));
        }
        if self.server.api_keys.iter().any(|k| k.trim().is_empty()) {
            return Err("`server.api_keys` holds an empty key; remove it".into());
        }
        for (i, entry) in self.server.keys.iter().enumerate() {
            if entry.key.trim().is_empty() {
                return Err(format!("`server.keys[{i}].key` is empty; give it a secret"));
            }
            if entry.scopes.is_empty() {
                return Err(format!(
                    "`server.keys[{i}].scopes` is empty, so the key could do nothing; list some \
                     of inference, fine_tuning, admin"
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        let mut every_key =
            (self.server.api_keys.iter()).chain(self.server.keys.iter().map(|k| &k.key));
        if every_key.any(|k| !seen.insert(k.as_str())) {
            return Err(
                "the same key appears twice in `server.api_keys` / `server.keys`; give each \
                 key one entry"
                    .into(),
            );
        }
        Ok(())
    }

    /// Parses `text` as a partial config layered over the defaults (tables merge key by key).
    fn from_toml_over_defaults(text: &str) -> Result<Self, String> {
        let mut merged: toml::Table = toml::from_str(DEFAULT_TOML).map_err(|e| e.to_string())?;
        let user: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        merge(&mut merged, user);
        toml::Value::Table(merged)
            .try_into()
            .map_err(|e: toml::de::Error| e.to_string())
    }
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_name_the_default_model() {
        let config = Config::default();
        assert_eq!(config.model.weights, WeightMode::Quantized);
        assert_eq!(config.model.weights, WeightMode::default());
        let (path, known) = config.model.resolved_path();
        assert_eq!(known.map(|m| m.name), Some(DEFAULT_MODEL.name));
        assert!(path.ends_with(DEFAULT_MODEL.file_name));
        let mut by_name = config.model.clone();
        by_name.path = "gemma3-270m".into();
        let (path, known) = by_name.resolved_path();
        assert_eq!(known.map(|m| m.name), Some("gemma3-270m"));
        assert!(path.ends_with("gemma-3-270m-q4_k_m.gguf"));
        config.validate().unwrap();
        assert_eq!(config.server.port, 8080);
        assert!(config.server.api_keys.is_empty());
    }

    #[test]
    fn a_partial_file_overrides_only_its_keys() {
        let config =
            Config::from_toml_over_defaults("[model]\nweights = \"f32\"\n").expect("valid");
        assert_eq!(config.model.weights, WeightMode::F32);
        assert_eq!(config.model.dir, PathBuf::from("models"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let err = Config::from_toml_over_defaults("[model]\nwieghts = \"f32\"\n").unwrap_err();
        assert!(err.contains("wieghts"), "{err}");
        let err = Config::from_toml_over_defaults("[model]\nweights = \"f16\"\n").unwrap_err();
        assert!(err.contains("f16"), "{err}");
        let zero = Config::from_toml_over_defaults("[scheduler]\nmax_batch_rows = 0\n").unwrap();
        let err = zero.validate().unwrap_err();
        assert!(err.contains("scheduler.max_batch_rows"), "{err}");
        let no_lease = Config::from_toml_over_defaults("[training]\njob_lease_seconds = 0\n");
        let err = no_lease.unwrap().validate().unwrap_err();
        assert!(err.contains("training.job_lease_seconds"), "{err}");
    }

    #[test]
    fn scoped_keys_are_read_and_checked() {
        let scoped = "[server]\napi_keys = [\"sk-all\"]\n\
                      [[server.keys]]\nkey = \"sk-app\"\nscopes = [\"inference\"]\n\
                      [[server.keys]]\nkey = \"sk-ops\"\nscopes = [\"admin\", \"fine_tuning\"]\nname = \"ops\"\n";
        let config = Config::from_toml_over_defaults(scoped).expect("valid");
        config.validate().expect("valid keys");
        assert_eq!(config.server.keys.len(), 2);
        assert_eq!(config.server.keys[1].name, "ops");

        let err = Config::from_toml_over_defaults(
            "[[server.keys]]\nkey = \"sk-x\"\nscopes = [\"everything\"]\n",
        )
        .unwrap_err();
        assert!(
            err.contains("everything") && err.contains("fine_tuning"),
            "{err}"
        );
        for (toml, says) in [
            ("[[server.keys]]\nkey = \"sk-x\"\nscopes = []\n", "scopes` is empty"),
            ("[[server.keys]]\nkey = \" \"\nscopes = [\"admin\"]\n", "key` is empty"),
            (
                "[server]\napi_keys = [\"sk-x\"]\n[[server.keys]]\nkey = \"sk-x\"\nscopes = [\"admin\"]\n",
                "appears twice",
            ),
        ] {
            let config = Config::from_toml_over_defaults(toml).expect("parses");
            let err = config.validate().unwrap_err();
            assert!(err.contains(says), "{toml}: {err}");
        }
    }
}
