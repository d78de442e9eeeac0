//! Opening a GGUF file: reading its header and metadata, checking it is a llama model, and
//! giving typed access to the metadata keys the tokenizer, chat template and model need.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};

use super::{EngineError, Result};

/// An opened GGUF file: its parsed header (metadata and tensor index) and its path.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    pub(crate) reader: BufReader<File>,
}

impl GgufFile {
    /// Opens and parses the header; tensor data is read later, one tensor at a time.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| EngineError::InvalidGguf {
            path: path.to_path_buf(),
            reason: describe_header_error(&e),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    /// Typed access to the header's metadata.
    pub fn metadata(&self) -> Metadata<'_> {
        Metadata {
            content: &self.content,
        }
    }
}

/// Turns candle's header errors into sentences that say what is wrong with the file.
fn describe_header_error(e: &candle_core::Error) -> String {
    let message = e.to_string();
    if message.contains("unknown dtype") {
        format!("{message}: a tensor uses a quantization this engine cannot load (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K to Q6_K)")
    } else if message.contains("magic") {
        format!("{message}: the file does not start with the GGUF magic bytes")
    } else if message.contains("failed to fill whole buffer") {
        "the header ends early: the file is truncated or not GGUF".to_string()
    } else {
        message
    }
}

/// Typed, error-reporting access to GGUF metadata keys.
#[derive(Clone, Copy)]
pub struct Metadata<'a> {
    pub content: &'a Content,
}

impl<'a> Metadata<'a> {
    pub fn new(content: &'a Content) -> Self {
        Self { content }
    }

    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.content.metadata.get(key)
    }

    fn required(&self, key: &str) -> Result<&'a Value> {
        self.get(key).ok_or_else(|| EngineError::Metadata {
            key: key.to_string(),
            reason: "missing".into(),
        })
    }

    fn wrong_type(key: &str, e: candle_core::Error) -> EngineError {
        EngineError::Metadata {
            key: key.to_string(),
            reason: format!("{e}"),
        }
    }

    pub fn string(&self, key: &str) -> Result<&'a str> {
        self.required(key)?
            .to_string()
            .map(String::as_str)
            .map_err(|e| Self::wrong_type(key, e))
    }

    /// Integer keys are stored as u32 by most writers but u64/i32 by some; accept any.
    pub fn usize(&self, key: &str) -> Result<usize> {
        let value = self.required(key)?;
        let as_u64 = match value {
            Value::U8(v) => Some(u64::from(*v)),
            Value::U16(v) => Some(u64::from(*v)),
            Value::U32(v) => Some(u64::from(*v)),
            Value::U64(v) => Some(*v),
            Value::I8(v) => u64::try_from(*v).ok(),
            Value::I16(v) => u64::try_from(*v).ok(),
            Value::I32(v) => u64::try_from(*v).ok(),
            Value::I64(v) => u64::try_from(*v).ok(),
            _ => None,
        };
        as_u64
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| EngineError::Metadata {
                key: key.to_string(),
                reason: format!("expected a non-negative integer, found {value:?}"),
            })
    }

    pub fn f32(&self, key: &str) -> Result<f32> {
        match self.required(key)? {
            Value::F32(v) => Ok(*v),
            Value::F64(v) => Ok(*v as f32),
            other => Err(EngineError::Metadata {
                key: key.to_string(),
                reason: format!("expected a float, found {other:?}"),
            }),
        }
    }

    pub fn array(&self, key: &str) -> Result<&'a [Value]> {
        self.required(key)?
            .to_vec()
            .map(Vec::as_slice)
            .map_err(|e| Self::wrong_type(key, e))
    }
}
