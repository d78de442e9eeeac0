//! The engine as a fine-tuning job sees it: [`plugin::ZoEngine`] over the scheduler.
//!
//! The job's thread never runs the model itself. Its forward passes (θ+εz and θ−εz of a step as
//! rows of the same work, or θ for held-out evaluation) and its greedy answers (the `f1` and
//! `exact_match` objectives) go to the engine thread as background work, which runs it in slices
//! within training's share of engine time ([`crate::scheduler::background`]). The hidden states
//! kept for frozen-layer reuse ([`crate::engine::frozen_layers`]) belong to the job: they go
//! with each forward pass to the engine thread and are given back when the job's engine drops.

use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};

use adapters::LoraAdapter;
use plugin::{LogProbs, ScoreRequest, ZoEngine};

use crate::engine::frozen_layers::{FrozenStates, FrozenStatesBudget, ReuseCounts};
use crate::engine::loaded_model::LoadedModel;
use crate::engine::zo_backend::per_adapter;
use crate::engine::{EngineError, Result};
use crate::metrics as m;
use crate::scheduler::{
    BackgroundGreedyWork, BackgroundRow, BackgroundScoreWork, BackgroundWork, GreedyPrompt,
    SchedulerHandle,
};

pub struct QueuedEngine {
    model: Arc<LoadedModel>,
    scheduler: SchedulerHandle,
    frozen: Arc<Mutex<FrozenStates>>,
    /// The reuse counts already reported to the metrics.
    reported: Mutex<ReuseCounts>,
}

impl QueuedEngine {
    pub fn new(
        model: Arc<LoadedModel>,
        scheduler: SchedulerHandle,
        frozen_states: Arc<FrozenStatesBudget>,
    ) -> Self {
        Self {
            model,
            scheduler,
            frozen: Arc::new(Mutex::new(FrozenStates::new(frozen_states))),
            reported: Mutex::new(ReuseCounts::default()),
        }
    }

    /// Bytes of hidden states this job keeps.
    pub fn frozen_states_bytes(&self) -> usize {
        self.frozen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .held_bytes()
    }

    fn report_reuse(&self) {
        let (counts, used) = {
            let frozen = self.frozen.lock().unwrap_or_else(PoisonError::into_inner);
            (frozen.counts(), frozen.budget_used_bytes())
        };
        let mut reported = self.reported.lock().unwrap_or_else(PoisonError::into_inner);
        metrics::counter!(m::TRAINING_FROZEN_LAYER_TOKENS_TOTAL, "source" => "reused")
            .increment(counts.reused_tokens - reported.reused_tokens);
        metrics::counter!(m::TRAINING_FROZEN_LAYER_TOKENS_TOTAL, "source" => "computed")
            .increment(counts.computed_tokens - reported.computed_tokens);
        metrics::gauge!(m::TRAINING_FROZEN_STATES_BYTES).set(used as f64);
        *reported = counts;
    }

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

impl ZoEngine for QueuedEngine {
    type Error = EngineError;

    fn tokenize(&self, text: &str, special: bool) -> Vec<u32> {
        self.model.tokenizer.encode(text, special)
    }

    fn score(&self, adapters: &[&LoraAdapter], items: &[ScoreRequest]) -> Result<LogProbs> {
        let views = self.model.views(adapters)?;
        // Adapter-major, so each adapter's rows form one contiguous LoRA segment.
        let rows = views
            .iter()
            .flat_map(|view| {
                items.iter().map(move |item| BackgroundRow {
                    prompt: item.prompt.clone(),
                    continuations: item.continuations.clone(),
                    adapter: Arc::clone(view),
                })
            })
            .collect();
        let frozen = Arc::clone(&self.frozen);
        let scores = self.run_background(|reply| {
            BackgroundWork::Score(BackgroundScoreWork {
                rows,
                frozen: Some(frozen),
                reply,
            })
        })?;
        self.report_reuse();
        Ok(per_adapter(scores, adapters.len(), items.len()))
    }

    fn generate_greedy(
        &self,
        adapters: &[&LoraAdapter],
        prompts: &[Vec<u32>],
        max_tokens: usize,
    ) -> Result<Vec<Vec<String>>> {
        let views = self.model.views(adapters)?;
        let prompts_under_adapters = views
            .iter()
            .flat_map(|view| {
                prompts.iter().map(move |prompt| GreedyPrompt {
                    prompt: prompt.clone(),
                    adapter: Arc::clone(view),
                })
            })
            .collect();
        let params = self.model.greedy_params(max_tokens);
        let answers = self.run_background(|reply| {
            BackgroundWork::Greedy(BackgroundGreedyWork {
                prompts: prompts_under_adapters,
                params,
                reply,
            })
        })?;
        Ok(per_adapter(answers, adapters.len(), prompts.len()))
    }
}
