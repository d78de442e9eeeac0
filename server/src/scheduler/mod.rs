//! The scheduler: the model as an actor that owns its thread.
//!
//! HTTP handlers never touch the forward pass. They submit [`Work`] to a bounded queue
//! ([`queue`]) and read the tokens back from a channel; one engine thread ([`engine_loop`])
//! batches everything that is running into each forward step (continuous batching). Shutdown is
//! in two phases: [`Scheduler::close`] refuses new work and lets running work finish;
//! [`Scheduler::cancel_all`] ends what is left.

pub mod background;
pub mod engine_loop;
pub mod prefix_cache;
pub mod queue;
pub mod share;
pub mod work;

use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use crate::engine::generate::GenerationParams;
use crate::engine::loaded_model::LoadedModel;
use crate::engine::lora::AdapterView;

pub use engine_loop::BatchLimits;
pub use queue::SubmitError;
pub use work::{
    BackgroundGreedyWork, BackgroundScoreWork, BackgroundWork, GenerationEvent, PromptTokenLogprob,
    Work,
};

use queue::WorkQueue;
use work::{GenerateWork, PromptLogprobsWork};

pub struct Scheduler {
    handle: SchedulerHandle,
    thread: Option<JoinHandle<()>>,
}

/// A cloneable way to submit work, for those who outlive a borrow of [`Scheduler`] (training's
/// worker thread).
#[derive(Clone)]
pub struct SchedulerHandle {
    queue: Arc<WorkQueue>,
}

/// One sequence a request asks for.
pub struct SequenceRequest {
    pub prompt: Vec<u32>,
    pub adapter: Option<Arc<AdapterView>>,
    pub params: GenerationParams,
}

impl Scheduler {
    /// Starts the engine thread for `model`.
    pub fn start(model: Arc<LoadedModel>, limits: BatchLimits, max_waiting: usize) -> Self {
        let queue = Arc::new(WorkQueue::new(max_waiting));
        let thread_queue = Arc::clone(&queue);
        let thread = std::thread::Builder::new()
            .name("mezo-engine".into())
            .spawn(move || engine_loop::run(model, thread_queue, limits))
            .expect("the OS can start one thread at start-up");
        Self {
            handle: SchedulerHandle { queue },
            thread: Some(thread),
        }
    }

    pub fn handle(&self) -> &SchedulerHandle {
        &self.handle
    }

    /// See [`SchedulerHandle::submit_sequences`].
    pub fn submit_sequences(
        &self,
        sequences: Vec<SequenceRequest>,
    ) -> Result<Vec<mpsc::UnboundedReceiver<GenerationEvent>>, SubmitError> {
        self.handle.submit_sequences(sequences)
    }

    /// Queues the computation of a prompt's own token log-probs.
    pub fn submit_prompt_logprobs(
        &self,
        tokens: Vec<u32>,
        adapter: Option<Arc<AdapterView>>,
        top_n: usize,
    ) -> Result<oneshot::Receiver<Result<Vec<PromptTokenLogprob>, String>>, SubmitError> {
        let (reply, rx) = oneshot::channel();
        self.handle
            .queue
            .push_all(vec![Work::PromptLogprobs(PromptLogprobsWork {
                tokens,
                adapter,
                top_n,
                reply,
            })])?;
        Ok(rx)
    }

    /// Requests accepted but not yet running.
    pub fn waiting(&self) -> usize {
        self.handle.queue.waiting()
    }

    /// Refuses new work; queued and running requests still complete, training work stops.
    pub fn close(&self) {
        self.handle.queue.close(engine_loop::SHUTDOWN_MESSAGE);
    }

    /// Fails everything queued or running (the end of shutdown's grace period).
    pub fn cancel_all(&self) {
        self.handle.queue.cancel_all(engine_loop::SHUTDOWN_MESSAGE);
    }

    /// Waits for the engine thread to exit (after `close` once work ran out, or `cancel_all`).
    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the engine thread panicked");
            }
        }
    }
}

impl SchedulerHandle {
    /// Queues the sequences of one request (its `n` choices, its prompts) together: all are
    /// accepted or none. Each gets its own event channel, in order.
    pub fn submit_sequences(
        &self,
        sequences: Vec<SequenceRequest>,
    ) -> Result<Vec<mpsc::UnboundedReceiver<GenerationEvent>>, SubmitError> {
        let mut receivers = Vec::with_capacity(sequences.len());
        let works = sequences
            .into_iter()
            .map(|s| {
                let (events, rx) = mpsc::unbounded_channel();
                receivers.push(rx);
                Work::Generate(GenerateWork {
                    prompt: s.prompt,
                    adapter: s.adapter,
                    params: s.params,
                    events,
                })
            })
            .collect();
        self.queue.push_all(works)?;
        Ok(receivers)
    }

    /// Queues training's work; the reply arrives on the work's `reply`.
    pub fn submit_background(&self, work: BackgroundWork) -> Result<(), SubmitError> {
        self.queue.push_background(work)
    }

    pub fn is_closed(&self) -> bool {
        self.queue.is_closed()
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // Without this the engine thread would sleep on the queue forever.
        self.handle.queue.cancel_all(engine_loop::SHUTDOWN_MESSAGE);
    }
}
