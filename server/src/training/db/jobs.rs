//! Jobs: their specs, status and progress, their examples and their step logs (the log that
//! resumes and replays a job bit for bit).

use plugin::{StepRecord, TrainingExample};
use rusqlite::{params, Connection, OptionalExtension};

use super::events::insert_event;
use super::{corrupt, json, Db, DbError, DbResult};
use crate::training::job::{EventKind, EventLevel, Job, JobSpec, JobStatus, Progress};
use crate::training::JobQuota;

/// What a new job must stay within.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobLimits<'a> {
    /// Its owner's cap on unfinished jobs, if it has an owner.
    pub quota: Option<&'a JobQuota>,
    /// Most examples stored for one adapter (its jobs' and its unused feedback); 0: no cap.
    pub max_stored_per_adapter: usize,
}

/// Whether a new job was stored, and if not, why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Stored,
    /// Its owner already has its most jobs queued or running.
    OwnerAtCap,
    /// Its examples would take the adapter past its cap; `stored` are there already.
    AdapterFull {
        stored: usize,
    },
}

impl Db {
    /// Stores a new job and its examples in one transaction.
    pub fn insert_job(
        &self,
        job: &Job,
        train: &[TrainingExample],
        held_out: &[TrainingExample],
    ) -> DbResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        insert_job_rows(&tx, job, None, train, held_out)?;
        tx.commit()?;
        Ok(())
    }

    /// [`Self::insert_job`] within `limits`: nothing is stored when the job's owner already
    /// has its most jobs queued or running, or when its examples would take the adapter past
    /// its cap of stored examples. The counts and the insert are one transaction, so two
    /// submits cannot both take the last place.
    pub fn insert_job_within(
        &self,
        job: &Job,
        train: &[TrainingExample],
        held_out: &[TrainingExample],
        limits: &JobLimits<'_>,
    ) -> DbResult<Admission> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        if let Some(quota) = limits.quota.filter(|q| q.max_unfinished > 0) {
            let unfinished: usize = tx.query_row(
                "SELECT COUNT(*) FROM jobs WHERE owner = ?1 AND status IN (?2, ?3)",
                params![
                    quota.owner,
                    JobStatus::Queued.as_str(),
                    JobStatus::Running.as_str()
                ],
                |row| row.get(0),
            )?;
            if unfinished >= quota.max_unfinished {
                return Ok(Admission::OwnerAtCap);
            }
        }
        if limits.max_stored_per_adapter > 0 {
            let stored = stored_examples(&tx, &job.spec.adapter)?;
            if stored + train.len() + held_out.len() > limits.max_stored_per_adapter {
                return Ok(Admission::AdapterFull { stored });
            }
        }
        let owner = limits.quota.map(|q| q.owner.as_str());
        insert_job_rows(&tx, job, owner, train, held_out)?;
        tx.commit()?;
        Ok(Admission::Stored)
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
        transition_on(&self.conn(), id, from, to, now, error)
    }

    /// [`Self::transition`] and, when the job moved, its event, in one transaction: whoever sees
    /// the new status also finds the event (a job's event stream ends on a finished status).
    pub fn transition_with_event(
        &self,
        id: &str,
        change: (&[JobStatus], JobStatus, Option<&str>),
        now: u64,
        event: (EventLevel, EventKind, &str, &serde_json::Value),
    ) -> DbResult<bool> {
        let (from, to, error) = change;
        let (level, kind, message, data) = event;
        let mut conn = self.conn();
        let transaction = conn.transaction()?;
        let moved = transition_on(&transaction, id, from, to, now, error)?;
        if moved {
            insert_event(&transaction, id, now, level, kind, message, data)?;
        }
        transaction.commit()?;
        Ok(moved)
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

/// Moves job `id` from one of the statuses `from` to `to`; whether it moved.
fn transition_on(
    conn: &Connection,
    id: &str,
    from: &[JobStatus],
    to: JobStatus,
    now: u64,
    error: Option<&str>,
) -> DbResult<bool> {
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

/// A job's row (with its owner, if any) and its examples' rows.
fn insert_job_rows(
    tx: &rusqlite::Transaction<'_>,
    job: &Job,
    owner: Option<&str>,
    train: &[TrainingExample],
    held_out: &[TrainingExample],
) -> DbResult<()> {
    tx.execute(
        "INSERT INTO jobs (id, created_at, adapter, spec, status, progress, train_examples, held_out_examples, owner)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            job.id,
            job.created_at,
            job.spec.adapter,
            json(&job.spec),
            job.status.as_str(),
            json(&job.progress),
            train.len(),
            held_out.len(),
            owner
        ],
    )?;
    let mut insert =
        tx.prepare("INSERT INTO examples (job_id, held_out, idx, body) VALUES (?1, ?2, ?3, ?4)")?;
    for (held, examples) in [(false, train), (true, held_out)] {
        for (idx, example) in examples.iter().enumerate() {
            insert.execute(params![job.id, held, idx, json(example)])?;
        }
    }
    Ok(())
}

/// Examples stored for `adapter`: its jobs' (training and held-out) and its feedback items no
/// job has used yet (a used item is one of its job's examples).
pub(super) fn stored_examples(conn: &Connection, adapter: &str) -> DbResult<usize> {
    Ok(conn.query_row(
        "SELECT (SELECT COUNT(*) FROM examples WHERE job_id IN (SELECT id FROM jobs WHERE adapter = ?1))
              + (SELECT COUNT(*) FROM feedback WHERE adapter = ?1 AND job_id IS NULL)",
        params![adapter],
        |row| row.get(0),
    )?)
}
