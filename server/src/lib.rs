//! mezo-serve's server crate: the engine that owns the model and runs its forward pass, the
//! scheduler that batches requests and training slices onto it, the OpenAI-compatible HTTP layer
//! (`api`), background fine-tuning jobs (`training`), the served adapter versions and their hot
//! swap (`adapter_versions`), metrics, the model fetcher, configuration, progress bars on a
//! terminal, and, with the `bench` feature (on by default), the benchmarks and their data sets.
//! The `mezo` command line is `src/bin/mezo/`.

pub mod adapter_versions;
pub mod api;
#[cfg(feature = "bench")]
pub mod bench;
pub mod config;
#[cfg(feature = "bench")]
pub mod datasets;
pub mod engine;
pub mod fetch;
pub mod ids;
pub mod learning_curves;
pub mod metrics;
pub mod process_memory;
pub mod progress;
pub mod scheduler;
pub mod serve;
pub mod training;
