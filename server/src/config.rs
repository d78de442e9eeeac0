//! Configuration: `config/default.toml` documents every key; a user file given with `--config`
//! overrides it, and command-line flags override both. Unknown keys are errors, so a typo
//! never silently falls back to a default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::engine::weights::WeightMode;
use crate::fetch::DEFAULT_MODEL;

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
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Empty: the default model in `dir`.
    #[serde(default)]
    pub path: PathBuf,
    pub dir: PathBuf,
    pub weights: WeightMode,
}

impl ModelConfig {
    /// The GGUF file to load, and whether it is the default model (which may be fetched).
    pub fn resolved_path(&self) -> (PathBuf, bool) {
        if self.path.as_os_str().is_empty() {
            (self.dir.join(DEFAULT_MODEL.file_name), true)
        } else {
            (self.path.clone(), false)
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
        Self::from_toml_over_defaults(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
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
        let (path, is_default) = config.model.resolved_path();
        assert!(is_default);
        assert!(path.ends_with(DEFAULT_MODEL.file_name));
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
    }
}
