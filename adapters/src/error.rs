//! The adapters crate's one error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("`{0}` is not a LoRA target this engine supports; use q, k, v, o, gate, up or down (embeddings and lm_head are not supported)")]
    UnsupportedTarget(String),

    #[error("invalid LoRA configuration: {0}")]
    InvalidConfig(String),

    #[error("{path}: {reason}")]
    InvalidFile { path: PathBuf, reason: String },

    #[error("{path}: PEFT feature `{feature}` is not supported by this engine; {hint}")]
    UnsupportedFeature {
        path: PathBuf,
        feature: String,
        hint: String,
    },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = AdapterError> = std::result::Result<T, E>;
