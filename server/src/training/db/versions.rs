//! Adapters: their published versions, the live version of each, and their continuous-training
//! settings.

use std::collections::HashSet;

use super::sql::values;
use super::{corrupt, json, Db, DbResult};
use crate::training::job::{HeldOutPoint, VersionInfo};

impl Db {
    pub fn insert_version(&self, adapter: &str, info: &VersionInfo) -> DbResult<()> {
        self.transaction(|conn| {
            conn.execute(
                "INSERT INTO versions (adapter, version, created_at, job_id, step, held_out)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (adapter, version) DO UPDATE SET created_at = excluded.created_at,
                   job_id = excluded.job_id, step = excluded.step, held_out = excluded.held_out",
                &values![
                    adapter,
                    info.version,
                    info.created_at,
                    info.job_id.as_deref(),
                    info.step,
                    info.held_out.as_ref().map(json)
                ],
            )?;
            // A new version is live (a rollback made earlier is superseded).
            conn.execute(
                "INSERT INTO adapters (name, live_version) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET live_version = ?2",
                &values![adapter, info.version],
            )
        })?;
        Ok(())
    }

    /// What the database knows of `adapter`'s versions, by version.
    pub fn versions(&self, adapter: &str) -> DbResult<Vec<VersionInfo>> {
        let rows = self.transaction(|conn| {
            conn.query(
                "SELECT version, created_at, job_id, step, held_out FROM versions
                 WHERE adapter = ?1 ORDER BY version",
                &values![adapter],
            )
        })?;
        let mut versions = Vec::new();
        for row in rows {
            let held_out: Option<HeldOutPoint> = row
                .get::<Option<String>>(4)?
                .map(|h| serde_json::from_str(&h))
                .transpose()
                .map_err(corrupt("version metrics"))?;
            versions.push(VersionInfo {
                version: row.get(0)?,
                created_at: row.get(1)?,
                job_id: row.get(2)?,
                step: row.get(3)?,
                held_out,
            });
        }
        Ok(versions)
    }

    /// Every (adapter, version) this server has published.
    pub fn published_versions(&self) -> DbResult<HashSet<(String, u32)>> {
        let rows =
            self.transaction(|conn| conn.query("SELECT adapter, version FROM versions", &[]))?;
        rows.iter()
            .map(|row| Ok((row.get(0)?, row.get(1)?)))
            .collect()
    }

    pub fn set_live_version(&self, adapter: &str, version: u32) -> DbResult<()> {
        self.transaction(|conn| {
            conn.execute(
                "INSERT INTO adapters (name, live_version) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET live_version = ?2",
                &values![adapter, version],
            )
        })?;
        Ok(())
    }

    /// Live versions chosen by rollbacks or publishes, by adapter.
    pub fn live_versions(&self) -> DbResult<Vec<(String, u32)>> {
        let rows = self.transaction(|conn| {
            conn.query(
                "SELECT name, live_version FROM adapters WHERE live_version IS NOT NULL",
                &[],
            )
        })?;
        rows.iter()
            .map(|row| Ok((row.get(0)?, row.get(1)?)))
            .collect()
    }

    /// Sets (or, with `None`, stops) continuous training of `adapter` on its feedback.
    pub fn set_continuous(&self, adapter: &str, every: Option<(u32, u64)>) -> DbResult<()> {
        self.transaction(|conn| {
            conn.execute(
                "INSERT INTO adapters (name, feedback_every, feedback_steps) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET feedback_every = ?2, feedback_steps = ?3",
                &values![adapter, every.map(|e| e.0), every.map(|e| e.1)],
            )
        })?;
        Ok(())
    }

    /// `(feedback items per job, steps per job)` when `adapter` trains on its feedback.
    pub fn continuous(&self, adapter: &str) -> DbResult<Option<(u32, u64)>> {
        let row = self.transaction(|conn| {
            conn.query_opt(
                "SELECT feedback_every, feedback_steps FROM adapters WHERE name = ?1",
                &values![adapter],
            )
        })?;
        let Some(row) = row else {
            return Ok(None);
        };
        Ok(
            match (row.get::<Option<u32>>(0)?, row.get::<Option<u64>>(1)?) {
                (Some(every), Some(steps)) => Some((every, steps)),
                _ => None,
            },
        )
    }

    /// Forgets an adapter: its versions, settings, feedback and its jobs' examples (which
    /// frees its share of `training.max_stored_examples_per_adapter`). The jobs stay, for their
    /// history; the caller has cancelled them first.
    pub fn delete_adapter(&self, adapter: &str) -> DbResult<()> {
        self.transaction(|conn| {
            for statement in [
                "DELETE FROM versions WHERE adapter = ?1",
                "DELETE FROM adapters WHERE name = ?1",
                "DELETE FROM feedback WHERE adapter = ?1",
                "DELETE FROM examples WHERE job_id IN (SELECT id FROM jobs WHERE adapter = ?1)",
            ] {
                conn.execute(statement, &values![adapter])?;
            }
            Ok(())
        })
    }
}
