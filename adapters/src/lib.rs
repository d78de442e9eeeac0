//! LoRA adapter data for mezo-serve.
//!
//! An adapter is plain f32 data: for each adapted linear layer of the base model, a low-rank pair
//! `A` (`rank × in`) and `B` (`out × rank`) whose product, scaled by `alpha / rank` (or
//! `alpha / √rank` with rsLoRA), is added to that layer's output: `y = W·x + scale·B·(A·x)`.
//! This crate knows nothing about engines or training: the engine turns adapters into its own
//! tensors, the MeZO plugin perturbs and updates the f32 parameters in place of a copy, and the
//! server stores and publishes them ([`store`] is the on-disk layout, [`registry`] the
//! in-memory versions that requests resolve). Files are in PEFT's format so they load in the wider
//! ecosystem (see [`peft`]).

mod error;
mod lora;
pub mod peft;
pub mod qk_rows;
pub mod registry;
pub mod store;

pub use error::{AdapterError, Result};
pub use lora::{LoraAdapter, LoraConfig, LoraLayer, ModelDims, TargetModule};
pub use qk_rows::QkRowOrder;
