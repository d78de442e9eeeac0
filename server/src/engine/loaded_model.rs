//! A model loaded once: the forward pass, its tokenizer and chat template, read from one GGUF.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::chat_template::ChatTemplate;
use super::gguf::GgufFile;
use super::llama::Llama;
use super::tokenizer::Tokenizer;
use super::weights::WeightMode;
use super::{EngineError, Result};

#[derive(Debug)]
pub struct LoadedModel {
    pub path: PathBuf,
    /// The GGUF's `general.name` ("SmolLM2 135M Instruct"), when it has one.
    pub name: Option<String>,
    pub llama: Llama,
    pub tokenizer: Tokenizer,
    pub chat_template: ChatTemplate,
    pub load_time: Duration,
}

impl LoadedModel {
    pub fn load(path: &Path, mode: WeightMode) -> Result<Self> {
        let start = Instant::now();
        let mut file = GgufFile::open(path)?;
        let tokenizer = Tokenizer::from_gguf(&file.metadata())?;
        let chat_template = ChatTemplate::from_gguf(&file.metadata())?;
        let name = file
            .metadata()
            .string("general.name")
            .ok()
            .map(str::to_string);
        let llama = Llama::load(&mut file, mode)?;
        if tokenizer.vocab_size() > llama.config.vocab_size {
            return Err(EngineError::InvalidGguf {
                path: path.to_path_buf(),
                reason: format!(
                    "the tokenizer has {} tokens but the embedding only {} rows",
                    tokenizer.vocab_size(),
                    llama.config.vocab_size
                ),
            });
        }
        tracing::info!(
            path = %path.display(),
            mode = %mode,
            weights_mib = llama.weights_size_bytes() / (1 << 20),
            seconds = start.elapsed().as_secs_f32(),
            "model loaded"
        );
        Ok(Self {
            path: path.to_path_buf(),
            name,
            llama,
            tokenizer,
            chat_template,
            load_time: start.elapsed(),
        })
    }
}
