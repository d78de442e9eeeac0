//! Training's work on the engine thread, one slice at a time between serving steps.
//!
//! A slice is at most `training.slice_tokens` tokens of forward pass, the longest a serving
//! step waits behind training. Scoring work (a MeZO step's θ+εz and θ−εz rows, a held-out
//! evaluation) is cut into slices of whole rows. Greedy decoding (the `f1` and `exact_match`
//! objectives) runs as sequences of its own, apart from the requests being served: each slice
//! is one decoding step over the running sequences, with newcomers' prompts admitted while the
//! slice's token budget lasts, so training's answers count against training's share of engine
//! time like its scoring does.

use std::ops::Range;
use std::sync::Arc;

use crate::engine::batch::chunks_by_budget;
use crate::engine::generate::{step, Sequence};
use crate::engine::loaded_model::LoadedModel;
use crate::engine::scoring::{score_rows, ContinuationLogprobs};

use super::work::{BackgroundGreedyWork, BackgroundScoreWork, BackgroundWork};

/// Training work being run slice by slice.
pub(super) enum BackgroundTask {
    Score(ScoreTask),
    Greedy(GreedyTask),
}

/// How a slice ended: `None` while work remains, else the outcome to reply with.
type SliceOutcome = Option<Result<(), String>>;

impl BackgroundTask {
    pub(super) fn new(work: BackgroundWork, slice_tokens: usize) -> Self {
        match work {
            BackgroundWork::Score(work) => {
                BackgroundTask::Score(ScoreTask::new(work, slice_tokens))
            }
            BackgroundWork::Greedy(work) => {
                BackgroundTask::Greedy(GreedyTask::new(work, slice_tokens))
            }
        }
    }

    /// Runs the next slice; `Some` with the reply's content once all slices ran or one failed.
    pub(super) fn run_slice(&mut self, model: &LoadedModel) -> SliceOutcome {
        let outcome = match self {
            BackgroundTask::Score(task) => task.run_slice(model),
            BackgroundTask::Greedy(task) => task.run_slice(model),
        };
        outcome.map(|result| {
            result.map_err(|err| {
                tracing::error!(error = %err, "training forward failed");
                format!("the engine failed: {err}")
            })
        })
    }

    /// Sends the results (or `outcome`'s error) to the job waiting for them.
    pub(super) fn finish(self, outcome: Result<(), String>) {
        match self {
            BackgroundTask::Score(task) => {
                let ScoreTask { work, scores, .. } = task;
                // The job's kept hidden states are let go before it hears back, so that a job
                // that drops its engine after the reply finds their budget returned.
                drop(work.frozen);
                let _ = work.reply.send(outcome.map(|()| scores));
            }
            BackgroundTask::Greedy(task) => {
                let answers = task.answers.into_iter().map(Option::unwrap_or_default);
                let _ = task.work.reply.send(outcome.map(|()| answers.collect()));
            }
        }
    }
}

pub(super) struct ScoreTask {
    work: BackgroundScoreWork,
    slices: Vec<Range<usize>>,
    next_slice: usize,
    scores: ContinuationLogprobs,
}

impl ScoreTask {
    fn new(work: BackgroundScoreWork, slice_tokens: usize) -> Self {
        let slices = chunks_by_budget(work.rows.iter().map(|r| r.tokens()), slice_tokens);
        let scores = Vec::with_capacity(work.rows.len());
        Self {
            work,
            slices,
            next_slice: 0,
            scores,
        }
    }

    fn run_slice(&mut self, model: &LoadedModel) -> SliceOutcome {
        let Some(range) = self.slices.get(self.next_slice).cloned() else {
            return Some(Ok(()));
        };
        self.next_slice += 1;
        let scores = score_rows(
            &model.transformer,
            &self.work.rows[range],
            self.work.frozen.as_deref(),
        );
        match scores {
            Ok(scores) => {
                self.scores.extend(scores);
                (self.next_slice == self.slices.len()).then_some(Ok(()))
            }
            Err(err) => Some(Err(err.to_string())),
        }
    }
}

pub(super) struct GreedyTask {
    work: BackgroundGreedyWork,
    slice_tokens: usize,
    /// Prompts started so far are `0..next_prompt`.
    next_prompt: usize,
    /// Sequences still generating, with their prompt's index. Finished ones are dropped at
    /// once (their key/value caches can be large), keeping only their answer.
    running: Vec<(usize, Sequence)>,
    answers: Vec<Option<String>>,
}

impl GreedyTask {
    fn new(work: BackgroundGreedyWork, slice_tokens: usize) -> Self {
        let answers = vec![None; work.prompts.len()];
        Self {
            work,
            slice_tokens,
            next_prompt: 0,
            running: Vec::new(),
            answers,
        }
    }

    fn run_slice(&mut self, model: &LoadedModel) -> SliceOutcome {
        // Each running sequence costs one token of the slice, each newcomer its prompt; with
        // nothing running, one newcomer starts whatever its length.
        let mut used = self.running.len();
        while let Some(next) = self.work.prompts.get(self.next_prompt) {
            if used > 0 && used + next.prompt.len() > self.slice_tokens {
                break;
            }
            let seq = Sequence::new(
                &model.transformer,
                next.prompt.clone(),
                Some(Arc::clone(&next.adapter)),
                self.work.params.clone(),
            );
            match seq {
                Ok(seq) => self.running.push((self.next_prompt, seq)),
                Err(err) => return Some(Err(err.to_string())),
            }
            used += next.prompt.len();
            self.next_prompt += 1;
        }
        let mut seqs: Vec<&mut Sequence> = self.running.iter_mut().map(|(_, s)| s).collect();
        if let Err(err) = step(&model.transformer, &model.tokenizer, &mut seqs) {
            return Some(Err(err.to_string()));
        }
        let answers = &mut self.answers;
        self.running.retain(|(index, seq)| {
            if seq.is_finished() {
                answers[*index] = Some(seq.text().to_string());
            }
            !seq.is_finished()
        });
        let done = self.next_prompt == self.work.prompts.len() && self.running.is_empty();
        done.then_some(Ok(()))
    }
}
