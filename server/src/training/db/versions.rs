//! Adapters: their published versions, the live version of each, and their continuous-training
//! settings.
//!
//! The database numbers versions: a publish takes the adapter's next number in the transaction
//! that stores the version's row and files, so servers sharing the database never pick the same
//! one. Every change to versions (a publish, a rollback, a delete) is announced on PostgreSQL's
//! [`VERSIONS_CHANNEL`] when it commits.

use std::collections::HashSet;

use adapters::peft::PeftFiles;
use sha2::{Digest, Sha256};

use super::jobs::{renew_on, write_progress, Lease};
use super::postgres::VERSIONS_CHANNEL;
use super::sql::{values, Dialect, SqlConnection};
use super::{corrupt, json, Db, DbResult};
use crate::training::job::{HeldOutPoint, Progress, VersionInfo};

/// A version to publish: its files and what made it.
pub struct NewVersion<'a> {
    pub adapter: &'a str,
    pub files: &'a PeftFiles,
    pub created_at: u64,
    /// When it was published, in Unix milliseconds: replicas measure their lag from it (and
    /// the publishing job's lease is renewed from it).
    pub published_ms: u64,
    /// The highest version number this server has for the adapter (a folder the database never
    /// heard of keeps its number).
    pub local_floor: u32,
    /// The job that made it; `None` for a folder loaded from elsewhere.
    pub made_by: Option<JobPublish<'a>>,
}

/// What a job's publish stores with the version.
pub struct JobPublish<'a> {
    pub job_id: &'a str,
    /// Steps done when the published adapter was taken.
    pub step: u64,
    pub held_out: Option<&'a HeldOutPoint>,
    /// The lease the job must still hold.
    pub lease: &'a Lease,
    /// The job's progress with this publish, but for the version's number, which the
    /// transaction appends to `published_versions`: written together with the version, so a
    /// job resumed after a crash never publishes the same step twice.
    pub progress: &'a Progress,
}

/// A version as replicas compare it with what they serve: everything but its files.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionHead {
    pub adapter: String,
    pub version: u32,
    pub job_id: Option<String>,
    pub step: Option<u64>,
    pub published_ms: Option<u64>,
    /// SHA-256 of its weights file, hex; `None` for versions stored before files were.
    pub weights_sha256: Option<String>,
}

/// The lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Tells the other servers sharing the database that `adapter`'s versions changed, when this
/// transaction commits.
fn announce(conn: &mut dyn SqlConnection, adapter: &str) -> DbResult<()> {
    if conn.dialect() == Dialect::Postgres {
        conn.execute(
            "SELECT pg_notify(?1, ?2)",
            &values![VERSIONS_CHANNEL, adapter],
        )?;
    }
    Ok(())
}

impl Db {
    /// Stores `new` as its adapter's next version, live at once, and returns its number; `None`
    /// (nothing stored) when the publishing job no longer holds its lease (it was cancelled,
    /// or another server took it over).
    pub fn publish_version(&self, new: &NewVersion<'_>) -> DbResult<Option<u32>> {
        let job = new.made_by.as_ref();
        self.transaction(|conn| {
            if let Some(job) = job {
                if !renew_on(conn, job.job_id, job.lease, new.published_ms)? {
                    return Ok(None);
                }
            }
            // The adapter's row, locked until commit: publishes of one adapter take turns.
            conn.execute(
                "INSERT INTO adapters (name) VALUES (?1) ON CONFLICT (name) DO NOTHING",
                &values![new.adapter],
            )?;
            conn.execute(
                "UPDATE adapters SET name = name WHERE name = ?1",
                &values![new.adapter],
            )?;
            let highest: u32 = conn.query_value(
                "SELECT COALESCE(MAX(version), 0) FROM versions WHERE adapter = ?1",
                &values![new.adapter],
            )?;
            let version = highest.max(new.local_floor) + 1;
            // Replicas sharing PostgreSQL write a version they cannot rebuild from these; the
            // only server of a SQLite file has the folder, and the copy would double its disk.
            let weights =
                (conn.dialect() == Dialect::Postgres).then_some(new.files.weights.as_slice());
            conn.execute(
                "INSERT INTO versions (adapter, version, created_at, job_id, step, held_out,
                   published_ms, config_json, weights, weights_sha256)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                &values![
                    new.adapter,
                    version,
                    new.created_at,
                    job.map(|j| j.job_id),
                    job.map(|j| j.step),
                    job.and_then(|j| j.held_out).map(json),
                    new.published_ms,
                    new.files.config_json.as_str(),
                    weights,
                    sha256_hex(&new.files.weights)
                ],
            )?;
            conn.execute(
                "UPDATE adapters SET live_version = ?2 WHERE name = ?1",
                &values![new.adapter, version],
            )?;
            if let Some(job) = job {
                let mut progress = job.progress.clone();
                progress.published_versions.push(version);
                write_progress(conn, job.job_id, &progress)?;
            }
            announce(conn, new.adapter)?;
            Ok(Some(version))
        })
    }

    /// Takes back `adapter@version`, published a moment ago by this server, whose folder could
    /// not be written here (a full disk): its row goes, a live pointer still on it returns to
    /// `previous_live` (`None`: the adapter had no version before), and the job that published
    /// it gets back `progress` (its progress without this version).
    pub fn withdraw_version(
        &self,
        adapter: &str,
        version: u32,
        previous_live: Option<u32>,
        job: Option<(&str, &Progress)>,
    ) -> DbResult<()> {
        self.transaction(|conn| {
            if let Some((id, progress)) = job {
                write_progress(conn, id, progress)?;
            }
            conn.execute(
                "DELETE FROM versions WHERE adapter = ?1 AND version = ?2",
                &values![adapter, version],
            )?;
            conn.execute(
                "UPDATE adapters SET live_version = ?3 WHERE name = ?1 AND live_version = ?2",
                &values![adapter, version, previous_live],
            )?;
            announce(conn, adapter)
        })
    }

    /// Every version of every adapter, by adapter and version, without their files.
    pub fn version_heads(&self) -> DbResult<Vec<VersionHead>> {
        let rows = self.transaction(|conn| {
            conn.query(
                "SELECT adapter, version, job_id, step, published_ms, weights_sha256
                 FROM versions ORDER BY adapter, version",
                &[],
            )
        })?;
        rows.iter()
            .map(|row| {
                Ok(VersionHead {
                    adapter: row.get(0)?,
                    version: row.get(1)?,
                    job_id: row.get(2)?,
                    step: row.get(3)?,
                    published_ms: row.get(4)?,
                    weights_sha256: row.get(5)?,
                })
            })
            .collect()
    }

    /// The files of `adapter@version`, when the database has them (PostgreSQL keeps them;
    /// SQLite keeps only their digest).
    pub fn version_files(&self, adapter: &str, version: u32) -> DbResult<Option<PeftFiles>> {
        let row = self.transaction(|conn| {
            conn.query_opt(
                "SELECT config_json, weights FROM versions WHERE adapter = ?1 AND version = ?2",
                &values![adapter, version],
            )
        })?;
        let Some(row) = row else {
            return Ok(None);
        };
        Ok(
            match (
                row.get::<Option<String>>(0)?,
                row.get::<Option<Vec<u8>>>(1)?,
            ) {
                (Some(config_json), Some(weights)) => Some(PeftFiles {
                    config_json,
                    weights,
                }),
                _ => None,
            },
        )
    }

    /// Records `info` as a version without files, live at once: the row a release before
    /// version files wrote (the upgrade tests build such databases with it).
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
            )?;
            announce(conn, adapter)
        })
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
            announce(conn, adapter)
        })
    }
}
