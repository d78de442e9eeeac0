//! The SQLite database's schema and its history: each migration brings a database from one schema
//! version (SQLite's `user_version`) to the next, in one transaction, so a data folder written
//! by any earlier release opens with this one and nothing is half-migrated after a crash.
//!
//! Never edit a migration that has shipped; add the next one. Releases before versioning wrote
//! the tables of the first migration with `user_version` 0; its statements create only what is
//! missing, so it applies to those databases unchanged.

use rusqlite::Connection;

use super::{DbError, DbResult};

/// The migrations in order: `MIGRATIONS[v]` takes a database at version `v` to `v + 1`.
const MIGRATIONS: &[&str] = &[
    TABLES,
    SPECS_WITHOUT_ESTIMATOR_ARE_CENTRAL,
    JOB_OWNERS,
    LEASES_AND_VERSION_FILES,
];

/// Version 1: every table.
const TABLES: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    adapter TEXT NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    error TEXT,
    progress TEXT NOT NULL,
    train_examples INTEGER NOT NULL,
    held_out_examples INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS examples (
    job_id TEXT NOT NULL,
    held_out INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (job_id, held_out, idx)
);
CREATE TABLE IF NOT EXISTS steps (
    job_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (job_id, step)
);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    level TEXT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE TABLE IF NOT EXISTS versions (
    adapter TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    job_id TEXT,
    step INTEGER,
    held_out TEXT,
    PRIMARY KEY (adapter, version)
);
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY,
    live_version INTEGER,
    feedback_every INTEGER,
    feedback_steps INTEGER
);
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    content BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS completions (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    adapter TEXT,
    prompt TEXT NOT NULL,
    completion TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    completion_id TEXT NOT NULL,
    adapter TEXT NOT NULL,
    reward REAL NOT NULL,
    corrected_answer TEXT,
    job_id TEXT
);
";

/// Version 2: jobs stored before the trainer's default estimator became FZOO have no
/// `estimator` in their spec; they ran with central differences and must resume with them
/// (a spec without the field would read the new default).
const SPECS_WITHOUT_ESTIMATOR_ARE_CENTRAL: &str = "
UPDATE jobs SET spec = json_set(spec, '$.trainer.estimator', 'central')
WHERE json_type(spec, '$.trainer.estimator') IS NULL;
";

/// Version 3: the API key a job was submitted with (its name), for the per-key cap on queued
/// jobs; jobs stored before have none.
const JOB_OWNERS: &str = "
ALTER TABLE jobs ADD COLUMN owner TEXT;
";

/// Version 4: the lease of a running job (which server runs it, until when), and each
/// version's files, so that a server that lacks a version's folder can write it (after a crash
/// between the row and the folder, or a replica sharing a PostgreSQL database). Versions
/// published before have no files here; their folders are on disk.
const LEASES_AND_VERSION_FILES: &str = "
ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires_ms INTEGER;
ALTER TABLE versions ADD COLUMN published_ms INTEGER;
ALTER TABLE versions ADD COLUMN config_json TEXT;
ALTER TABLE versions ADD COLUMN weights BLOB;
ALTER TABLE versions ADD COLUMN weights_sha256 TEXT;
";

/// The schema version this release writes.
pub const CURRENT_VERSION: u32 = MIGRATIONS.len() as u32;

/// Applies the migrations `conn`'s database lacks; refuses a database of a newer release.
pub fn migrate(conn: &mut Connection) -> DbResult<()> {
    let version: u32 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if version > CURRENT_VERSION {
        return Err(DbError::NewerSchema {
            found: version,
            known: CURRENT_VERSION,
        });
    }
    for (from, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let transaction = conn.transaction()?;
        transaction.execute_batch(migration)?;
        transaction.pragma_update(None, "user_version", from as u32 + 1)?;
        transaction.commit()?;
        if from > 0 {
            tracing::info!(version = from + 1, "database schema migrated");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(conn: &Connection) -> u32 {
        conn.pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap()
    }

    #[test]
    fn a_fresh_database_gets_every_migration_and_a_second_run_changes_nothing() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        assert_eq!(version(&conn), CURRENT_VERSION);
        migrate(&mut conn).unwrap();
        assert_eq!(version(&conn), CURRENT_VERSION);
    }

    #[test]
    fn a_database_of_a_newer_release_is_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "user_version", CURRENT_VERSION + 1)
            .unwrap();
        let err = migrate(&mut conn).unwrap_err();
        assert!(
            err.to_string().contains("written by a newer release"),
            "{err}"
        );
    }
}
