//! Job events: what a job reported, numbered per job so that clients page through them and
//! event streams resume where they stopped.

use super::sql::{values, SqlConnection};
use super::{corrupt, Db, DbError, DbResult};
use crate::training::job::{EventKind, EventLevel, JobEvent};

impl Db {
    pub fn add_event(
        &self,
        job_id: &str,
        now: u64,
        level: EventLevel,
        kind: EventKind,
        message: &str,
        data: &serde_json::Value,
    ) -> DbResult<u64> {
        self.transaction(|conn| insert_event(conn, job_id, now, level, kind, message, data))
    }

    /// Events with `seq > after`, oldest first, at most `limit`.
    pub fn events(&self, job_id: &str, after: u64, limit: usize) -> DbResult<Vec<JobEvent>> {
        let rows = self.transaction(|conn| {
            conn.query(
                "SELECT seq, created_at, level, kind, message, data FROM events
                 WHERE job_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                &values![job_id, after, limit],
            )
        })?;
        let mut events = Vec::new();
        for row in rows {
            let kind: String = row.get(3)?;
            events.push(JobEvent {
                seq: row.get(0)?,
                created_at: row.get(1)?,
                level: EventLevel::parse(&row.get::<String>(2)?),
                kind: EventKind::parse(&kind).ok_or(DbError::Corrupt {
                    what: "event",
                    reason: format!("unknown kind `{kind}`"),
                })?,
                message: row.get(4)?,
                data: serde_json::from_str(&row.get::<String>(5)?)
                    .map_err(corrupt("event data"))?,
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
        let before = before.unwrap_or(u64::MAX).min(i64::MAX as u64);
        let first: Option<u64> = self.transaction(|conn| {
            conn.query_value(
                "SELECT MIN(seq) FROM (SELECT seq FROM events WHERE job_id = ?1 AND seq < ?2
                   ORDER BY seq DESC LIMIT ?3) AS latest",
                &values![job_id, before, limit],
            )
        })?;
        let Some(first) = first else {
            return Ok(Vec::new());
        };
        let mut events = self.events(job_id, first - 1, limit)?;
        events.retain(|e| e.seq < before);
        events.reverse();
        Ok(events)
    }
}

/// Appends an event to job `job_id`'s list; its sequence number.
pub(super) fn insert_event(
    conn: &mut dyn SqlConnection,
    job_id: &str,
    now: u64,
    level: EventLevel,
    kind: EventKind,
    message: &str,
    data: &serde_json::Value,
) -> DbResult<u64> {
    let seq: u64 = conn.query_value(
        "SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job_id = ?1",
        &values![job_id],
    )?;
    conn.execute(
        "INSERT INTO events (job_id, seq, created_at, level, kind, message, data)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        &values![
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
