//! Training's work on the engine thread, one slice at a time between serving steps.
//!
//! A slice is at most `training.slice_tokens` tokens of forward pass (`idle_slice_tokens` when
//! nothing is being served), the longest a serving step waits behind training; the engine loop
//! chooses each slice's budget as it starts it. Scoring work (a MeZO step's θ+εz and θ−εz
//! rows, a held-out evaluation) is cut into slices of whole rows. Greedy decoding (the `f1` and
//! `exact_match` objectives) runs as sequences of its own, apart from the requests being
//! served: each slice is one decoding step over the running sequences, with newcomers' prompts
//! admitted while the slice's token budget lasts, so training's answers count against
//! training's share of engine time like its scoring does.

use std::sync::Arc;

use crate::engine::batch::chunks_by_budget;
use crate::engine::generate::{step, Sequence};
use crate::engine::loaded_model::LoadedModel;
use crate::engine::scoring::{score_rows, ContinuationLogprobs};
use crate::metrics as m;

use super::work::{BackgroundGreedyWork, BackgroundScoreWork, BackgroundWork};

/// Training work being run slice by slice.
pub(super) enum BackgroundTask {
    Score(ScoreTask),
    Greedy(GreedyTask),
}

/// How a slice ended: `None` while work remains, else the outcome to reply with.
type SliceOutcome = Option<Result<(), String>>;

impl BackgroundTask {
    pub(super) fn new(work: BackgroundWork) -> Self {
        match work {
            BackgroundWork::Score(work) => BackgroundTask::Score(ScoreTask::new(work)),
            BackgroundWork::Greedy(work) => BackgroundTask::Greedy(GreedyTask::new(work)),
        }
    }

    /// Runs the next slice, of at most `slice_tokens` tokens; `Some` with the reply's content
    /// once all slices ran or one failed.
    pub(super) fn run_slice(&mut self, model: &LoadedModel, slice_tokens: usize) -> SliceOutcome {
        let outcome = match self {
            BackgroundTask::Score(task) => task.run_slice(model, slice_tokens),
            BackgroundTask::Greedy(task) => task.run_slice(model, slice_tokens),
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
    /// Rows scored so far are `0..next_row`.
    next_row: usize,
    scores: ContinuationLogprobs,
}

impl ScoreTask {
    fn new(work: BackgroundScoreWork) -> Self {
        let scores = Vec::with_capacity(work.rows.len());
        Self {
            work,
            next_row: 0,
            scores,
        }
    }

    fn run_slice(&mut self, model: &LoadedModel, slice_tokens: usize) -> SliceOutcome {
        let rest = &self.work.rows[self.next_row..];
        let Some(first) = chunks_by_budget(rest.iter().map(|r| r.tokens()), slice_tokens)
            .into_iter()
            .next()
        else {
            return Some(Ok(()));
        };
        let rows = self.next_row + first.start..self.next_row + first.end;
        self.next_row = rows.end;
        let tokens: usize = self.work.rows[rows.clone()]
            .iter()
            .map(|r| r.tokens())
            .sum();
        metrics::histogram!(m::ENGINE_TRAINING_SLICE_TOKENS).record(tokens as f64);
        let scores = score_rows(
            &model.transformer,
            &self.work.rows[rows],
            self.work.frozen.as_deref(),
        );
        match scores {
            Ok(scores) => {
                self.scores.extend(scores);
                (self.next_row == self.work.rows.len()).then_some(Ok(()))
            }
            Err(err) => Some(Err(err.to_string())),
        }
    }
}

pub(super) struct GreedyTask {
    work: BackgroundGreedyWork,
    /// Prompts started so far are `0..next_prompt`.
    next_prompt: usize,
    /// Sequences still generating, with their prompt's index. Finished ones are dropped at
    /// once (their key/value caches can be large), keeping only their answer.
    running: Vec<(usize, Sequence)>,
    answers: Vec<Option<String>>,
}

impl GreedyTask {
    fn new(work: BackgroundGreedyWork) -> Self {
        let answers = vec![None; work.prompts.len()];
        Self {
            work,
            next_prompt: 0,
            running: Vec::new(),
            answers,
        }
    }

    fn run_slice(&mut self, model: &LoadedModel, slice_tokens: usize) -> SliceOutcome {
        // Each running sequence costs one token of the slice, each newcomer its prompt; with
        // nothing running, one newcomer starts whatever its length.
        let mut used = self.running.len();
        while let Some(next) = self.work.prompts.get(self.next_prompt) {
            if used > 0 && used + next.prompt.len() > slice_tokens {
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
        metrics::histogram!(m::ENGINE_TRAINING_SLICE_TOKENS).record(used as f64);
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
