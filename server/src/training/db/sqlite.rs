//! The embedded backend: one SQLite file in the data folder, one connection behind a lock,
//! in WAL mode with `synchronous = FULL` (a commit is on disk before the client hears of it).

use std::path::Path;
use std::sync::{Mutex, PoisonError};

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::Connection;

use super::sql::{Dialect, Row, SqlConnection, Value};
use super::{sqlite_migrations, Backend, DbError, DbResult};

pub(super) struct SqliteBackend {
    conn: Mutex<Connection>,
}

/// SQLite's "another connection holds the lock" (after the busy timeout).
fn is_busy(err: &rusqlite::Error) -> bool {
    matches!(
        err.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

impl SqliteBackend {
    pub fn open(path: &Path) -> DbResult<Self> {
        let conn = Connection::open(path)?;
        Self::init(conn).map_err(|err| match err {
            DbError::Sqlite(e) if is_busy(&e) => DbError::Locked {
                path: path.to_path_buf(),
            },
            other => other,
        })
    }

    #[cfg(test)]
    pub fn in_memory() -> DbResult<Self> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> DbResult<Self> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        sqlite_migrations::migrate(&mut conn)?;
        // A write lock held elsewhere would otherwise show up only at the first write a client
        // waits for: take it once now, waiting no longer than the busy timeout.
        conn.execute_batch("BEGIN IMMEDIATE; COMMIT;")?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }
}

impl Backend for SqliteBackend {
    fn transaction(
        &self,
        work: &mut (dyn FnMut(&mut dyn SqlConnection) -> DbResult<()> + Send),
    ) -> DbResult<()> {
        // SQLite keeps its own consistency; a panic while holding the lock leaves no half
        // write (the transaction rolls back when dropped).
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let transaction = conn.transaction()?;
        work(&mut SqliteTransaction(&transaction))?;
        transaction.commit()?;
        Ok(())
    }
}

struct SqliteTransaction<'a>(&'a rusqlite::Transaction<'a>);

impl SqlConnection for SqliteTransaction<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn execute(&mut self, sql: &str, params: &[Value]) -> DbResult<u64> {
        let mut statement = self.0.prepare_cached(sql)?;
        let changed = statement.execute(rusqlite::params_from_iter(params))?;
        Ok(changed as u64)
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> DbResult<Vec<Row>> {
        let mut statement = self.0.prepare_cached(sql)?;
        let columns = statement.column_count();
        let mut rows = statement.query(rusqlite::params_from_iter(params))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let values = (0..columns)
                .map(|i| row.get_ref(i).map_err(DbError::from).and_then(read_value))
                .collect::<DbResult<_>>()?;
            out.push(Row(values));
        }
        Ok(out)
    }
}

fn read_value(value: ValueRef<'_>) -> DbResult<Value> {
    Ok(match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(v) => Value::Int(v),
        ValueRef::Real(v) => Value::Real(v),
        ValueRef::Text(text) => {
            Value::Text(
                String::from_utf8(text.to_vec()).map_err(|e| DbError::Corrupt {
                    what: "text column",
                    reason: e.to_string(),
                })?,
            )
        }
        ValueRef::Blob(bytes) => Value::Blob(bytes.to_vec()),
    })
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(v) => ValueRef::Integer(*v),
            Value::Real(v) => ValueRef::Real(*v),
            Value::Text(text) => ValueRef::Text(text.as_bytes()),
            Value::Blob(bytes) => ValueRef::Blob(bytes),
        }))
    }
}
