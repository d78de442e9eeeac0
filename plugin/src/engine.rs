//! The one trait through which MeZO talks to an engine.
//!
//! Every method takes a list of adapters and evaluates the same work under each of them, so an
//! engine that batches rows with different adapters (mezo-serve's does) evaluates θ+εz and θ−εz
//! in one forward pass. Results are indexed `[adapter][item]…` in the order given.

use adapters::LoraAdapter;

use crate::TrainError;

/// A prompt and the continuations whose tokens are to be scored after it.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreRequest {
    pub prompt: Vec<u32>,
    pub continuations: Vec<Vec<u32>>,
}

/// Log-probabilities of continuation tokens, `[adapter][item][continuation][token]`.
pub type LogProbs = Vec<Vec<Vec<Vec<f32>>>>;

/// Forward passes under given adapter parameters.
pub trait ZoEngine {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Token ids of `text`. With `special`, `text` is a prompt: special tokens (`<|im_start|>`…)
    /// are parsed as such, as a chat prompt rendered by a template needs, and BOS goes in front
    /// when the model expects it; user-provided completions are tokenized as plain text.
    fn tokenize(&self, text: &str, special: bool) -> Vec<u32>;

    /// Log-probability of every continuation token: `result[adapter][item][continuation][token]`.
    fn score(
        &self,
        adapters: &[&LoraAdapter],
        items: &[ScoreRequest],
    ) -> Result<LogProbs, Self::Error>;

    /// Greedy decoding of each prompt under each adapter, stopping at the model's end of turn
    /// or after `max_tokens`: `result[adapter][item]` is the generated text.
    fn generate_greedy(
        &self,
        adapters: &[&LoraAdapter],
        prompts: &[Vec<u32>],
        max_tokens: usize,
    ) -> Result<Vec<Vec<String>>, Self::Error>;
}

/// [`ZoEngine`] with its error type erased into [`TrainError::Engine`], the form in which
/// objectives receive the engine. It exists so that [`crate::Objective`] can be a trait object
/// (the objective of a job is chosen at run time) while engines keep their own error types.
/// Every [`ZoEngine`] is one; nothing else needs to implement it.
pub trait DynEngine {
    /// See [`ZoEngine::tokenize`].
    fn tokenize(&self, text: &str, special: bool) -> Vec<u32>;

    /// See [`ZoEngine::score`].
    fn score(
        &self,
        adapters: &[&LoraAdapter],
        items: &[ScoreRequest],
    ) -> Result<LogProbs, TrainError>;

    /// See [`ZoEngine::generate_greedy`].
    fn generate_greedy(
        &self,
        adapters: &[&LoraAdapter],
        prompts: &[Vec<u32>],
        max_tokens: usize,
    ) -> Result<Vec<Vec<String>>, TrainError>;
}

impl<E: ZoEngine> DynEngine for E {
    fn tokenize(&self, text: &str, special: bool) -> Vec<u32> {
        ZoEngine::tokenize(self, text, special)
    }

    fn score(
        &self,
        adapters: &[&LoraAdapter],
        items: &[ScoreRequest],
    ) -> Result<LogProbs, TrainError> {
        ZoEngine::score(self, adapters, items).map_err(|e| TrainError::Engine(Box::new(e)))
    }

    fn generate_greedy(
        &self,
        adapters: &[&LoraAdapter],
        prompts: &[Vec<u32>],
        max_tokens: usize,
    ) -> Result<Vec<Vec<String>>, TrainError> {
        ZoEngine::generate_greedy(self, adapters, prompts, max_tokens)
            .map_err(|e| TrainError::Engine(Box::new(e)))
    }
}
