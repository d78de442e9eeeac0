//! PEFT-format adapter directories: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! [`save`] writes an adapter in the layout Hugging Face PEFT's `save_pretrained` produces, so
//! tools that read PEFT adapters (transformers + PEFT, vLLM, llama.cpp's converter) can use it.
//! [`load`] reads such a directory back and checks it against the base model's dimensions.
//! Files are always in PEFT's (Hugging Face's) row order; adapters in memory follow the engine's
//! ([`ModelDims::qk_rows`]), and the two convert here, through [`crate::qk_rows`].
//! PEFT can express much more than this engine computes (DoRA, per-module ranks, trained biases,
//! full copies of other modules, …); loading refuses every such adapter with an error naming the
//! feature, because silently dropping part of an adapter would serve a different model than the
//! one trained.
//!
//! The config file is read and written in `config.rs`, the tensors file in `tensors.rs`, and
//! `files.rs` reads both within a size limit and writes them atomically.

mod config;
mod files;
mod tensors;

use std::fs::File;
use std::io::Read;
use std::path::Path;

use serde_json::Value;

use crate::qk_rows::QkRowOrder;
use crate::{AdapterError, LoraAdapter, ModelDims, Result};
use config::{config_json, parse_config};
use files::{read_limited, write_atomically};
use tensors::{parse_row_order, parse_tensors, serialize_weights};

/// The adapter's hyperparameters, in PEFT's `LoraConfig` JSON.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's tensors.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's older pickle format, which is refused (reading pickles can run arbitrary code).
const PICKLE_WEIGHTS_FILE: &str = "adapter_model.bin";
/// `PeftModelForCausalLM` wraps the base model as `base_model.model`, so PEFT's keys carry it.
const KEY_PREFIX: &str = "base_model.model.";
/// The safetensors metadata key recording the q/k `lora_B` row order of the file's tensors
/// (always Hugging Face's when this server writes it; PEFT ignores the key).
const ROW_ORDER_KEY: &str = "mezo.qk_row_order";
/// A safetensors header is JSON naming each tensor; an adapter's is a few hundred KiB at most.
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Writes `adapter` into `dir` (created if missing) as a PEFT LoRA adapter.
///
/// Each file is replaced atomically, so a reader sees either the old or the new version of it,
/// never a torn one. The pair is not replaced atomically: the tensors are written first and the
/// config last, so a directory that has a config has its tensors, but a reader racing a save
/// that overwrites an adapter of another shape can see new tensors with the old config. Save a
/// new version into a fresh directory when readers may be looking.
///
/// # Errors
///
/// [`AdapterError::InvalidConfig`] if the adapter's config or data are inconsistent (nothing is
/// written then), [`AdapterError::Io`] if the directory or a file cannot be written.
pub fn save(adapter: &LoraAdapter, dir: &Path, base_model_name_or_path: &str) -> Result<()> {
    PeftFiles::of(adapter, base_model_name_or_path)?.write(dir)
}

/// The two files of a PEFT adapter folder, in memory: what [`save`] writes, and what a server
/// keeps in its database so that another server can write the same folder byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeftFiles {
    /// `adapter_config.json`.
    pub config_json: String,
    /// `adapter_model.safetensors`.
    pub weights: Vec<u8>,
}

impl PeftFiles {
    /// The files [`save`] writes for `adapter`.
    ///
    /// # Errors
    ///
    /// [`AdapterError::InvalidConfig`] if the adapter's config or data are inconsistent.
    pub fn of(adapter: &LoraAdapter, base_model_name_or_path: &str) -> Result<Self> {
        adapter.config.validate()?;
        Ok(Self {
            weights: serialize_weights(adapter)?,
            config_json: config_json(&adapter.config, base_model_name_or_path)?,
        })
    }

    /// Writes both files into `dir` (created if missing), the config last, as [`save`] does.
    ///
    /// # Errors
    ///
    /// [`AdapterError::Io`] if the directory or a file cannot be written.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| AdapterError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        write_atomically(dir, WEIGHTS_FILE, &self.weights)?;
        write_atomically(dir, CONFIG_FILE, self.config_json.as_bytes())
    }
}

/// The q/k row order that the tensors in `dir` declare, or `None` for a file that does not say
/// (PEFT's own files, which are in Hugging Face's order, and folders published by versions of
/// this server before it recorded the order, which are in the engine's). Reads only the
/// safetensors header.
///
/// # Errors
///
/// [`AdapterError::Io`] if the file cannot be read, [`AdapterError::InvalidFile`] if its header
/// is malformed or names an unknown order.
pub fn stored_row_order(dir: &Path) -> Result<Option<QkRowOrder>> {
    let path = dir.join(WEIGHTS_FILE);
    let io = |source| AdapterError::Io {
        path: path.clone(),
        source,
    };
    let mut file = File::open(&path).map_err(io)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(io)?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER_BYTES {
        return Err(invalid(
            &path,
            format!(
                "its safetensors header claims {len} bytes; the file is not a safetensors file"
            ),
        ));
    }
    let mut header = Vec::new();
    file.take(len).read_to_end(&mut header).map_err(io)?;
    let header: Value = serde_json::from_slice(&header)
        .map_err(|e| invalid(&path, format!("its safetensors header is not JSON ({e})")))?;
    header
        .get("__metadata__")
        .and_then(|m| m.get(ROW_ORDER_KEY))
        .map(|order| parse_row_order(&path, order))
        .transpose()
}

/// Rewrites the tensors of a folder that an earlier version of this server published, whose
/// unmarked q/k `lora_B` rows are in the engine's order (`dims.qk_rows`), into PEFT's order with
/// the order recorded. Only the tensors file is replaced (atomically), so an interrupted
/// conversion leaves either the old file, converted again next time, or the new one.
///
/// # Errors
///
/// As [`load_limited`], and [`AdapterError::Io`] if the file cannot be replaced.
pub fn convert_engine_order_folder(dir: &Path, dims: &ModelDims, max_bytes: u64) -> Result<()> {
    let adapter = load_stored(dir, dims, max_bytes, Some(dims.qk_rows))?;
    write_atomically(dir, WEIGHTS_FILE, &serialize_weights(&adapter)?)
}

/// Reads the PEFT LoRA adapter in `dir` for a base model of the given dimensions.
///
/// # Errors
///
/// [`AdapterError::Io`] if the directory or a file is missing or unreadable,
/// [`AdapterError::InvalidFile`] if a file is malformed or does not fit `dims`, and
/// [`AdapterError::UnsupportedFeature`] if the adapter uses PEFT features this engine does not
/// implement. Nothing is loaded in part.
pub fn load(dir: &Path, dims: &ModelDims) -> Result<LoraAdapter> {
    load_limited(dir, dims, u64::MAX)
}

/// Like [`load`], but refuses either file if it is larger than `max_bytes`, before reading it
/// into memory, so an upload cannot exhaust the server's memory.
///
/// # Errors
///
/// As [`load`], and [`AdapterError::InvalidFile`] naming the size and the limit for a file over
/// the limit.
pub fn load_limited(dir: &Path, dims: &ModelDims, max_bytes: u64) -> Result<LoraAdapter> {
    load_stored(dir, dims, max_bytes, None)
}

/// Loads `dir`, whose unmarked tensors are taken to be in `unmarked_order` (`None`: PEFT's).
fn load_stored(
    dir: &Path,
    dims: &ModelDims,
    max_bytes: u64,
    unmarked_order: Option<QkRowOrder>,
) -> Result<LoraAdapter> {
    let config_path = dir.join(CONFIG_FILE);
    let config_text = read_limited(&config_path, max_bytes)?;
    let config = parse_config(&config_path, &config_text)?;
    config.validate_for(dims.n_layer).map_err(|e| {
        invalid(
            &config_path,
            format!("{e}; the adapter was trained for another base model"),
        )
    })?;

    let weights_path = dir.join(WEIGHTS_FILE);
    let weights = match read_limited(&weights_path, max_bytes) {
        Err(AdapterError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound
                && dir.join(PICKLE_WEIGHTS_FILE).exists() =>
        {
            return Err(AdapterError::UnsupportedFeature {
                path: dir.join(PICKLE_WEIGHTS_FILE),
                feature: "pickled weights (adapter_model.bin)".into(),
                hint: format!(
                    "convert the adapter to {WEIGHTS_FILE}: load it with PEFT and call \
                     save_pretrained(dir, safe_serialization=True)"
                ),
            });
        }
        other => other?,
    };
    let layers = parse_tensors(&weights_path, &weights, &config, dims, unmarked_order)?;
    Ok(LoraAdapter {
        config,
        dims: *dims,
        layers,
    })
}

fn unsupported(path: &Path, feature: impl Into<String>, hint: impl Into<String>) -> AdapterError {
    AdapterError::UnsupportedFeature {
        path: path.to_path_buf(),
        feature: feature.into(),
        hint: hint.into(),
    }
}

fn invalid(path: &Path, reason: impl Into<String>) -> AdapterError {
    AdapterError::InvalidFile {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests;
