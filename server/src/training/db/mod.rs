//! The fine-tuning database: one SQLite file (`<data dir>/mezo.sqlite`) holding uploaded files,
//! jobs with their examples, step logs and events, published versions, adapter settings, recent
//! completions and feedback.
//!
//! Everything a client was told is accepted (a job, its examples, a feedback item, a step) is
//! committed before the reply or before the next step, with `synchronous = FULL`, so a
//! `kill -9` loses nothing that was acknowledged. Adapter tensors are not here: each version is
//! a PEFT folder on disk (see `super::publish`).
//!
//! One file per table group: `jobs` (jobs, examples, step logs), `events`, `versions` (versions,
//! live pointers, adapter settings), `files`, `feedback` (remembered completions and feedback);
//! `migrations` holds the schema and its history.

use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use rusqlite::Connection;

mod events;
mod feedback;
mod files;
mod jobs;
mod migrations;
mod versions;

pub use feedback::{FeedbackItem, PendingFeedback, StoredCompletion};
pub use files::StoredFile;
pub use jobs::{Admission, JobLimits};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(
        "the fine-tuning database failed: {0}; check that the data folder is writable and not full"
    )]
    Sqlite(#[from] rusqlite::Error),
    #[error(
        "the fine-tuning database {} is locked by another process (another `mezo serve` on the \
         same data folder?); stop it, or give this server its own --data-dir",
        path.display()
    )]
    Locked { path: std::path::PathBuf },
    #[error("the fine-tuning database holds a malformed {what}: {reason}")]
    Corrupt { what: &'static str, reason: String },
    #[error(
        "the fine-tuning database was written by a newer release (schema version {found}, this \
         release knows up to {known}); run that release, or give this one another data folder"
    )]
    NewerSchema { found: u32, known: u32 },
}

pub type DbResult<T> = Result<T, DbError>;

pub struct Db {
    conn: Mutex<Connection>,
}

/// SQLite's "another connection holds the lock" (after the busy timeout).
fn is_busy(err: &rusqlite::Error) -> bool {
    matches!(
        err.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

fn corrupt(what: &'static str) -> impl Fn(serde_json::Error) -> DbError {
    move |e| DbError::Corrupt {
        what,
        reason: e.to_string(),
    }
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("the database's JSON values always serialize")
}

impl Db {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> DbResult<Self> {
        let conn = Connection::open(path)?;
        Self::init(conn).map_err(|err| match err {
            DbError::Sqlite(e) if is_busy(&e) => DbError::Locked {
                path: path.to_path_buf(),
            },
            other => other,
        })
    }

    /// A database in memory, for tests.
    #[cfg(test)]
    pub fn in_memory() -> DbResult<Self> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> DbResult<Self> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrations::migrate(&mut conn)?;
        // A write lock held elsewhere would otherwise show up only at the first write a client
        // waits for: take it once now, waiting no longer than the busy timeout.
        conn.execute_batch("BEGIN IMMEDIATE; COMMIT;")?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // SQLite keeps its own consistency; a panic while holding the lock leaves no half write.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::training::job::{
        EventKind, EventLevel, Job, JobOrigin, JobSpec, JobStatus, Progress,
    };
    use plugin::{ObjectiveKind, StepRecord, TrainerConfig, TrainingExample};

    fn job(id: &str, adapter: &str) -> Job {
        Job {
            id: id.into(),
            created_at: 1,
            spec: JobSpec {
                adapter: adapter.into(),
                objective: ObjectiveKind::Completion,
                trainer: TrainerConfig::default(),
                base_version: None,
                lora: adapters::LoraConfig::default(),
                init_seed: 7,
                publish_every: Some(10),
                publish_only_if_improved: false,
                origin: JobOrigin::Finetune,
            },
            status: JobStatus::Queued,
            started_at: None,
            finished_at: None,
            error: None,
            progress: Progress::default(),
            train_examples: 1,
            held_out_examples: 1,
        }
    }

    fn example(text: &str) -> TrainingExample {
        TrainingExample::Completion {
            prompt: text.into(),
            completion: "!".into(),
        }
    }

    #[test]
    fn an_owner_gets_no_more_unfinished_jobs_than_its_quota() {
        let db = Db::in_memory().unwrap();
        let quota = |owner: &str, max_unfinished: usize| crate::training::JobQuota {
            owner: owner.into(),
            max_unfinished,
        };
        let insert = |id: &str, quota: &crate::training::JobQuota| {
            let limits = JobLimits {
                quota: Some(quota),
                max_stored_per_adapter: 0,
            };
            db.insert_job_within(&job(id, "x"), &[example("t")], &[], &limits)
                .unwrap()
        };
        assert_eq!(insert("j1", &quota("app", 2)), Admission::Stored);
        assert_eq!(insert("j2", &quota("app", 2)), Admission::Stored);
        assert_eq!(insert("j3", &quota("app", 2)), Admission::OwnerAtCap);
        assert_eq!(db.job("j3").unwrap(), None, "a refused job is not stored");
        assert_eq!(insert("j4", &quota("ops", 2)), Admission::Stored);
        assert_eq!(
            insert("j5", &quota("ops", 0)),
            Admission::Stored,
            "0: no cap"
        );
        assert_eq!(insert("j6", &quota("ops", 0)), Admission::Stored);
        db.insert_job(&job("j7", "x"), &[], &[]).unwrap();
        // A finished job frees its place.
        assert!(db
            .transition("j1", &[JobStatus::Queued], JobStatus::Cancelled, 2, None)
            .unwrap());
        assert_eq!(insert("j3", &quota("app", 2)), Admission::Stored);
        assert_eq!(insert("j8", &quota("app", 2)), Admission::OwnerAtCap);
    }

    #[test]
    fn an_adapter_stores_no_more_examples_than_its_cap() {
        let db = Db::in_memory().unwrap();
        let limits = JobLimits {
            quota: None,
            max_stored_per_adapter: 5,
        };
        let examples = |n: usize| vec![example("t"); n];
        let insert = |id: &str, adapter: &str, train: usize, held_out: usize| {
            db.insert_job_within(
                &job(id, adapter),
                &examples(train),
                &examples(held_out),
                &limits,
            )
            .unwrap()
        };
        assert_eq!(insert("j1", "x", 2, 1), Admission::Stored);
        assert_eq!(
            insert("j2", "x", 2, 1),
            Admission::AdapterFull { stored: 3 }
        );
        assert_eq!(db.job("j2").unwrap(), None);
        assert_eq!(
            insert("j3", "y", 5, 0),
            Admission::Stored,
            "each adapter has its own"
        );
        // Unused feedback counts; a full adapter takes no more.
        let completion = StoredCompletion {
            id: "c".into(),
            adapter: Some("x".into()),
            prompt: "p".into(),
            completion: "a".into(),
        };
        db.insert_completion(&completion, 0, 10).unwrap();
        assert_eq!(
            db.insert_feedback("f1", 0, "c", "x", 1.0, None, 5).unwrap(),
            Some(1)
        );
        assert_eq!(
            db.insert_feedback("f2", 0, "c", "x", 1.0, None, 5).unwrap(),
            Some(2)
        );
        assert_eq!(
            db.insert_feedback("f3", 0, "c", "x", 1.0, None, 5).unwrap(),
            None
        );
        assert_eq!(
            insert("j4", "x", 1, 0),
            Admission::AdapterFull { stored: 5 }
        );
        assert_eq!(insert("j5", "x", 0, 0), Admission::Stored, "0 more fits");
        // Deleting the adapter frees its examples (its jobs stay, for their history).
        db.delete_adapter("x").unwrap();
        assert!(db.job("j1").unwrap().is_some());
        assert_eq!(insert("j6", "x", 5, 0), Admission::Stored);
    }

    #[test]
    fn jobs_examples_and_steps_round_trip() {
        let db = Db::in_memory().unwrap();
        let a = job("ftjob-a", "x");
        db.insert_job(&a, &[example("t")], &[example("h")]).unwrap();
        assert_eq!(db.job("ftjob-a").unwrap().unwrap(), a);
        assert_eq!(db.job("nope").unwrap(), None);
        assert_eq!(
            db.examples("ftjob-a").unwrap(),
            (vec![example("t")], vec![example("h")])
        );
        let record = StepRecord {
            step: 0,
            seeds: vec![u64::MAX - 3],
            projected_grads: vec![0.1 + f32::EPSILON],
            lr: 1e-3,
            weight_decay: 0.0,
            loss_plus: 1.25,
            loss_minus: 1.5,
            estimator: plugin::Estimator::Fzoo,
            optimizer: plugin::Optimizer::Momentum { beta: 0.9 },
            trained_tensors: plugin::TrainedTensors::LoraB,
        };
        db.record_step("ftjob-a", &record, &Progress::default())
            .unwrap();
        assert_eq!(db.step_log("ftjob-a").unwrap(), vec![record]);
    }

    #[test]
    fn a_database_of_the_previous_release_opens_and_its_jobs_resume_as_they_ran() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("mezo.sqlite");
        // What the release before schema versions left: the first migration's tables (no job
        // owners), user_version 0, and job specs without `estimator` (they all ran with central
        // differences).
        let db = Db::open(&path).unwrap();
        db.insert_job(&job("ftjob-old", "x"), &[example("t")], &[])
            .unwrap();
        {
            let conn = db.conn();
            conn.execute(
                "UPDATE jobs SET spec = json_remove(spec, '$.trainer.estimator')",
                [],
            )
            .unwrap();
            conn.execute("ALTER TABLE jobs DROP COLUMN owner", [])
                .unwrap();
            conn.pragma_update(None, "user_version", 0).unwrap();
        }
        drop(db);
        let reopened = Db::open(&path).unwrap();
        let old = reopened.job("ftjob-old").unwrap().unwrap();
        assert_eq!(old.spec.trainer.estimator, plugin::Estimator::Central);
        // Without the migration the spec would read the current default.
        assert_eq!(TrainerConfig::default().estimator, plugin::Estimator::Fzoo);
        assert_eq!(reopened.examples("ftjob-old").unwrap().0, [example("t")]);
        let version: u32 = reopened
            .conn()
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, migrations::CURRENT_VERSION);
    }

    #[test]
    fn a_finished_status_and_its_event_are_written_together() {
        use crate::training::job::{EventKind, EventLevel};
        let db = Db::in_memory().unwrap();
        db.insert_job(&job("j1", "x"), &[], &[]).unwrap();
        let event = (
            EventLevel::Info,
            EventKind::Status,
            "job cancelled",
            &serde_json::json!({ "status": "cancelled" }),
        );
        let cancel = (&[JobStatus::Queued][..], JobStatus::Cancelled, None);
        assert!(db.transition_with_event("j1", cancel, 7, event).unwrap());
        assert_eq!(db.job("j1").unwrap().unwrap().status, JobStatus::Cancelled);
        let events = db.events("j1", 0, 10).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].message, "job cancelled");
        // A job that is not in `from` does not move, and gets no event.
        assert!(!db.transition_with_event("j1", cancel, 8, event).unwrap());
        assert_eq!(db.events("j1", 0, 10).unwrap().len(), 1);
    }

    #[test]
    fn the_queue_runs_one_job_per_adapter_in_order() {
        let db = Db::in_memory().unwrap();
        for (id, adapter) in [("j1", "x"), ("j2", "x"), ("j3", "y")] {
            db.insert_job(&job(id, adapter), &[], &[]).unwrap();
        }
        assert_eq!(db.next_queued_job().unwrap().unwrap().id, "j1");
        assert!(db
            .transition("j1", &[JobStatus::Queued], JobStatus::Running, 5, None)
            .unwrap());
        // x is busy: y's job is next.
        assert_eq!(db.next_queued_job().unwrap().unwrap().id, "j3");
        assert!(!db
            .transition("j1", &[JobStatus::Queued], JobStatus::Cancelled, 6, None)
            .unwrap());
        assert_eq!(db.requeue_interrupted().unwrap(), 1);
        assert_eq!(db.job("j1").unwrap().unwrap().status, JobStatus::Queued);
        let listed: Vec<String> = db
            .list_jobs(None, 2)
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(listed, ["j3", "j2"]);
        let rest: Vec<String> = db
            .list_jobs(Some("j2"), 10)
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(rest, ["j1"]);
    }

    #[test]
    fn events_page_forwards_and_backwards() {
        let db = Db::in_memory().unwrap();
        for i in 0..5 {
            let data = serde_json::json!({ "step": i });
            let seq = db
                .add_event("j", 0, EventLevel::Info, EventKind::Step, "step", &data)
                .unwrap();
            assert_eq!(seq, i + 1);
        }
        let after_two: Vec<u64> = db
            .events("j", 2, 10)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(after_two, [3, 4, 5]);
        let latest: Vec<u64> = db
            .events_before("j", None, 2)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(latest, [5, 4]);
        let older: Vec<u64> = db
            .events_before("j", Some(4), 10)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(older, [3, 2, 1]);
        assert!(db.events_before("j", Some(1), 10).unwrap().is_empty());
    }

    #[test]
    fn feedback_counts_until_a_job_takes_it() {
        let db = Db::in_memory().unwrap();
        let completion = StoredCompletion {
            id: "chatcmpl-1".into(),
            adapter: Some("x".into()),
            prompt: "p".into(),
            completion: "c".into(),
        };
        db.insert_completion(&completion, 0, 10).unwrap();
        assert_eq!(db.completion("chatcmpl-1").unwrap(), Some(completion));
        assert_eq!(
            db.insert_feedback("fb-1", 0, "chatcmpl-1", "x", 1.0, None, 0)
                .unwrap(),
            Some(1)
        );
        assert_eq!(
            db.insert_feedback("fb-2", 0, "chatcmpl-1", "x", -1.0, Some("better"), 0)
                .unwrap(),
            Some(2)
        );
        let pending = db.pending_feedback("x").unwrap();
        assert_eq!(pending.len(), 2);
        assert_eq!(pending[1].corrected_answer.as_deref(), Some("better"));
        let ids: Vec<String> = pending.iter().map(|p| p.id.clone()).collect();
        db.insert_feedback_job(&job("j", "x"), &[example("p")], &ids)
            .unwrap();
        assert!(db.pending_feedback("x").unwrap().is_empty());
    }

    #[test]
    fn old_completions_are_forgotten() {
        let db = Db::in_memory().unwrap();
        for i in 0..5 {
            let c = StoredCompletion {
                id: format!("c{i}"),
                adapter: None,
                prompt: "p".into(),
                completion: "c".into(),
            };
            db.insert_completion(&c, i, 3).unwrap();
        }
        assert!(db.completion("c1").unwrap().is_none());
        assert!(db.completion("c4").unwrap().is_some());
    }
}
