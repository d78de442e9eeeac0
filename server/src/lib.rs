//! mezo-serve's server crate: the engine that owns the model and runs its forward pass, the
//! model fetcher, configuration, benchmarks, and (in `main.rs`) the `mezo` command line.

pub mod bench;
pub mod config;
pub mod datasets;
pub mod engine;
pub mod fetch;
pub mod process_memory;
