//! The worker thread: takes queued jobs in order and runs them step by step.
//!
//! Each step is committed to the database (its replayable record and the job's progress) before
//! the next one starts; held-out evaluations and publishes are events. A job interrupted by a
//! shutdown or a crash stays `running` in the database, goes back to the queue at the next
//! start, and resumes by replaying its step log onto the same initial adapter: θ is bit-for-bit
//! what it was, and the run goes on exactly as if it had never stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use adapters::LoraAdapter;
use plugin::{DynEngine, HeldOutReport, StepRecord, Trainer};
use serde_json::json;

use super::job::{EventKind, EventLevel, HeldOutPoint, Job, JobStatus, VersionInfo};
use super::{QueuedEngine, RunningJob, Shared};
use crate::ids::unix_now;
use crate::metrics as m;

/// How often an idle worker looks at the queue even without being woken.
const IDLE_POLL: Duration = Duration::from_secs(2);

/// How a job's run ended, when it did not fail.
enum JobEnd {
    Succeeded,
    Cancelled,
    /// The server is stopping; the job resumes at the next start.
    Interrupted,
}

pub(super) fn run(shared: Arc<Shared>) {
    while !shared.is_shutting_down() {
        let job = match shared.db.next_queued_job() {
            Ok(Some(job)) => job,
            Ok(None) => {
                shared.wait(IDLE_POLL);
                continue;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot read the job queue");
                shared.wait(IDLE_POLL);
                continue;
            }
        };
        // Registered as running before its status says so: a cancel that sees the status
        // `running` also finds the flag to set.
        let cancelled = Arc::new(AtomicBool::new(false));
        *shared
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(RunningJob {
            id: job.id.clone(),
            cancelled: Arc::clone(&cancelled),
        });
        let started = shared.db.transition(
            &job.id,
            &[JobStatus::Queued],
            JobStatus::Running,
            unix_now(),
            None,
        );
        if !matches!(started, Ok(true)) {
            *shared
                .running
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = None;
            // `Ok(false)`: cancelled between the read and now.
            if let Err(err) = started {
                tracing::error!(job = %job.id, error = %err, "cannot start the job");
                shared.wait(IDLE_POLL);
            }
            continue;
        }
        shared.update_job_gauges();
        let id = job.id.clone();
        let adapter = job.spec.adapter.clone();
        // One engine per job: the hidden states it keeps for frozen-layer reuse are the job's.
        let engine = QueuedEngine::new(
            Arc::clone(&shared.model),
            shared.scheduler.clone(),
            Arc::clone(&shared.frozen_states),
        );
        let outcome = JobRun::start(&shared, &engine, job, &cancelled).and_then(|run| run.run());
        drop(engine);
        metrics::gauge!(m::TRAINING_FROZEN_STATES_BYTES)
            .set(shared.frozen_states.used_bytes() as f64);
        *shared
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        match outcome {
            Ok(JobEnd::Succeeded) => tracing::info!(job = %id, %adapter, "job succeeded"),
            Ok(JobEnd::Cancelled) => tracing::info!(job = %id, %adapter, "job cancelled"),
            Ok(JobEnd::Interrupted) => {
                tracing::info!(job = %id, "job interrupted by shutdown; it resumes at the next start");
            }
            Err(_) if shared.is_shutting_down() => {
                tracing::info!(job = %id, "job interrupted by shutdown; it resumes at the next start");
            }
            Err(message) => {
                tracing::error!(job = %id, %adapter, error = %message, "job failed");
                let failed = shared.db.transition(
                    &id,
                    &[JobStatus::Running],
                    JobStatus::Failed,
                    unix_now(),
                    Some(&message),
                );
                if let Err(err) = failed {
                    tracing::error!(job = %id, error = %err, "cannot record the failure");
                }
                shared.event(
                    &id,
                    EventLevel::Error,
                    EventKind::Status,
                    &format!("job failed: {message}"),
                    json!({ "status": "failed", "error": message }),
                );
            }
        }
        shared.update_job_gauges();
    }
    tracing::info!("training worker stopped");
}

/// One job being run: its trainer and what it has reported.
struct JobRun<'a> {
    shared: &'a Shared,
    engine: &'a QueuedEngine,
    job: Job,
    trainer: Trainer,
    cancelled: &'a AtomicBool,
    /// The adapter's name as a metrics label (bounded, see [`m::adapter_label`]).
    metrics_label: String,
}

/// Which adapter a publish hands to the registry.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Publish {
    /// θ as it is now (a periodic publish).
    Current,
    /// The last publish of a job: θ, or, when held-out evaluations saw a better adapter earlier
    /// in the run, that one (a run that overshoots still publishes its best).
    BestSeen,
}

impl<'a> JobRun<'a> {
    /// Rebuilds the job's trainer: its initial adapter, examples and step log (replayed).
    fn start(
        shared: &'a Shared,
        engine: &'a QueuedEngine,
        mut job: Job,
        cancelled: &'a AtomicBool,
    ) -> Result<Self, String> {
        let id = job.id.clone();
        let (train, held_out) = shared.db.examples(&id).map_err(|e| e.to_string())?;
        let log = shared.db.step_log(&id).map_err(|e| e.to_string())?;
        let adapter = job.spec.adapter.clone();
        if log.is_empty() {
            // The base is fixed when the job first starts: the adapter's live version then
            // (a job queued behind another on the same adapter continues from its result).
            let live = shared
                .adapters
                .registry()
                .versions(&adapter)
                .map(|(_, live)| live);
            if live != job.spec.base_version {
                job.spec.base_version = live;
                shared
                    .db
                    .set_spec(&id, &job.spec)
                    .map_err(|e| e.to_string())?;
            }
        }
        let initial = match job.spec.base_version {
            Some(version) => shared
                .adapters
                .load_lora(&adapter, version)
                .map_err(|e| format!("cannot load `{adapter}@{version}` to continue: {e}"))?,
            None => LoraAdapter::new_initialized(
                job.spec.lora.clone(),
                shared.adapters.dims(),
                job.spec.init_seed,
            )
            .map_err(|e| e.to_string())?,
        };
        let objective = job.spec.objective.build().map_err(|e| e.to_string())?;
        let resumed_at = log.len();
        let trainer = Trainer::resume(
            job.spec.trainer.clone(),
            objective,
            initial,
            train,
            held_out,
            log,
        )
        .map_err(|e| e.to_string())?;
        let message = if resumed_at == 0 {
            format!(
                "job started: adapter `{adapter}`, objective `{}`",
                trainer.objective().name()
            )
        } else {
            format!("job resumed at step {resumed_at}: the step log was replayed")
        };
        shared.event(
            &id,
            EventLevel::Info,
            EventKind::Status,
            &message,
            json!({ "status": "running", "steps_done": resumed_at }),
        );
        Ok(Self {
            metrics_label: m::adapter_label(&job.spec.adapter),
            shared,
            engine,
            job,
            trainer,
            cancelled,
        })
    }

    fn run(mut self) -> Result<JobEnd, String> {
        if self.job.held_out_examples > 0 {
            self.evaluate()?;
        }
        // A crash between a step and its publish: publish what is due now.
        let done = self.trainer.steps_done();
        if self.publish_due(done) && self.job.progress.last_published_step != Some(done) {
            self.publish(Publish::Current)?;
        }
        loop {
            if self.cancelled.load(Ordering::SeqCst) {
                return Ok(JobEnd::Cancelled);
            }
            if self.shared.is_shutting_down() {
                return Ok(JobEnd::Interrupted);
            }
            if self.trainer.stop_reason().is_some() {
                break;
            }
            let started = Instant::now();
            let record = self
                .trainer
                .step(self.engine as &dyn DynEngine)
                .map_err(|e| e.to_string())?;
            self.record_step(&record, started.elapsed())?;
            if self.cancelled.load(Ordering::SeqCst) {
                return Ok(JobEnd::Cancelled);
            }
            let done = self.trainer.steps_done();
            let config = self.trainer.config();
            let eval_due = done.is_multiple_of(config.eval_every) || done == config.max_steps;
            if eval_due && self.job.held_out_examples > 0 {
                self.evaluate()?;
            }
            if self.publish_due(done) {
                self.publish(Publish::Current)?;
            }
        }
        let done = self.trainer.steps_done();
        if self.job.progress.last_published_step != Some(done) {
            self.publish(Publish::BestSeen)?;
        }
        let moved = self
            .shared
            .db
            .transition(
                &self.job.id,
                &[JobStatus::Running],
                JobStatus::Succeeded,
                unix_now(),
                None,
            )
            .map_err(|e| e.to_string())?;
        if !moved {
            // Cancelled after its last step.
            return Ok(JobEnd::Cancelled);
        }
        let versions = &self.job.progress.published_versions;
        self.shared.event(
            &self.job.id,
            EventLevel::Info,
            EventKind::Status,
            &format!("job succeeded after {done} steps; published versions {versions:?}"),
            json!({ "status": "succeeded", "steps_done": done, "published_versions": versions }),
        );
        Ok(JobEnd::Succeeded)
    }

    /// Whether a periodic publish is due after `done` steps (the final one is not periodic).
    fn publish_due(&self, done: u64) -> bool {
        let max = self.trainer.config().max_steps;
        self.job
            .spec
            .publish_every
            .is_some_and(|every| done > 0 && done.is_multiple_of(every) && done < max)
    }

    fn record_step(&mut self, record: &StepRecord, took: Duration) -> Result<(), String> {
        let loss = f64::from(record.train_loss());
        let grad = record
            .projected_grads
            .iter()
            .map(|&g| f64::from(g))
            .sum::<f64>()
            / record.projected_grads.len().max(1) as f64;
        let progress = &mut self.job.progress;
        progress.steps_done = record.step + 1;
        progress.train_loss = Some(loss);
        self.shared
            .db
            .record_step(&self.job.id, record, progress)
            .map_err(|e| e.to_string())?;
        let label = &self.metrics_label;
        metrics::counter!(m::TRAINING_STEPS_TOTAL, "adapter" => label.clone()).increment(1);
        metrics::gauge!(m::TRAINING_LOSS, "adapter" => label.clone()).set(loss);
        metrics::gauge!(m::TRAINING_PROJECTED_GRADIENT, "adapter" => label.clone()).set(grad);
        metrics::histogram!(m::TRAINING_STEP_SECONDS).record(took.as_secs_f64());
        let max = self.trainer.config().max_steps;
        self.shared.event(
            &self.job.id,
            EventLevel::Info,
            EventKind::Step,
            &format!(
                "step {}/{max}: train loss {loss:.4}, projected gradient {grad:.4}",
                record.step + 1
            ),
            json!({
                "step": record.step + 1,
                "train_loss": loss,
                "loss_plus": record.loss_plus,
                "loss_minus": record.loss_minus,
                "projected_gradient": grad,
                "lr": record.lr,
                "seconds": took.as_secs_f64(),
            }),
        );
        Ok(())
    }

    fn evaluate(&mut self) -> Result<(), String> {
        let Some(report) = self
            .trainer
            .evaluate_held_out(self.engine as &dyn DynEngine)
            .map_err(|e| e.to_string())?
        else {
            return Ok(());
        };
        self.record_held_out(&report)
    }

    fn record_held_out(&mut self, report: &HeldOutReport) -> Result<(), String> {
        let point = HeldOutPoint {
            steps_done: report.steps_done,
            evaluation: report.evaluation.clone(),
        };
        let label = &self.metrics_label;
        metrics::gauge!(m::TRAINING_HELD_OUT, "adapter" => label.clone(), "metric" => "loss")
            .set(point.evaluation.loss);
        for (name, value) in &point.evaluation.metrics {
            metrics::gauge!(m::TRAINING_HELD_OUT, "adapter" => label.clone(), "metric" => name.clone())
                .set(*value);
        }
        let metrics_text: Vec<String> = point
            .evaluation
            .metrics
            .iter()
            .map(|(k, v)| format!(", {k} {v:.4}"))
            .collect();
        self.shared.event(
            &self.job.id,
            EventLevel::Info,
            EventKind::HeldOut,
            &format!(
                "held-out after {} steps: loss {:.4}{}",
                point.steps_done,
                point.evaluation.loss,
                metrics_text.concat()
            ),
            serde_json::to_value(&point).unwrap_or_default(),
        );
        let progress = &mut self.job.progress;
        if progress.held_out_before.is_none() && point.steps_done == 0 {
            progress.held_out_before = Some(point.clone());
        }
        progress.held_out = Some(point);
        self.shared
            .db
            .set_progress(&self.job.id, progress)
            .map_err(|e| e.to_string())
    }

    /// Publishes θ (or, for [`Publish::BestSeen`], the best adapter the held-out evaluations saw)
    /// as the adapter's next version, unless the job publishes only improvements and the held-out
    /// loss is worse than before the job.
    fn publish(&mut self, which: Publish) -> Result<(), String> {
        let done = self.trainer.steps_done();
        let held_out_now = if self.job.held_out_examples == 0 {
            None
        } else {
            if self
                .job
                .progress
                .held_out
                .as_ref()
                .is_none_or(|h| h.steps_done != done)
            {
                self.evaluate()?;
            }
            self.job.progress.held_out.clone()
        };
        let best = self.trainer.best().filter(|best| {
            which == Publish::BestSeen
                && best.steps_done != done
                && held_out_now
                    .as_ref()
                    .is_some_and(|now| best.evaluation.loss < now.evaluation.loss)
        });
        // When the best adapter is published instead of θ: its step, and why, for the event.
        let mut chosen = None;
        let (theta, step, held_out_now) = match best {
            Some(best) => {
                chosen = Some(format!(
                    ": the adapter of step {}, the lowest held-out loss seen ({:.4}; {:.4} at the last step)",
                    best.steps_done,
                    best.evaluation.loss,
                    held_out_now.as_ref().map_or(f64::NAN, |h| h.evaluation.loss)
                ));
                let point = HeldOutPoint {
                    steps_done: best.steps_done,
                    evaluation: best.evaluation.clone(),
                };
                (&best.adapter, best.steps_done, Some(point))
            }
            None => (self.trainer.adapter(), done, held_out_now),
        };
        if self.job.spec.publish_only_if_improved {
            if let (Some(now), Some(before)) = (&held_out_now, &self.job.progress.held_out_before) {
                // The best seen being the adapter the job started from is no improvement either.
                if now.evaluation.loss > before.evaluation.loss || now.steps_done == 0 {
                    let last = self.job.progress.held_out.as_ref().unwrap_or(now);
                    self.shared.event(
                        &self.job.id,
                        EventLevel::Warn,
                        EventKind::Publish,
                        &format!(
                            "not published after {done} steps: held-out loss {:.4} is worse than {:.4} before the job",
                            last.evaluation.loss, before.evaluation.loss
                        ),
                        json!({ "published": false, "steps_done": done }),
                    );
                    self.job.progress.last_published_step = Some(done);
                    return self
                        .shared
                        .db
                        .set_progress(&self.job.id, &self.job.progress)
                        .map_err(|e| e.to_string());
                }
            }
        }
        let adapter = self.job.spec.adapter.clone();
        let _gate = self
            .shared
            .publish_gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.cancelled.load(Ordering::SeqCst) {
            // Its adapter may be being deleted; the run loop ends the job.
            return Ok(());
        }
        let published = self
            .shared
            .adapters
            .publish(&adapter, theta)
            .map_err(|e| e.to_string())?;
        let info = VersionInfo {
            version: published.version,
            created_at: published.created,
            job_id: Some(self.job.id.clone()),
            step: Some(step),
            held_out: held_out_now,
        };
        self.shared
            .db
            .insert_version(&adapter, &info)
            .map_err(|e| e.to_string())?;
        let progress = &mut self.job.progress;
        progress.published_versions.push(info.version);
        progress.last_published_step = Some(done);
        self.shared
            .db
            .set_progress(&self.job.id, progress)
            .map_err(|e| e.to_string())?;
        self.shared.event(
            &self.job.id,
            EventLevel::Info,
            EventKind::Publish,
            &format!(
                "published `{adapter}@{}` after {done} steps{}",
                info.version,
                chosen.as_deref().unwrap_or_default()
            ),
            json!({
                "published": true,
                "adapter": adapter,
                "version": info.version,
                "steps_done": done,
                "adapter_step": step,
            }),
        );
        Ok(())
    }
}
