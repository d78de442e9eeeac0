//! The bounded queue between HTTP handlers and the engine thread.
//!
//! Handlers push (never blocking: a full queue is an immediate refusal the client sees as 429);
//! the engine thread takes work between steps, as much as its batch and prefill budget allow,
//! and sleeps on the queue only when it has nothing running.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use super::work::{BackgroundWork, Work};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is busy: {waiting} requests are already waiting; retry shortly")]
    QueueFull { waiting: usize },
    #[error("the server is shutting down and accepts no new requests")]
    ShuttingDown,
    #[error("this request asks for {asked} sequences (prompts × n) but the server queues at most {capacity} (scheduler.max_waiting); split it")]
    TooManySequences { asked: usize, capacity: usize },
}

#[derive(Default)]
struct QueueState {
    waiting: VecDeque<Work>,
    /// Training's work: not bounded by `capacity` (one job trains at a time and waits for each
    /// reply), and never refused with 429.
    background: VecDeque<BackgroundWork>,
    closed: bool,
    cancel_all: bool,
}

pub struct WorkQueue {
    state: Mutex<QueueState>,
    work_arrived: Condvar,
    capacity: usize,
}

/// What the engine thread gets when it asks for work.
pub enum Taken {
    Work {
        works: Vec<Work>,
        background: Option<BackgroundWork>,
    },
    /// Stop now: shutdown's grace period is over (running sequences must be failed).
    CancelAll,
    /// Closed and drained: the engine may exit once its running sequences finish.
    Closed,
}

impl WorkQueue {
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(QueueState::default()),
            work_arrived: Condvar::new(),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Work items are plain data; a panic elsewhere cannot leave them half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues all of `works` or none of them.
    pub fn push_all(&self, works: Vec<Work>) -> Result<(), SubmitError> {
        let mut state = self.lock();
        if state.closed {
            return Err(SubmitError::ShuttingDown);
        }
        if works.len() > self.capacity {
            return Err(SubmitError::TooManySequences {
                asked: works.len(),
                capacity: self.capacity,
            });
        }
        if state.waiting.len() + works.len() > self.capacity {
            return Err(SubmitError::QueueFull {
                waiting: state.waiting.len(),
            });
        }
        state.waiting.extend(works);
        drop(state);
        self.work_arrived.notify_one();
        Ok(())
    }

    /// Queues training work; refused only when the server is shutting down.
    pub fn push_background(&self, work: BackgroundWork) -> Result<(), SubmitError> {
        let mut state = self.lock();
        if state.closed {
            return Err(SubmitError::ShuttingDown);
        }
        state.background.push_back(work);
        drop(state);
        self.work_arrived.notify_one();
        Ok(())
    }

    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    /// Takes up to `max_items` in arrival order while their prompts fit `prefill_budget` (the
    /// first always fits, so a long prompt runs alone rather than never), and the next training
    /// work if `want_background`. Blocks while there is nothing to take if `block`.
    pub fn take(
        &self,
        max_items: usize,
        prefill_budget: usize,
        want_background: bool,
        block: bool,
    ) -> Taken {
        let mut state = self.lock();
        loop {
            if state.cancel_all {
                return Taken::CancelAll;
            }
            let background_ready = want_background && !state.background.is_empty();
            if !state.waiting.is_empty() || background_ready || !block {
                break;
            }
            if state.closed {
                return Taken::Closed;
            }
            state = self
                .work_arrived
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let mut taken = Vec::new();
        let mut tokens = 0;
        while taken.len() < max_items {
            let Some(next) = state.waiting.front() else {
                break;
            };
            let cost = next.prefill_tokens();
            if !taken.is_empty() && tokens + cost > prefill_budget {
                break;
            }
            tokens += cost;
            taken.extend(state.waiting.pop_front());
        }
        let background = if want_background {
            state.background.pop_front()
        } else {
            None
        };
        Taken::Work {
            works: taken,
            background,
        }
    }

    /// Refuses new work from now on; queued and running requests still complete. Training work
    /// is failed at once: a job resumes from its step log when the server starts again.
    pub fn close(&self, message: &str) {
        let background: Vec<BackgroundWork> = {
            let mut state = self.lock();
            state.closed = true;
            state.background.drain(..).collect()
        };
        for work in background {
            work.fail(message);
        }
        self.work_arrived.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Ends everything: queued work is failed here, running work by the engine thread.
    pub fn cancel_all(&self, message: &str) {
        let (drained, background): (Vec<Work>, Vec<BackgroundWork>) = {
            let mut state = self.lock();
            state.closed = true;
            state.cancel_all = true;
            (
                state.waiting.drain(..).collect(),
                state.background.drain(..).collect(),
            )
        };
        for work in drained {
            work.fail(message);
        }
        for work in background {
            work.fail(message);
        }
        self.work_arrived.notify_all();
    }
}
