//! Job events: what a job reported, numbered per job so that clients page through them and
//! event streams resume where they stopped.

use rusqlite::{params, Connection};

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
        insert_event(&self.conn(), job_id, now, level, kind, message, data)
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
}

/// Appends an event to job `job_id`'s list; its sequence number.
pub(super) fn insert_event(
    conn: &Connection,
    job_id: &str,
    now: u64,
    level: EventLevel,
    kind: EventKind,
    message: &str,
    data: &serde_json::Value,
) -> DbResult<u64> {
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
