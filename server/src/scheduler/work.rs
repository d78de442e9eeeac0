//! The units of work the engine thread runs, and what it sends back.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::engine::frozen_layers::FrozenStates;
use crate::engine::generate::{GenerationParams, GreedyPrompt, TokenEvent};
use crate::engine::lora::AdapterView;
use crate::engine::sampler::TokenLogprob;
use crate::engine::scoring::{ContinuationLogprobs, ScoreRow};

/// Work waiting for the engine.
pub enum Work {
    Generate(GenerateWork),
    PromptLogprobs(PromptLogprobsWork),
}

impl Work {
    /// Prompt tokens the engine must prefill for this work (its share of a step's budget).
    pub fn prefill_tokens(&self) -> usize {
        match self {
            Work::Generate(w) => w.prompt.len(),
            Work::PromptLogprobs(w) => w.tokens.len(),
        }
    }

    /// Tells the submitter the work will not run.
    pub fn fail(self, message: &str) {
        match self {
            Work::Generate(w) => {
                let _ = w.events.send(GenerationEvent::Failed(message.to_string()));
            }
            Work::PromptLogprobs(w) => {
                let _ = w.reply.send(Err(message.to_string()));
            }
        }
    }
}

/// One sequence to generate: a request with `n` choices submits `n` of these.
pub struct GenerateWork {
    pub prompt: Vec<u32>,
    /// The adapter version resolved when the request arrived; `None` is the base model.
    pub adapter: Option<Arc<AdapterView>>,
    pub params: GenerationParams,
    /// Dropping the receiving end cancels the sequence at the next step.
    pub events: mpsc::UnboundedSender<GenerationEvent>,
}

/// What a generating sequence reports, token by token.
#[derive(Debug, Clone)]
pub enum GenerationEvent {
    Token(TokenEvent),
    /// The sequence ended without finishing (engine failure, shutdown); the message is for users.
    Failed(String),
}

/// Log-probabilities of a prompt's own tokens under the model (`echo` with `logprobs`).
pub struct PromptLogprobsWork {
    pub tokens: Vec<u32>,
    pub adapter: Option<Arc<AdapterView>>,
    /// Alternatives to report per position.
    pub top_n: usize,
    pub reply: oneshot::Sender<Result<Vec<PromptTokenLogprob>, String>>,
}

/// One prompt token's log-prob given the tokens before it; the first token has none.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptTokenLogprob {
    pub token: u32,
    pub logprob: Option<f32>,
    pub top_logprobs: Vec<TokenLogprob>,
}

/// Training's work on the engine: run in slices within training's share of its time
/// ([`super::share`]), between serving steps ([`super::background`]).
pub enum BackgroundWork {
    Score(BackgroundScoreWork),
    Greedy(BackgroundGreedyWork),
}

impl BackgroundWork {
    /// Tells the submitter the work will not run.
    pub fn fail(self, message: &str) {
        match self {
            BackgroundWork::Score(work) => {
                let _ = work.reply.send(Err(message.to_string()));
            }
            BackgroundWork::Greedy(work) => {
                let _ = work.reply.send(Err(message.to_string()));
            }
        }
    }
}

/// Training's forward passes: continuations to score, each row under its own adapter (θ+εz and
/// θ−εz of a MeZO step, or θ for a held-out evaluation).
pub struct BackgroundScoreWork {
    pub rows: Vec<ScoreRow>,
    /// The job's kept hidden states, when its rows may start at their first adapted layer.
    pub frozen: Option<Arc<std::sync::Mutex<FrozenStates>>>,
    /// `[row][continuation][token]` log-probs, or why they could not be computed.
    pub reply: std::sync::mpsc::SyncSender<Result<ContinuationLogprobs, String>>,
}

/// Training's greedy decoding (the `f1` and `exact_match` objectives): an answer for each
/// prompt under its own adapter (θ+εz and θ−εz of a MeZO step, or θ for a held-out evaluation).
pub struct BackgroundGreedyWork {
    pub prompts: Vec<GreedyPrompt>,
    pub params: GenerationParams,
    /// The answers, in `prompts` order, or why they could not be generated.
    pub reply: std::sync::mpsc::SyncSender<Result<Vec<String>, String>>,
}
