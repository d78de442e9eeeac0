//! MeZO for mezo-serve: fine-tuning LoRA adapters with forward passes only.
//!
//! The plugin owns the algorithm (seeded perturbations, the SPSA estimate, objectives, the
//! trainer loop, replayable step logs) and knows the engine only through the [`ZoEngine`] trait:
//! "score these continuations" and "greedily decode these prompts", each under a list of
//! adapters. Any engine that can run rows under different adapters in one batch implements it.
//!
//! The path of a step, file by file: [`trainer`] picks the minibatch and the seeds,
//! [`spsa`] builds θ ± εz ([`perturbation`]) and asks an [`Objective`] for L+ and L−, which
//! tokenizes the [`TrainingExample`]s and calls the engine; the resulting [`StepRecord`] is applied
//! to θ by the run's [`optimizer`], and the list of records replays the run bit for bit ([`replay`](mod@replay)).

pub mod engine;
mod error;
mod example;
pub mod objectives;
pub mod optimizer;
pub mod perturbation;
pub mod replay;
pub mod spsa;
#[cfg(test)]
mod test_support;
pub mod trainer;

pub use engine::{DynEngine, LogProbs, ScoreRequest, ZoEngine};
pub use error::{Result, TrainError};
pub use example::{ExampleKind, TrainingExample};
pub use objectives::{Evaluation, Objective, ObjectiveKind};
pub use optimizer::{Optimizer, OptimizerState, TrainedTensors};
pub use replay::{replay, StepRecord};
pub use spsa::{Estimator, EvalMode, SpsaStep};
pub use trainer::{
    Checkpoint, HeldOutReport, LrSchedule, StopReason, Trainer, TrainerConfig, TrainerEvent,
};
