//! The database: which one `DATABASE_URL` names, the connections the
//! service uses, and migrations.
//!
//! The service runs on [`Db`], a small pool of its own rather than sqlx's
//! `Pool`. sqlx pings every connection when it goes back to its pool (and by
//! default when it comes out): two extra round trips on every request, which
//! cost more than the request's own statement. `Db` hands out a connection as
//! it was left, and pings only one that sat idle for [`PING_AFTER_IDLE`]. It
//! never reuses a connection whose statement failed at the connection level
//! or was cancelled midway; it closes it. And every wait is bounded: getting
//! a connection (`acquire_timeout`), each statement (`statement_timeout`,
//! enforced by PostgreSQL), and each call as a whole, here: a connection and
//! its statement within `acquire_timeout + statement_timeout`. In a network
//! partition packets vanish, the server's timeout never reaches taskql and
//! TCP may wait indefinitely; only this side's deadline ends the wait.
//!
//! SeaORM's entity API runs on `Db` through `ConnectionTrait`, so the
//! service builds its statements with SeaORM. Every connection's options
//! (the pool's, the migrator's, the LISTEN connection's) are made by
//! [`DbSettings`], in `db/settings.rs`.
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use migration::{Migrator, MigratorTrait};
use sea_orm::sea_query::Values;
use sea_orm::sqlx::postgres::{PgConnectOptions, PgConnection};
use sea_orm::sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sea_orm::sqlx::{self, AssertSqlSafe, Connection as _};
use sea_orm::{
    ConnAcquireErr, ConnectionTrait, DatabaseBackend, DatabaseConnection, DbErr, ExecResult,
    QueryResult, RuntimeErr, Statement,
};
use sea_query_sqlx::SqlxValues;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument as _;

/// The moment a database call is given up.
type Deadline = tokio::time::Instant;

pub use crate::config::Backend;
pub use settings::DbSettings;

mod settings;

/// SQLite allows one writer at a time; more connections only queue.
pub const MAX_SQLITE_CONNECTIONS: u32 = 8;
/// A connection idle this long is pinged before it is handed out: a NAT, a
/// proxy or a database restart may have dropped it meanwhile.
pub const PING_AFTER_IDLE: Duration = Duration::from_secs(30);
/// Prepared statements each connection keeps (a batched create of n rows is
/// a statement of its own).
const STATEMENT_CACHE: usize = 300;

/// How the service's connections behave: `TASKQL_DB_*` (see
/// [`crate::config::DatabaseSettings`], where their defaults are).
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub max_connections: u32,
    /// Longest wait for a connection before a request fails with SERVICE_UNAVAILABLE.
    pub acquire_timeout: Duration,
    /// Longest a statement may run.
    pub statement_timeout: Duration,
}

impl From<&crate::config::DatabaseSettings> for PoolSettings {
    fn from(settings: &crate::config::DatabaseSettings) -> Self {
        Self {
            max_connections: settings.max_connections,
            acquire_timeout: settings.acquire_timeout,
            statement_timeout: settings.statement_timeout,
        }
    }
}

impl PoolSettings {
    /// The longest one database call takes on this side: getting a
    /// connection, then its statement (in a transaction, `BEGIN`, each
    /// statement and `COMMIT` are calls of their own). Past it the call fails
    /// with SERVICE_UNAVAILABLE and its connection is closed. What the wait
    /// for a connection left of `acquire_timeout` is the statement's grace
    /// past `statement_timeout`, for the server's own timeout to answer first.
    pub fn call_limit(&self) -> Duration {
        self.acquire_timeout + self.statement_timeout
    }
}

/// What `/metrics` shows of the pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolStats {
    pub max: usize,
    pub open: usize,
    pub in_use: usize,
    /// Connections handed out since start, and the time spent waiting for them.
    pub acquired: u64,
    pub acquire_wait: Duration,
    pub acquire_timeouts: u64,
}

/// The service's connections (cheap to clone).
#[derive(Clone)]
pub struct Db {
    pool: Arc<Pool>,
}

#[derive(Clone)]
enum Connector {
    Postgres(PgConnectOptions),
    Sqlite(SqliteConnectOptions),
}

struct Pool {
    backend: Backend,
    connector: Connector,
    settings: PoolSettings,
    size: usize,
    slots: Arc<Semaphore>,
    idle: Mutex<Vec<Idle>>,
    open: AtomicUsize,
    acquired: AtomicU64,
    waited_micros: AtomicU64,
    timeouts: AtomicU64,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

enum Conn {
    Postgres(PgConnection),
    Sqlite(SqliteConnection),
}

fn sqlx_err(kind: fn(RuntimeErr) -> DbErr, err: sqlx::Error) -> DbErr {
    kind(RuntimeErr::SqlxError(Arc::new(err)))
}

fn timed_out(what: &str) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("the database did not answer {what} in time"),
    ))
}

/// Whether a connection that returned this error must not be used again.
fn breaks_connection(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::PoolClosed
        | sqlx::Error::PoolTimedOut => true,
        // Connection exceptions, and the server shutting down.
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
        _ => false,
    }
}

/// Whether an error means the database is unreachable, overloaded or slow
/// (worth retrying later) rather than a fault in the request or the server.
pub fn is_unavailable(err: &DbErr) -> bool {
    let sqlx_error = match err {
        DbErr::ConnectionAcquire(_) => return true,
        DbErr::Conn(RuntimeErr::SqlxError(e))
        | DbErr::Exec(RuntimeErr::SqlxError(e))
        | DbErr::Query(RuntimeErr::SqlxError(e)) => e,
        DbErr::Conn(_) => return true,
        _ => return false,
    };
    if breaks_connection(sqlx_error) {
        return true;
    }
    match sqlx_error.as_ref() {
        // query_canceled (statement_timeout), too_many_connections,
        // insufficient resources; SQLite's "database is locked" after its
        // busy timeout.
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            matches!(
                code.as_ref(),
                "57014" | "53300" | "53000" | "5" | "6" | "517"
            )
        }),
        _ => false,
    }
}

impl Conn {
    async fn open(connector: &Connector) -> Result<Self, sqlx::Error> {
        Ok(match connector {
            Connector::Postgres(options) => {
                Self::Postgres(PgConnection::connect_with(options).await?)
            }
            Connector::Sqlite(options) => {
                Self::Sqlite(SqliteConnection::connect_with(options).await?)
            }
        })
    }

    async fn fetch_all(
        &mut self,
        sql: &str,
        values: Values,
    ) -> Result<Vec<QueryResult>, sqlx::Error> {
        let values = SqlxValues(values);
        Ok(match self {
            Self::Postgres(conn) => sqlx::query_with(AssertSqlSafe(sql), values)
                .fetch_all(conn)
                .await?
                .into_iter()
                .map(QueryResult::from)
                .collect(),
            Self::Sqlite(conn) => sqlx::query_with(AssertSqlSafe(sql), values)
                .fetch_all(conn)
                .await?
                .into_iter()
                .map(QueryResult::from)
                .collect(),
        })
    }

    async fn execute(&mut self, sql: &str, values: Values) -> Result<ExecResult, sqlx::Error> {
        let values = SqlxValues(values);
        Ok(match self {
            Self::Postgres(conn) => sqlx::query_with(AssertSqlSafe(sql), values)
                .execute(conn)
                .await?
                .into(),
            Self::Sqlite(conn) => sqlx::query_with(AssertSqlSafe(sql), values)
                .execute(conn)
                .await?
                .into(),
        })
    }

    /// Runs `sql` (one or more statements, no parameters) unprepared.
    async fn execute_unprepared(&mut self, sql: &str) -> Result<ExecResult, sqlx::Error> {
        let sql = sqlx::raw_sql(AssertSqlSafe(sql));
        Ok(match self {
            Self::Postgres(conn) => sql.execute(conn).await?.into(),
            Self::Sqlite(conn) => sql.execute(conn).await?.into(),
        })
    }

    async fn ping(&mut self) -> Result<(), sqlx::Error> {
        match self {
            Self::Postgres(conn) => conn.ping().await,
            Self::Sqlite(conn) => conn.ping().await,
        }
    }
}

/// A connection out of the pool. It goes back when dropped, unless its last
/// call failed at the connection level, never finished, or left a
/// transaction open.
pub struct Pooled {
    /// `None` once the connection is gone (broken, or dropped midway).
    conn: Option<Conn>,
    pool: Arc<Pool>,
    /// Cleared while a transaction is open on the connection.
    reusable: bool,
    _slot: OwnedSemaphorePermit,
}

impl Drop for Pooled {
    fn drop(&mut self) {
        match self.conn.take() {
            Some(conn) if self.reusable && !self.pool.slots.is_closed() => {
                let mut idle = self.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
                idle.push(Idle {
                    conn,
                    since: Instant::now(),
                });
            }
            _ => {
                self.pool.open.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl Pooled {
    /// Runs one database call on this connection, given up at `deadline`.
    /// The connection is taken out for the call, so a call dropped midway
    /// (its request went away, or the deadline passed) takes the half-read
    /// connection with it.
    async fn run<T>(
        &mut self,
        what: &str,
        deadline: Deadline,
        call: impl AsyncFnOnce(&mut Conn) -> Result<T, sqlx::Error>,
    ) -> Result<T, sqlx::Error> {
        let Some(mut conn) = self.conn.take() else {
            return Err(sqlx::Error::PoolClosed);
        };
        let outcome = match tokio::time::timeout_at(deadline, call(&mut conn)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(timed_out(what)),
        };
        match &outcome {
            Err(err) if breaks_connection(err) => {
                // The others were most likely cut off at the same moment (a
                // restart, a failover): open fresh ones instead.
                self.pool.discard_idle();
            }
            _ => self.conn = Some(conn),
        }
        outcome
    }

    /// Whether the connection is still there to use.
    fn is_alive(&self) -> bool {
        self.conn.is_some()
    }

    /// Runs a query, given up after [`PoolSettings::call_limit`].
    pub async fn fetch_all(
        &mut self,
        sql: &str,
        values: Values,
    ) -> Result<Vec<QueryResult>, DbErr> {
        let deadline = self.pool.call_deadline();
        self.fetch_all_by(sql, values, deadline).await
    }

    /// Runs a statement, given up after [`PoolSettings::call_limit`].
    pub async fn execute(&mut self, sql: &str, values: Values) -> Result<ExecResult, DbErr> {
        let deadline = self.pool.call_deadline();
        self.execute_by(sql, values, deadline).await
    }

    /// Runs statements without parameters, given up after
    /// [`PoolSettings::call_limit`].
    pub async fn execute_unprepared(&mut self, sql: &str) -> Result<ExecResult, DbErr> {
        let deadline = self.pool.call_deadline();
        self.execute_unprepared_by(sql, deadline).await
    }

    /// The span of one call: disabled (and free) unless a trace or the log
    /// filter wants it.
    fn statement_span(&self, sql: &str) -> tracing::Span {
        tracing::debug_span!(
            "db",
            otel.name = sql.split_whitespace().next().unwrap_or("SQL"),
            otel.kind = "client",
            "db.system" = self.pool.backend.otel_name(),
            "db.statement" = sql,
        )
    }

    async fn fetch_all_by(
        &mut self,
        sql: &str,
        values: Values,
        deadline: Deadline,
    ) -> Result<Vec<QueryResult>, DbErr> {
        let span = self.statement_span(sql);
        self.run("a query", deadline, async |conn| {
            conn.fetch_all(sql, values).await
        })
        .instrument(span)
        .await
        .map_err(|e| sqlx_err(DbErr::Query, e))
    }

    async fn execute_by(
        &mut self,
        sql: &str,
        values: Values,
        deadline: Deadline,
    ) -> Result<ExecResult, DbErr> {
        let span = self.statement_span(sql);
        self.run("a statement", deadline, async |conn| {
            conn.execute(sql, values).await
        })
        .instrument(span)
        .await
        .map_err(|e| sqlx_err(DbErr::Exec, e))
    }

    async fn execute_unprepared_by(
        &mut self,
        sql: &str,
        deadline: Deadline,
    ) -> Result<ExecResult, DbErr> {
        let span = self.statement_span(sql);
        self.run("a statement", deadline, async |conn| {
            conn.execute_unprepared(sql).await
        })
        .instrument(span)
        .await
        .map_err(|e| sqlx_err(DbErr::Exec, e))
    }
}

impl Pool {
    /// When a call starting now must have ended.
    fn call_deadline(&self) -> Deadline {
        Deadline::now() + self.settings.call_limit()
    }

    fn discard_idle(&self) {
        let dropped = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|p| p.into_inner()));
        self.open.fetch_sub(dropped.len(), Ordering::Relaxed);
    }
}

/// SQLite keeps memory statistics under one process-wide mutex that every
/// allocation of every connection takes; on many cores, connections queue
/// on it. taskql never reads those statistics, so they are turned off,
/// once, before this process opens SQLite (every connection opens through
/// this module, after this call).
fn configure_sqlite() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: SQLITE_CONFIG_MEMSTATUS takes one int. sqlite3_config must
        // not run while SQLite is in use; it runs once, before the first
        // connection of this process, and if SQLite was already initialised
        // it changes nothing and returns SQLITE_MISUSE.
        let rc = unsafe {
            libsqlite3_sys::sqlite3_config(
                libsqlite3_sys::SQLITE_CONFIG_MEMSTATUS,
                0 as std::ffi::c_int,
            )
        };
        if rc != libsqlite3_sys::SQLITE_OK {
            tracing::debug!(
                rc,
                "SQLite was started before its memory statistics could be turned off"
            );
        }
    });
}

impl Db {
    /// The service's pool; connections open when first needed, so a
    /// database that is down at start-up is retried by later requests.
    pub fn new(database: &DbSettings, settings: PoolSettings) -> Self {
        let (connector, size) = database.pool(&settings);
        Self::with_connector(database.backend(), connector, settings, size)
    }

    fn with_connector(
        backend: Backend,
        connector: Connector,
        settings: PoolSettings,
        size: u32,
    ) -> Self {
        let size = size.max(1) as usize;
        Self {
            pool: Arc::new(Pool {
                backend,
                connector,
                settings,
                size,
                slots: Arc::new(Semaphore::new(size)),
                idle: Mutex::new(Vec::with_capacity(size)),
                open: AtomicUsize::new(0),
                acquired: AtomicU64::new(0),
                waited_micros: AtomicU64::new(0),
                timeouts: AtomicU64::new(0),
            }),
        }
    }

    /// A pool of its own with `size` connections to the same database, with
    /// the same settings: for background work that must not queue behind
    /// requests for a connection (the change log's reader).
    pub fn apart(&self, size: u32) -> Self {
        let pool = &self.pool;
        Self::with_connector(pool.backend, pool.connector.clone(), pool.settings, size)
    }

    /// Like [`Db::new`], and opens one connection to show the database is reachable.
    pub async fn connect(database: &DbSettings, settings: PoolSettings) -> Result<Self, DbErr> {
        let db = Self::new(database, settings);
        db.acquire().await?;
        Ok(db)
    }

    pub fn backend(&self) -> Backend {
        self.pool.backend
    }

    pub fn settings(&self) -> PoolSettings {
        self.pool.settings
    }

    pub fn stats(&self) -> PoolStats {
        let pool = &self.pool;
        PoolStats {
            max: pool.size,
            open: pool.open.load(Ordering::Relaxed),
            in_use: pool.size - pool.slots.available_permits(),
            acquired: pool.acquired.load(Ordering::Relaxed),
            acquire_wait: Duration::from_micros(pool.waited_micros.load(Ordering::Relaxed)),
            acquire_timeouts: pool.timeouts.load(Ordering::Relaxed),
        }
    }

    /// Closes every idle connection; later requests open new ones. Called
    /// when the database is known to have gone away and come back.
    pub fn discard_idle(&self) {
        self.pool.discard_idle();
    }

    /// Closes the idle connections and refuses new work; connections in use
    /// close when their holders let go of them.
    pub async fn close(&self) {
        self.pool.slots.close();
        self.pool.discard_idle();
    }

    /// A connection, within `acquire_timeout` (SERVICE_UNAVAILABLE after).
    pub async fn acquire(&self) -> Result<Pooled, DbErr> {
        self.acquire_within(self.pool.settings.acquire_timeout)
            .await
    }

    async fn acquire_within(&self, limit: Duration) -> Result<Pooled, DbErr> {
        let pool = &self.pool;
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + limit);
        let timeout = || {
            pool.timeouts.fetch_add(1, Ordering::Relaxed);
            DbErr::ConnectionAcquire(ConnAcquireErr::Timeout)
        };
        let slot = match tokio::time::timeout_at(deadline, pool.slots.clone().acquire_owned()).await
        {
            Ok(Ok(slot)) => slot,
            Ok(Err(_)) => return Err(DbErr::ConnectionAcquire(ConnAcquireErr::ConnectionClosed)),
            Err(_) => return Err(timeout()),
        };
        let pooled = |conn| Pooled {
            conn: Some(conn),
            pool: pool.clone(),
            reusable: true,
            _slot: slot,
        };
        loop {
            let idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let conn = match idle {
                Some(idle) if idle.since.elapsed() < PING_AFTER_IDLE => idle.conn,
                Some(mut idle) => {
                    match tokio::time::timeout_at(deadline, idle.conn.ping()).await {
                        Ok(Ok(())) => idle.conn,
                        Ok(Err(_)) => {
                            // Stale: drop it and try the next one.
                            pool.open.fetch_sub(1, Ordering::Relaxed);
                            continue;
                        }
                        Err(_) => {
                            pool.open.fetch_sub(1, Ordering::Relaxed);
                            return Err(timeout());
                        }
                    }
                }
                None => {
                    match tokio::time::timeout_at(deadline, Conn::open(&pool.connector)).await {
                        Ok(Ok(conn)) => {
                            pool.open.fetch_add(1, Ordering::Relaxed);
                            conn
                        }
                        Ok(Err(err)) => return Err(sqlx_err(DbErr::Conn, err)),
                        Err(_) => return Err(timeout()),
                    }
                }
            };
            pool.acquired.fetch_add(1, Ordering::Relaxed);
            pool.waited_micros
                .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            return Ok(pooled(conn));
        }
    }

    /// Whether a connection answers within `limit` (for `/readyz`).
    pub async fn ping(&self, limit: Duration) -> Result<(), DbErr> {
        let started = Instant::now();
        let mut conn = self.acquire_within(limit).await?;
        let left = limit.saturating_sub(started.elapsed());
        let deadline = self.pool.call_deadline();
        let ping = conn.run("a ping", deadline, async |c| c.ping().await);
        match tokio::time::timeout(left, ping).await {
            Ok(outcome) => outcome.map_err(|e| sqlx_err(DbErr::Conn, e)),
            Err(_) => Err(sqlx_err(DbErr::Conn, timed_out("a ping"))),
        }
    }

    /// Starts a transaction on one connection; it rolls back unless committed.
    pub async fn begin(&self) -> Result<DbTransaction, DbErr> {
        let deadline = self.pool.call_deadline();
        let mut conn = self.acquire().await?;
        conn.execute_unprepared_by("BEGIN", deadline).await?;
        conn.reusable = false;
        Ok(DbTransaction {
            backend: self.pool.backend,
            conn: tokio::sync::Mutex::new(conn),
        })
    }

    /// This pool, for statements the caller knows only read (see [`Reads`]).
    pub fn reads(&self) -> Reads<'_> {
        Reads(self)
    }

    /// Runs a query; `retry` says whether it only reads.
    async fn query(&self, stmt: Statement, retry: Retry) -> Result<Vec<QueryResult>, DbErr> {
        let Statement { sql, values, .. } = stmt;
        let values = values.unwrap_or(Values(Vec::new()));
        let deadline = self.pool.call_deadline();
        let mut conn = self.acquire().await?;
        let again = (retry == Retry::OnStaleConnection).then(|| values.clone());
        match conn.fetch_all_by(&sql, values, deadline).await {
            Err(err) if !conn.is_alive() && again.is_some() && Deadline::now() < deadline => {
                drop(conn);
                tracing::debug!(error = %err, "a read failed on a stale connection; trying a fresh one");
                let left = deadline.saturating_duration_since(Deadline::now());
                let mut conn = self
                    .acquire_within(left.min(self.pool.settings.acquire_timeout))
                    .await?;
                conn.fetch_all_by(&sql, again.unwrap_or(Values(Vec::new())), deadline)
                    .await
            }
            outcome => outcome,
        }
    }
}

/// Whether a query is tried again on a fresh connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    Never,
    /// Once, when its connection turned out dead (the database restarted).
    OnStaleConnection,
}

/// A [`Db`] for statements its caller states only read. A query through it
/// that fails on a connection that turns out dead is tried once more on a
/// fresh one, within the same deadline: reading twice is harmless, waiting
/// twice as long is not. Statements run through [`Db`] itself are never
/// retried, since running a write twice may not be. `execute_*` calls are
/// never retried either way.
#[derive(Clone, Copy)]
pub struct Reads<'a>(&'a Db);

#[async_trait::async_trait]
impl ConnectionTrait for Reads<'_> {
    fn get_database_backend(&self) -> DatabaseBackend {
        self.0.get_database_backend()
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        self.0.execute_raw(stmt).await
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        ConnectionTrait::execute_unprepared(self.0, sql).await
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        Ok(self
            .0
            .query(stmt, Retry::OnStaleConnection)
            .await?
            .into_iter()
            .next())
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        self.0.query(stmt, Retry::OnStaleConnection).await
    }
}

#[async_trait::async_trait]
impl ConnectionTrait for Db {
    fn get_database_backend(&self) -> DatabaseBackend {
        self.pool.backend.sea_orm()
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        let values = stmt.values.unwrap_or(Values(Vec::new()));
        let deadline = self.pool.call_deadline();
        let mut conn = self.acquire().await?;
        conn.execute_by(&stmt.sql, values, deadline).await
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        let deadline = self.pool.call_deadline();
        let mut conn = self.acquire().await?;
        conn.execute_unprepared_by(sql, deadline).await
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        Ok(self.query(stmt, Retry::Never).await?.into_iter().next())
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        self.query(stmt, Retry::Never).await
    }
}

/// A transaction on one connection of a [`Db`]. Dropped without
/// [`commit`](Self::commit) or [`rollback`](Self::rollback), its connection
/// is closed, which rolls it back.
pub struct DbTransaction {
    backend: Backend,
    conn: tokio::sync::Mutex<Pooled>,
}

impl DbTransaction {
    pub async fn commit(self) -> Result<(), DbErr> {
        self.finish("COMMIT").await
    }

    pub async fn rollback(self) -> Result<(), DbErr> {
        self.finish("ROLLBACK").await
    }

    async fn finish(self, sql: &str) -> Result<(), DbErr> {
        let mut conn = self.conn.into_inner();
        conn.execute_unprepared(sql).await?;
        // The transaction is over: the connection may serve others again.
        conn.reusable = true;
        Ok(())
    }
}

#[async_trait::async_trait]
impl ConnectionTrait for DbTransaction {
    fn get_database_backend(&self) -> DatabaseBackend {
        self.backend.sea_orm()
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        let values = stmt.values.unwrap_or(Values(Vec::new()));
        self.conn.lock().await.execute(&stmt.sql, values).await
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        self.conn.lock().await.execute_unprepared(sql).await
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        Ok(self.query_all_raw(stmt).await?.into_iter().next())
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        let values = stmt.values.unwrap_or(Values(Vec::new()));
        self.conn.lock().await.fetch_all(&stmt.sql, values).await
    }
}

/// [`DbSettings::connect_migrator`] for a URL.
pub async fn connect(url: &str, max_connections: u32) -> Result<DatabaseConnection, DbErr> {
    DbSettings::new(url)?
        .connect_migrator(max_connections)
        .await
}

pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbErr> {
    Migrator::up(db, None).await
}
