//! The database settings: which database, and how the service's pool of
//! connections to it behaves. `crate::db` reads them.
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::parse::{self, Setting};

/// The database a `DATABASE_URL` names, decided once from its scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// `sqlite:…`, `postgres://…` or `postgresql://…`; `None` for anything else.
    pub fn of_url(url: &str) -> Option<Self> {
        if url.starts_with("sqlite:") {
            Some(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Self::Postgres)
        } else {
            None
        }
    }

    /// The database's name in OpenTelemetry's `db.system`.
    pub fn otel_name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgresql",
        }
    }

    pub fn sea_orm(self) -> sea_orm::DatabaseBackend {
        match self {
            Self::Sqlite => sea_orm::DatabaseBackend::Sqlite,
            Self::Postgres => sea_orm::DatabaseBackend::Postgres,
        }
    }
}

/// A checked `DATABASE_URL` (`sqlite:…`, `postgres://…` or
/// `postgresql://…`) and the database it names.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    backend: Backend,
    url: String,
}

impl std::fmt::Debug for DatabaseUrl {
    // The URL may hold a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseUrl")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl DatabaseUrl {
    pub fn parse(text: &str) -> Result<Self, String> {
        let url = text.trim();
        if url.is_empty() {
            return Err("is set but empty; unset it for sqlite://taskql.db?mode=rwc".into());
        }
        match Backend::of_url(url) {
            Some(backend) => Ok(Self {
                backend,
                url: url.to_owned(),
            }),
            None => Err("must start with sqlite:// or postgres://".into()),
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn as_str(&self) -> &str {
        &self.url
    }

    /// The SQLite database file the URL names, if it names one.
    pub fn sqlite_file(&self) -> Option<PathBuf> {
        let rest = self
            .url
            .strip_prefix("sqlite://")
            .or_else(|| self.url.strip_prefix("sqlite:"))?;
        let path = rest.split('?').next().unwrap_or_default();
        (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
    }
}

/// Which database, and the service's connections to it.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Database")]
pub struct DatabaseSettings {
    /// `sqlite://…` or `postgres://…`.
    #[arg(
        long = "database-url",
        value_name = "DATABASE_URL",
        env = "DATABASE_URL",
        default_value = "sqlite://taskql.db?mode=rwc",
        global = true,
        value_parser = Setting(DatabaseUrl::parse)
    )]
    pub url: DatabaseUrl,
    /// Database connection pool size (SQLite uses at most 8).
    #[arg(
        id = "db_max_connections",
        long = "db-max-connections",
        value_name = "DB_MAX_CONNECTIONS",
        env = "TASKQL_DB_MAX_CONNECTIONS",
        default_value = "10",
        global = true,
        value_parser = Setting(|text| parse::positive(text, 1000).map(|n| n as u32))
    )]
    pub max_connections: u32,
    /// Longest wait for a database connection before a request fails with
    /// SERVICE_UNAVAILABLE.
    #[arg(
        long = "db-acquire-timeout",
        value_name = "DB_ACQUIRE_TIMEOUT",
        env = "TASKQL_DB_ACQUIRE_TIMEOUT",
        default_value = "3s",
        global = true,
        value_parser = Setting(parse::timeout)
    )]
    pub acquire_timeout: Duration,
    /// Longest a database statement may run (PostgreSQL's
    /// `statement_timeout`): shorter than the request timeout, so that the
    /// database ends a slow statement before the request's deadline does.
    #[arg(
        long = "db-statement-timeout",
        value_name = "DB_STATEMENT_TIMEOUT",
        env = "TASKQL_DB_STATEMENT_TIMEOUT",
        default_value = "5s",
        global = true,
        value_parser = Setting(parse::timeout)
    )]
    pub statement_timeout: Duration,
    /// Longest a GraphQL operation, or one read of a subscription, waits on
    /// the database in all (connections, statements, `BEGIN`, `COMMIT`,
    /// retries) before it fails with SERVICE_UNAVAILABLE.
    #[arg(
        long = "request-timeout",
        value_name = "REQUEST_TIMEOUT",
        env = "TASKQL_REQUEST_TIMEOUT",
        default_value = "10s",
        global = true,
        value_parser = Setting(parse::timeout)
    )]
    pub request_timeout: Duration,
}

impl DatabaseSettings {
    /// The statement timeout must fall inside the request's deadline: past
    /// it the request closes the statement's connection before PostgreSQL's
    /// own cancel can end the statement and keep the connection.
    pub(super) fn check_deadlines(&self) -> Result<(), super::ConfigError> {
        if self.statement_timeout >= self.request_timeout {
            return Err(super::ConfigError::new(
                "TASKQL_DB_STATEMENT_TIMEOUT",
                format!(
                    "must be shorter than TASKQL_REQUEST_TIMEOUT ({:?}), so that the database \
                     ends a slow statement before the request's deadline does",
                    self.request_timeout
                ),
            ));
        }
        Ok(())
    }
}
