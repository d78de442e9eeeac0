//! Jobs: their specs, status and progress, their examples and their step logs (the log that
//! resumes and replays a job bit for bit), and the leases under which servers run them.
//!
//! A server runs a job only while it holds the job's lease: it takes a queued job (or a running
//! one whose lease has lapsed: its server died) in one transaction, renews the lease while the
//! job runs, and every write of the job's progress checks that the lease is still its own. A
//! server that lost its lease (it stalled past it, or the job was cancelled elsewhere) stops
//! without writing, and another server resumes the job from its step log.

use plugin::{StepRecord, TrainingExample};

use super::events::insert_event;
use super::sql::{row_placeholders, values, Dialect, Row, SqlConnection, Value};
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

/// A server's claim on the jobs it runs: its name in the `lease_owner` column, and how long a
/// lease lasts from its last renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub owner: String,
    pub duration_ms: u64,
}

impl Db {
    /// Stores a new job and its examples in one transaction.
    pub fn insert_job(
        &self,
        job: &Job,
        train: &[TrainingExample],
        held_out: &[TrainingExample],
    ) -> DbResult<()> {
        self.transaction(|conn| insert_job_rows(conn, job, None, train, held_out))
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
        self.transaction(|conn| {
            if let Some(quota) = limits.quota.filter(|q| q.max_unfinished > 0) {
                let unfinished: usize = conn.query_value(
                    "SELECT COUNT(*) FROM jobs WHERE owner = ?1 AND status IN (?2, ?3)",
                    &values![
                        &quota.owner,
                        JobStatus::Queued.as_str(),
                        JobStatus::Running.as_str()
                    ],
                )?;
                if unfinished >= quota.max_unfinished {
                    return Ok(Admission::OwnerAtCap);
                }
            }
            if limits.max_stored_per_adapter > 0 {
                let stored = stored_examples(conn, &job.spec.adapter)?;
                if stored + train.len() + held_out.len() > limits.max_stored_per_adapter {
                    return Ok(Admission::AdapterFull { stored });
                }
            }
            let owner = limits.quota.map(|q| q.owner.as_str());
            insert_job_rows(conn, job, owner, train, held_out)?;
            Ok(Admission::Stored)
        })
    }

    pub fn job(&self, id: &str) -> DbResult<Option<Job>> {
        let rows = self.jobs_where("WHERE id = ?1", &values![id])?;
        Ok(rows.into_iter().next())
    }

    /// Jobs in creation order, newest first: up to `limit` created before job `after` (by id).
    pub fn list_jobs(&self, after: Option<&str>, limit: usize) -> DbResult<Vec<Job>> {
        match after {
            Some(after) => self.jobs_where(
                "WHERE seq < (SELECT seq FROM jobs WHERE id = ?1) ORDER BY seq DESC LIMIT ?2",
                &values![after, limit],
            ),
            None => self.jobs_where("ORDER BY seq DESC LIMIT ?1", &values![limit]),
        }
    }

    /// Takes the next job to run under `lease` (at `now_ms`, Unix milliseconds), marked
    /// running: a running job whose lease has lapsed (its server died; it resumes from its
    /// step log), else the oldest queued job; never a job of an adapter that has a running job
    /// under a live lease. Claims are serialized across servers, so each job has one taker.
    pub fn claim_next_job(&self, lease: &Lease, now_ms: u64) -> DbResult<Option<Job>> {
        self.transaction(|conn| {
            if conn.dialect() == Dialect::Postgres {
                conn.execute(
                    "SELECT pg_advisory_xact_lock(?1)",
                    &values![super::postgres::CLAIM_LOCK],
                )?;
            }
            let rows = conn.query(
                &format!(
                    "{JOB_COLUMNS} WHERE (status = 'queued'
                       OR (status = 'running' AND COALESCE(lease_expires_ms, 0) < ?1))
                     AND adapter NOT IN (SELECT adapter FROM jobs
                       WHERE status = 'running' AND COALESCE(lease_expires_ms, 0) >= ?1)
                     ORDER BY CASE WHEN status = 'running' THEN 0 ELSE 1 END, seq LIMIT 1"
                ),
                &values![now_ms],
            )?;
            let Some(row) = rows.first() else {
                return Ok(None);
            };
            let mut job = job_from_row(row)?;
            conn.execute(
                "UPDATE jobs SET status = 'running', started_at = COALESCE(started_at, ?2),
                   lease_owner = ?3, lease_expires_ms = ?4
                 WHERE id = ?1",
                &values![
                    &job.id,
                    now_ms / 1000,
                    &lease.owner,
                    now_ms + lease.duration_ms
                ],
            )?;
            job.status = JobStatus::Running;
            job.started_at = job.started_at.or(Some(now_ms / 1000));
            Ok(Some(job))
        })
    }

    /// Extends `lease` on running job `id` from `now_ms`; false when the lease is no longer
    /// this server's (the job was cancelled, or its lease lapsed and another server took it).
    pub fn renew_lease(&self, id: &str, lease: &Lease, now_ms: u64) -> DbResult<bool> {
        self.transaction(|conn| renew_on(conn, id, lease, now_ms))
    }

    /// Lets another server take running job `id` at once (this one is stopping); the job stays
    /// running, to be resumed from its step log.
    pub fn release_lease(&self, id: &str, lease: &Lease) -> DbResult<()> {
        self.transaction(|conn| {
            conn.execute(
                "UPDATE jobs SET lease_expires_ms = 0
                 WHERE id = ?1 AND status = 'running' AND lease_owner = ?2",
                &values![id, &lease.owner],
            )
        })?;
        Ok(())
    }

    /// Jobs of `adapter` that are queued or running.
    pub fn unfinished_jobs_of(&self, adapter: &str) -> DbResult<Vec<Job>> {
        self.jobs_where(
            "WHERE adapter = ?1 AND status IN ('queued', 'running') ORDER BY seq",
            &values![adapter],
        )
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
        self.transaction(|conn| transition_on(conn, id, (from, None), to, now, error))
    }

    /// [`Self::transition`] and, when the job moved, its event, in one transaction: whoever sees
    /// the new status also finds the event (a job's event stream ends on a finished status).
    /// With `held_by`, the job moves only while that server holds its lease (the server that
    /// ran it ends it; a server that lost it does not).
    pub fn transition_with_event(
        &self,
        id: &str,
        change: (&[JobStatus], JobStatus, Option<&str>),
        held_by: Option<&Lease>,
        now: u64,
        event: (EventLevel, EventKind, &str, &serde_json::Value),
    ) -> DbResult<bool> {
        let (from, to, error) = change;
        let (level, kind, message, data) = event;
        let holder = held_by.map(|lease| lease.owner.as_str());
        self.transaction(|conn| {
            let moved = transition_on(conn, id, (from, holder), to, now, error)?;
            if moved {
                insert_event(conn, id, now, level, kind, message, data)?;
            }
            Ok(moved)
        })
    }

    /// At start-up of the only server of a database (SQLite): jobs that were running when it
    /// stopped go back to the queue (they resume from their step logs, at once rather than
    /// when their leases lapse). Returns how many.
    pub fn requeue_interrupted(&self) -> DbResult<usize> {
        let requeued = self.transaction(|conn| {
            conn.execute(
                "UPDATE jobs SET status = 'queued' WHERE status = 'running'",
                &[],
            )
        })?;
        Ok(requeued as usize)
    }

    pub fn count_jobs_by_status(&self) -> DbResult<Vec<(JobStatus, u64)>> {
        let rows = self.transaction(|conn| {
            conn.query("SELECT status, COUNT(*) FROM jobs GROUP BY status", &[])
        })?;
        let mut counts = Vec::new();
        for row in rows {
            if let Some(status) = JobStatus::parse(&row.get::<String>(0)?) {
                counts.push((status, row.get(1)?));
            }
        }
        Ok(counts)
    }

    pub fn set_spec(&self, id: &str, spec: &JobSpec) -> DbResult<()> {
        self.transaction(|conn| {
            conn.execute(
                "UPDATE jobs SET spec = ?2 WHERE id = ?1",
                &values![id, json(spec)],
            )
        })?;
        Ok(())
    }

    /// Writes the progress of running job `id`, renewing `lease`; false (nothing written) when
    /// the lease is no longer this server's.
    pub fn set_progress(
        &self,
        id: &str,
        progress: &Progress,
        lease: &Lease,
        now_ms: u64,
    ) -> DbResult<bool> {
        self.transaction(|conn| set_progress_on(conn, id, progress, lease, now_ms))
    }

    /// A job's training and held-out examples, in their posted order.
    pub fn examples(&self, id: &str) -> DbResult<(Vec<TrainingExample>, Vec<TrainingExample>)> {
        let rows = self.transaction(|conn| {
            conn.query(
                "SELECT held_out, body FROM examples WHERE job_id = ?1 ORDER BY held_out, idx",
                &values![id],
            )
        })?;
        let (mut train, mut held_out) = (Vec::new(), Vec::new());
        for row in rows {
            let example: TrainingExample =
                serde_json::from_str(&row.get::<String>(1)?).map_err(corrupt("example"))?;
            if row.get::<bool>(0)? {
                held_out.push(example);
            } else {
                train.push(example);
            }
        }
        Ok((train, held_out))
    }

    /// Appends a step record and the job's progress in one transaction, renewing `lease`;
    /// false (nothing written) when the lease is no longer this server's.
    pub fn record_step(
        &self,
        id: &str,
        record: &StepRecord,
        progress: &Progress,
        lease: &Lease,
        now_ms: u64,
    ) -> DbResult<bool> {
        self.transaction(|conn| {
            if !set_progress_on(conn, id, progress, lease, now_ms)? {
                return Ok(false);
            }
            conn.execute(
                "INSERT INTO steps (job_id, step, record) VALUES (?1, ?2, ?3)",
                &values![id, record.step, json(record)],
            )?;
            Ok(true)
        })
    }

    /// The job's step log, in step order.
    pub fn step_log(&self, id: &str) -> DbResult<Vec<StepRecord>> {
        let rows = self.transaction(|conn| {
            conn.query(
                "SELECT record FROM steps WHERE job_id = ?1 ORDER BY step",
                &values![id],
            )
        })?;
        rows.iter()
            .map(|row| serde_json::from_str(&row.get::<String>(0)?).map_err(corrupt("step record")))
            .collect()
    }

    /// The jobs `JOB_COLUMNS` selects with `clause` (a `WHERE`, an `ORDER BY`, a `LIMIT`).
    fn jobs_where(&self, clause: &str, params: &[Value]) -> DbResult<Vec<Job>> {
        let sql = format!("{JOB_COLUMNS} {clause}");
        let rows = self.transaction(|conn| conn.query(&sql, params))?;
        rows.iter().map(job_from_row).collect()
    }
}

const JOB_COLUMNS: &str = "SELECT id, created_at, spec, status, started_at, finished_at, error, progress, train_examples, held_out_examples FROM jobs";

fn job_from_row(row: &Row) -> DbResult<Job> {
    let status: String = row.get(3)?;
    Ok(Job {
        id: row.get(0)?,
        created_at: row.get(1)?,
        spec: serde_json::from_str(&row.get::<String>(2)?).map_err(corrupt("job"))?,
        status: JobStatus::parse(&status).ok_or(DbError::Corrupt {
            what: "job",
            reason: format!("unknown status `{status}`"),
        })?,
        started_at: row.get(4)?,
        finished_at: row.get(5)?,
        error: row.get(6)?,
        progress: serde_json::from_str(&row.get::<String>(7)?).map_err(corrupt("job progress"))?,
        train_examples: row.get(8)?,
        held_out_examples: row.get(9)?,
    })
}

pub(super) fn renew_on(
    conn: &mut dyn SqlConnection,
    id: &str,
    lease: &Lease,
    now_ms: u64,
) -> DbResult<bool> {
    let renewed = conn.execute(
        "UPDATE jobs SET lease_expires_ms = ?3
         WHERE id = ?1 AND status = 'running' AND lease_owner = ?2",
        &values![id, &lease.owner, now_ms + lease.duration_ms],
    )?;
    Ok(renewed == 1)
}

fn set_progress_on(
    conn: &mut dyn SqlConnection,
    id: &str,
    progress: &Progress,
    lease: &Lease,
    now_ms: u64,
) -> DbResult<bool> {
    if !renew_on(conn, id, lease, now_ms)? {
        return Ok(false);
    }
    write_progress(conn, id, progress)?;
    Ok(true)
}

/// Writes job `id`'s progress (the caller has checked or renewed its lease in the same
/// transaction).
pub(super) fn write_progress(
    conn: &mut dyn SqlConnection,
    id: &str,
    progress: &Progress,
) -> DbResult<()> {
    conn.execute(
        "UPDATE jobs SET progress = ?2 WHERE id = ?1",
        &values![id, json(progress)],
    )?;
    Ok(())
}

/// Moves job `id` from one of the statuses `from` (and, when a holder is given, only while
/// that server holds its lease) to `to`; whether it moved.
fn transition_on(
    conn: &mut dyn SqlConnection,
    id: &str,
    (from, holder): (&[JobStatus], Option<&str>),
    to: JobStatus,
    now: u64,
    error: Option<&str>,
) -> DbResult<bool> {
    let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    let placeholders = from.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>();
    let started = (to == JobStatus::Running).then_some(now);
    let finished = to.is_finished().then_some(now);
    let held = if holder.is_some() {
        " AND lease_owner = ?6"
    } else {
        ""
    };
    let mut params = values![id, to.as_str(), started, finished, error].to_vec();
    params.extend(holder.map(Value::from));
    let changed = conn.execute(
        &format!(
            "UPDATE jobs SET status = ?2,
               started_at = COALESCE(started_at, ?3),
               finished_at = ?4,
               error = ?5
             WHERE id = ?1 AND status IN ({}){held}",
            placeholders.join(", ")
        ),
        &params,
    )?;
    Ok(changed == 1)
}

/// Examples stored by one statement: 4 parameters each, well within SQLite's 32,766 and
/// PostgreSQL's 65,535 parameters a statement.
const EXAMPLES_PER_INSERT: usize = 256;

/// A job's row (with its owner, if any) and its examples' rows.
pub(super) fn insert_job_rows(
    conn: &mut dyn SqlConnection,
    job: &Job,
    owner: Option<&str>,
    train: &[TrainingExample],
    held_out: &[TrainingExample],
) -> DbResult<()> {
    conn.execute(
        "INSERT INTO jobs (id, created_at, adapter, spec, status, progress, train_examples, held_out_examples, owner)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        &values![
            &job.id,
            job.created_at,
            &job.spec.adapter,
            json(&job.spec),
            job.status.as_str(),
            json(&job.progress),
            train.len(),
            held_out.len(),
            owner
        ],
    )?;
    // Many rows per statement: with PostgreSQL across a network, a round trip per example
    // would make a 512-example job take seconds to store.
    let rows: Vec<(bool, usize, &TrainingExample)> = [(false, train), (true, held_out)]
        .into_iter()
        .flat_map(|(held, examples)| {
            let numbered = examples.iter().enumerate();
            numbered.map(move |(idx, example)| (held, idx, example))
        })
        .collect();
    for chunk in rows.chunks(EXAMPLES_PER_INSERT) {
        let params: Vec<Value> = chunk
            .iter()
            .flat_map(|&(held, idx, example)| values![&job.id, held, idx, json(example)])
            .collect();
        conn.execute(
            &format!(
                "INSERT INTO examples (job_id, held_out, idx, body) VALUES {}",
                row_placeholders(chunk.len(), 4)
            ),
            &params,
        )?;
    }
    Ok(())
}

/// Examples stored for `adapter`: its jobs' (training and held-out) and its feedback items no
/// job has used yet (a used item is one of its job's examples).
pub(super) fn stored_examples(conn: &mut dyn SqlConnection, adapter: &str) -> DbResult<usize> {
    conn.query_value(
        "SELECT (SELECT COUNT(*) FROM examples WHERE job_id IN (SELECT id FROM jobs WHERE adapter = ?1))
              + (SELECT COUNT(*) FROM feedback WHERE adapter = ?1 AND job_id IS NULL)",
        &values![adapter],
    )
}
