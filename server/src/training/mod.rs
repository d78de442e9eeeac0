//! Background fine-tuning: jobs of MeZO steps on posted examples and feedback, run while the
//! server keeps serving, publishing adapter versions as they go.
//!
//! The path of a job: the HTTP layer validates a request into a [`NewJob`]; [`Training::submit`]
//! checks it against the plugin's trainer and stores it with its examples ([`db`]) before
//! answering 202; the one worker thread (`worker`) takes queued jobs in order (one per adapter
//! at a time), runs the plugin's trainer through [`QueuedEngine`], which sends each forward pass
//! to the scheduler as background work (training slices share the engine with serving, see
//! [`crate::scheduler::share`]), records every step, and publishes versions through
//! [`AdapterVersions`]. After a crash the worker replays a job's step log and goes on.
//! [`feedback`] turns rated answers into `reward` jobs. Every job event is written to the
//! database and announced to event streams, which wait on an [`EventWatch`] instead of polling.
//!
//! Servers sharing a PostgreSQL database are replicas of one service: each runs jobs under a
//! lease (`db::jobs`), so a job runs on one of them and moves to another when its server dies,
//! and each installs the versions the others publish (`replication`).

mod adapter_lifecycle;
pub mod db;
mod event_notices;
pub mod feedback;
mod files;
pub mod job;
pub mod queued_engine;
mod replication;
mod worker;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use adapters::{LoraAdapter, LoraConfig};
use plugin::{ObjectiveKind, Trainer, TrainerConfig, TrainingExample};

use crate::adapter_versions::{AdapterVersions, PublishError};
use crate::config::{DataConfig, TrainingConfig};
use crate::engine::frozen_layers::FrozenStatesBudget;
use crate::engine::loaded_model::LoadedModel;
use crate::ids::{new_id, unix_now};
use crate::metrics as m;
use crate::scheduler::SchedulerHandle;
use db::{Admission, JobLimits, Lease};
use event_notices::EventNotices;

pub use adapter_lifecycle::{AdapterRecord, VersionRecord};
pub use db::{DatabaseUrl, Db, DbError, StoredFile};
pub use event_notices::EventWatch;
pub use job::{Job, JobEvent, JobOrigin, JobSpec, JobStatus, Progress, VersionInfo};
pub use queued_engine::QueuedEngine;

/// The database file in the data folder.
pub const DB_FILE: &str = "mezo.sqlite";

/// Where the fine-tuning database is: `data.database`, or [`DB_FILE`] in the data folder.
pub fn database_url(data: &DataConfig) -> Result<DatabaseUrl, DbError> {
    if data.database.trim().is_empty() {
        Ok(DatabaseUrl::Sqlite(data.dir.join(DB_FILE)))
    } else {
        DatabaseUrl::parse(&data.database)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrainingError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(
        "cannot create the data folder {path}: {source}; check --data-dir and its permissions"
    )]
    DataDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A request that cannot become a job; `param` is the offending field's path.
    #[error("{message}")]
    Invalid { param: String, message: String },
    /// More of something than one request may hold (examples, file bytes).
    #[error("{message}")]
    TooLarge { param: String, message: String },
    #[error("{what} `{id}` does not exist")]
    NotFound { what: &'static str, id: String },
    /// The request conflicts with the object's state (cancelling a finished job).
    #[error("{0}")]
    Conflict(String),
    /// The job's owner already has its most jobs queued or running.
    #[error(
        "this API key already has {max} fine-tuning jobs queued or running, as many as it may \
         (`max_queued_jobs`); retry when one has finished, or cancel one"
    )]
    TooManyJobs { max: usize },
    #[error(transparent)]
    Publish(#[from] PublishError),
}

impl TrainingError {
    fn not_found(what: &'static str, id: &str) -> Self {
        TrainingError::NotFound {
            what,
            id: id.to_string(),
        }
    }
}

/// A validated request for a job.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub adapter: String,
    pub objective: ObjectiveKind,
    pub trainer: TrainerConfig,
    /// LoRA shape of a new adapter; `None`: the paper's (r = 8, α = 16 on q and v).
    pub lora: Option<LoraConfig>,
    pub publish_every: Option<u64>,
    pub publish_only_if_improved: bool,
    pub train: Vec<TrainingExample>,
    pub held_out: Vec<TrainingExample>,
    pub origin: JobOrigin,
    /// Whose job it is and how many of theirs may wait or run at once; `None`: nobody's
    /// (no API keys, or a job that feedback started).
    pub quota: Option<JobQuota>,
}

/// The owner of a job (an API key's name) and the most of its jobs queued or running at once
/// (0: no cap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobQuota {
    pub owner: String,
    pub max_unfinished: usize,
}

/// The running job, so that a cancel can reach it between steps.
struct RunningJob {
    id: String,
    cancelled: Arc<AtomicBool>,
}

pub(crate) struct Shared {
    db: Db,
    config: TrainingConfig,
    model: Arc<LoadedModel>,
    adapters: Arc<AdapterVersions>,
    scheduler: SchedulerHandle,
    base_model: String,
    /// The memory every job's kept hidden states share (frozen-layer reuse).
    frozen_states: Arc<FrozenStatesBudget>,
    running: Mutex<Option<RunningJob>>,
    /// This server's name among replicas (`server.replica_name`).
    replica_name: String,
    /// The lease this server takes jobs under: its name and a random token (so that a
    /// restarted server, or another given the same name, never passes for this one).
    lease: Lease,
    /// Adapters this server knows the database has versions of: when one is no longer there,
    /// another server deleted it (adapter folders put in by hand are not in the database).
    adapters_in_db: Mutex<HashSet<String>>,
    /// Versions the database lists whose files it does not have and that cannot be rebuilt
    /// (published by an earlier release, their folders gone here): reported once.
    unobtainable_versions: Mutex<HashSet<(String, u32)>>,
    shutdown: AtomicBool,
    /// Wakes the worker when a job is queued or the server stops.
    wake: (Mutex<u64>, Condvar),
    /// Wakes event streams when a job has a new event.
    event_notices: EventNotices,
    /// Held while a version is published (folder and database row) and while an adapter is
    /// deleted (see `adapter_lifecycle`).
    publish_gate: Mutex<()>,
}

/// The fine-tuning service: jobs, their events, adapter versions' history, files, feedback.
#[derive(Clone)]
pub struct Training {
    shared: Arc<Shared>,
}

impl Training {
    /// Opens (creating if needed) the fine-tuning database `data` names: its `database` URL,
    /// or `mezo.sqlite` in its folder. The server opens it before loading adapters, whose
    /// published versions it lists.
    pub fn open_db(data: &DataConfig) -> Result<Db, TrainingError> {
        std::fs::create_dir_all(&data.dir).map_err(|source| TrainingError::DataDir {
            path: data.dir.clone(),
            source,
        })?;
        let url = database_url(data)?;
        let db = Db::open(&url)?;
        tracing::info!(database = %url, "fine-tuning database open");
        Ok(db)
    }

    /// Takes over the database opened by [`Self::open_db`] as the server `replica_name`: the
    /// only server of a SQLite database puts jobs interrupted by a crash back in the queue;
    /// versions the database has and this server lacks are written and served, and the live
    /// versions it records restored. Starts the worker thread and, on a database replicas
    /// share, the replication thread.
    pub fn start(
        db: Db,
        config: TrainingConfig,
        model: Arc<LoadedModel>,
        adapters: Arc<AdapterVersions>,
        scheduler: SchedulerHandle,
        (base_model, replica_name): (String, String),
    ) -> Result<Self, TrainingError> {
        if !db.is_shared() {
            let requeued = db.requeue_interrupted()?;
            if requeued > 0 {
                tracing::info!(
                    jobs = requeued,
                    "jobs interrupted by the last shutdown will resume from their step logs"
                );
            }
        }
        let frozen_states = FrozenStatesBudget::new(config.frozen_states_bytes);
        let lease = Lease {
            owner: format!("{replica_name}#{}", new_id("run")),
            duration_ms: config.job_lease_seconds.max(1) * 1000,
        };
        let notices = db.version_notices();
        let training = Self {
            shared: Arc::new(Shared {
                db,
                frozen_states,
                config,
                model,
                adapters,
                scheduler,
                base_model,
                replica_name,
                lease,
                adapters_in_db: Mutex::new(HashSet::new()),
                unobtainable_versions: Mutex::new(HashSet::new()),
                running: Mutex::new(None),
                shutdown: AtomicBool::new(false),
                wake: (Mutex::new(0), Condvar::new()),
                event_notices: EventNotices::default(),
                publish_gate: Mutex::new(()),
            }),
        };
        training.shared.sync_versions(replication::Sync::CatchUp)?;
        training.update_job_gauges();
        metrics::gauge!(m::FINETUNE_JOBS_RUNNING_HERE).set(0.0);
        let shared = Arc::clone(&training.shared);
        std::thread::Builder::new()
            .name("mezo-training".into())
            .spawn(move || worker::run(shared))
            .expect("the OS can start one thread at start-up");
        if let Some(notices) = notices {
            let shared = Arc::clone(&training.shared);
            std::thread::Builder::new()
                .name("mezo-replication".into())
                .spawn(move || replication::run(shared, notices))
                .expect("the OS can start one thread at start-up");
        }
        Ok(training)
    }

    pub fn config(&self) -> &TrainingConfig {
        &self.shared.config
    }

    /// The base model's id, as requests name it.
    pub fn base_model(&self) -> &str {
        &self.shared.base_model
    }

    /// Stops the worker after its current step; the job stays resumable.
    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.notify();
    }

    /// Validates `request` as the trainer would, stores it with its examples, and queues it;
    /// refused when its owner already has as many jobs queued or running as its quota allows,
    /// or when its examples would take the adapter past `training.max_stored_examples_per_adapter`.
    pub fn submit(&self, request: NewJob) -> Result<Job, TrainingError> {
        let job = self.build_job(&request)?;
        let limits = JobLimits {
            quota: request.quota.as_ref(),
            max_stored_per_adapter: self.shared.config.max_stored_examples_per_adapter,
        };
        let admission =
            (self.shared.db).insert_job_within(&job, &request.train, &request.held_out, &limits)?;
        match admission {
            Admission::Stored => {}
            Admission::OwnerAtCap => {
                return Err(TrainingError::TooManyJobs {
                    max: request.quota.map_or(0, |q| q.max_unfinished),
                })
            }
            Admission::AdapterFull { stored } => {
                return Err(adapter_full(
                    "examples",
                    &request.adapter,
                    stored,
                    limits.max_stored_per_adapter,
                ))
            }
        }
        self.queued(&job);
        Ok(job)
    }

    /// Reports a stored job as queued and wakes the worker.
    fn queued(&self, job: &Job) {
        self.shared.event(
            &job.id,
            job::EventLevel::Info,
            job::EventKind::Status,
            &format!(
                "job queued: {} training and {} held-out examples for adapter `{}`",
                job.train_examples, job.held_out_examples, job.spec.adapter
            ),
            serde_json::json!({ "status": "queued" }),
        );
        self.update_job_gauges();
        self.shared.notify();
    }

    /// The job `request` describes, once checked as the trainer would check it.
    fn build_job(&self, request: &NewJob) -> Result<Job, TrainingError> {
        let adapter = &request.adapter;
        adapters::store::validate_name(adapter).map_err(|e| TrainingError::Invalid {
            param: "adapter".into(),
            message: e.to_string(),
        })?;
        let total = request.train.len() + request.held_out.len();
        if total > self.shared.config.max_examples {
            return Err(TrainingError::TooLarge {
                param: "examples".into(),
                message: format!(
                    "{total} examples is more than the {} one job may post (training.max_examples)",
                    self.shared.config.max_examples
                ),
            });
        }
        if request.trainer.max_steps > self.shared.config.max_steps {
            return Err(TrainingError::Invalid {
                param: "hyperparameters.max_steps".into(),
                message: format!(
                    "max_steps must be at most {} (training.max_steps); given {}",
                    self.shared.config.max_steps, request.trainer.max_steps
                ),
            });
        }
        if request.publish_every == Some(0) {
            return Err(TrainingError::Invalid {
                param: "publish_every".into(),
                message: "publish_every must be at least 1 step".into(),
            });
        }
        if let Some(lora) = &request.lora {
            lora.validate_layers(self.shared.adapters.dims().n_layer)
                .map_err(|e| TrainingError::Invalid {
                    param: "lora.layers".into(),
                    message: e.to_string(),
                })?;
        }
        let base = self.shared.adapters.registry().versions(adapter);
        let (base_version, initial) = match base {
            Some((_, live)) => {
                let lora = self.shared.adapters.load_lora(adapter, live).map_err(|e| {
                    TrainingError::Invalid {
                        param: "adapter".into(),
                        message: format!("cannot continue from `{adapter}@{live}`: {e}"),
                    }
                })?;
                if request.lora.as_ref().is_some_and(|l| *l != lora.config) {
                    return Err(TrainingError::Invalid {
                        param: "lora".into(),
                        message: format!(
                            "adapter `{adapter}` exists with another LoRA shape; omit `lora` to continue it, or train a new adapter name"
                        ),
                    });
                }
                (Some(live), lora)
            }
            None => (
                None,
                self.fresh_adapter(request.lora.clone().unwrap_or_default(), 0)?,
            ),
        };
        let lora = initial.config.clone();
        let objective = request
            .objective
            .build()
            .map_err(|e| invalid_hyperparameter(&e))?;
        Trainer::new(
            request.trainer.clone(),
            objective,
            initial,
            request.train.clone(),
            request.held_out.clone(),
        )
        .map_err(|e| invalid_hyperparameter(&e))?;

        Ok(Job {
            id: new_id("ftjob"),
            created_at: unix_now(),
            spec: JobSpec {
                adapter: adapter.clone(),
                objective: request.objective.clone(),
                init_seed: request.trainer.seed,
                trainer: request.trainer.clone(),
                base_version,
                lora,
                publish_every: request.publish_every,
                publish_only_if_improved: request.publish_only_if_improved,
                origin: request.origin.clone(),
            },
            status: JobStatus::Queued,
            started_at: None,
            finished_at: None,
            error: None,
            progress: Progress::default(),
            train_examples: request.train.len(),
            held_out_examples: request.held_out.len(),
        })
    }

    fn fresh_adapter(&self, lora: LoraConfig, seed: u64) -> Result<LoraAdapter, TrainingError> {
        LoraAdapter::new_initialized(lora, self.shared.adapters.dims(), seed).map_err(|e| {
            TrainingError::Invalid {
                param: "lora".into(),
                message: e.to_string(),
            }
        })
    }

    pub fn job(&self, id: &str) -> Result<Job, TrainingError> {
        self.shared
            .db
            .job(id)?
            .ok_or_else(|| TrainingError::not_found("job", id))
    }

    pub fn list_jobs(&self, after: Option<&str>, limit: usize) -> Result<Vec<Job>, TrainingError> {
        if let Some(after) = after {
            self.job(after)?;
        }
        Ok(self.shared.db.list_jobs(after, limit)?)
    }

    /// Cancels a queued or running job (a running one stops after its current step; nothing
    /// more is published). Cancelling a finished job is a conflict.
    pub fn cancel(&self, id: &str) -> Result<Job, TrainingError> {
        let job = self.job(id)?;
        if job.status.is_finished() {
            return Err(TrainingError::Conflict(format!(
                "job `{id}` already ended with status `{}`; only queued or running jobs can be cancelled",
                job.status.as_str()
            )));
        }
        self.shared.cancel_unfinished(&job)?;
        self.update_job_gauges();
        self.job(id)
    }

    /// Events with `seq > after`, oldest first.
    pub fn events(
        &self,
        id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<JobEvent>, TrainingError> {
        self.job(id)?;
        Ok(self.shared.db.events(id, after, limit)?)
    }

    /// A watch on new events: take it before reading [`Self::events`], then wait on it.
    pub fn watch_events(&self) -> EventWatch {
        self.shared.event_notices.watch()
    }

    /// Events with `seq < before` (all when `None`), newest first: OpenAI's order.
    pub fn events_newest_first(
        &self,
        id: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<JobEvent>, TrainingError> {
        self.job(id)?;
        Ok(self.shared.db.events_before(id, before, limit)?)
    }

    /// What the database knows of each version of `adapter` (metrics, the job that made it).
    pub fn versions(&self, adapter: &str) -> Result<Vec<VersionInfo>, TrainingError> {
        Ok(self.shared.db.versions(adapter)?)
    }

    /// Makes `version` of `adapter` live again, and remembers it across restarts.
    pub fn rollback(&self, adapter: &str, version: u32) -> Result<(), TrainingError> {
        self.shared.rollback(adapter, version)
    }

    /// Cancels the adapter's jobs, stops serving it, deletes its folder and history.
    pub fn delete_adapter(&self, adapter: &str) -> Result<(), TrainingError> {
        self.shared.delete_adapter(adapter)
    }

    fn update_job_gauges(&self) {
        self.shared.update_job_gauges();
    }
}

/// The trainer's validation errors as a 400 naming the field.
fn invalid_hyperparameter(err: &plugin::TrainError) -> TrainingError {
    use plugin::TrainError as E;
    let param = match err {
        E::InvalidConfig { field, .. } => format!("hyperparameters.{field}"),
        E::InvalidExample { index, field, .. } => format!("examples[{index}].{field}"),
        E::WrongExampleKind { index, .. } => format!("examples[{index}]"),
        E::InHeldOutSet(inner) => match inner.as_ref() {
            E::InvalidExample { index, field, .. } => format!("eval_examples[{index}].{field}"),
            E::WrongExampleKind { index, .. } => format!("eval_examples[{index}]"),
            _ => "eval_examples".into(),
        },
        _ => "hyperparameters".into(),
    };
    TrainingError::Invalid {
        param,
        message: err.to_string(),
    }
}

impl Shared {
    fn notify(&self) {
        let (count, condvar) = &self.wake;
        *count.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        condvar.notify_all();
    }

    /// Sleeps until notified or `timeout`, whichever comes first.
    fn wait(&self, timeout: Duration) {
        let (count, condvar) = &self.wake;
        let guard = count.lock().unwrap_or_else(PoisonError::into_inner);
        let seen = *guard;
        let _ = condvar
            .wait_timeout_while(guard, timeout, |c| *c == seen)
            .unwrap_or_else(PoisonError::into_inner);
    }

    fn is_shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst) || self.scheduler.is_closed()
    }

    /// The adapter job `spec` starts from: the version of its adapter it continues, or a fresh
    /// adapter of its seed. Its step log replays onto this, when the job resumes and when a
    /// replica rebuilds a version the job published.
    fn initial_adapter(&self, spec: &JobSpec) -> Result<LoraAdapter, String> {
        match spec.base_version {
            Some(version) => self
                .adapters
                .load_lora(&spec.adapter, version)
                .map_err(|e| format!("cannot load `{}@{version}` to continue: {e}", spec.adapter)),
            None => LoraAdapter::new_initialized(
                spec.lora.clone(),
                self.adapters.dims(),
                spec.init_seed,
            )
            .map_err(|e| e.to_string()),
        }
    }

    fn cancel_unfinished(&self, job: &Job) -> Result<(), TrainingError> {
        self.finish(
            &job.id,
            (
                &[JobStatus::Queued, JobStatus::Running],
                JobStatus::Cancelled,
            ),
            false,
            None,
            "job cancelled",
            serde_json::json!({ "status": "cancelled" }),
        )?;
        if let Some(running) = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .filter(|r| r.id == job.id)
        {
            running.cancelled.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Ends job `id` (from one of `from`, to the finished status `to`) together with its status
    /// event, in one transaction, so that an event stream that sees the job finished also finds
    /// the event; whether the job moved (someone else may have ended it first).
    ///
    /// With `held`, only while this server holds the job's lease (the worker ending its job);
    /// without, whoever holds it (a cancel).
    fn finish(
        &self,
        id: &str,
        (from, to): (&[JobStatus], JobStatus),
        held: bool,
        error: Option<&str>,
        message: &str,
        data: serde_json::Value,
    ) -> Result<bool, DbError> {
        let level = if to == JobStatus::Failed {
            job::EventLevel::Error
        } else {
            job::EventLevel::Info
        };
        let moved = self.db.transition_with_event(
            id,
            (from, to, error),
            held.then_some(&self.lease),
            unix_now(),
            (level, job::EventKind::Status, message, &data),
        );
        self.event_notices.notify(id);
        moved
    }

    /// Appends an event; a database failure here is logged, not fatal to the job.
    fn event(
        &self,
        job_id: &str,
        level: job::EventLevel,
        kind: job::EventKind,
        message: &str,
        data: serde_json::Value,
    ) {
        if let Err(err) = self
            .db
            .add_event(job_id, unix_now(), level, kind, message, &data)
        {
            tracing::error!(job = job_id, error = %err, "cannot record a job event");
        }
        // Even after a failed write: a stream that wakes re-reads the job's status too.
        self.event_notices.notify(job_id);
    }

    fn update_job_gauges(&self) {
        match self.db.count_jobs_by_status() {
            Ok(counts) => {
                for status in JobStatus::ALL {
                    let n = counts
                        .iter()
                        .find(|(s, _)| *s == status)
                        .map_or(0, |(_, n)| *n);
                    metrics::gauge!(m::FINETUNE_JOBS, "status" => status.as_str()).set(n as f64);
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot count jobs for /metrics"),
        }
    }
}

/// The answer when an adapter stores as many examples as it may.
fn adapter_full(param: &str, adapter: &str, stored: usize, max: usize) -> TrainingError {
    TrainingError::TooLarge {
        param: param.into(),
        message: format!(
            "the adapter `{adapter}` already stores {stored} examples and may store at most \
             {max} (training.max_stored_examples_per_adapter); train a new adapter, or delete \
             this one (DELETE /v1/adapters/{adapter}) to start it over"
        ),
    }
}
