//! A model loaded once: the forward pass, its tokenizer and chat template, read from one GGUF.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::chat_template::ChatTemplate;
use super::gguf::GgufFile;
use super::tokenizer::Tokenizer;
use super::transformer::Transformer;
use super::weights::WeightMode;
use super::{EngineError, Result};

#[derive(Debug)]
pub struct LoadedModel {
    pub path: PathBuf,
    /// The GGUF's `general.name` ("SmolLM2 135M Instruct"), when it has one.
    pub name: Option<String>,
    pub transformer: Transformer,
    pub tokenizer: Tokenizer,
    /// `None` for a base model whose file has no template and that was given none.
    chat_template: Option<ChatTemplate>,
    pub load_time: Duration,
}

impl LoadedModel {
    /// The model in `path`, with the chat template its file carries.
    pub fn load(path: &Path, mode: WeightMode) -> Result<Self> {
        Self::load_with_template(path, mode, None)
    }

    /// Serves sequences of at most `max_model_len` tokens (prompt and completion), if that is
    /// shorter than the model's context; 0 keeps the model's.
    pub fn limit_context(&mut self, max_model_len: usize) {
        let context = &mut self.transformer.config.context_length;
        if max_model_len > 0 && max_model_len < *context {
            tracing::info!(
                max_model_len,
                model_context = *context,
                "serving shorter sequences than the model's context (model.max_model_len)"
            );
            *context = max_model_len;
        }
    }

    /// The model in `path`; `chat_template`, a Jinja file, replaces the template its file
    /// carries (or gives one to a base model that has none).
    pub fn load_with_template(
        path: &Path,
        mode: WeightMode,
        chat_template: Option<&Path>,
    ) -> Result<Self> {
        let start = Instant::now();
        let mut file = GgufFile::open(path)?;
        let tokenizer = Tokenizer::from_gguf(&file.metadata())?;
        let chat_template = match chat_template {
            Some(template) => Some(ChatTemplate::from_file(template, &file.metadata())?),
            None => ChatTemplate::from_gguf(&file.metadata())?,
        };
        if chat_template.is_none() {
            tracing::info!(
                path = %path.display(),
                "the model has no chat template: /v1/completions only (--chat-template FILE \
                 gives it one)"
            );
        }
        let name = file
            .metadata()
            .string("general.name")
            .ok()
            .map(str::to_string);
        let transformer = Transformer::load(&mut file, mode)?;
        if tokenizer.vocab_size() > transformer.config.vocab_size {
            return Err(EngineError::InvalidGguf {
                path: path.to_path_buf(),
                reason: format!(
                    "the tokenizer has {} tokens but the embedding only {} rows",
                    tokenizer.vocab_size(),
                    transformer.config.vocab_size
                ),
            });
        }
        tracing::info!(
            path = %path.display(),
            mode = %mode,
            weights_mib = transformer.weights_size_bytes() / (1 << 20),
            matrices = ?transformer.matrix_types(),
            seconds = start.elapsed().as_secs_f32(),
            "model loaded"
        );
        Ok(Self {
            path: path.to_path_buf(),
            name,
            transformer,
            tokenizer,
            chat_template,
            load_time: start.elapsed(),
        })
    }

    /// The chat template, or, for a base model without one, an error saying how to give it
    /// one.
    pub fn chat_template(&self) -> Result<&ChatTemplate> {
        self.chat_template
            .as_ref()
            .ok_or_else(|| EngineError::NoChatTemplate {
                path: self.path.clone(),
            })
    }
}
