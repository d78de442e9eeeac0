//! The PostgreSQL backend (`--database postgres://…`): one connection behind a lock, opened
//! again when it drops, the schema's history for PostgreSQL, and the channel on which replicas
//! sharing the database hear of each other's adapter versions (`LISTEN`/`NOTIFY`).
//!
//! Any number of servers may share one database (replicas behind a load balancer): jobs are
//! taken under leases (see `jobs`), versions are numbered by the database (see `versions`).

use std::collections::HashMap;
use std::error::Error;
use std::sync::{Mutex, PoisonError};

use bytes::BytesMut;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{FromSql, IsNull, ToSql, Type};
use postgres::{Client, NoTls, Statement};

use super::location::redact_password;
use super::sql::{numbered_dollar_placeholders, Dialect, Row, SqlConnection, Value};
use super::{Backend, DbError, DbResult};

/// The key of the advisory lock held while the schema is migrated ("mezo" in ASCII, plus one:
/// the key an earlier release held for the whole session).
const MIGRATION_LOCK: i64 = 0x6d65_7a70;

/// The key of the advisory lock held while a job is claimed, so that two replicas looking for
/// work at once never both take a job, nor two jobs of one adapter.
pub(super) const CLAIM_LOCK: i64 = 0x6d65_7a71;

/// The channel on which a change to adapter versions (a publish, a rollback, a delete) is
/// announced to every replica.
pub const VERSIONS_CHANNEL: &str = "mezo_versions";

/// How long a connection attempt waits when the URL sets no `connect_timeout`.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The migrations in order: `MIGRATIONS[v]` takes a database at version `v` to `v + 1`.
/// Never edit one that has shipped; add the next.
const MIGRATIONS: &[&str] = &[TABLES, LEASES_AND_VERSION_FILES];

/// Version 1: every table, as SQLite's schema has them at its version 3, with 64-bit integers.
const TABLES: &str = "
CREATE TABLE jobs (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    adapter TEXT NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    error TEXT,
    progress TEXT NOT NULL,
    train_examples BIGINT NOT NULL,
    held_out_examples BIGINT NOT NULL,
    owner TEXT
);
CREATE INDEX jobs_by_adapter ON jobs (adapter, status);
CREATE TABLE examples (
    job_id TEXT NOT NULL,
    held_out BIGINT NOT NULL,
    idx BIGINT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (job_id, held_out, idx)
);
CREATE TABLE steps (
    job_id TEXT NOT NULL,
    step BIGINT NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (job_id, step)
);
CREATE TABLE events (
    job_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    level TEXT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE TABLE versions (
    adapter TEXT NOT NULL,
    version BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    job_id TEXT,
    step BIGINT,
    held_out TEXT,
    PRIMARY KEY (adapter, version)
);
CREATE TABLE adapters (
    name TEXT PRIMARY KEY,
    live_version BIGINT,
    feedback_every BIGINT,
    feedback_steps BIGINT
);
CREATE TABLE files (
    id TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    content BYTEA NOT NULL
);
CREATE TABLE completions (
    seq BIGSERIAL NOT NULL,
    id TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL,
    adapter TEXT,
    prompt TEXT NOT NULL,
    completion TEXT NOT NULL
);
CREATE TABLE feedback (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    completion_id TEXT NOT NULL,
    adapter TEXT NOT NULL,
    reward DOUBLE PRECISION NOT NULL,
    corrected_answer TEXT,
    job_id TEXT
);
CREATE INDEX feedback_by_adapter ON feedback (adapter, job_id);
";

/// Version 2: as SQLite's version 4, job leases and versions' files.
const LEASES_AND_VERSION_FILES: &str = "
ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires_ms BIGINT;
ALTER TABLE versions ADD COLUMN published_ms BIGINT;
ALTER TABLE versions ADD COLUMN config_json TEXT;
ALTER TABLE versions ADD COLUMN weights BYTEA;
ALTER TABLE versions ADD COLUMN weights_sha256 TEXT;
";

/// The schema version this release writes.
pub const CURRENT_VERSION: u32 = MIGRATIONS.len() as u32;

pub(super) struct PostgresBackend {
    url: String,
    /// `None` after the connection was lost; the next transaction connects again.
    connection: Mutex<Option<Connection>>,
}

/// A connection and the statements prepared on it, by their SQL: each statement is parsed
/// once per connection, not at every call (which would cost a round trip more).
struct Connection {
    client: Client,
    statements: HashMap<String, Statement>,
}

/// Statements kept prepared on a connection. The storage code's statements are a fixed set
/// (and a few lengths of the batched insert); past this, the cache starts again.
const MAX_PREPARED_STATEMENTS: usize = 256;

impl PostgresBackend {
    /// Connects and brings the database's schema up to date.
    pub fn connect(url: &str) -> DbResult<Self> {
        let backend = Self {
            url: url.to_string(),
            connection: Mutex::new(None),
        };
        let connection = off_the_async_runtime(|| backend.open_connection())?;
        *backend
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(connection);
        Ok(backend)
    }

    fn error(&self, source: postgres::Error) -> DbError {
        DbError::Postgres {
            url: redact_password(&self.url),
            source,
        }
    }

    /// A new connection, the schema migrated.
    fn open_connection(&self) -> DbResult<Connection> {
        let mut config: postgres::Config = self.url.parse().map_err(|e| self.error(e))?;
        if config.get_connect_timeout().is_none() {
            // A chat reply waits for its completion to be stored: an unreachable host must
            // not hold it for the operating system's minutes-long connect timeout.
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let mut client = config.connect(NoTls).map_err(|e| self.error(e))?;
        migrate(&mut client).map_err(|err| match err {
            MigrationError::Postgres(e) => self.error(e),
            MigrationError::Db(e) => e,
        })?;
        Ok(Connection {
            client,
            statements: HashMap::new(),
        })
    }

    fn transaction_here(
        &self,
        work: &mut (dyn FnMut(&mut dyn SqlConnection) -> DbResult<()> + Send),
    ) -> DbResult<()> {
        // A panic while holding the lock leaves no half write: the transaction rolls back.
        let mut slot = self
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if slot.as_ref().is_none_or(|c| c.client.is_closed()) {
            *slot = None;
            *slot = Some(self.open_connection()?);
            tracing::info!(url = %redact_password(&self.url), "connected to the database again");
        }
        let outcome = {
            let Connection { client, statements } = slot.as_mut().expect("connected just above");
            if statements.len() > MAX_PREPARED_STATEMENTS {
                statements.clear();
            }
            let mut transaction = client.transaction().map_err(|e| self.error(e))?;
            let mut conn = PostgresTransaction {
                transaction: &mut transaction,
                statements,
                backend: self,
            };
            match work(&mut conn) {
                Ok(()) => transaction.commit().map_err(|e| self.error(e)),
                Err(err) => Err(err),
            }
        };
        if let Err(DbError::Postgres { source, .. }) = &outcome {
            if source.is_closed() {
                *slot = None;
            }
        }
        outcome
    }
}

impl Backend for PostgresBackend {
    fn transaction(
        &self,
        work: &mut (dyn FnMut(&mut dyn SqlConnection) -> DbResult<()> + Send),
    ) -> DbResult<()> {
        off_the_async_runtime(|| self.transaction_here(work))
    }

    fn version_notices(&self) -> Option<VersionNotices> {
        Some(VersionNotices {
            url: self.url.clone(),
            client: None,
        })
    }
}

/// A connection of its own that listens on the versions channel (`mezo_versions`): the blocking
/// wait of a replica's replication thread. It connects (again) when it needs to.
pub struct VersionNotices {
    url: String,
    client: Option<Client>,
}

impl VersionNotices {
    /// Waits up to `timeout` for a change to be announced: `Ok(true)` when one was (all
    /// announcements that arrived are taken), `Ok(false)` when none came. After an error the
    /// next call connects again; changes announced while disconnected are not heard, so the
    /// caller looks at the database after every wait, announced or not.
    pub fn wait(&mut self, timeout: std::time::Duration) -> DbResult<bool> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = None;
            let mut config: postgres::Config = self.url.parse().map_err(|e| self.error(e))?;
            if config.get_connect_timeout().is_none() {
                config.connect_timeout(CONNECT_TIMEOUT);
            }
            let mut client = config.connect(NoTls).map_err(|e| self.error(e))?;
            client
                .batch_execute(&format!("LISTEN {VERSIONS_CHANNEL}"))
                .map_err(|e| self.error(e))?;
            self.client = Some(client);
        }
        let first = {
            let client = self.client.as_mut().expect("connected just above");
            let mut notifications = client.notifications();
            let first = notifications.timeout_iter(timeout).next();
            if first.is_ok() {
                // Several changes may be announced at once: one look at the database covers all.
                while let Ok(Some(_)) = notifications.iter().next() {}
            }
            first
        };
        let heard = match first {
            Ok(heard) => heard.is_some(),
            Err(e) => {
                self.client = None;
                return Err(self.error(e));
            }
        };
        Ok(heard)
    }

    fn error(&self, source: postgres::Error) -> DbError {
        DbError::Postgres {
            url: redact_password(&self.url),
            source,
        }
    }
}

/// Runs `call` where the blocking client may run. `postgres`'s blocking client drives its
/// own single-thread runtime, which cannot start on a thread that is already driving async
/// tasks (the HTTP handlers call the database directly, as they do SQLite): there, `call` runs
/// on a scoped thread of its own, which costs tens of microseconds beside a round trip to the
/// database.
fn off_the_async_runtime<R: Send>(call: impl FnOnce() -> R + Send) -> R {
    if tokio::runtime::Handle::try_current().is_err() {
        return call();
    }
    std::thread::scope(|scope| {
        scope
            .spawn(call)
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

enum MigrationError {
    Postgres(postgres::Error),
    Db(DbError),
}

impl From<postgres::Error> for MigrationError {
    fn from(e: postgres::Error) -> Self {
        MigrationError::Postgres(e)
    }
}

/// Applies the migrations the database lacks, in one transaction that holds a lock against
/// another server migrating at the same time; refuses a database of a newer release.
fn migrate(client: &mut Client) -> Result<(), MigrationError> {
    let mut transaction = client.transaction()?;
    transaction.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    transaction.batch_execute(
        "CREATE TABLE IF NOT EXISTS mezo_schema (version BIGINT NOT NULL);
         INSERT INTO mezo_schema (version) SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM mezo_schema);",
    )?;
    let version: i64 = transaction
        .query_one("SELECT version FROM mezo_schema", &[])?
        .get(0);
    let version = u32::try_from(version).unwrap_or(u32::MAX);
    if version > CURRENT_VERSION {
        return Err(MigrationError::Db(DbError::NewerSchema {
            found: version,
            known: CURRENT_VERSION,
        }));
    }
    for (from, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        transaction.batch_execute(migration)?;
        transaction.execute("UPDATE mezo_schema SET version = $1", &[&(from as i64 + 1)])?;
        tracing::info!(version = from + 1, "database schema migrated");
    }
    transaction.commit()?;
    Ok(())
}

struct PostgresTransaction<'a, 'b> {
    transaction: &'a mut postgres::Transaction<'b>,
    statements: &'a mut HashMap<String, Statement>,
    backend: &'a PostgresBackend,
}

impl PostgresTransaction<'_, '_> {
    /// `sql` prepared on this connection (once).
    fn statement(&mut self, sql: &str) -> DbResult<Statement> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self
            .transaction
            .prepare(&numbered_dollar_placeholders(sql))
            .map_err(|e| self.backend.error(e))?;
        self.statements.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }
}

fn as_params(params: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

impl SqlConnection for PostgresTransaction<'_, '_> {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn execute(&mut self, sql: &str, params: &[Value]) -> DbResult<u64> {
        let statement = self.statement(sql)?;
        let changed = self.transaction.execute(&statement, &as_params(params));
        changed.map_err(|e| self.backend.error(e))
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> DbResult<Vec<Row>> {
        let statement = self.statement(sql)?;
        let rows = self.transaction.query(&statement, &as_params(params));
        let rows = rows.map_err(|e| self.backend.error(e))?;
        rows.iter()
            .map(|row| {
                let values = (0..row.len())
                    .map(|i| row.try_get::<_, Value>(i))
                    .collect::<Result<_, _>>();
                values.map(Row).map_err(|e| self.backend.error(e))
            })
            .collect()
    }
}

type BoxError = Box<dyn Error + Sync + Send>;

impl ToSql for Value {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        match (self, ty) {
            (Value::Null, _) => Ok(IsNull::Yes),
            (Value::Int(v), &Type::INT8) => v.to_sql(ty, out),
            (Value::Int(v), &Type::INT4) => i32::try_from(*v)?.to_sql(ty, out),
            (Value::Int(v), &Type::INT2) => i16::try_from(*v)?.to_sql(ty, out),
            (Value::Int(v), &Type::BOOL) => (*v != 0).to_sql(ty, out),
            (Value::Int(v), &Type::FLOAT8) => (*v as f64).to_sql(ty, out),
            (Value::Real(v), &Type::FLOAT8) => v.to_sql(ty, out),
            (Value::Real(v), &Type::FLOAT4) => (*v as f32).to_sql(ty, out),
            (Value::Text(text), _) if <&str as ToSql>::accepts(ty) => text.as_str().to_sql(ty, out),
            (Value::Blob(bytes), &Type::BYTEA) => bytes.as_slice().to_sql(ty, out),
            (value, ty) => Err(format!("cannot store {value:?} in a column of type {ty}").into()),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

impl<'a> FromSql<'a> for Value {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        Ok(match *ty {
            Type::INT8 => Value::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => Value::Int(i32::from_sql(ty, raw)?.into()),
            Type::INT2 => Value::Int(i16::from_sql(ty, raw)?.into()),
            Type::BOOL => Value::Int(bool::from_sql(ty, raw)?.into()),
            Type::FLOAT8 => Value::Real(f64::from_sql(ty, raw)?),
            Type::FLOAT4 => Value::Real(f32::from_sql(ty, raw)?.into()),
            Type::BYTEA => Value::Blob(<Vec<u8>>::from_sql(ty, raw)?),
            _ if <String as FromSql>::accepts(ty) => Value::Text(String::from_sql(ty, raw)?),
            _ => return Err(format!("no conversion for a column of type {ty}").into()),
        })
    }

    fn from_sql_null(_: &Type) -> Result<Self, BoxError> {
        Ok(Value::Null)
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}
