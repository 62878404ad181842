//! One typed configuration from flags and environment, validated at start.
//!
//! The command line's parsers turn each setting's text into its value (a
//! duration, a count, an address, a URL), so a bad value stops the command
//! before it runs, with a line naming the setting. The settings come in
//! groups, one file each, by what they configure; the defaults live in the
//! parser alone. This module calls into no other part of taskql: the layers
//! above read it.
mod auth;
mod database;
mod http;
mod parse;
mod tasks;
mod telemetry;

use clap::{Parser, Subcommand};
use std::time::Duration;

pub use auth::{AuthConfig, AuthSettings, JwtKey, KeySource};
pub use database::{Backend, DatabaseSettings, DatabaseUrl};
pub use http::HttpSettings;
pub use parse::{MAX_DURATION_DAYS, parse_bounded_duration, parse_duration, setting_error};
pub use tasks::{Retention, TaskSettings};
pub use telemetry::{TelemetrySettings, TraceExport, TraceSampler, trace_export};

#[derive(Debug, Parser)]
#[command(
    name = "taskql",
    version,
    about = "A GraphQL server that tracks users' background tasks"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the GraphQL API (the default).
    Serve,
    /// Run database migrations and exit.
    Migrate,
    /// Print a signed token for a user (HS256, with the configured secret).
    Token {
        /// The user id (`sub`).
        #[arg(long)]
        user: String,
        /// The `role` claim; `service_role` makes a worker.
        #[arg(long)]
        role: Option<String>,
        /// How long the token is valid, e.g. 30m, 12h, 7d.
        #[arg(long, default_value = "24h", value_parser = parse::Setting(parse_bounded_duration))]
        ttl: Duration,
    },
    /// Print the GraphQL schema (SDL).
    Schema,
}

/// Every setting is a flag and an environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    #[command(flatten)]
    pub database: DatabaseSettings,
    #[command(flatten)]
    pub auth: AuthSettings,
    #[command(flatten)]
    pub tasks: TaskSettings,
    #[command(flatten)]
    pub http: HttpSettings,
    #[command(flatten)]
    pub telemetry: TelemetrySettings,
    /// Log filter.
    #[arg(
        long = "log",
        env = "RUST_LOG",
        default_value = "info",
        global = true,
        help_heading = "Logs"
    )]
    pub log: String,
    /// Log lines as text (coloured only on a terminal) or as JSON objects.
    #[arg(
        long,
        env = "TASKQL_LOG_FORMAT",
        value_enum,
        ignore_case = true,
        default_value = "text",
        global = true,
        help_heading = "Logs"
    )]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

impl Settings {
    /// The settings these command-line arguments (program name first) and
    /// the environment give: the defaults live in the parser alone. A bad
    /// value's error has the [`ConfigError`] as its [`setting_error`].
    pub fn from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Cli::try_parse_from(args).map(|cli| cli.settings)
    }
}

/// A setting that cannot be used, named the way the operator set it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{setting}: {problem}")]
pub struct ConfigError {
    /// The environment variable, or the flag of a setting without one.
    pub setting: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(setting: &str, problem: impl Into<String>) -> Self {
        Self {
            setting: setting.to_owned(),
            problem: problem.into(),
        }
    }
}

/// Validated settings. Building one reads (a public key file) but never
/// writes: the local secret is made by `crate::auth::load_key`, a step of
/// its own.
#[derive(Debug, Clone)]
pub struct Config {
    pub database: DatabaseSettings,
    pub auth: AuthConfig,
    pub tasks: TaskSettings,
    pub http: HttpSettings,
}

impl Config {
    /// Checks what no one setting's parser can: the settings together.
    pub fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        settings.database.check_deadlines()?;
        Ok(Self {
            auth: AuthConfig::new(&settings.auth, &settings.database.url)?,
            database: settings.database.clone(),
            tasks: settings.tasks.clone(),
            http: settings.http.clone(),
        })
    }

    pub fn backend(&self) -> Backend {
        self.database.url.backend()
    }
}

/// The `RUST_LOG` filter, e.g. `info` or `taskql=debug,warn`.
pub fn log_filter(text: &str) -> Result<tracing_subscriber::EnvFilter, ConfigError> {
    if text.trim().is_empty() {
        return Err(ConfigError::new(
            "RUST_LOG",
            "is set but empty; unset it for 'info', or give a filter like info or taskql=debug,warn",
        ));
    }
    // tracing means to allow spaces around directives but mis-slices
    // `a=debug, b=info`; trimming each (it splits on commas too) avoids that.
    let directives: Vec<&str> = text.split(',').map(str::trim).collect();
    tracing_subscriber::EnvFilter::try_new(directives.join(",")).map_err(|err| {
        ConfigError::new(
            "RUST_LOG",
            format!("'{text}' is not a log filter like info or taskql=debug,warn ({err})"),
        )
    })
}

#[cfg(test)]
mod tests;
