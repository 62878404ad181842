//! How taskql connects to the database `DATABASE_URL` names: every
//! connection's options, written once.
use std::time::Duration;

use sea_orm::sqlx::postgres::PgConnectOptions;
use sea_orm::sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sea_orm::sqlx::{self, ConnectOptions as _};
use sea_orm::{DatabaseConnection, DbErr};

use super::{Backend, Connector, MAX_SQLITE_CONNECTIONS, PoolSettings, STATEMENT_CACHE, sqlx_err};

/// How to reach the database `DATABASE_URL` names: the URL parsed once,
/// and the one place that says how taskql's connections to it are set up,
/// for the service's pool ([`Db`]), the migrator ([`DbSettings::connect_migrator`])
/// and PostgreSQL's LISTEN connection ([`DbSettings::listener_options`]).
#[derive(Clone)]
pub struct DbSettings {
    backend: Backend,
    url: Connector,
}

impl std::fmt::Debug for DbSettings {
    // The parsed URL may hold a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbSettings")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

/// SQLite's busy timeout for the migrator: it may wait behind a running
/// server's writers longer than one of the server's statements may.
const MIGRATOR_BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// The migrator's longest wait for a connection.
const MIGRATOR_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

impl DbSettings {
    /// Parses `url` (`sqlite:…`, `postgres://…` or `postgresql://…`).
    pub fn new(url: &str) -> Result<Self, DbErr> {
        let backend = Backend::of_url(url).ok_or_else(|| {
            DbErr::Custom("DATABASE_URL must start with sqlite: or postgres://".into())
        })?;
        let conn_err = |e| sqlx_err(DbErr::Conn, e);
        let url = match backend {
            Backend::Postgres => Connector::Postgres(url.parse().map_err(conn_err)?),
            Backend::Sqlite => Connector::Sqlite(url.parse().map_err(conn_err)?),
        };
        Ok(Self { backend, url })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A PostgreSQL connection as taskql opens it, named `application_name`
    /// in `pg_stat_activity`.
    fn postgres(options: &PgConnectOptions, application_name: &str) -> PgConnectOptions {
        options
            .clone()
            .application_name(application_name)
            .statement_cache_capacity(STATEMENT_CACHE)
            .disable_statement_logging()
    }

    /// An SQLite connection as taskql opens it: writers queue for SQLite's
    /// one write lock up to `busy_timeout`, rather than fail at once.
    fn sqlite(options: &SqliteConnectOptions, busy_timeout: Duration) -> SqliteConnectOptions {
        configure_sqlite();
        options
            .clone()
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(busy_timeout)
            .foreign_keys(true)
            // A dependency's cancel runs through its dependents' dependents:
            // the triggers fire from their own statements (see the
            // dependencies migration).
            .pragma("recursive_triggers", "ON")
            .create_if_missing(true)
            .statement_cache_capacity(STATEMENT_CACHE)
            .disable_statement_logging()
    }

    /// The service's connections, and how many of them there may be.
    pub(super) fn pool(&self, settings: &PoolSettings) -> (Connector, u32) {
        match &self.url {
            Connector::Postgres(options) => {
                let options = Self::postgres(options, "taskql").options([
                    (
                        "statement_timeout",
                        settings.statement_timeout.as_millis().to_string(),
                    ),
                    // Every statement of the service is short. A plan whose
                    // estimate passes `jit_above_cost` (a claim with keys
                    // over a deep queue does) would be compiled first, which
                    // costs hundreds of milliseconds for a statement that
                    // runs in a few.
                    ("jit", "off".to_owned()),
                ]);
                (Connector::Postgres(options), settings.max_connections)
            }
            Connector::Sqlite(options) => (
                Connector::Sqlite(Self::sqlite(options, settings.statement_timeout)),
                settings.max_connections.min(MAX_SQLITE_CONNECTIONS),
            ),
        }
    }

    /// The options of PostgreSQL's LISTEN connection; `None` on SQLite.
    pub fn listener_options(&self, application_name: &str) -> Option<PgConnectOptions> {
        match &self.url {
            Connector::Postgres(options) => Some(Self::postgres(options, application_name)),
            Connector::Sqlite(_) => None,
        }
    }

    /// A SeaORM pool of at most `max_connections`, for migrations and
    /// one-off administration (the CLI's `migrate`, tests). The server
    /// itself runs on [`Db`].
    pub async fn connect_migrator(
        &self,
        max_connections: u32,
    ) -> Result<DatabaseConnection, DbErr> {
        use sea_orm::sqlx::pool::PoolOptions;
        use sea_orm::{SqlxPostgresConnector, SqlxSqliteConnector};
        let conn_err = |e| sqlx_err(DbErr::Conn, e);
        fn pool_options<DB: sqlx::Database>(max_connections: u32) -> PoolOptions<DB> {
            PoolOptions::new()
                .max_connections(max_connections)
                .min_connections(1)
                .acquire_timeout(MIGRATOR_ACQUIRE_TIMEOUT)
        }
        Ok(match &self.url {
            Connector::Postgres(options) => {
                let options = Self::postgres(options, "taskql");
                let pool = pool_options(max_connections)
                    .connect_with(options)
                    .await
                    .map_err(conn_err)?;
                SqlxPostgresConnector::from_sqlx_postgres_pool(pool)
            }
            Connector::Sqlite(options) => {
                let options = Self::sqlite(options, MIGRATOR_BUSY_TIMEOUT);
                let pool = pool_options(max_connections.min(MAX_SQLITE_CONNECTIONS))
                    .connect_with(options)
                    .await
                    .map_err(conn_err)?;
                SqlxSqliteConnector::from_sqlx_sqlite_pool(pool)
            }
        })
    }
}

/// SQLite keeps memory statistics under one process-wide mutex that every
/// allocation of every connection takes; on many cores, connections queue
/// on it. taskql never reads those statistics, so they are turned off,
/// once, before this process opens SQLite (every connection opens through
/// this module, after this call).
pub(super) fn configure_sqlite() {
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
