//! Adapters: their published versions, the live version of each, and their continuous-training
//! settings.

use std::collections::HashSet;

use rusqlite::{params, OptionalExtension};

use super::{corrupt, json, Db, DbResult};
use crate::training::job::{HeldOutPoint, VersionInfo};

impl Db {
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

    /// Forgets an adapter: its versions, settings, feedback and its jobs' examples (which
    /// frees its share of `training.max_stored_examples_per_adapter`). The jobs stay, for their
    /// history; the caller has cancelled them first.
    pub fn delete_adapter(&self, adapter: &str) -> DbResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM versions WHERE adapter = ?1", params![adapter])?;
        tx.execute("DELETE FROM adapters WHERE name = ?1", params![adapter])?;
        tx.execute("DELETE FROM feedback WHERE adapter = ?1", params![adapter])?;
        tx.execute(
            "DELETE FROM examples WHERE job_id IN (SELECT id FROM jobs WHERE adapter = ?1)",
            params![adapter],
        )?;
        tx.commit()?;
        Ok(())
    }
}
