//! The engine thread: the one owner of the forward pass, running continuous batching.
//!
//! Each turn of the loop admits waiting work (up to the batch's free rows and the step's
//! prefill budget), drops sequences whose client went away, runs one [`step`] over every running
//! sequence — the newcomers' prompts and everyone else's next token in one packed forward, each
//! row under its own adapter version — and hands each sequence its token. Sequences join and
//! leave between steps; nobody waits for a whole batch to finish. A newcomer whose prompt
//! starts like a recent one under the same adapter version skips that part of its prefill
//! ([`PrefixCache`]).
//!
//! Training work (the forward passes of MeZO steps, greedy answers for its metrics) runs between
//! serving steps, one slice of at most `training_slice_tokens` tokens at a time
//! (`BackgroundTask`), within the share of engine time that [`EngineShare`] allows while
//! requests are being served; with nothing to serve, slices grow to
//! `idle_training_slice_tokens`.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::engine::batch::{BatchRow, RowCache};
use crate::engine::generate::{step, Sequence};
use crate::engine::kv_cache::KvCache;
use crate::engine::loaded_model::LoadedModel;
use crate::engine::sampler::{log_softmax_row, top_logprobs, TokenLogprob};
use crate::engine::Result;
use crate::metrics as m;

use super::background::BackgroundTask;
use super::prefix_cache::PrefixCache;
use super::queue::{Taken, WorkQueue};
use super::share::EngineShare;
use super::work::{GenerateWork, GenerationEvent, PromptLogprobsWork, PromptTokenLogprob, Work};

/// What the loop needs to know about its limits.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_batch_rows: usize,
    pub max_prefill_tokens_per_step: usize,
    /// Memory for cached prompt prefixes (0: no prefix caching).
    pub prefix_cache_bytes: usize,
    /// Training's most share of engine time while requests are served, in [0, 1].
    pub max_training_share: f64,
    /// Most tokens in one training slice: the longest a serving step waits behind training.
    pub training_slice_tokens: usize,
    /// Most tokens in one training slice while nothing is being served: fuller forwards,
    /// which train faster.
    pub idle_training_slice_tokens: usize,
}

/// Prompt log-probs are computed this many tokens per forward, so a long prompt's logits
/// (vocabulary-wide per position) never all sit in memory at once.
const PROMPT_LOGPROBS_CHUNK: usize = 256;

pub const SHUTDOWN_MESSAGE: &str = "the server shut down before this request finished";

struct RunningSequence {
    seq: Sequence,
    events: mpsc::UnboundedSender<GenerationEvent>,
    /// Joined this step: its prompt is prefilled by the coming step.
    prefilling: bool,
}

pub fn run(model: Arc<LoadedModel>, queue: Arc<WorkQueue>, limits: BatchLimits) {
    let mut running: Vec<RunningSequence> = Vec::new();
    let mut prefixes = PrefixCache::new(limits.prefix_cache_bytes);
    let mut share = EngineShare::new(limits.max_training_share);
    let mut training: Option<BackgroundTask> = None;
    loop {
        let free_rows = limits.max_batch_rows.saturating_sub(running.len());
        let idle = running.is_empty() && training.is_none();
        let (admitted, background) = match queue.take(
            free_rows,
            limits.max_prefill_tokens_per_step,
            training.is_none(),
            idle,
        ) {
            Taken::Work { works, background } => (works, background),
            Taken::CancelAll => {
                for r in running.drain(..) {
                    let _ = r
                        .events
                        .send(GenerationEvent::Failed(SHUTDOWN_MESSAGE.into()));
                }
                if let Some(task) = training.take() {
                    task.finish(Err(SHUTDOWN_MESSAGE.into()));
                }
                break;
            }
            Taken::Closed => break,
        };
        if let Some(work) = background {
            training = Some(BackgroundTask::new(work));
        }
        for work in admitted {
            match work {
                Work::Generate(work) => {
                    running.extend(start_sequence(&model, &mut prefixes, work));
                }
                Work::PromptLogprobs(work) => run_prompt_logprobs(&model, work),
            }
        }
        // A closed channel means the client disconnected (or the handler gave up): stop here
        // instead of generating tokens nobody reads.
        running.retain(|r| !r.events.is_closed());
        metrics::gauge!(m::REQUESTS_RUNNING).set(running.len() as f64);
        metrics::gauge!(m::REQUESTS_WAITING).set(queue.waiting() as f64);
        if !running.is_empty() {
            let started = Instant::now();
            serving_step(&model, &mut running, &mut prefixes);
            share.record_serving(started.elapsed());
        }
        if training.is_some() && queue.is_closed() {
            // Shutting down: the job resumes from its step log at the next start.
            if let Some(task) = training.take() {
                task.finish(Err(SHUTDOWN_MESSAGE.into()));
            }
        }
        let serving_busy = !running.is_empty() || queue.waiting() > 0;
        if let Some(task) = training.as_mut() {
            if share.training_may_run(serving_busy) {
                let slice_tokens = if serving_busy {
                    limits.training_slice_tokens
                } else {
                    limits.idle_training_slice_tokens
                };
                let started = Instant::now();
                let outcome = task.run_slice(&model, slice_tokens);
                share.record_training(started.elapsed());
                if let Some(outcome) = outcome {
                    if let Some(task) = training.take() {
                        task.finish(outcome);
                    }
                }
            }
        }
    }
    metrics::gauge!(m::REQUESTS_RUNNING).set(0.0);
    tracing::info!("engine thread stopped");
}

/// One forward step over every running sequence; each gets its token (or the failure).
fn serving_step(
    model: &LoadedModel,
    running: &mut Vec<RunningSequence>,
    prefixes: &mut PrefixCache,
) {
    let started = Instant::now();
    let outcome = {
        let mut seqs: Vec<&mut Sequence> = running.iter_mut().map(|r| &mut r.seq).collect();
        step(&model.transformer, &model.tokenizer, &mut seqs)
    };
    metrics::histogram!(m::ENGINE_BATCH_ROWS).record(running.len() as f64);
    metrics::histogram!(m::ENGINE_STEP_SECONDS).record(started.elapsed().as_secs_f64());
    match outcome {
        Ok(events) => {
            for (r, event) in running.iter_mut().zip(events) {
                if let Some(event) = event {
                    let _ = r.events.send(GenerationEvent::Token(event));
                }
                if r.prefilling {
                    r.prefilling = false;
                    prefixes.insert(r.seq.adapter(), r.seq.prompt(), r.seq.cache());
                }
            }
            running.retain(|r| !r.seq.is_finished());
        }
        Err(err) => {
            tracing::error!(error = %err, rows = running.len(), "engine step failed");
            for r in running.drain(..) {
                let _ = r
                    .events
                    .send(GenerationEvent::Failed(format!("the engine failed: {err}")));
            }
        }
    }
}

fn start_sequence(
    model: &LoadedModel,
    prefixes: &mut PrefixCache,
    work: GenerateWork,
) -> Option<RunningSequence> {
    let cached = prefixes.lookup(&work.adapter, &work.prompt);
    let reused = cached.as_ref().map_or(0, |c| c.len());
    metrics::counter!(m::PREFIX_CACHE_HIT_TOKENS_TOTAL).increment(reused as u64);
    metrics::counter!(m::PREFILL_TOKENS_TOTAL).increment((work.prompt.len() - reused) as u64);
    let seq = match cached {
        Some(cache) => Sequence::with_cached_prefix(
            &model.transformer,
            work.prompt,
            work.adapter,
            work.params,
            cache,
        ),
        None => Sequence::new(&model.transformer, work.prompt, work.adapter, work.params),
    };
    match seq {
        Ok(seq) => Some(RunningSequence {
            seq,
            events: work.events,
            prefilling: true,
        }),
        Err(err) => {
            // Handlers validate first, so this is a limit they did not know about.
            let _ = work.events.send(GenerationEvent::Failed(err.to_string()));
            None
        }
    }
}

fn run_prompt_logprobs(model: &LoadedModel, work: PromptLogprobsWork) {
    let result = prompt_logprobs(model, &work).map_err(|err| {
        tracing::error!(error = %err, "prompt log-probs failed");
        format!("the engine failed: {err}")
    });
    let _ = work.reply.send(result);
}

/// Each prompt token's log-prob given the ones before it, fed through the cache in chunks.
fn prompt_logprobs(
    model: &LoadedModel,
    work: &PromptLogprobsWork,
) -> Result<Vec<PromptTokenLogprob>> {
    let c = &model.transformer.config;
    let mut cache = KvCache::new(c.n_layer, c.n_kv_head, c.head_dim);
    let mut out = Vec::with_capacity(work.tokens.len());
    out.extend(work.tokens.first().map(|&token| PromptTokenLogprob {
        token,
        logprob: None,
        top_logprobs: Vec::new(),
    }));
    // Logits at position i predict token i + 1; the last position predicts nothing asked for.
    let predicting = work.tokens.len().saturating_sub(1);
    let mut start = 0;
    while start < predicting {
        let end = (start + PROMPT_LOGPROBS_CHUNK).min(predicting);
        let chunk = &work.tokens[start..end];
        let logits = {
            let mut rows = [BatchRow::all_logits(
                chunk,
                RowCache::Append(&mut cache),
                work.adapter.as_deref(),
            )];
            model.transformer.forward(&mut rows)?
        };
        let logits = logits
            .into_iter()
            .next()
            .flatten()
            .expect("an all-logits row returns its logits");
        for (offset, row) in logits.to_vec2::<f32>()?.iter().enumerate() {
            let token = work.tokens[start + offset + 1];
            let lp = log_softmax_row(row);
            out.push(PromptTokenLogprob {
                token,
                logprob: Some(lp.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY)),
                top_logprobs: if work.top_n == 0 {
                    Vec::<TokenLogprob>::new()
                } else {
                    top_logprobs(&lp, work.top_n)
                },
            });
        }
        start = end;
    }
    Ok(out)
}
