//! mezo-serve's server crate: the engine that owns the model and runs its forward pass, the
//! scheduler that batches requests and training slices onto it, the OpenAI-compatible HTTP layer
//! (`api`), background fine-tuning jobs (`training`), the served adapter versions and their hot
//! swap (`adapter_versions`), metrics, the model fetcher, configuration, benchmarks, and (in
//! `main.rs`) the `mezo` command line.

pub mod adapter_versions;
pub mod api;
pub mod bench;
pub mod config;
pub mod datasets;
pub mod engine;
pub mod fetch;
pub mod ids;
pub mod metrics;
pub mod process_memory;
pub mod scheduler;
pub mod serve;
pub mod training;
