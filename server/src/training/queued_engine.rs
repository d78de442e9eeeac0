//! The engine as a fine-tuning job sees it: a [`TrainingEngine`] whose passes run on the engine
//! thread.
//!
//! The job's thread never runs the model itself. Its forward passes (θ+εz and θ−εz of a step as
//! rows of the same work, or θ for held-out evaluation) and its greedy answers (the `f1` and
//! `exact_match` objectives) go to the engine thread as background work, which runs it in slices
//! within training's share of engine time ([`crate::scheduler::background`]). The hidden states
//! kept for frozen-layer reuse ([`crate::engine::frozen_layers`]) belong to the job: they go
//! with each forward pass to the engine thread and are given back when the job's engine drops.

use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};

use crate::engine::frozen_layers::{FrozenStates, FrozenStatesBudget};
use crate::engine::generate::{GenerationParams, GreedyPrompt};
use crate::engine::loaded_model::LoadedModel;
use crate::engine::scoring::{ContinuationLogprobs, ScoreRow};
use crate::engine::zo_backend::{ForwardRunner, TrainingEngine};
use crate::engine::{EngineError, Result};
use crate::scheduler::{
    BackgroundGreedyWork, BackgroundScoreWork, BackgroundWork, SchedulerHandle,
};

/// A fine-tuning job's engine.
pub type QueuedEngine = TrainingEngine<OnEngineThread>;

impl QueuedEngine {
    pub fn new(
        model: Arc<LoadedModel>,
        scheduler: SchedulerHandle,
        frozen_states: Arc<FrozenStatesBudget>,
    ) -> Self {
        Self::with_runner(OnEngineThread { model, scheduler }, frozen_states)
    }
}

/// Passes sent to the engine thread as background work; the job's thread waits for each.
pub struct OnEngineThread {
    model: Arc<LoadedModel>,
    scheduler: SchedulerHandle,
}

impl OnEngineThread {
    /// Submits the work `make` builds around a reply channel and waits for the reply.
    fn run_background<T>(
        &self,
        make: impl FnOnce(SyncSender<std::result::Result<T, String>>) -> BackgroundWork,
    ) -> Result<T> {
        let (reply, answer) = sync_channel(1);
        self.scheduler
            .submit_background(make(reply))
            .map_err(unavailable)?;
        answer
            .recv()
            .map_err(|_| unavailable("the engine thread stopped"))?
            .map_err(unavailable)
    }
}

fn unavailable(err: impl std::fmt::Display) -> EngineError {
    EngineError::Unavailable(err.to_string())
}

impl ForwardRunner for OnEngineThread {
    fn model(&self) -> &LoadedModel {
        &self.model
    }

    fn score(
        &self,
        rows: Vec<ScoreRow>,
        frozen: Option<&Arc<Mutex<FrozenStates>>>,
    ) -> Result<ContinuationLogprobs> {
        let frozen = frozen.map(Arc::clone);
        self.run_background(|reply| {
            BackgroundWork::Score(BackgroundScoreWork {
                rows,
                frozen,
                reply,
            })
        })
    }

    fn greedy(&self, prompts: Vec<GreedyPrompt>, params: GenerationParams) -> Result<Vec<String>> {
        self.run_background(|reply| {
            BackgroundWork::Greedy(BackgroundGreedyWork {
                prompts,
                params,
                reply,
            })
        })
    }
}
