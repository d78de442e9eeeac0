//! Copying a whole database into another (`mezo copy-database`): how a server moves from the
//! embedded SQLite file to PostgreSQL, or back, keeping its jobs (and their step logs, so they
//! resume), versions, live pointers, files, completions and feedback.

use super::sql::{row_placeholders, values, Dialect, SqlConnection, Value};
use super::{Db, DbError, DbResult};

/// Rows read (and written) per statement.
const ROWS_PER_PAGE: usize = 200;

/// A table to copy: its name, the columns both schemas share, and the order to copy in.
struct Table {
    name: &'static str,
    columns: &'static str,
    /// `None`: insertion order (see [`Dialect::completions_insertion_order`]).
    order: Option<&'static str>,
    /// A serial column copied as is, whose sequence must then move past the copied values.
    serial: Option<&'static str>,
}

const TABLES: &[Table] = &[
    Table {
        name: "jobs",
        columns: "seq, id, created_at, adapter, spec, status, started_at, finished_at, error, \
                  progress, train_examples, held_out_examples, owner",
        order: Some("seq"),
        serial: Some("seq"),
    },
    Table {
        name: "examples",
        columns: "job_id, held_out, idx, body",
        order: Some("job_id, held_out, idx"),
        serial: None,
    },
    Table {
        name: "steps",
        columns: "job_id, step, record",
        order: Some("job_id, step"),
        serial: None,
    },
    Table {
        name: "events",
        columns: "job_id, seq, created_at, level, kind, message, data",
        order: Some("job_id, seq"),
        serial: None,
    },
    Table {
        name: "versions",
        columns: "adapter, version, created_at, job_id, step, held_out, published_ms, \
                  config_json, weights, weights_sha256",
        order: Some("adapter, version"),
        serial: None,
    },
    Table {
        name: "adapters",
        columns: "name, live_version, feedback_every, feedback_steps",
        order: Some("name"),
        serial: None,
    },
    Table {
        name: "files",
        columns: "id, created_at, filename, purpose, bytes, content",
        order: Some("id"),
        serial: None,
    },
    Table {
        name: "completions",
        columns: "id, created_at, adapter, prompt, completion",
        order: None,
        serial: None,
    },
    Table {
        name: "feedback",
        columns: "seq, id, created_at, completion_id, adapter, reward, corrected_answer, job_id",
        order: Some("seq"),
        serial: Some("seq"),
    },
];

/// Rows copied, by table.
pub type CopyReport = Vec<(&'static str, u64)>;

impl Db {
    /// Copies every row of this database into `target`, which must hold none, in one
    /// transaction on `target` (all or nothing). This database is read a page at a time: stop
    /// the server that uses it first.
    pub fn copy_into(&self, target: &Db) -> DbResult<CopyReport> {
        target.transaction(|into| {
            let stored: u64 = into.query_value(
                "SELECT (SELECT COUNT(*) FROM jobs) + (SELECT COUNT(*) FROM files)
                      + (SELECT COUNT(*) FROM completions) + (SELECT COUNT(*) FROM feedback)
                      + (SELECT COUNT(*) FROM versions) + (SELECT COUNT(*) FROM adapters)",
                &[],
            )?;
            if stored > 0 {
                return Err(DbError::TargetNotEmpty { rows: stored });
            }
            let mut report = Vec::new();
            for table in TABLES {
                let copied = self.copy_table(table, into)?;
                report.push((table.name, copied));
            }
            Ok(report)
        })
    }

    fn copy_table(&self, table: &Table, into: &mut dyn SqlConnection) -> DbResult<u64> {
        let width = table.columns.split(',').count();
        let mut copied = 0u64;
        loop {
            let rows = self.transaction(|conn| {
                let order = table
                    .order
                    .unwrap_or_else(|| conn.dialect().completions_insertion_order());
                let select = format!(
                    "SELECT {} FROM {} ORDER BY {order} LIMIT ?1 OFFSET ?2",
                    table.columns, table.name
                );
                conn.query(&select, &values![ROWS_PER_PAGE, copied])
            })?;
            if rows.is_empty() {
                break;
            }
            let params: Vec<Value> = rows.iter().flat_map(|row| row.0.iter().cloned()).collect();
            into.execute(
                &format!(
                    "INSERT INTO {} ({}) VALUES {}",
                    table.name,
                    table.columns,
                    row_placeholders(rows.len(), width)
                ),
                &params,
            )?;
            copied += rows.len() as u64;
        }
        if let (Some(column), Dialect::Postgres) = (table.serial, into.dialect()) {
            // Explicit values leave PostgreSQL's sequence behind (SQLite's AUTOINCREMENT
            // follows the largest value by itself): the next row must number after them.
            into.query(
                &format!(
                    "SELECT setval(pg_get_serial_sequence('{0}', '{column}'), \
                     (SELECT COALESCE(MAX({column}), 0) + 1 FROM {0}), false)",
                    table.name
                ),
                &[],
            )?;
        }
        Ok(copied)
    }
}
