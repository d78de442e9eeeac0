//! The worker thread: takes queued jobs in order and runs each with the trainer's own loop
//! ([`Trainer::run`], the one `mezo bench mezo` runs), pausing it for periodic publishes.
//!
//! Each step is committed to the database (its replayable record and the job's progress) before
//! the next one starts; held-out evaluations and publishes are events. A job interrupted by a
//! shutdown or a crash stays `running` in the database, goes back to the queue at the next
//! start, and resumes by replaying its step log onto the same initial adapter: θ is bit-for-bit
//! what it was, and the run goes on exactly as if it had never stopped.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use plugin::{DynEngine, HeldOutReport, StepRecord, StopReason, Trainer, TrainerEvent};
use serde_json::json;

use super::adapter_lifecycle::Provenance;
use super::job::{EventKind, EventLevel, HeldOutPoint, Job, JobStatus};
use super::{QueuedEngine, RunningJob, Shared};
use crate::ids::unix_now_ms;
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
    let mut failing: Option<String> = None;
    while !shared.is_shutting_down() {
        let job = match shared.db.claim_next_job(&shared.lease, unix_now_ms()) {
            Ok(Some(job)) => job,
            Ok(None) => {
                if failing.take().is_some() {
                    tracing::info!("reading the job queue again");
                }
                shared.wait(IDLE_POLL);
                continue;
            }
            Err(err) => {
                let message = err.to_string();
                // Once per kind of failure, not at every poll while the database is down.
                if failing.as_deref() != Some(message.as_str()) {
                    tracing::error!(error = %message, "cannot read the job queue; retrying");
                    failing = Some(message);
                }
                shared.wait(IDLE_POLL);
                continue;
            }
        };
        failing = None;
        let cancelled = Arc::new(AtomicBool::new(false));
        *shared
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(RunningJob {
            id: job.id.clone(),
            cancelled: Arc::clone(&cancelled),
        });
        shared.update_job_gauges();
        metrics::gauge!(m::FINETUNE_JOBS_RUNNING_HERE).set(1.0);
        let id = job.id.clone();
        let adapter = job.spec.adapter.clone();
        // One engine per job: the hidden states it keeps for frozen-layer reuse are the job's.
        let engine = QueuedEngine::new(
            Arc::clone(&shared.model),
            shared.scheduler.clone(),
            Arc::clone(&shared.frozen_states),
        );
        let lease_lost = AtomicBool::new(false);
        let running = AtomicBool::new(true);
        let outcome = std::thread::scope(|scope| {
            let keeper =
                scope.spawn(|| keep_lease(&shared, &id, &running, &lease_lost, &cancelled));
            let outcome = JobRun::start(&shared, &engine, job, &cancelled, &lease_lost)
                .and_then(|run| run.run());
            running.store(false, Ordering::SeqCst);
            keeper.thread().unpark();
            outcome
        });
        drop(engine);
        metrics::gauge!(m::TRAINING_FROZEN_STATES_BYTES)
            .set(shared.frozen_states.used_bytes() as f64);
        metrics::gauge!(m::FINETUNE_JOBS_RUNNING_HERE).set(0.0);
        *shared
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        let interrupted = || {
            tracing::info!(job = %id, "job interrupted by shutdown; it resumes from its step log, here at the next start or on another replica");
            if let Err(err) = shared.db.release_lease(&id, &shared.lease) {
                tracing::warn!(job = %id, error = %err, "cannot hand the job's lease back");
            }
        };
        match outcome {
            _ if lease_lost.load(Ordering::SeqCst) => tracing::warn!(
                job = %id,
                "the job is no longer this server's: it was cancelled on another replica, or \
                 its lease lapsed (this server stalled or lost the database) and another replica \
                 resumed it"
            ),
            Ok(JobEnd::Succeeded) => tracing::info!(job = %id, %adapter, "job succeeded"),
            Ok(JobEnd::Cancelled) => tracing::info!(job = %id, %adapter, "job cancelled"),
            Ok(JobEnd::Interrupted) => interrupted(),
            Err(_) if shared.is_shutting_down() => interrupted(),
            Err(message) => {
                tracing::error!(job = %id, %adapter, error = %message, "job failed");
                let failed = shared.finish(
                    &id,
                    (&[JobStatus::Running], JobStatus::Failed),
                    true,
                    Some(&message),
                    &format!("job failed: {message}"),
                    json!({ "status": "failed", "error": message }),
                );
                if let Err(err) = failed {
                    tracing::error!(job = %id, error = %err, "cannot record the failure");
                }
            }
        }
        shared.update_job_gauges();
    }
    tracing::info!("training worker stopped");
}

/// Renews this server's lease on job `id` four times per lease while `running`; when the lease
/// is no longer this server's (the job was cancelled on another replica, or the lease lapsed and
/// another replica took the job), says so in `lost` and stops the run through `cancelled`. A
/// database that cannot be reached is tried again at the next renewal.
fn keep_lease(
    shared: &Shared,
    id: &str,
    running: &AtomicBool,
    lost: &AtomicBool,
    cancelled: &AtomicBool,
) {
    let every = Duration::from_millis(shared.lease.duration_ms / 4);
    loop {
        std::thread::park_timeout(every);
        if !running.load(Ordering::SeqCst) {
            return;
        }
        match shared.db.renew_lease(id, &shared.lease, unix_now_ms()) {
            Ok(true) => {}
            Ok(false) => {
                lost.store(true, Ordering::SeqCst);
                cancelled.store(true, Ordering::SeqCst);
                return;
            }
            Err(err) => tracing::warn!(job = id, error = %err, "cannot renew the job's lease"),
        }
    }
}

/// One job being run: its trainer, and where its progress goes.
struct JobRun<'a> {
    engine: &'a QueuedEngine,
    trainer: Trainer,
    report: JobReport<'a>,
}

/// A job as it is recorded while it runs: its row, events and metrics.
struct JobReport<'a> {
    shared: &'a Shared,
    job: Job,
    cancelled: &'a AtomicBool,
    /// Set (with `cancelled`) when a write finds the job's lease no longer this server's.
    lease_lost: &'a AtomicBool,
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

/// Why [`JobRun::train`] handed control back.
enum Pause {
    /// The trainer's run ended: its steps are done, or early stopping stopped it.
    RunEnded,
    /// A periodic publish is due.
    PublishDue,
    /// Cancelled, or the server is stopping.
    Ended(JobEnd),
}

/// Whether a periodic publish is due after `done` of `max_steps` steps (the final one is not
/// periodic).
fn publish_due(every: Option<u64>, max_steps: u64, done: u64) -> bool {
    every.is_some_and(|every| done > 0 && done.is_multiple_of(every) && done < max_steps)
}

impl<'a> JobRun<'a> {
    /// Rebuilds the job's trainer: its initial adapter, examples and step log (replayed).
    fn start(
        shared: &'a Shared,
        engine: &'a QueuedEngine,
        mut job: Job,
        cancelled: &'a AtomicBool,
        lease_lost: &'a AtomicBool,
    ) -> Result<Self, String> {
        let id = job.id.clone();
        let (train, held_out) = shared.db.examples(&id).map_err(|e| e.to_string())?;
        let log = shared.db.step_log(&id).map_err(|e| e.to_string())?;
        let adapter = job.spec.adapter.clone();
        if log.is_empty() {
            // The base is fixed when the job first starts: the adapter's live version then
            // (a job queued behind another on the same adapter continues from its result,
            // which another replica may have published a moment ago).
            if shared.db.is_shared() {
                shared
                    .sync_versions(super::replication::Sync::Follow)
                    .map_err(|e| e.to_string())?;
            }
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
        let initial = shared.initial_adapter(&job.spec)?;
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
        let replica = &shared.replica_name;
        let message = if resumed_at == 0 {
            format!(
                "job started on replica `{replica}`: adapter `{adapter}`, objective `{}`",
                trainer.objective().name()
            )
        } else {
            format!(
                "job resumed at step {resumed_at} on replica `{replica}`: the step log was replayed"
            )
        };
        shared.event(
            &id,
            EventLevel::Info,
            EventKind::Status,
            &message,
            json!({ "status": "running", "steps_done": resumed_at, "replica": replica }),
        );
        Ok(Self {
            engine,
            trainer,
            report: JobReport {
                metrics_label: m::adapter_label(&job.spec.adapter),
                shared,
                job,
                cancelled,
                lease_lost,
            },
        })
    }

    fn run(mut self) -> Result<JobEnd, String> {
        // A crash between a step and its publish: publish what is due now.
        let done = self.trainer.steps_done();
        let (every, max_steps) = (
            self.report.job.spec.publish_every,
            self.trainer.config().max_steps,
        );
        if publish_due(every, max_steps, done)
            && self.report.job.progress.last_published_step != Some(done)
        {
            self.publish(Publish::Current)?;
        }
        loop {
            match self.train()? {
                Pause::RunEnded => break,
                Pause::PublishDue => self.publish(Publish::Current)?,
                Pause::Ended(end) => return Ok(end),
            }
        }
        let done = self.trainer.steps_done();
        if self.report.job.progress.last_published_step != Some(done) {
            self.publish(Publish::BestSeen)?;
        }
        let report = &self.report;
        let versions = &report.job.progress.published_versions;
        let moved = report
            .shared
            .finish(
                &report.job.id,
                (&[JobStatus::Running], JobStatus::Succeeded),
                true,
                None,
                &format!("job succeeded after {done} steps; published versions {versions:?}"),
                json!({ "status": "succeeded", "steps_done": done, "published_versions": versions }),
            )
            .map_err(|e| e.to_string())?;
        if !moved {
            // Cancelled after its last step.
            return Ok(JobEnd::Cancelled);
        }
        Ok(JobEnd::Succeeded)
    }

    /// Runs the trainer's own loop ([`Trainer::run`]: held-out evaluations before the first
    /// step, every `eval_every` steps and after the last), recording each step and evaluation,
    /// until the run ends, a periodic publish is due, or the job is cancelled or interrupted.
    fn train(&mut self) -> Result<Pause, String> {
        if let Some(end) = self.report.interruption() {
            return Ok(Pause::Ended(end));
        }
        let (every, max_steps) = (
            self.report.job.spec.publish_every,
            self.trainer.config().max_steps,
        );
        let report = &mut self.report;
        let mut failure = None;
        let mut pause = Pause::RunEnded;
        // Steps are timed from the end of the previous event, so an evaluation is not a step's.
        let mut since = Instant::now();
        let stopped = self
            .trainer
            .run(self.engine as &dyn DynEngine, |event| {
                let recorded = match event {
                    TrainerEvent::Step(record) => report.record_step(record, since.elapsed()),
                    TrainerEvent::HeldOut(held_out) => report.record_held_out(held_out),
                };
                since = Instant::now();
                if let Err(err) = recorded {
                    failure = Some(err);
                    return ControlFlow::Break(());
                }
                if let TrainerEvent::Step(record) = event {
                    if let Some(end) = report.interruption() {
                        pause = Pause::Ended(end);
                        return ControlFlow::Break(());
                    }
                    if publish_due(every, max_steps, record.step + 1) {
                        pause = Pause::PublishDue;
                        return ControlFlow::Break(());
                    }
                }
                ControlFlow::Continue(())
            })
            .map_err(|e| e.to_string())?;
        if let Some(err) = failure {
            return Err(err);
        }
        debug_assert!(
            stopped == StopReason::Cancelled || matches!(pause, Pause::RunEnded),
            "the run only stops early when asked to"
        );
        Ok(pause)
    }

    fn evaluate(&mut self) -> Result<(), String> {
        let Some(report) = self
            .trainer
            .evaluate_held_out(self.engine as &dyn DynEngine)
            .map_err(|e| e.to_string())?
        else {
            return Ok(());
        };
        self.report.record_held_out(&report)
    }

    /// Publishes θ (or, for [`Publish::BestSeen`], the best adapter the held-out evaluations saw)
    /// as the adapter's next version, unless the job publishes only improvements and the held-out
    /// loss is worse than before the job.
    fn publish(&mut self, which: Publish) -> Result<(), String> {
        let done = self.trainer.steps_done();
        let held_out_now = if self.report.job.held_out_examples == 0 {
            None
        } else {
            if self
                .report
                .job
                .progress
                .held_out
                .as_ref()
                .is_none_or(|h| h.steps_done != done)
            {
                self.evaluate()?;
            }
            self.report.job.progress.held_out.clone()
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
        if self.report.job.spec.publish_only_if_improved {
            if let (Some(now), Some(before)) =
                (&held_out_now, &self.report.job.progress.held_out_before)
            {
                // The best seen being the adapter the job started from is no improvement either.
                if now.evaluation.loss > before.evaluation.loss || now.steps_done == 0 {
                    let last = self.report.job.progress.held_out.as_ref().unwrap_or(now);
                    self.report.shared.event(
                        &self.report.job.id,
                        EventLevel::Warn,
                        EventKind::Publish,
                        &format!(
                            "not published after {done} steps: held-out loss {:.4} is worse than {:.4} before the job",
                            last.evaluation.loss, before.evaluation.loss
                        ),
                        json!({ "published": false, "steps_done": done }),
                    );
                    self.report.job.progress.last_published_step = Some(done);
                    return self.report.save_progress();
                }
            }
        }
        let adapter = self.report.job.spec.adapter.clone();
        let mut progress = self.report.job.progress.clone();
        progress.last_published_step = Some(done);
        let made_by = Provenance {
            job_id: &self.report.job.id,
            step,
            held_out: held_out_now,
            progress: &progress,
        };
        let published = self
            .report
            .shared
            .publish_version(&adapter, theta, made_by, self.report.cancelled)
            .map_err(|e| e.to_string())?;
        let Some(info) = published else {
            // Cancelled here (the run loop ends the job), or the lease is gone.
            if !self.report.cancelled.load(Ordering::SeqCst) {
                self.report.lost_lease();
            }
            return Ok(());
        };
        // The database stored this progress with the version.
        progress.published_versions.push(info.version);
        self.report.job.progress = progress;
        self.report.shared.event(
            &self.report.job.id,
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

impl JobReport<'_> {
    /// How the job ends now, if it was cancelled or the server is stopping.
    fn interruption(&self) -> Option<JobEnd> {
        if self.cancelled.load(Ordering::SeqCst) {
            Some(JobEnd::Cancelled)
        } else if self.shared.is_shutting_down() {
            Some(JobEnd::Interrupted)
        } else {
            None
        }
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
        let held = self
            .shared
            .db
            .record_step(
                &self.job.id,
                record,
                progress,
                &self.shared.lease,
                unix_now_ms(),
            )
            .map_err(|e| e.to_string())?;
        if !held {
            self.lost_lease();
            return Ok(());
        }
        let label = &self.metrics_label;
        metrics::counter!(m::TRAINING_STEPS_TOTAL, "adapter" => label.clone()).increment(1);
        metrics::gauge!(m::TRAINING_LOSS, "adapter" => label.clone()).set(loss);
        metrics::gauge!(m::TRAINING_PROJECTED_GRADIENT, "adapter" => label.clone()).set(grad);
        metrics::histogram!(m::TRAINING_STEP_SECONDS).record(took.as_secs_f64());
        let max = self.job.spec.trainer.max_steps;
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
        self.save_progress()
    }

    /// Writes the job's progress while this server holds its lease.
    fn save_progress(&self) -> Result<(), String> {
        let held = self
            .shared
            .db
            .set_progress(
                &self.job.id,
                &self.job.progress,
                &self.shared.lease,
                unix_now_ms(),
            )
            .map_err(|e| e.to_string())?;
        if !held {
            self.lost_lease();
        }
        Ok(())
    }

    /// The job is no longer this server's: the run stops at the next check, writing nothing.
    fn lost_lease(&self) {
        self.lease_lost.store(true, Ordering::SeqCst);
        self.cancelled.store(true, Ordering::SeqCst);
    }
}
