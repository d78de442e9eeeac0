//! The serving engine: one copy of a decoder-only model loaded from GGUF (Llama-family or
//! Gemma 3, [`transformer`]), its tokenizer and chat template, and one forward pass that serves
//! requests and evaluates training perturbations alike (rows of a batch may each use a
//! different LoRA adapter view).

pub mod attention;
pub mod batch;
pub mod blocks;
pub mod chat_template;
pub mod error;
pub mod frozen_layers;
pub mod gemma3;
pub mod generate;
pub mod gguf;
pub mod kernels;
pub mod kv_cache;
pub mod llama;
pub mod loaded_model;
pub mod lora;
pub mod rope;
pub mod sampler;
pub mod scoring;
pub mod tokenizer;
pub mod transformer;
pub mod weights;
pub mod zo_backend;

pub use error::{EngineError, Result};
