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
//! enforced by PostgreSQL), each call as a whole, here (a connection and its
//! statement within `acquire_timeout + statement_timeout`, and never past
//! `request_timeout`), and every call of one request together, by the
//! request's deadline ([`deadline`]). In a network partition packets vanish,
//! the server's timeout never reaches taskql and TCP may wait indefinitely;
//! only this side's deadline ends the wait.
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
use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseConnection, DbErr, ExecResult, QueryResult, Statement,
};
use tokio::sync::Semaphore;

pub use crate::config::Backend;
use deadline::Deadline;
pub use settings::DbSettings;

pub mod deadline;
pub mod dialect;
mod pool;
mod settings;

use pool::{Connector, Pool, sqlx_err, timed_out, unless_confirmed};
pub use pool::{Pooled, is_unavailable, is_unconfirmed, no_delay_to};

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
    /// Longest a request's database calls may take together (see [`deadline`]).
    pub request_timeout: Duration,
}

impl From<&crate::config::DatabaseSettings> for PoolSettings {
    fn from(settings: &crate::config::DatabaseSettings) -> Self {
        Self {
            max_connections: settings.max_connections,
            acquire_timeout: settings.acquire_timeout,
            statement_timeout: settings.statement_timeout,
            request_timeout: settings.request_timeout,
        }
    }
}

impl PoolSettings {
    /// The longest one database call takes on this side: getting a
    /// connection, then its statement (in a transaction, `BEGIN`, each
    /// statement and `COMMIT` are calls of their own), and never longer than
    /// a whole request. Past it the call fails with SERVICE_UNAVAILABLE and
    /// its connection is closed. What the wait for a connection left of
    /// `acquire_timeout` is the statement's grace past `statement_timeout`,
    /// for the server's own timeout to answer first. A request's deadline
    /// ([`deadline`]) may end a call sooner.
    pub fn call_limit(&self) -> Duration {
        (self.acquire_timeout + self.statement_timeout).min(self.request_timeout)
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

    /// A connection, within `acquire_timeout` and the request's deadline
    /// (SERVICE_UNAVAILABLE after).
    pub async fn acquire(&self) -> Result<Pooled, DbErr> {
        self.acquire_within(self.pool.settings.acquire_timeout)
            .await
    }

    async fn acquire_within(&self, limit: Duration) -> Result<Pooled, DbErr> {
        let limit = match deadline::current() {
            Some(deadline) => limit.min(deadline.saturating_duration_since(Deadline::now())),
            None => limit,
        };
        self.pool.acquire(limit).await
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
        self.begin_with("BEGIN").await
    }

    /// Starts a transaction that reads, then writes what it read decided:
    /// on SQLite it takes the write lock at once (`BEGIN IMMEDIATE`), so no
    /// other writer commits between its reads and its writes. On PostgreSQL
    /// it is [`Db::begin`]; lock what must not change (`FOR SHARE`).
    pub async fn begin_write(&self) -> Result<DbTransaction, DbErr> {
        match self.pool.backend {
            Backend::Sqlite => self.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.begin_with("BEGIN").await,
        }
    }

    async fn begin_with(&self, begin: &str) -> Result<DbTransaction, DbErr> {
        let deadline = self.pool.call_deadline();
        let mut conn = self.acquire().await?;
        conn.execute_unprepared_by(begin, deadline).await?;
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
        let outcome = match conn.fetch_all_by(&sql, values, deadline).await {
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
        };
        match retry {
            Retry::Never => outcome.map_err(unless_confirmed),
            Retry::OnStaleConnection => outcome,
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
        conn.execute_by(&stmt.sql, values, deadline)
            .await
            .map_err(unless_confirmed)
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        let deadline = self.pool.call_deadline();
        let mut conn = self.acquire().await?;
        conn.execute_unprepared_by(sql, deadline)
            .await
            .map_err(unless_confirmed)
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
    /// Commits; an error that leaves unknown whether the commit happened
    /// says so ([`is_unconfirmed`]).
    pub async fn commit(self) -> Result<(), DbErr> {
        self.finish("COMMIT").await.map_err(unless_confirmed)
    }

    pub async fn rollback(self) -> Result<(), DbErr> {
        self.finish("ROLLBACK").await
    }

    /// On PostgreSQL, takes the advisory lock `key` until the transaction
    /// ends, or says another holds it. SQLite has one writer at a time
    /// anyway: there it is always taken.
    pub async fn try_lock(&self, key: i64) -> Result<bool, DbErr> {
        self.advisory_lock("SELECT pg_try_advisory_xact_lock($1) AS locked", key)
            .await
    }

    /// Like [`Self::try_lock`], waiting for the lock when another holds it.
    pub async fn lock(&self, key: i64) -> Result<(), DbErr> {
        self.advisory_lock("SELECT pg_advisory_xact_lock($1) IS NULL AS locked", key)
            .await
            .map(drop)
    }

    async fn advisory_lock(&self, sql: &str, key: i64) -> Result<bool, DbErr> {
        if self.backend != Backend::Postgres {
            return Ok(true);
        }
        let statement =
            Statement::from_sql_and_values(DatabaseBackend::Postgres, sql, [key.into()]);
        match self.query_one_raw(statement).await? {
            Some(row) => row.try_get::<bool>("", "locked"),
            None => Err(DbErr::Custom("an advisory lock returned no row".into())),
        }
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
