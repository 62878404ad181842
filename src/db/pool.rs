//! The pool's connections: opening them, handing them out, running one
//! call on one within its deadline, and closing those that broke.
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sea_orm::sea_query::Values;
use sea_orm::sqlx::postgres::{PgConnectOptions, PgConnection};
use sea_orm::sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sea_orm::sqlx::{self, AssertSqlSafe, Connection as _};
use sea_orm::{ConnAcquireErr, DbErr, ExecResult, QueryResult, RuntimeErr};
use sea_query_sqlx::SqlxValues;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument as _;

use super::{Backend, Deadline, PING_AFTER_IDLE, PoolSettings, deadline};

#[derive(Clone)]
pub(super) enum Connector {
    Postgres(PgConnectOptions),
    Sqlite(SqliteConnectOptions),
}

pub(super) struct Pool {
    pub(super) backend: Backend,
    pub(super) connector: Connector,
    pub(super) settings: PoolSettings,
    pub(super) size: usize,
    pub(super) slots: Arc<Semaphore>,
    pub(super) idle: Mutex<Vec<Idle>>,
    pub(super) open: AtomicUsize,
    pub(super) acquired: AtomicU64,
    pub(super) waited_micros: AtomicU64,
    pub(super) timeouts: AtomicU64,
}

pub(super) struct Idle {
    pub(super) conn: Conn,
    pub(super) since: Instant,
}

pub(super) enum Conn {
    Postgres(PgConnection),
    Sqlite(SqliteConnection),
}

pub(super) fn sqlx_err(kind: fn(RuntimeErr) -> DbErr, err: sqlx::Error) -> DbErr {
    kind(RuntimeErr::SqlxError(Arc::new(err)))
}

pub(super) fn timed_out(what: &str) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("the database did not answer {what} in time"),
    ))
}

/// A call that may have changed something (a statement outside a
/// transaction, or `COMMIT`) went out, and its answer never came: the
/// connection broke or the deadline passed. Whether the change was made is
/// unknown.
#[derive(Debug, thiserror::Error)]
#[error("no answer came to a change sent to the database: {0}")]
struct Unconfirmed(String);

/// `err`, from a call that may have changed something, marked
/// [`Unconfirmed`] when it came after the call went out and left its
/// outcome unknown.
pub(super) fn unless_confirmed(err: DbErr) -> DbErr {
    let (DbErr::Exec(RuntimeErr::SqlxError(sqlx_error))
    | DbErr::Query(RuntimeErr::SqlxError(sqlx_error))) = &err
    else {
        return err;
    };
    // A call that found its connection already gone never went out.
    if matches!(sqlx_error.as_ref(), sqlx::Error::PoolClosed) || !breaks_connection(sqlx_error) {
        return err;
    }
    let unconfirmed = std::io::Error::other(Unconfirmed(sqlx_error.to_string()));
    sqlx_err(DbErr::Exec, sqlx::Error::Io(unconfirmed))
}

/// Whether `err` leaves unknown whether a change was made (see
/// [`Unconfirmed`]).
pub fn is_unconfirmed(err: &DbErr) -> bool {
    match err {
        DbErr::Exec(RuntimeErr::SqlxError(e)) => match e.as_ref() {
            sqlx::Error::Io(io) => io.get_ref().is_some_and(|inner| inner.is::<Unconfirmed>()),
            _ => false,
        },
        _ => false,
    }
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
        // insufficient resources; a deadlock or serialization failure (the
        // victim's transaction rolled back whole, so a retry is safe);
        // SQLite's "database is locked" after its busy timeout.
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            matches!(
                code.as_ref(),
                "57014" | "53300" | "53000" | "40P01" | "40001" | "5" | "6" | "517"
            )
        }),
        _ => false,
    }
}

/// Turns Nagle's algorithm off on every TCP socket of this process whose
/// peer listens on `port` (the database's).
///
/// sqlx 0.9.0 leaves it on, and writes a message in pieces of at most
/// 16 KiB: the second piece of a bigger one (a batch of 100 creates is
/// tens of KiB) waits for the database to acknowledge the first, which it
/// delays by 40 ms. Every such statement took 40 ms more, and a batch of
/// creates spent most of its time there. sqlx gives no hold of its socket,
/// so the sockets are found among the process's open descriptors, right
/// after each connect: one pass over them per new connection, which the
/// pool opens rarely. A descriptor that is not a TCP socket, or has
/// another peer, is left as it is.
#[cfg(unix)]
pub fn no_delay_to(port: u16) {
    use std::mem::ManuallyDrop;
    use std::os::fd::{FromRawFd, RawFd};
    let Ok(entries) = std::fs::read_dir("/proc/self/fd").or_else(|_| std::fs::read_dir("/dev/fd"))
    else {
        return;
    };
    for entry in entries.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        // SAFETY: the stream is never dropped, so the descriptor is never
        // closed and stays its owner's. On a descriptor that is not a
        // socket (or was closed meanwhile) both calls fail and do nothing;
        // on a socket reused meanwhile, NODELAY changes only when its
        // segments leave, never what it carries.
        let stream = ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
        if stream.peer_addr().is_ok_and(|peer| peer.port() == port) {
            let _ = stream.set_nodelay(true);
        }
    }
}

/// Elsewhere sqlx's sockets keep their defaults.
#[cfg(not(unix))]
pub fn no_delay_to(_port: u16) {}

impl Conn {
    pub(super) async fn open(connector: &Connector) -> Result<Self, sqlx::Error> {
        Ok(match connector {
            Connector::Postgres(options) => {
                let conn = PgConnection::connect_with(options).await?;
                if options.get_socket().is_none() {
                    no_delay_to(options.get_port());
                }
                Self::Postgres(conn)
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

    pub(super) async fn ping(&mut self) -> Result<(), sqlx::Error> {
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
    pub(super) conn: Option<Conn>,
    pub(super) pool: Arc<Pool>,
    /// Cleared while a transaction is open on the connection.
    pub(super) reusable: bool,
    pub(super) _slot: OwnedSemaphorePermit,
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
    pub(super) async fn run<T>(
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
            // Cut by its deadline: this connection may be mid-answer, so it
            // goes; the others may be fine (a slow statement, not a cut
            // network), so they stay.
            Err(_) => return Err(timed_out(what)),
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
    pub(super) fn is_alive(&self) -> bool {
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

    pub(super) async fn fetch_all_by(
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

    pub(super) async fn execute_by(
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

    pub(super) async fn execute_unprepared_by(
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
    /// A connection within `limit`: an idle one (pinged if it sat idle
    /// long), else a new one.
    pub(super) async fn acquire(self: &Arc<Self>, limit: Duration) -> Result<Pooled, DbErr> {
        let pool = self;
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

    /// When a call starting now must have ended: after the call limit, or
    /// at the request's deadline if that comes first.
    pub(super) fn call_deadline(&self) -> Deadline {
        let limit = Deadline::now() + self.settings.call_limit();
        deadline::current().map_or(limit, |request| request.min(limit))
    }

    pub(super) fn discard_idle(&self) {
        let dropped = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|p| p.into_inner()));
        self.open.fetch_sub(dropped.len(), Ordering::Relaxed);
    }
}
