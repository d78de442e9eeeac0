//! The engine layer's one error type.
//!
//! Every message names the file, the field or the limit involved and, where there is one, the
//! fix, because these errors reach users on the command line and (later) in API error bodies.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot read model file {path}: {source}; check the path, or run `mezo fetch-model`")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path} is not a usable GGUF file: {reason}")]
    InvalidGguf { path: PathBuf, reason: String },

    #[error(
        "{path} holds a `{architecture}` model, which this engine does not run; it runs GGUF \
         files of these architectures: {supported}"
    )]
    UnsupportedArchitecture {
        path: PathBuf,
        architecture: String,
        supported: String,
    },

    #[error("GGUF metadata key `{key}` is missing or has the wrong type: {reason}")]
    Metadata { key: String, reason: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    ChatTemplate(String),

    /// A base model: its file has no `tokenizer.chat_template` and none was given.
    #[error(
        "this model ({path}) has no chat template, so it cannot format chat messages; send text \
         to /v1/completions, or start the server with `--chat-template FILE` (or `chat_template` \
         in the config's [model] section) naming a Jinja template for it"
    )]
    NoChatTemplate { path: PathBuf },

    #[error("the input is {tokens} tokens, and with {requested} more to generate that exceeds the model's context of {limit} tokens; shorten the prompt or lower max_tokens")]
    ContextOverflow {
        tokens: usize,
        requested: usize,
        limit: usize,
    },

    #[error(
        "the input is {tokens} tokens, past the model's context of {limit} tokens; shorten it"
    )]
    InputTooLong { tokens: usize, limit: usize },

    #[error("invalid request: {0}")]
    InvalidRequest(String),

    #[error("adapter does not fit the model: {0}")]
    AdapterMismatch(String),

    /// The scheduler refused or dropped work (the server is shutting down).
    #[error("the engine is not available: {0}")]
    Unavailable(String),

    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
