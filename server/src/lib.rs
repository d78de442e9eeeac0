//! mezo-serve's server crate: the engine that owns the model and runs its forward pass, the
//! scheduler that batches requests onto it, the OpenAI-compatible HTTP layer (`api`), metrics,
//! the model fetcher, configuration, benchmarks, and (in `main.rs`) the `mezo` command line.

pub mod api;
pub mod bench;
pub mod config;
pub mod datasets;
pub mod engine;
pub mod fetch;
pub mod metrics;
pub mod process_memory;
pub mod scheduler;
pub mod serve;
