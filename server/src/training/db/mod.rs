//! The fine-tuning database: uploaded files, jobs with their examples, step logs and events,
//! published versions, adapter settings, recent completions and feedback. It lives in one
//! SQLite file (`<data dir>/mezo.sqlite`, the default) or in a PostgreSQL database
//! (`--database postgres://…`); both run the same statements (`sql`), through one
//! `Backend` each (`sqlite`, `postgres`).
//!
//! Everything a client was told is accepted (a job, its examples, a feedback item, a step) is
//! committed before the reply or before the next step (SQLite with `synchronous = FULL`), so a
//! `kill -9` loses nothing that was acknowledged. Each adapter version is a PEFT folder on
//! disk; PostgreSQL also keeps its files, so that any server sharing the database can serve it,
//! and SQLite, which has one server, keeps their digest.
//!
//! One file per table group: `jobs` (jobs, examples, step logs), `events`, `versions` (versions,
//! live pointers, adapter settings), `files`, `feedback` (remembered completions and feedback).
//! Each backend keeps its schema and its history (`sqlite_migrations`, `postgres`).

use std::path::{Path, PathBuf};

mod copy;
mod events;
mod feedback;
mod files;
mod jobs;
mod location;
mod postgres;
pub(crate) mod sql;
mod sqlite;
mod sqlite_migrations;
mod versions;

#[cfg(test)]
mod postgres_cluster;

pub use copy::CopyReport;
pub use feedback::{FeedbackItem, PendingFeedback, StoredCompletion};
pub use files::StoredFile;
pub use jobs::{Admission, JobLimits, Lease};
pub use location::DatabaseUrl;
pub use postgres::VersionNotices;
pub use versions::{sha256_hex, JobPublish, NewVersion, VersionHead};

use sql::SqlConnection;

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
    Locked { path: PathBuf },
    #[error("the fine-tuning database {url} failed: {source}{}", postgres_hint(.source))]
    Postgres {
        /// The URL with its password hidden.
        url: String,
        #[source]
        source: ::postgres::Error,
    },
    #[error(
        "the database to copy into already holds {rows} rows; copy into an empty one (a new \
         PostgreSQL database, or a SQLite path that does not exist yet)"
    )]
    TargetNotEmpty { rows: u64 },
    #[error("the fine-tuning database holds a malformed {what}: {reason}")]
    Corrupt { what: &'static str, reason: String },
    #[error(
        "the fine-tuning database was written by a newer release (schema version {found}, this \
         release knows up to {known}); run that release, or give this one another data folder"
    )]
    NewerSchema { found: u32, known: u32 },
    #[error(
        "`{given}` is not a database URL this server knows: use `sqlite:<path>` (a file, created \
         if missing) or `postgres://user:password@host:port/database`"
    )]
    UnknownScheme { given: String },
}

pub type DbResult<T> = Result<T, DbError>;

impl DbError {
    /// The database cannot be reached now (a lost connection, a server that is down), as
    /// opposed to one that refused what was asked: the request may be sent again later.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, DbError::Postgres { source, .. } if connection_lost(source))
    }
}

/// Whether a PostgreSQL error is the connection's, not a refused statement's. SQLSTATE
/// classes 08 (connection exception) and 57 (operator intervention: the server shutting down)
/// come from the server but say the same.
fn connection_lost(source: &::postgres::Error) -> bool {
    source.as_db_error().is_none_or(|e| {
        let code = e.code().code();
        code.starts_with("08") || code.starts_with("57")
    })
}

/// What to check after a PostgreSQL error that is the connection's.
fn postgres_hint(source: &::postgres::Error) -> &'static str {
    if connection_lost(source) {
        "; check that PostgreSQL is running and reachable from this host, and the URL's user \
         and password"
    } else {
        ""
    }
}

/// A database that runs the storage code's statements.
trait Backend: Send + Sync {
    /// Runs `work` in one transaction: committed when it returns `Ok`, rolled back otherwise.
    fn transaction(
        &self,
        work: &mut (dyn FnMut(&mut dyn SqlConnection) -> DbResult<()> + Send),
    ) -> DbResult<()>;

    /// A listener for changes other servers sharing the database make to adapter versions;
    /// `None` where no other server can share it (SQLite).
    fn version_notices(&self) -> Option<VersionNotices> {
        None
    }
}

pub struct Db {
    backend: Box<dyn Backend>,
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
    /// Opens (creating if needed) the database at `url`, bringing its schema up to date.
    pub fn open(url: &DatabaseUrl) -> DbResult<Self> {
        let backend: Box<dyn Backend> = match url {
            DatabaseUrl::Sqlite(path) => Box::new(sqlite::SqliteBackend::open(path)?),
            DatabaseUrl::Postgres(url) => Box::new(postgres::PostgresBackend::connect(url)?),
        };
        Ok(Self { backend })
    }

    /// Opens (creating if needed) the SQLite database at `path`.
    pub fn open_sqlite(path: &Path) -> DbResult<Self> {
        Self::open(&DatabaseUrl::Sqlite(path.to_path_buf()))
    }

    /// A SQLite database in memory, for tests.
    #[cfg(test)]
    pub fn in_memory() -> DbResult<Self> {
        Ok(Self {
            backend: Box::new(sqlite::SqliteBackend::in_memory()?),
        })
    }

    /// A listener for the adapter versions other servers publish, roll back or delete;
    /// `None` when no other server can share this database (SQLite).
    pub fn version_notices(&self) -> Option<VersionNotices> {
        self.backend.version_notices()
    }

    /// Whether other servers may share this database (PostgreSQL): then a job can be running
    /// on another server, and nothing that is running may be taken back at start.
    pub fn is_shared(&self) -> bool {
        self.version_notices().is_some()
    }

    /// Runs `work` in one transaction; its result once committed.
    fn transaction<R: Send>(
        &self,
        work: impl FnOnce(&mut dyn SqlConnection) -> DbResult<R> + Send,
    ) -> DbResult<R> {
        let mut work = Some(work);
        let mut result = None;
        self.backend.transaction(&mut |conn| {
            let work = work
                .take()
                .expect("a backend runs a transaction's work once");
            result = Some(work(conn)?);
            Ok(())
        })?;
        Ok(result.expect("a committed transaction has run its work"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::training::job::{
        EventKind, EventLevel, Job, JobOrigin, JobSpec, JobStatus, Progress, VersionInfo,
    };
    use adapters::peft::PeftFiles;
    use plugin::{ObjectiveKind, StepRecord, TrainerConfig, TrainingExample};

    /// The storage suite: every case runs on SQLite (one test each, in memory) and on a
    /// throwaway PostgreSQL server (one test, a fresh database per case).
    macro_rules! storage_suite {
        ($($case:ident),* $(,)?) => {
            mod on_sqlite {
                $(
                    #[test]
                    fn $case() {
                        super::$case(&super::Db::in_memory().unwrap());
                    }
                )*
            }

            #[test]
            fn the_storage_suite_passes_on_postgresql() {
                let cluster = super::postgres_cluster::PostgresCluster::start();
                $(
                    let url = cluster.create_database(stringify!($case));
                    let db = Db::open(&DatabaseUrl::Postgres(url)).unwrap();
                    $case(&db);
                )*
            }
        };
    }

    storage_suite!(
        an_owner_gets_no_more_unfinished_jobs_than_its_quota,
        an_adapter_stores_no_more_examples_than_its_cap,
        jobs_examples_and_steps_round_trip,
        many_examples_keep_their_order_and_their_split,
        a_finished_status_and_its_event_are_written_together,
        the_queue_runs_one_job_per_adapter_in_order,
        a_job_whose_lease_lapses_is_taken_over_before_queued_ones,
        published_versions_are_numbered_in_turn_and_keep_their_files,
        events_page_forwards_and_backwards,
        feedback_counts_until_a_job_takes_it,
        old_completions_are_forgotten
    );

    #[test]
    fn postgresql_lost_is_unavailable_then_reconnected() {
        let cluster = postgres_cluster::PostgresCluster::start();
        let url = DatabaseUrl::Postgres(cluster.create_database("lost"));
        let db = Db::open(&url).unwrap();
        db.insert_job(&job("j1", "x"), &[example("t")], &[])
            .unwrap();

        cluster.stop();
        let lost = db.job("j1").unwrap_err();
        assert!(lost.is_unavailable(), "{lost}");
        assert!(
            lost.to_string()
                .contains("check that PostgreSQL is running"),
            "{lost}"
        );
        cluster.start_server();
        let job = db.job("j1").unwrap().expect("committed before the loss");
        assert_eq!(job.id, "j1");
        assert_eq!(db.examples("j1").unwrap().0, [example("t")]);
    }

    #[test]
    fn an_unreachable_postgresql_is_named_without_its_password() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("postgres://mezo:hunter2@127.0.0.1:{port}/mezo");
        let err = Db::open(&DatabaseUrl::Postgres(url))
            .err()
            .expect("nothing listens there");
        let text = err.to_string();
        assert!(
            text.contains(&format!("postgres://mezo:***@127.0.0.1:{port}/mezo")),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
        assert!(err.is_unavailable(), "{text}");
    }

    /// A database with a row in every table: two jobs (one from feedback) with examples,
    /// steps and events, two versions and a rollback, a continuous-training setting, a file,
    /// completions and feedback.
    fn fill(db: &Db) {
        db.insert_job(
            &job("ftjob-1", "x"),
            &[example("t1"), example("t2")],
            &[example("h")],
        )
        .unwrap();
        let record = StepRecord {
            step: 0,
            seeds: vec![u64::MAX - 1],
            projected_grads: vec![0.25],
            lr: 1e-3,
            weight_decay: 0.0,
            loss_plus: 1.0,
            loss_minus: 2.0,
            estimator: plugin::Estimator::Fzoo,
            optimizer: plugin::Optimizer::Sgd,
            trained_tensors: plugin::TrainedTensors::LoraB,
        };
        let lease = lease("a");
        assert_eq!(
            db.claim_next_job(&lease, 1_000).unwrap().unwrap().id,
            "ftjob-1"
        );
        assert!(db
            .record_step("ftjob-1", &record, &Progress::default(), &lease, 2_000)
            .unwrap());
        let data = serde_json::json!({ "step": 0 });
        db.add_event(
            "ftjob-1",
            3,
            EventLevel::Info,
            EventKind::Step,
            "step",
            &data,
        )
        .unwrap();
        for version in [1, 2] {
            let info = VersionInfo {
                version,
                created_at: 10 + u64::from(version),
                job_id: Some("ftjob-1".into()),
                step: Some(u64::from(version)),
                held_out: None,
            };
            db.insert_version("x", &info).unwrap();
        }
        db.set_live_version("x", 1).unwrap();
        db.set_continuous("x", Some((2, 5))).unwrap();
        let file = StoredFile {
            id: "file-1".into(),
            created_at: 4,
            filename: "train.jsonl".into(),
            purpose: "fine-tune".into(),
            bytes: 3,
        };
        db.insert_file(&file, &[0, 159, 255]).unwrap();
        for i in 0..3 {
            let completion = StoredCompletion {
                id: format!("c{i}"),
                adapter: (i > 0).then(|| "x".to_string()),
                prompt: format!("p{i}"),
                completion: "a".into(),
            };
            db.insert_completion(&completion, i, 10).unwrap();
        }
        db.insert_feedback("fb-1", 5, "c1", "x", 1.0, None, 0)
            .unwrap();
        db.insert_feedback("fb-2", 6, "c2", "x", -1.0, Some("better"), 0)
            .unwrap();
        assert!(db
            .insert_feedback_job(&job("ftjob-2", "x"), &[example("p1")], &["fb-1".into()])
            .unwrap());
    }

    /// Everything the storage code reads back, as text.
    fn snapshot(db: &Db) -> String {
        let jobs = db.list_jobs(None, 100).unwrap();
        let mut text = format!("{jobs:?}\n");
        for job in &jobs {
            text += &format!("{:?}\n", db.examples(&job.id).unwrap());
            text += &format!("{:?}\n", db.step_log(&job.id).unwrap());
            text += &format!("{:?}\n", db.events(&job.id, 0, 100).unwrap());
        }
        text += &format!("{:?}\n", db.versions("x").unwrap());
        text += &format!("{:?}\n", db.live_versions().unwrap());
        text += &format!("{:?}\n", db.continuous("x").unwrap());
        text += &format!("{:?}\n", db.list_files().unwrap());
        text += &format!("{:?}\n", db.file_content("file-1").unwrap());
        text += &format!("{:?}\n", db.list_feedback("x", 100).unwrap());
        text += &format!("{:?}\n", db.pending_feedback("x").unwrap());
        for i in 0..3 {
            text += &format!("{:?}\n", db.completion(&format!("c{i}")).unwrap());
        }
        text
    }

    /// SQLite → PostgreSQL → SQLite: everything reads back the same at each end, new rows
    /// number after the copied ones, and a database that holds rows is not copied into.
    #[test]
    fn a_database_copies_into_another_backend_and_back() {
        let folder = tempfile::tempdir().unwrap();
        let sqlite = Db::open_sqlite(&folder.path().join("a.sqlite")).unwrap();
        fill(&sqlite);
        let before = snapshot(&sqlite);

        let cluster = postgres_cluster::PostgresCluster::start();
        let postgres = Db::open(&DatabaseUrl::Postgres(cluster.create_database("copy"))).unwrap();
        let report = sqlite.copy_into(&postgres).unwrap();
        let rows = |table: &str| report.iter().find(|(t, _)| *t == table).unwrap().1;
        assert_eq!(
            (rows("jobs"), rows("examples"), rows("feedback")),
            (2, 4, 2)
        );
        assert_eq!(snapshot(&postgres), before);

        let back = Db::open_sqlite(&folder.path().join("b.sqlite")).unwrap();
        postgres.copy_into(&back).unwrap();
        assert_eq!(snapshot(&back), before);

        let refused = sqlite.copy_into(&postgres).unwrap_err();
        assert!(
            matches!(refused, DbError::TargetNotEmpty { .. }),
            "{refused}"
        );
        // The sequences moved past the copied rows: a new job lists first, new feedback last.
        postgres.insert_job(&job("ftjob-3", "x"), &[], &[]).unwrap();
        assert_eq!(postgres.list_jobs(None, 1).unwrap()[0].id, "ftjob-3");
        postgres
            .insert_feedback("fb-3", 7, "c2", "x", 1.0, None, 0)
            .unwrap();
        let feedback = postgres.list_feedback("x", 100).unwrap();
        assert_eq!(feedback.last().unwrap().id, "fb-3");
    }

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

    fn lease(owner: &str) -> Lease {
        Lease {
            owner: owner.into(),
            duration_ms: 10_000,
        }
    }

    fn example(text: &str) -> TrainingExample {
        TrainingExample::Completion {
            prompt: text.into(),
            completion: "!".into(),
        }
    }

    fn an_owner_gets_no_more_unfinished_jobs_than_its_quota(db: &Db) {
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

    fn an_adapter_stores_no_more_examples_than_its_cap(db: &Db) {
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

    fn jobs_examples_and_steps_round_trip(db: &Db) {
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
        let lease = lease("a");
        // Only the job's lease holder writes its steps.
        assert!(!db
            .record_step("ftjob-a", &record, &Progress::default(), &lease, 0)
            .unwrap());
        assert_eq!(db.claim_next_job(&lease, 0).unwrap().unwrap().id, "ftjob-a");
        assert!(db
            .record_step("ftjob-a", &record, &Progress::default(), &lease, 0)
            .unwrap());
        assert!(!db
            .record_step(
                "ftjob-a",
                &record,
                &Progress::default(),
                &self::lease("b"),
                0
            )
            .unwrap());
        assert_eq!(db.step_log("ftjob-a").unwrap(), vec![record]);
    }

    #[test]
    fn a_database_of_the_previous_release_opens_and_its_jobs_resume_as_they_ran() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("mezo.sqlite");
        // What the release before schema versions left: the first migration's tables (no job
        // owners, leases or version files), user_version 0, and job specs without `estimator` (they all ran with central
        // differences).
        let db = Db::open_sqlite(&path).unwrap();
        db.insert_job(&job("ftjob-old", "x"), &[example("t")], &[])
            .unwrap();
        drop(db);
        {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute(
                "UPDATE jobs SET spec = json_remove(spec, '$.trainer.estimator')",
                [],
            )
            .unwrap();
            for (table, column) in [
                ("jobs", "owner"),
                ("jobs", "lease_owner"),
                ("jobs", "lease_expires_ms"),
                ("versions", "published_ms"),
                ("versions", "config_json"),
                ("versions", "weights"),
                ("versions", "weights_sha256"),
            ] {
                conn.execute(&format!("ALTER TABLE {table} DROP COLUMN {column}"), [])
                    .unwrap();
            }
            conn.pragma_update(None, "user_version", 0).unwrap();
        }
        let reopened = Db::open_sqlite(&path).unwrap();
        let old = reopened.job("ftjob-old").unwrap().unwrap();
        assert_eq!(old.spec.trainer.estimator, plugin::Estimator::Central);
        // Without the migration the spec would read the current default.
        assert_eq!(TrainerConfig::default().estimator, plugin::Estimator::Fzoo);
        assert_eq!(reopened.examples("ftjob-old").unwrap().0, [example("t")]);
        drop(reopened);
        let version: u32 = rusqlite::Connection::open(&path)
            .unwrap()
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, sqlite_migrations::CURRENT_VERSION);
    }

    fn many_examples_keep_their_order_and_their_split(db: &Db) {
        // More than one batched insert's worth, ending mid-batch.
        let train: Vec<_> = (0..300).map(|i| example(&format!("t{i}"))).collect();
        let held_out: Vec<_> = (0..7).map(|i| example(&format!("h{i}"))).collect();
        db.insert_job(&job("big", "x"), &train, &held_out).unwrap();
        assert_eq!(db.examples("big").unwrap(), (train, held_out));
    }

    fn a_finished_status_and_its_event_are_written_together(db: &Db) {
        use crate::training::job::{EventKind, EventLevel};
        db.insert_job(&job("j1", "x"), &[], &[]).unwrap();
        let event = (
            EventLevel::Info,
            EventKind::Status,
            "job cancelled",
            &serde_json::json!({ "status": "cancelled" }),
        );
        let cancel = (&[JobStatus::Queued][..], JobStatus::Cancelled, None);
        assert!(db
            .transition_with_event("j1", cancel, None, 7, event)
            .unwrap());
        assert_eq!(db.job("j1").unwrap().unwrap().status, JobStatus::Cancelled);
        let events = db.events("j1", 0, 10).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].message, "job cancelled");
        // A job that is not in `from` does not move, and gets no event.
        assert!(!db
            .transition_with_event("j1", cancel, None, 8, event)
            .unwrap());
        assert_eq!(db.events("j1", 0, 10).unwrap().len(), 1);

        // A running job is finished only by the server holding its lease.
        db.insert_job(&job("j2", "x"), &[], &[]).unwrap();
        let (a, b) = (lease("a"), lease("b"));
        db.claim_next_job(&a, 0).unwrap().unwrap();
        let succeed = (&[JobStatus::Running][..], JobStatus::Succeeded, None);
        assert!(!db
            .transition_with_event("j2", succeed, Some(&b), 9, event)
            .unwrap());
        assert!(db
            .transition_with_event("j2", succeed, Some(&a), 9, event)
            .unwrap());
        assert_eq!(db.job("j2").unwrap().unwrap().status, JobStatus::Succeeded);
    }

    fn the_queue_runs_one_job_per_adapter_in_order(db: &Db) {
        for (id, adapter) in [("j1", "x"), ("j2", "x"), ("j3", "y")] {
            db.insert_job(&job(id, adapter), &[], &[]).unwrap();
        }
        let (a, b) = (lease("a"), lease("b"));
        let claimed = db.claim_next_job(&a, 0).unwrap().unwrap();
        assert_eq!(
            (claimed.id.as_str(), claimed.status),
            ("j1", JobStatus::Running)
        );
        // x is busy: y's job is next, then nothing while j1's lease lives.
        assert_eq!(db.claim_next_job(&b, 1).unwrap().unwrap().id, "j3");
        assert!(db.claim_next_job(&b, 2).unwrap().is_none());
        assert!(!db
            .transition("j1", &[JobStatus::Queued], JobStatus::Cancelled, 6, None)
            .unwrap());
        assert_eq!(db.requeue_interrupted().unwrap(), 2);
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

    fn a_job_whose_lease_lapses_is_taken_over_before_queued_ones(db: &Db) {
        for (id, adapter) in [("j1", "x"), ("j2", "x"), ("j3", "y")] {
            db.insert_job(&job(id, adapter), &[], &[]).unwrap();
        }
        let (a, b) = (lease("a"), lease("b"));
        assert_eq!(db.claim_next_job(&a, 0).unwrap().unwrap().id, "j1");
        // Renewed at 5 s, a's lease on j1 lives to 15 s.
        assert!(db.renew_lease("j1", &a, 5_000).unwrap());
        assert_eq!(db.claim_next_job(&b, 14_000).unwrap().unwrap().id, "j3");
        assert!(db.claim_next_job(&b, 15_000).unwrap().is_none());
        // a stopped renewing: b resumes j1 ahead of the queued j2, and a's lease is gone.
        let taken = db.claim_next_job(&b, 15_001).unwrap().unwrap();
        assert_eq!(
            (taken.id.as_str(), taken.status),
            ("j1", JobStatus::Running)
        );
        assert!(!db.renew_lease("j1", &a, 15_002).unwrap());
        assert!(!db
            .set_progress("j1", &Progress::default(), &a, 15_002)
            .unwrap());
        assert!(db
            .set_progress("j1", &Progress::default(), &b, 15_002)
            .unwrap());
        // A stopping server hands its lease back: the job is free at once.
        db.release_lease("j1", &b).unwrap();
        assert_eq!(db.claim_next_job(&a, 15_003).unwrap().unwrap().id, "j1");
        assert_eq!(db.job("j2").unwrap().unwrap().status, JobStatus::Queued);
    }

    fn published_versions_are_numbered_in_turn_and_keep_their_files(db: &Db) {
        let files = |byte: u8| PeftFiles {
            config_json: format!("{{\"r\": {byte}}}"),
            weights: vec![byte; 3],
        };
        let (one, two) = (files(1), files(2));
        let new = |files| NewVersion {
            adapter: "x",
            files,
            created_at: 5,
            published_ms: 5_000,
            local_floor: 0,
            made_by: None,
        };
        assert_eq!(db.publish_version(&new(&one)).unwrap(), Some(1));
        // A server that has a folder the database never heard of numbers past it.
        let past_local = NewVersion {
            local_floor: 4,
            ..new(&two)
        };
        assert_eq!(db.publish_version(&past_local).unwrap(), Some(5));
        assert_eq!(db.live_versions().unwrap(), [("x".to_string(), 5)]);
        // Kept where replicas may need them: in a database that servers share.
        let kept = |files: &PeftFiles| db.is_shared().then(|| files.clone());
        assert_eq!(db.version_files("x", 1).unwrap(), kept(&one));
        assert_eq!(db.version_files("x", 5).unwrap(), kept(&two));
        assert_eq!(db.version_files("x", 2).unwrap(), None);
        let heads = db.version_heads().unwrap();
        assert_eq!(heads.len(), 2);
        assert_eq!(heads[1].version, 5);
        assert_eq!(heads[1].published_ms, Some(5_000));
        assert_eq!(heads[1].weights_sha256, Some(sha256_hex(&two.weights)));

        // A job publishes only while it holds its lease.
        db.insert_job(&job("j1", "x"), &[], &[]).unwrap();
        let (a, b) = (lease("a"), lease("b"));
        db.claim_next_job(&a, 0).unwrap().unwrap();
        let progress = Progress {
            steps_done: 3,
            ..Progress::default()
        };
        let by_job = |lease| NewVersion {
            made_by: Some(JobPublish {
                job_id: "j1",
                step: 3,
                held_out: None,
                lease,
                progress: &progress,
            }),
            ..new(&two)
        };
        assert_eq!(db.publish_version(&by_job(&b)).unwrap(), None);
        assert_eq!(db.publish_version(&by_job(&a)).unwrap(), Some(6));
        let head = db.version_heads().unwrap().pop().unwrap();
        assert_eq!((head.job_id.as_deref(), head.step), (Some("j1"), Some(3)));
        // The job's progress names the version, written in the same transaction.
        let stored = db.job("j1").unwrap().unwrap().progress;
        assert_eq!((stored.steps_done, stored.published_versions), (3, vec![6]));

        // A version whose folder could not be written is taken back; 5 is live again.
        db.withdraw_version("x", 6, Some(5), Some(("j1", &progress)))
            .unwrap();
        assert_eq!(db.live_versions().unwrap(), [("x".to_string(), 5)]);
        assert_eq!(db.version_heads().unwrap().len(), 2);
        let stored = db.job("j1").unwrap().unwrap().progress;
        assert!(stored.published_versions.is_empty());
    }

    fn events_page_forwards_and_backwards(db: &Db) {
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

    fn feedback_counts_until_a_job_takes_it(db: &Db) {
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
        assert!(db
            .insert_feedback_job(&job("j", "x"), &[example("p")], &ids)
            .unwrap());
        assert!(db.pending_feedback("x").unwrap().is_empty());
        // Another server's job on the same items, decided a moment earlier, stores nothing.
        assert!(!db
            .insert_feedback_job(&job("j2", "x"), &[example("p")], &ids)
            .unwrap());
        assert_eq!(db.job("j2").unwrap(), None);
        assert_eq!(db.unfinished_jobs_of("x").unwrap().len(), 1);
    }

    fn old_completions_are_forgotten(db: &Db) {
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
