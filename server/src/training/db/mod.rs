//! The fine-tuning database: one SQLite file (`<data dir>/mezo.sqlite`) holding uploaded files,
//! jobs with their examples, step logs and events, published versions, adapter settings, recent
//! completions and feedback.
//!
//! Everything a client was told is accepted (a job, its examples, a feedback item, a step) is
//! committed before the reply or before the next step, with `synchronous = FULL`, so a
//! `kill -9` loses nothing that was acknowledged. Adapter tensors are not here: each version is
//! a PEFT folder on disk (see `super::publish`).

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use plugin::{StepRecord, TrainingExample};
use rusqlite::{params, Connection, OptionalExtension};

mod migrations;

use super::job::{
    EventKind, EventLevel, HeldOutPoint, Job, JobEvent, JobSpec, JobStatus, Progress, VersionInfo,
};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(
        "the fine-tuning database failed: {0}; check that the data folder is writable and not full"
    )]
    Sqlite(#[from] rusqlite::Error),
    #[error("the fine-tuning database holds a malformed {what}: {reason}")]
    Corrupt { what: &'static str, reason: String },
    #[error(
        "the fine-tuning database was written by a newer release (schema version {found}, this \
         release knows up to {known}); run that release, or give this one another data folder"
    )]
    NewerSchema { found: u32, known: u32 },
}

pub type DbResult<T> = Result<T, DbError>;

/// An uploaded file's metadata (`content` is read separately).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredFile {
    pub id: String,
    pub created_at: u64,
    pub filename: String,
    pub purpose: String,
    pub bytes: u64,
}

/// A completion the server gave, kept so that feedback on it can become a training example.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredCompletion {
    pub id: String,
    /// The adapter that answered; `None`: the base model.
    pub adapter: Option<String>,
    /// The prompt as the model saw it (chat template applied).
    pub prompt: String,
    pub completion: String,
}

/// A stored feedback item.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedbackItem {
    pub id: String,
    pub created_at: u64,
    pub completion_id: String,
    pub adapter: String,
    pub reward: f32,
    pub corrected_answer: Option<String>,
    /// The job that trained on it, once one did.
    pub job_id: Option<String>,
}

/// A feedback item not yet used by a job.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingFeedback {
    pub id: String,
    pub prompt: String,
    pub completion: String,
    pub reward: f32,
    pub corrected_answer: Option<String>,
}

pub struct Db {
    conn: Mutex<Connection>,
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
        Self::init(conn)
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
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // SQLite keeps its own consistency; a panic while holding the lock leaves no half write.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    // ---- jobs ----

    /// Stores a new job and its examples in one transaction.
    pub fn insert_job(
        &self,
        job: &Job,
        train: &[TrainingExample],
        held_out: &[TrainingExample],
    ) -> DbResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO jobs (id, created_at, adapter, spec, status, progress, train_examples, held_out_examples)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                job.id,
                job.created_at,
                job.spec.adapter,
                json(&job.spec),
                job.status.as_str(),
                json(&job.progress),
                train.len(),
                held_out.len()
            ],
        )?;
        {
            let mut insert = tx.prepare(
                "INSERT INTO examples (job_id, held_out, idx, body) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (held, examples) in [(false, train), (true, held_out)] {
                for (idx, example) in examples.iter().enumerate() {
                    insert.execute(params![job.id, held, idx, json(example)])?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn job(&self, id: &str) -> DbResult<Option<Job>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("{JOB_COLUMNS} WHERE id = ?1"))?;
        let row = stmt.query_row(params![id], job_row).optional()?;
        row.map(JobRow::into_job).transpose()
    }

    /// Jobs in creation order, newest first: up to `limit` created before job `after` (by id).
    pub fn list_jobs(&self, after: Option<&str>, limit: usize) -> DbResult<Vec<Job>> {
        let conn = self.conn();
        let rows: Vec<JobRow> = match after {
            Some(after) => {
                let mut stmt = conn.prepare(&format!(
                    "{JOB_COLUMNS} WHERE seq < (SELECT seq FROM jobs WHERE id = ?1) ORDER BY seq DESC LIMIT ?2"
                ))?;
                let rows = stmt.query_map(params![after, limit], job_row)?;
                rows.collect::<Result<_, _>>()?
            }
            None => {
                let mut stmt =
                    conn.prepare(&format!("{JOB_COLUMNS} ORDER BY seq DESC LIMIT ?1"))?;
                let rows = stmt.query_map(params![limit], job_row)?;
                rows.collect::<Result<_, _>>()?
            }
        };
        rows.into_iter().map(JobRow::into_job).collect()
    }

    /// The oldest queued job whose adapter has no running job.
    pub fn next_queued_job(&self) -> DbResult<Option<Job>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "{JOB_COLUMNS} WHERE status = 'queued' AND adapter NOT IN
               (SELECT adapter FROM jobs WHERE status = 'running') ORDER BY seq LIMIT 1"
        ))?;
        let row = stmt.query_row([], job_row).optional()?;
        row.map(JobRow::into_job).transpose()
    }

    /// Jobs of `adapter` that are queued or running.
    pub fn unfinished_jobs_of(&self, adapter: &str) -> DbResult<Vec<Job>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "{JOB_COLUMNS} WHERE adapter = ?1 AND status IN ('queued', 'running') ORDER BY seq"
        ))?;
        let rows = stmt.query_map(params![adapter], job_row)?;
        let rows: Vec<JobRow> = rows.collect::<Result<_, _>>()?;
        rows.into_iter().map(JobRow::into_job).collect()
    }

    /// Moves a job from `from` to `to`; false if it was not in `from` (someone else moved it).
    pub fn transition(
        &self,
        id: &str,
        from: &[JobStatus],
        to: JobStatus,
        now: u64,
        error: Option<&str>,
    ) -> DbResult<bool> {
        let conn = self.conn();
        let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
        let placeholders = from.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>();
        let started = (to == JobStatus::Running).then_some(now);
        let finished = to.is_finished().then_some(now);
        let changed = conn.execute(
            &format!(
                "UPDATE jobs SET status = ?2,
                   started_at = COALESCE(started_at, ?3),
                   finished_at = ?4,
                   error = ?5
                 WHERE id = ?1 AND status IN ({})",
                placeholders.join(", ")
            ),
            params![id, to.as_str(), started, finished, error],
        )?;
        Ok(changed == 1)
    }

    /// At start-up: jobs that were running when the server stopped go back to the queue (they
    /// resume from their step logs). Returns how many.
    pub fn requeue_interrupted(&self) -> DbResult<usize> {
        Ok(self.conn().execute(
            "UPDATE jobs SET status = 'queued' WHERE status = 'running'",
            [],
        )?)
    }

    pub fn count_jobs_by_status(&self) -> DbResult<Vec<(JobStatus, u64)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT status, COUNT(*) FROM jobs GROUP BY status")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))?;
        let mut counts = Vec::new();
        for row in rows {
            let (status, n) = row?;
            if let Some(status) = JobStatus::parse(&status) {
                counts.push((status, n));
            }
        }
        Ok(counts)
    }

    pub fn set_spec(&self, id: &str, spec: &JobSpec) -> DbResult<()> {
        self.conn().execute(
            "UPDATE jobs SET spec = ?2 WHERE id = ?1",
            params![id, json(spec)],
        )?;
        Ok(())
    }

    pub fn set_progress(&self, id: &str, progress: &Progress) -> DbResult<()> {
        self.conn().execute(
            "UPDATE jobs SET progress = ?2 WHERE id = ?1",
            params![id, json(progress)],
        )?;
        Ok(())
    }

    /// A job's training and held-out examples, in their posted order.
    pub fn examples(&self, id: &str) -> DbResult<(Vec<TrainingExample>, Vec<TrainingExample>)> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT held_out, body FROM examples WHERE job_id = ?1 ORDER BY held_out, idx",
        )?;
        let rows = stmt.query_map(params![id], |r| {
            Ok((r.get::<_, bool>(0)?, r.get::<_, String>(1)?))
        })?;
        let (mut train, mut held_out) = (Vec::new(), Vec::new());
        for row in rows {
            let (held, body) = row?;
            let example: TrainingExample =
                serde_json::from_str(&body).map_err(corrupt("example"))?;
            if held {
                held_out.push(example);
            } else {
                train.push(example);
            }
        }
        Ok((train, held_out))
    }

    /// Appends a step record and the job's progress in one transaction.
    pub fn record_step(&self, id: &str, record: &StepRecord, progress: &Progress) -> DbResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO steps (job_id, step, record) VALUES (?1, ?2, ?3)",
            params![id, record.step, json(record)],
        )?;
        tx.execute(
            "UPDATE jobs SET progress = ?2 WHERE id = ?1",
            params![id, json(progress)],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The job's step log, in step order.
    pub fn step_log(&self, id: &str) -> DbResult<Vec<StepRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT record FROM steps WHERE job_id = ?1 ORDER BY step")?;
        let rows = stmt.query_map(params![id], |r| r.get::<_, String>(0))?;
        rows.map(|row| serde_json::from_str(&row?).map_err(corrupt("step record")))
            .collect()
    }

    // ---- events ----

    pub fn add_event(
        &self,
        job_id: &str,
        now: u64,
        level: EventLevel,
        kind: EventKind,
        message: &str,
        data: &serde_json::Value,
    ) -> DbResult<u64> {
        let conn = self.conn();
        let seq: u64 = conn.query_row(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job_id = ?1",
            params![job_id],
            |r| r.get(0),
        )?;
        conn.execute(
            "INSERT INTO events (job_id, seq, created_at, level, kind, message, data)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                job_id,
                seq,
                now,
                level.as_str(),
                kind.as_str(),
                message,
                data.to_string()
            ],
        )?;
        Ok(seq)
    }

    /// Events with `seq > after`, oldest first, at most `limit`.
    pub fn events(&self, job_id: &str, after: u64, limit: usize) -> DbResult<Vec<JobEvent>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT seq, created_at, level, kind, message, data FROM events
             WHERE job_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![job_id, after, limit], |r| {
            Ok((
                r.get::<_, u64>(0)?,
                r.get::<_, u64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
            ))
        })?;
        let mut events = Vec::new();
        for row in rows {
            let (seq, created_at, level, kind, message, data) = row?;
            events.push(JobEvent {
                seq,
                created_at,
                level: EventLevel::parse(&level),
                kind: EventKind::parse(&kind).ok_or(DbError::Corrupt {
                    what: "event",
                    reason: format!("unknown kind `{kind}`"),
                })?,
                message,
                data: serde_json::from_str(&data).map_err(corrupt("event data"))?,
            });
        }
        Ok(events)
    }

    /// Events with `seq < before` (every event when `None`), newest first, at most `limit`.
    pub fn events_before(
        &self,
        job_id: &str,
        before: Option<u64>,
        limit: usize,
    ) -> DbResult<Vec<JobEvent>> {
        let conn = self.conn();
        let before = before.unwrap_or(u64::MAX).min(i64::MAX as u64);
        let first: Option<u64> = conn.query_row(
            "SELECT MIN(seq) FROM (SELECT seq FROM events WHERE job_id = ?1 AND seq < ?2
               ORDER BY seq DESC LIMIT ?3)",
            params![job_id, before, limit],
            |r| r.get(0),
        )?;
        drop(conn);
        let Some(first) = first else {
            return Ok(Vec::new());
        };
        let mut events = self.events(job_id, first - 1, limit)?;
        events.retain(|e| e.seq < before);
        events.reverse();
        Ok(events)
    }

    // ---- versions and adapters ----

    pub fn insert_version(&self, adapter: &str, info: &VersionInfo) -> DbResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO versions (adapter, version, created_at, job_id, step, held_out)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                adapter,
                info.version,
                info.created_at,
                info.job_id,
                info.step,
                info.held_out.as_ref().map(json)
            ],
        )?;
        // A new version is live (a rollback made earlier is superseded).
        tx.execute(
            "INSERT INTO adapters (name, live_version) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET live_version = ?2",
            params![adapter, info.version],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// What the database knows of `adapter`'s versions, by version.
    pub fn versions(&self, adapter: &str) -> DbResult<Vec<VersionInfo>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT version, created_at, job_id, step, held_out FROM versions
             WHERE adapter = ?1 ORDER BY version",
        )?;
        let rows = stmt.query_map(params![adapter], |r| {
            Ok((
                r.get::<_, u32>(0)?,
                r.get::<_, u64>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<u64>>(3)?,
                r.get::<_, Option<String>>(4)?,
            ))
        })?;
        let mut versions = Vec::new();
        for row in rows {
            let (version, created_at, job_id, step, held_out) = row?;
            let held_out: Option<HeldOutPoint> = held_out
                .map(|h| serde_json::from_str(&h))
                .transpose()
                .map_err(corrupt("version metrics"))?;
            versions.push(VersionInfo {
                version,
                created_at,
                job_id,
                step,
                held_out,
            });
        }
        Ok(versions)
    }

    /// Every (adapter, version) this server has published.
    pub fn published_versions(&self) -> DbResult<HashSet<(String, u32)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT adapter, version FROM versions")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn set_live_version(&self, adapter: &str, version: u32) -> DbResult<()> {
        self.conn().execute(
            "INSERT INTO adapters (name, live_version) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET live_version = ?2",
            params![adapter, version],
        )?;
        Ok(())
    }

    /// Live versions chosen by rollbacks or publishes, by adapter.
    pub fn live_versions(&self) -> DbResult<Vec<(String, u32)>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT name, live_version FROM adapters WHERE live_version IS NOT NULL")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Sets (or, with `None`, stops) continuous training of `adapter` on its feedback.
    pub fn set_continuous(&self, adapter: &str, every: Option<(u32, u64)>) -> DbResult<()> {
        self.conn().execute(
            "INSERT INTO adapters (name, feedback_every, feedback_steps) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET feedback_every = ?2, feedback_steps = ?3",
            params![adapter, every.map(|e| e.0), every.map(|e| e.1)],
        )?;
        Ok(())
    }

    /// `(feedback items per job, steps per job)` when `adapter` trains on its feedback.
    pub fn continuous(&self, adapter: &str) -> DbResult<Option<(u32, u64)>> {
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT feedback_every, feedback_steps FROM adapters WHERE name = ?1",
                params![adapter],
                |r| Ok((r.get::<_, Option<u32>>(0)?, r.get::<_, Option<u64>>(1)?)),
            )
            .optional()?;
        Ok(match row {
            Some((Some(every), Some(steps))) => Some((every, steps)),
            _ => None,
        })
    }

    /// Forgets an adapter: its versions, settings and feedback. Jobs stay, for their history.
    pub fn delete_adapter(&self, adapter: &str) -> DbResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM versions WHERE adapter = ?1", params![adapter])?;
        tx.execute("DELETE FROM adapters WHERE name = ?1", params![adapter])?;
        tx.execute("DELETE FROM feedback WHERE adapter = ?1", params![adapter])?;
        tx.commit()?;
        Ok(())
    }

    // ---- files ----

    pub fn insert_file(&self, file: &StoredFile, content: &[u8]) -> DbResult<()> {
        self.conn().execute(
            "INSERT INTO files (id, created_at, filename, purpose, bytes, content)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                file.id,
                file.created_at,
                file.filename,
                file.purpose,
                file.bytes,
                content
            ],
        )?;
        Ok(())
    }

    pub fn file(&self, id: &str) -> DbResult<Option<StoredFile>> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                "SELECT id, created_at, filename, purpose, bytes FROM files WHERE id = ?1",
                params![id],
                file_row,
            )
            .optional()?)
    }

    pub fn file_content(&self, id: &str) -> DbResult<Option<Vec<u8>>> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                "SELECT content FROM files WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()?)
    }

    pub fn list_files(&self) -> DbResult<Vec<StoredFile>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, created_at, filename, purpose, bytes FROM files ORDER BY created_at DESC, id",
        )?;
        let rows = stmt.query_map([], file_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn delete_file(&self, id: &str) -> DbResult<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM files WHERE id = ?1", params![id])?
            == 1)
    }

    // ---- completions and feedback ----

    /// Remembers a completion, forgetting the oldest beyond `keep`.
    pub fn insert_completion(
        &self,
        completion: &StoredCompletion,
        now: u64,
        keep: usize,
    ) -> DbResult<()> {
        let conn = self.conn();
        conn.execute(
            "INSERT OR REPLACE INTO completions (id, created_at, adapter, prompt, completion)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                completion.id,
                now,
                completion.adapter,
                completion.prompt,
                completion.completion
            ],
        )?;
        conn.execute(
            "DELETE FROM completions WHERE rowid NOT IN
               (SELECT rowid FROM completions ORDER BY rowid DESC LIMIT ?1)",
            params![keep],
        )?;
        Ok(())
    }

    pub fn completion(&self, id: &str) -> DbResult<Option<StoredCompletion>> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                "SELECT id, adapter, prompt, completion FROM completions WHERE id = ?1",
                params![id],
                |r| {
                    Ok(StoredCompletion {
                        id: r.get(0)?,
                        adapter: r.get(1)?,
                        prompt: r.get(2)?,
                        completion: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    /// Stores a feedback item; returns how many items of `adapter` no job has used yet.
    pub fn insert_feedback(
        &self,
        id: &str,
        now: u64,
        completion_id: &str,
        adapter: &str,
        reward: f32,
        corrected_answer: Option<&str>,
    ) -> DbResult<u64> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO feedback (id, created_at, completion_id, adapter, reward, corrected_answer)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![id, now, completion_id, adapter, reward, corrected_answer],
        )?;
        Ok(conn.query_row(
            "SELECT COUNT(*) FROM feedback WHERE adapter = ?1 AND job_id IS NULL",
            params![adapter],
            |r| r.get(0),
        )?)
    }

    /// Feedback on `adapter`, oldest first, at most `limit`.
    pub fn list_feedback(&self, adapter: &str, limit: usize) -> DbResult<Vec<FeedbackItem>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, created_at, completion_id, adapter, reward, corrected_answer, job_id
             FROM feedback WHERE adapter = ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![adapter, limit], |r| {
            Ok(FeedbackItem {
                id: r.get(0)?,
                created_at: r.get(1)?,
                completion_id: r.get(2)?,
                adapter: r.get(3)?,
                reward: r.get::<_, f64>(4)? as f32,
                corrected_answer: r.get(5)?,
                job_id: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Feedback on `adapter` that no job has used, oldest first, with its completion.
    pub fn pending_feedback(&self, adapter: &str) -> DbResult<Vec<PendingFeedback>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT f.id, c.prompt, c.completion, f.reward, f.corrected_answer
             FROM feedback f JOIN completions c ON c.id = f.completion_id
             WHERE f.adapter = ?1 AND f.job_id IS NULL ORDER BY f.seq",
        )?;
        let rows = stmt.query_map(params![adapter], |r| {
            Ok(PendingFeedback {
                id: r.get(0)?,
                prompt: r.get(1)?,
                completion: r.get(2)?,
                reward: r.get::<_, f64>(3)? as f32,
                corrected_answer: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Stores a job made of feedback items and marks them used, in one transaction.
    pub fn insert_feedback_job(
        &self,
        job: &Job,
        train: &[TrainingExample],
        feedback_ids: &[String],
    ) -> DbResult<()> {
        self.insert_job(job, train, &[])?;
        let conn = self.conn();
        let mut stmt = conn.prepare("UPDATE feedback SET job_id = ?1 WHERE id = ?2")?;
        for id in feedback_ids {
            stmt.execute(params![job.id, id])?;
        }
        Ok(())
    }
}

const JOB_COLUMNS: &str = "SELECT id, created_at, spec, status, started_at, finished_at, error, progress, train_examples, held_out_examples FROM jobs";

struct JobRow {
    id: String,
    created_at: u64,
    spec: String,
    status: String,
    started_at: Option<u64>,
    finished_at: Option<u64>,
    error: Option<String>,
    progress: String,
    train_examples: usize,
    held_out_examples: usize,
}

fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    Ok(JobRow {
        id: r.get(0)?,
        created_at: r.get(1)?,
        spec: r.get(2)?,
        status: r.get(3)?,
        started_at: r.get(4)?,
        finished_at: r.get(5)?,
        error: r.get(6)?,
        progress: r.get(7)?,
        train_examples: r.get(8)?,
        held_out_examples: r.get(9)?,
    })
}

impl JobRow {
    fn into_job(self) -> DbResult<Job> {
        Ok(Job {
            spec: serde_json::from_str(&self.spec).map_err(corrupt("job"))?,
            status: JobStatus::parse(&self.status).ok_or(DbError::Corrupt {
                what: "job",
                reason: format!("unknown status `{}`", self.status),
            })?,
            progress: serde_json::from_str(&self.progress).map_err(corrupt("job progress"))?,
            id: self.id,
            created_at: self.created_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            error: self.error,
            train_examples: self.train_examples,
            held_out_examples: self.held_out_examples,
        })
    }
}

fn file_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredFile> {
    Ok(StoredFile {
        id: r.get(0)?,
        created_at: r.get(1)?,
        filename: r.get(2)?,
        purpose: r.get(3)?,
        bytes: r.get(4)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::training::job::JobOrigin;
    use plugin::{ObjectiveKind, TrainerConfig};

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
        // What the release before schema versions left: the same tables, user_version 0, and
        // job specs without `estimator` (they all ran with central differences).
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
            db.insert_feedback("fb-1", 0, "chatcmpl-1", "x", 1.0, None)
                .unwrap(),
            1
        );
        assert_eq!(
            db.insert_feedback("fb-2", 0, "chatcmpl-1", "x", -1.0, Some("better"))
                .unwrap(),
            2
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
