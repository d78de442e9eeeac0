//! The engine as a fine-tuning job sees it: [`plugin::ZoEngine`] over the scheduler.
//!
//! The job's thread never runs the model itself. Scoring (every objective's forward passes:
//! θ+εz and θ−εz of a step as rows of the same work, or θ for held-out evaluation) goes to the
//! engine thread as background work, which runs it in slices within training's share of engine
//! time. Greedy decoding (the `f1` and `exact_match` objectives) goes in as ordinary sequences,
//! batched with the requests being served.

use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::time::Duration;

use adapters::LoraAdapter;
use plugin::{LogProbs, ScoreRequest, ZoEngine};

use crate::engine::loaded_model::LoadedModel;
use crate::engine::lora::AdapterView;
use crate::engine::zo_backend::per_adapter;
use crate::engine::{EngineError, Result};
use crate::scheduler::{
    BackgroundRow, BackgroundScoreWork, GenerationEvent, SchedulerHandle, SequenceRequest,
    SubmitError,
};

/// How long to wait before asking again when the request queue is full.
const QUEUE_FULL_RETRY: Duration = Duration::from_millis(100);

/// Greedy sequences submitted at once: a batch's worth, well within any request queue.
const GREEDY_SEQUENCES_PER_SUBMIT: usize = 8;

pub struct QueuedEngine {
    model: Arc<LoadedModel>,
    scheduler: SchedulerHandle,
}

impl QueuedEngine {
    pub fn new(model: Arc<LoadedModel>, scheduler: SchedulerHandle) -> Self {
        Self { model, scheduler }
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
        let (reply, answer) = sync_channel(1);
        self.scheduler
            .submit_background(BackgroundScoreWork { rows, reply })
            .map_err(unavailable)?;
        let scores = answer
            .recv()
            .map_err(|_| unavailable("the engine thread stopped"))?
            .map_err(unavailable)?;
        Ok(per_adapter(scores, adapters.len(), items.len()))
    }

    fn generate_greedy(
        &self,
        adapters: &[&LoraAdapter],
        prompts: &[Vec<u32>],
        max_tokens: usize,
    ) -> Result<Vec<Vec<String>>> {
        let views = self.model.views(adapters)?;
        let params = self.model.greedy_params(max_tokens);
        let sequences: Vec<(Arc<AdapterView>, &Vec<u32>)> = views
            .iter()
            .flat_map(|view| prompts.iter().map(move |p| (Arc::clone(view), p)))
            .collect();
        let mut texts = Vec::with_capacity(sequences.len());
        for chunk in sequences.chunks(GREEDY_SEQUENCES_PER_SUBMIT) {
            let receivers = loop {
                let requests = chunk
                    .iter()
                    .map(|(view, prompt)| SequenceRequest {
                        prompt: (*prompt).clone(),
                        adapter: Some(Arc::clone(view)),
                        params: params.clone(),
                    })
                    .collect();
                match self.scheduler.submit_sequences(requests) {
                    Ok(receivers) => break receivers,
                    // Serving comes first: wait for room rather than fail the step.
                    Err(SubmitError::QueueFull { .. }) => std::thread::sleep(QUEUE_FULL_RETRY),
                    Err(err) => return Err(unavailable(err)),
                }
            };
            for mut events in receivers {
                texts.push(collect_text(&mut events)?);
            }
        }
        Ok(per_adapter(texts, adapters.len(), prompts.len()))
    }
}

/// The text of one generated sequence, once it finished.
fn collect_text(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<GenerationEvent>,
) -> Result<String> {
    let mut text = String::new();
    while let Some(event) = events.blocking_recv() {
        match event {
            GenerationEvent::Token(token) => {
                text.push_str(&token.text);
                if token.finish.is_some() {
                    break;
                }
            }
            GenerationEvent::Failed(message) => return Err(unavailable(message)),
        }
    }
    Ok(text)
}
