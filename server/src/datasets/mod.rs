//! Task data the benchmarks and demos use, fetched from package registries (never committed).

pub mod sentiment;
