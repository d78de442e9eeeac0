//! `mezo bench …`: benchmarks that print numbers (never asserted in tests).

pub mod engine;
pub mod feedback;
pub mod mezo;
pub mod peers;
pub mod serve;
pub mod soak;
