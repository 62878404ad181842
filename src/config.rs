//! One typed configuration from flags and environment, validated at start.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand};

use crate::auth::JwtKey;
use crate::db::Backend;

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
        #[arg(long, default_value = "24h")]
        ttl: String,
    },
    /// Print the GraphQL schema (SDL).
    Schema,
}

/// Every setting is a flag and an environment variable.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// `sqlite://…` or `postgres://…`.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://taskql.db?mode=rwc",
        global = true
    )]
    pub database_url: String,
    /// Address to serve on.
    #[arg(
        long,
        env = "TASKQL_LISTEN",
        default_value = "127.0.0.1:8000",
        global = true
    )]
    pub listen: String,
    /// HS256 secret that signs tokens.
    #[arg(long, env = "TASKQL_JWT_SECRET", global = true, hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM public key (RSA or EC) for RS256/ES256 tokens.
    // Parsed as any OS string so that an empty value reaches validation
    // (clap's path parser would reject it with a message of its own).
    #[arg(
        long,
        env = "TASKQL_JWT_PUBLIC_KEY_FILE",
        global = true,
        value_parser = clap::builder::OsStringValueParser::new().map(PathBuf::from)
    )]
    pub jwt_public_key_file: Option<PathBuf>,
    /// Required `iss` claim.
    #[arg(long, env = "TASKQL_JWT_ISSUER", global = true)]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim.
    #[arg(long, env = "TASKQL_JWT_AUDIENCE", global = true)]
    pub jwt_audience: Option<String>,
    /// The `role` claim that makes a worker.
    #[arg(
        long,
        env = "TASKQL_SERVICE_ROLE",
        default_value = "service_role",
        global = true
    )]
    pub service_role: String,
    /// Attempts a task gets when neither its create nor its type's policy says.
    #[arg(long, env = "TASKQL_MAX_ATTEMPTS", default_value = "3", global = true)]
    pub max_attempts: String,
    /// Delete finished tasks older than this (e.g. 30d); off when unset.
    #[arg(long, env = "TASKQL_RETENTION", global = true)]
    pub retention: Option<String>,
    /// How long the change log keeps events, which is how far back a
    /// `taskEvents(after:)` cursor can resume.
    #[arg(
        long,
        env = "TASKQL_EVENT_RETENTION",
        default_value = "24h",
        global = true
    )]
    pub event_retention: String,
    /// Database connection pool size (SQLite uses at most 8).
    #[arg(
        long,
        env = "TASKQL_DB_MAX_CONNECTIONS",
        default_value = "10",
        global = true
    )]
    pub db_max_connections: String,
    /// Longest wait for a database connection before a request fails with
    /// SERVICE_UNAVAILABLE.
    #[arg(
        long,
        env = "TASKQL_DB_ACQUIRE_TIMEOUT",
        default_value = "3s",
        global = true
    )]
    pub db_acquire_timeout: String,
    /// Longest a database statement may run.
    #[arg(
        long,
        env = "TASKQL_DB_STATEMENT_TIMEOUT",
        default_value = "10s",
        global = true
    )]
    pub db_statement_timeout: String,
    /// Subscriptions one websocket connection may run at once.
    #[arg(
        long,
        env = "TASKQL_MAX_SUBSCRIPTIONS_PER_CONNECTION",
        default_value = "200",
        global = true
    )]
    pub max_subscriptions_per_connection: String,
    /// Longest a client may take to send a request's head; idle connections
    /// close after it too.
    #[arg(
        long,
        env = "TASKQL_HEADER_TIMEOUT",
        default_value = "10s",
        global = true
    )]
    pub header_timeout: String,
    /// Longest a client may take to send a request's body.
    #[arg(
        long,
        env = "TASKQL_BODY_TIMEOUT",
        default_value = "10s",
        global = true
    )]
    pub body_timeout: String,
    /// Most HTTP connections at once (default: from the open-file limit).
    #[arg(long, env = "TASKQL_MAX_CONNECTIONS", global = true)]
    pub max_connections: Option<String>,
    /// Most websockets and event streams at once (default: from the
    /// open-file limit, at most 10000).
    #[arg(long, env = "TASKQL_MAX_WEBSOCKETS", global = true)]
    pub max_websockets: Option<String>,
    /// How often a websocket is pinged and an event stream gets a keep-alive
    /// comment.
    #[arg(
        long,
        env = "TASKQL_KEEPALIVE_INTERVAL",
        default_value = "15s",
        global = true
    )]
    pub keepalive_interval: String,
    /// A JSON manifest of trusted documents (hash to document); when set,
    /// users may run only these.
    #[arg(
        long,
        env = "TASKQL_TRUSTED_DOCUMENTS",
        global = true,
        value_parser = clap::builder::OsStringValueParser::new().map(PathBuf::from)
    )]
    pub trusted_documents: Option<PathBuf>,
    /// Longest a shutdown waits for requests in flight.
    #[arg(
        long,
        env = "TASKQL_SHUTDOWN_TIMEOUT",
        default_value = "10s",
        global = true
    )]
    pub shutdown_timeout: String,
    /// Log filter.
    #[arg(long = "log", env = "RUST_LOG", default_value = "info", global = true)]
    pub log: String,
    /// Log lines as text (coloured only on a terminal) or as JSON objects.
    #[arg(
        long,
        env = "TASKQL_LOG_FORMAT",
        value_enum,
        ignore_case = true,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    /// Base URL of an OTLP/HTTP collector; spans go to `<url>/v1/traces`.
    /// Tracing is off while neither endpoint is set.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
    /// The full URL spans are sent to, instead of OTEL_EXPORTER_OTLP_ENDPOINT's.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", global = true)]
    pub otlp_traces_endpoint: Option<String>,
    /// How spans are sent: http/protobuf, the one protocol taskql speaks.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_PROTOCOL", global = true)]
    pub otlp_protocol: Option<String>,
    /// Like OTEL_EXPORTER_OTLP_PROTOCOL, for traces only (it wins).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", global = true)]
    pub otlp_traces_protocol: Option<String>,
    /// `service.name` of the spans taskql sends.
    #[arg(long, env = "OTEL_SERVICE_NAME", global = true)]
    pub otel_service_name: Option<String>,
    /// Which traces are kept: always_on, always_off, traceidratio,
    /// parentbased_always_on (the default), parentbased_always_off,
    /// parentbased_traceidratio.
    #[arg(long, env = "OTEL_TRACES_SAMPLER", global = true)]
    pub traces_sampler: Option<String>,
    /// The ratio of the traceidratio samplers, from 0 to 1 (default 1).
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG", global = true)]
    pub traces_sampler_arg: Option<String>,
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
    /// the environment give: the defaults live in the parser alone.
    pub fn from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Cli::try_parse_from(args).map(|cli| cli.settings)
    }
}

/// A setting that cannot be used, named the way the operator set it.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {problem}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub problem: String,
}

fn bad(setting: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        setting,
        problem: problem.into(),
    }
}

/// Where the key that checks tokens comes from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// `TASKQL_JWT_SECRET` or `TASKQL_JWT_PUBLIC_KEY_FILE`.
    Configured(JwtKey),
    /// No JWT settings on SQLite: a secret kept in this file beside the
    /// database, made the first time [`Config::load_key`] needs it.
    LocalSecret(PathBuf),
}

/// Validated settings. Building one reads (a public key file) but never
/// writes: the local secret is made by [`Config::load_key`], a step of its own.
#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub backend: Backend,
    pub listen: SocketAddr,
    pub key_source: KeySource,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    pub service_role: String,
    pub max_attempts: i32,
    pub retention: Option<Duration>,
    pub event_retention: Duration,
    pub db_max_connections: u32,
    pub db_acquire_timeout: Duration,
    pub db_statement_timeout: Duration,
    pub max_subscriptions_per_connection: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    /// `None`: sized from the open-file limit when serving.
    pub max_connections: Option<usize>,
    /// `None`: sized from the open-file limit when serving.
    pub max_websockets: Option<usize>,
    pub keepalive_interval: Duration,
    /// `Some`: users may run only these documents.
    pub trusted_documents: Option<std::sync::Arc<crate::http::persisted::TrustedDocuments>>,
    pub shutdown_timeout: Duration,
}

/// The longest retention or token lifetime, in days (100 years).
pub const MAX_DURATION_DAYS: u64 = 36_500;

/// Why a duration cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DurationError {
    /// Not `<digits><s|m|h|d>`, or zero.
    Malformed,
    /// Well-formed, but too many seconds to count.
    TooLong,
}

/// The seconds in `45s`, `15m`, `12h`, `30d` (a bare number is seconds).
fn duration_seconds(text: &str) -> Result<u64, DurationError> {
    use std::num::IntErrorKind;
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|err: std::num::ParseIntError| match err.kind() {
            IntErrorKind::PosOverflow => DurationError::TooLong,
            _ => DurationError::Malformed,
        })?;
    let per_unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(DurationError::Malformed),
    };
    let seconds = n.checked_mul(per_unit).ok_or(DurationError::TooLong)?;
    if seconds == 0 {
        return Err(DurationError::Malformed);
    }
    // Whatever is parsed here may be added to or taken from a chrono time.
    i64::try_from(seconds)
        .ok()
        .and_then(chrono::TimeDelta::try_seconds)
        .ok_or(DurationError::TooLong)?;
    Ok(seconds)
}

/// Parses `45s`, `15m`, `12h`, `30d` (a bare number is seconds). `None` for
/// zero, for anything else, and for more seconds than a `chrono::Duration`
/// holds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    duration_seconds(text).ok().map(Duration::from_secs)
}

/// Like [`parse_duration`], but at most [`MAX_DURATION_DAYS`]; the error is
/// the problem, to follow the setting's name.
pub fn parse_bounded_duration(text: &str) -> Result<Duration, String> {
    match duration_seconds(text) {
        Ok(seconds) if seconds <= MAX_DURATION_DAYS * 86_400 => Ok(Duration::from_secs(seconds)),
        Err(DurationError::Malformed) => {
            Err(format!("'{text}' is not a duration like 30d, 12h or 90m"))
        }
        Ok(_) | Err(DurationError::TooLong) => Err(format!(
            "'{text}' is too long; at most {MAX_DURATION_DAYS}d (100 years)"
        )),
    }
}

/// The value of an optional setting, which when given must not be blank:
/// an empty variable is a mistake, not a way to unset it.
fn not_blank<'a>(
    setting: &'static str,
    value: Option<&'a str>,
    hint: &str,
) -> Result<Option<&'a str>, ConfigError> {
    match value {
        Some(text) if text.trim().is_empty() => {
            Err(bad(setting, format!("is set but empty; {hint}")))
        }
        other => Ok(other),
    }
}

/// A checked `DATABASE_URL` (`sqlite:…`, `postgres://…` or
/// `postgresql://…`) and the database it names.
pub fn validate_database_url(text: &str) -> Result<(Backend, String), ConfigError> {
    let url = text.trim();
    if url.is_empty() {
        return Err(bad(
            "DATABASE_URL",
            "is set but empty; unset it for sqlite://taskql.db?mode=rwc",
        ));
    }
    match Backend::of_url(url) {
        Some(backend) => Ok((backend, url.to_owned())),
        None => Err(bad(
            "DATABASE_URL",
            "must start with sqlite:// or postgres://",
        )),
    }
}

/// The `RUST_LOG` filter, e.g. `info` or `taskql=debug,warn`.
pub fn log_filter(text: &str) -> Result<tracing_subscriber::EnvFilter, ConfigError> {
    if text.trim().is_empty() {
        return Err(bad(
            "RUST_LOG",
            "is set but empty; unset it for 'info', or give a filter like info or taskql=debug,warn",
        ));
    }
    // tracing means to allow spaces around directives but mis-slices
    // `a=debug, b=info`; trimming each (it splits on commas too) avoids that.
    let directives: Vec<&str> = text.split(',').map(str::trim).collect();
    tracing_subscriber::EnvFilter::try_new(directives.join(",")).map_err(|err| {
        bad(
            "RUST_LOG",
            format!("'{text}' is not a log filter like info or taskql=debug,warn ({err})"),
        )
    })
}

/// The longest timeout a setting may have: an hour.
const MAX_TIMEOUT_SECS: u64 = 3600;

/// A timeout like `3s`, `500ms` or `2m`, from 1 ms to an hour.
fn parse_timeout(setting: &'static str, text: &str) -> Result<Duration, ConfigError> {
    let trimmed = text.trim();
    let parsed = match trimmed.strip_suffix("ms") {
        Some(millis) => millis.parse::<u64>().ok().map(Duration::from_millis),
        None => duration_seconds(trimmed).ok().map(Duration::from_secs),
    };
    match parsed {
        Some(timeout) if !timeout.is_zero() && timeout.as_secs() <= MAX_TIMEOUT_SECS => Ok(timeout),
        _ => Err(bad(
            setting,
            format!("'{text}' is not a timeout like 3s, 500ms or 2m (at most 1h)"),
        )),
    }
}

fn parse_positive(setting: &'static str, text: &str, max: u64) -> Result<u64, ConfigError> {
    match text.trim().parse::<u64>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(bad(
            setting,
            format!("'{text}' is not a whole number from 1 to {max}"),
        )),
    }
}

/// The SQLite database file a `sqlite://` URL names, if it names one.
pub fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
}

fn local_secret_path(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(".jwt-secret");
    PathBuf::from(name)
}

/// Where and how spans are exported, when tracing is on.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceExport {
    /// The URL spans are POSTed to (OTLP/HTTP, protobuf).
    pub endpoint: String,
    /// `OTEL_SERVICE_NAME`; without it, a `service.name` in
    /// `OTEL_RESOURCE_ATTRIBUTES`, else `taskql`.
    pub service_name: Option<String>,
    pub sampler: TraceSampler,
}

/// Which traces are kept, as `OTEL_TRACES_SAMPLER` names them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceSampler {
    /// Follow the caller's decision when a request continues a trace.
    pub parent_based: bool,
    /// The share of new traces kept, from 0 to 1.
    pub ratio: f64,
}

/// An `OTEL_*` value: as OpenTelemetry's specification asks, an empty one
/// is the same as none.
fn otel_value(value: Option<&str>) -> Option<&str> {
    value.map(str::trim).filter(|text| !text.is_empty())
}

/// The URL spans go to: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as given, or
/// `OTEL_EXPORTER_OTLP_ENDPOINT` with `/v1/traces` appended.
fn traces_endpoint(settings: &Settings) -> Result<Option<String>, ConfigError> {
    let (setting, given, url) = match (
        otel_value(settings.otlp_traces_endpoint.as_deref()),
        otel_value(settings.otlp_endpoint.as_deref()),
    ) {
        (Some(url), _) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url, url.to_owned()),
        (None, Some(base)) => (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            base,
            format!("{}/v1/traces", base.trim_end_matches('/')),
        ),
        (None, None) => return Ok(None),
    };
    let is_http = url.parse::<axum::http::Uri>().ok().is_some_and(|uri| {
        matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some()
    });
    if !is_http {
        return Err(bad(
            setting,
            format!("'{given}' is not an http:// or https:// URL like http://localhost:4318"),
        ));
    }
    Ok(Some(url))
}

/// Whether tracing is on, and how: from the standard `OTEL_*` variables.
/// An unsupported protocol or sampler is an error even while tracing is off.
pub fn trace_export(settings: &Settings) -> Result<Option<TraceExport>, ConfigError> {
    let (setting, protocol) = match otel_value(settings.otlp_traces_protocol.as_deref()) {
        Some(protocol) => ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", Some(protocol)),
        None => (
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            otel_value(settings.otlp_protocol.as_deref()),
        ),
    };
    if let Some(protocol) = protocol.filter(|p| *p != "http/protobuf") {
        return Err(bad(
            setting,
            format!("'{protocol}' is not supported; taskql sends traces as http/protobuf"),
        ));
    }
    let sampler_name =
        otel_value(settings.traces_sampler.as_deref()).unwrap_or("parentbased_always_on");
    let ratio_arg = || -> Result<f64, ConfigError> {
        match otel_value(settings.traces_sampler_arg.as_deref()) {
            None => Ok(1.0),
            Some(text) => match text.parse::<f64>() {
                Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
                _ => Err(bad(
                    "OTEL_TRACES_SAMPLER_ARG",
                    format!("'{text}' is not a ratio from 0 to 1, like 0.25"),
                )),
            },
        }
    };
    let (parent_based, ratio) = match sampler_name {
        "always_on" => (false, 1.0),
        "always_off" => (false, 0.0),
        "traceidratio" => (false, ratio_arg()?),
        "parentbased_always_on" => (true, 1.0),
        "parentbased_always_off" => (true, 0.0),
        "parentbased_traceidratio" => (true, ratio_arg()?),
        other => {
            return Err(bad(
                "OTEL_TRACES_SAMPLER",
                format!(
                    "'{other}' is not one of always_on, always_off, traceidratio, \
                     parentbased_always_on, parentbased_always_off, parentbased_traceidratio"
                ),
            ));
        }
    };
    let Some(endpoint) = traces_endpoint(settings)? else {
        return Ok(None);
    };
    Ok(Some(TraceExport {
        endpoint,
        service_name: otel_value(settings.otel_service_name.as_deref()).map(str::to_owned),
        sampler: TraceSampler {
            parent_based,
            ratio,
        },
    }))
}

impl Config {
    /// Validates every setting. With no JWT settings on SQLite, the key is
    /// a local secret beside the database file, which is not made here.
    pub fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        let (backend, url) = validate_database_url(&settings.database_url)?;
        let listen: SocketAddr = settings.listen.trim().parse().map_err(|_| {
            bad(
                "TASKQL_LISTEN",
                format!(
                    "'{}' is not an address like 127.0.0.1:8000",
                    settings.listen
                ),
            )
        })?;
        let secret = not_blank(
            "TASKQL_JWT_SECRET",
            settings.jwt_secret.as_deref(),
            "give one of at least 16 bytes, or unset it (on SQLite a local secret is then made)",
        )?;
        let public_key_file = settings.jwt_public_key_file.as_deref();
        if public_key_file.is_some_and(|path| path.to_string_lossy().trim().is_empty()) {
            return Err(bad(
                "TASKQL_JWT_PUBLIC_KEY_FILE",
                "is set but empty; unset it, or give the path of a PEM public key",
            ));
        }
        let jwt_issuer = not_blank(
            "TASKQL_JWT_ISSUER",
            settings.jwt_issuer.as_deref(),
            "give the required `iss`, or unset it to accept any",
        )?
        .map(str::to_owned);
        let jwt_audience = not_blank(
            "TASKQL_JWT_AUDIENCE",
            settings.jwt_audience.as_deref(),
            "give the required `aud`, or unset it to accept any",
        )?
        .map(str::to_owned);
        let key_source = match (secret, public_key_file) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "TASKQL_JWT_SECRET",
                    "set either it or TASKQL_JWT_PUBLIC_KEY_FILE, not both",
                ));
            }
            (Some(secret), None) => {
                if secret.len() < 16 {
                    return Err(bad("TASKQL_JWT_SECRET", "must be at least 16 bytes long"));
                }
                KeySource::Configured(JwtKey::Secret(secret.to_owned()))
            }
            (None, Some(path)) => {
                let pem = std::fs::read(path).map_err(|err| {
                    bad(
                        "TASKQL_JWT_PUBLIC_KEY_FILE",
                        format!("cannot read {}: {err}", path.display()),
                    )
                })?;
                KeySource::Configured(JwtKey::PublicKeyPem(pem))
            }
            (None, None) if backend == Backend::Sqlite => {
                let database = sqlite_file(&url).unwrap_or_else(|| PathBuf::from("taskql.db"));
                KeySource::LocalSecret(local_secret_path(&database))
            }
            (None, None) => {
                return Err(bad(
                    "TASKQL_JWT_SECRET",
                    "must be set (or TASKQL_JWT_PUBLIC_KEY_FILE) when DATABASE_URL is PostgreSQL",
                ));
            }
        };
        let service_role = settings.service_role.trim().to_owned();
        if service_role.is_empty() {
            return Err(bad("TASKQL_SERVICE_ROLE", "must not be empty"));
        }
        let max_attempts =
            parse_positive("TASKQL_MAX_ATTEMPTS", &settings.max_attempts, 1000)? as i32;
        let retention = match settings.retention.as_deref().map(str::trim) {
            None | Some("") | Some("off") => None,
            Some(text) => Some(
                parse_bounded_duration(text).map_err(|problem| bad("TASKQL_RETENTION", problem))?,
            ),
        };
        let event_retention = match parse_bounded_duration(settings.event_retention.trim()) {
            Ok(retention) if retention.is_zero() => {
                return Err(bad("TASKQL_EVENT_RETENTION", "must be longer than 0"));
            }
            Ok(retention) => retention,
            Err(problem) => return Err(bad("TASKQL_EVENT_RETENTION", problem)),
        };
        let db_max_connections = parse_positive(
            "TASKQL_DB_MAX_CONNECTIONS",
            &settings.db_max_connections,
            1000,
        )? as u32;
        let db_acquire_timeout =
            parse_timeout("TASKQL_DB_ACQUIRE_TIMEOUT", &settings.db_acquire_timeout)?;
        let db_statement_timeout = parse_timeout(
            "TASKQL_DB_STATEMENT_TIMEOUT",
            &settings.db_statement_timeout,
        )?;
        let max_subscriptions_per_connection = parse_positive(
            "TASKQL_MAX_SUBSCRIPTIONS_PER_CONNECTION",
            &settings.max_subscriptions_per_connection,
            100_000,
        )? as usize;
        let header_timeout = parse_timeout("TASKQL_HEADER_TIMEOUT", &settings.header_timeout)?;
        let body_timeout = parse_timeout("TASKQL_BODY_TIMEOUT", &settings.body_timeout)?;
        let max_connections = settings
            .max_connections
            .as_deref()
            .map(|text| parse_positive("TASKQL_MAX_CONNECTIONS", text, 1_000_000))
            .transpose()?
            .map(|n| n as usize);
        let max_websockets = settings
            .max_websockets
            .as_deref()
            .map(|text| parse_positive("TASKQL_MAX_WEBSOCKETS", text, 1_000_000))
            .transpose()?
            .map(|n| n as usize);
        let keepalive_interval =
            parse_timeout("TASKQL_KEEPALIVE_INTERVAL", &settings.keepalive_interval)?;
        let trusted_documents = match settings.trusted_documents.as_deref() {
            None => None,
            Some(path) if path.to_string_lossy().trim().is_empty() => {
                return Err(bad(
                    "TASKQL_TRUSTED_DOCUMENTS",
                    "is set but empty; unset it, or give the path of a JSON manifest",
                ));
            }
            Some(path) => Some(std::sync::Arc::new(
                crate::http::persisted::TrustedDocuments::load(path)
                    .map_err(|problem| bad("TASKQL_TRUSTED_DOCUMENTS", problem))?,
            )),
        };
        let shutdown_timeout =
            parse_timeout("TASKQL_SHUTDOWN_TIMEOUT", &settings.shutdown_timeout)?;
        let config = Self {
            database_url: url,
            backend,
            listen,
            key_source,
            jwt_issuer,
            jwt_audience,
            service_role,
            max_attempts,
            retention,
            event_retention,
            db_max_connections,
            db_acquire_timeout,
            db_statement_timeout,
            max_subscriptions_per_connection,
            header_timeout,
            body_timeout,
            max_connections,
            max_websockets,
            keepalive_interval,
            trusted_documents,
            shutdown_timeout,
        };
        // A key that does not parse is a start-up error, not a 401 later.
        if let KeySource::Configured(key) = &config.key_source {
            config.authenticator(key)?;
        }
        Ok(config)
    }

    /// The key that checks (and, for a secret, signs) tokens. For a local
    /// secret this is the step that makes its file, or reads it back.
    pub fn load_key(&self) -> Result<JwtKey, ConfigError> {
        match &self.key_source {
            KeySource::Configured(key) => Ok(key.clone()),
            KeySource::LocalSecret(path) => crate::auth::load_or_create_local_secret(path)
                .map(JwtKey::Secret)
                .map_err(|err| {
                    bad(
                        "TASKQL_JWT_SECRET",
                        format!(
                            "unset, and the local secret {} cannot be written: {err}",
                            path.display()
                        ),
                    )
                }),
        }
    }

    pub fn authenticator(&self, key: &JwtKey) -> Result<crate::auth::Authenticator, ConfigError> {
        crate::auth::Authenticator::new(
            key,
            self.jwt_issuer.as_deref(),
            self.jwt_audience.as_deref(),
            &self.service_role,
        )
        .map_err(|problem| bad("TASKQL_JWT_PUBLIC_KEY_FILE", problem.to_string()))
    }

    /// The local secret's file, when the key is one.
    pub fn local_secret_file(&self) -> Option<&Path> {
        match &self.key_source {
            KeySource::LocalSecret(path) => Some(path),
            KeySource::Configured(_) => None,
        }
    }

    /// Caps on HTTP connections and websockets: as set, else sized from the
    /// open-file limit.
    pub fn connection_caps(&self) -> (usize, usize) {
        let (connections, websockets) = crate::http::serve::default_caps(
            crate::http::serve::open_file_limit(),
            self.db_max_connections as usize,
        );
        (
            self.max_connections.unwrap_or(connections),
            self.max_websockets.unwrap_or(websockets),
        )
    }

    /// How the service's database connections behave.
    pub fn pool_settings(&self) -> crate::db::PoolSettings {
        crate::db::PoolSettings {
            max_connections: self.db_max_connections,
            acquire_timeout: self.db_acquire_timeout,
            statement_timeout: self.db_statement_timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("30d"),
            Some(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(parse_duration("90m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("45"), Some(Duration::from_secs(45)));
        for bad in ["", "0s", "d", "3w", "-1h", "1.5h"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn durations_beyond_chrono_are_rejected() {
        // chrono::Duration holds at most i64::MAX milliseconds.
        let max = i64::MAX as u64 / 1000;
        assert_eq!(
            parse_duration(&max.to_string()),
            Some(Duration::from_secs(max))
        );
        for huge in [
            (max + 1).to_string(),
            u64::MAX.to_string(),
            "99999999999999999999d".into(),
            "100000000000000d".into(),
            "3000000000000000h".into(),
        ] {
            assert_eq!(parse_duration(&huge), None, "{huge}");
            let problem = parse_bounded_duration(&huge).expect_err(&huge);
            assert!(problem.contains("too long"), "{huge}: {problem}");
        }
    }

    #[test]
    fn bounded_durations_stop_at_100_years() {
        assert_eq!(
            parse_bounded_duration("36500d"),
            Ok(Duration::from_secs(36_500 * 86_400))
        );
        assert_eq!(
            parse_bounded_duration("12h"),
            Ok(Duration::from_secs(43_200))
        );
        // Within chrono's range, but not a sensible retention or lifetime.
        assert!(parse_duration("100000000d").is_some());
        for long in ["36501d", "876001h", "100000000d"] {
            let problem = parse_bounded_duration(long).expect_err(long);
            assert_eq!(
                problem,
                format!("'{long}' is too long; at most 36500d (100 years)")
            );
        }
        for bad in ["", "0s", "forever", "1.5h"] {
            let problem = parse_bounded_duration(bad).expect_err(bad);
            assert!(problem.contains("is not a duration"), "{bad}: {problem}");
        }
    }

    #[test]
    fn empty_settings_are_errors_not_unset() {
        let base =
            Settings::from_args(["taskql", "--jwt-secret", "0123456789abcdef0123456789abcdef"])
                .unwrap();
        let cases: Vec<(Settings, &str)> = vec![
            (
                // Not a cue to make a local secret on SQLite.
                Settings {
                    jwt_secret: Some(String::new()),
                    ..base.clone()
                },
                "TASKQL_JWT_SECRET",
            ),
            (
                Settings {
                    jwt_secret: Some("  ".into()),
                    ..base.clone()
                },
                "TASKQL_JWT_SECRET",
            ),
            (
                Settings {
                    jwt_issuer: Some(String::new()),
                    ..base.clone()
                },
                "TASKQL_JWT_ISSUER",
            ),
            (
                Settings {
                    jwt_audience: Some(String::new()),
                    ..base.clone()
                },
                "TASKQL_JWT_AUDIENCE",
            ),
            (
                Settings {
                    jwt_secret: None,
                    jwt_public_key_file: Some(PathBuf::new()),
                    ..base.clone()
                },
                "TASKQL_JWT_PUBLIC_KEY_FILE",
            ),
            (
                Settings {
                    database_url: String::new(),
                    ..base.clone()
                },
                "DATABASE_URL",
            ),
        ];
        for (settings, name) in cases {
            let err = Config::from_settings(&settings).expect_err(name);
            assert_eq!(err.setting, name);
            assert!(err.problem.starts_with("is set but empty"), "{err}");
        }
        assert_eq!(
            validate_database_url(" ").unwrap_err().setting,
            "DATABASE_URL"
        );
        // Given, they are kept.
        let config = Config::from_settings(&Settings {
            jwt_issuer: Some("https://issuer".into()),
            jwt_audience: Some("authenticated".into()),
            ..base
        })
        .unwrap();
        assert_eq!(config.jwt_issuer.as_deref(), Some("https://issuer"));
        assert_eq!(config.jwt_audience.as_deref(), Some("authenticated"));
    }

    #[test]
    fn log_filters_are_checked() {
        for good in [
            "info",
            "warn",
            "taskql=debug,warn",
            "warn,taskql::service=trace",
            "taskql=debug, tower_http=info",
        ] {
            assert!(log_filter(good).is_ok(), "{good}");
        }
        for bad in ["info,[bad", "taskql=loud", "", "  "] {
            let err = log_filter(bad).expect_err(bad);
            assert_eq!(err.setting, "RUST_LOG");
            assert!(!err.to_string().contains('\n'), "{err}");
        }
    }

    #[test]
    fn trace_settings_follow_the_otel_variables() {
        let base = Settings {
            otlp_endpoint: None,
            otlp_traces_endpoint: None,
            otlp_protocol: None,
            otlp_traces_protocol: None,
            otel_service_name: None,
            traces_sampler: None,
            traces_sampler_arg: None,
            ..Settings::from_args(["taskql"]).unwrap()
        };
        let off = |settings: &Settings| trace_export(settings).unwrap().is_none();
        assert!(off(&base));
        assert!(off(&Settings {
            otlp_endpoint: Some(" ".into()),
            ..base.clone()
        }));
        let on = trace_export(&Settings {
            otlp_endpoint: Some("http://collector:4318/".into()),
            ..base.clone()
        })
        .unwrap()
        .unwrap();
        assert_eq!(
            on,
            TraceExport {
                endpoint: "http://collector:4318/v1/traces".into(),
                service_name: None,
                sampler: TraceSampler {
                    parent_based: true,
                    ratio: 1.0
                },
            }
        );
        let own = trace_export(&Settings {
            otlp_endpoint: Some("http://collector:4318".into()),
            otlp_traces_endpoint: Some("https://traces.example/in".into()),
            otlp_protocol: Some("grpc".into()),
            otlp_traces_protocol: Some("http/protobuf".into()),
            otel_service_name: Some("tasks-eu".into()),
            traces_sampler: Some("traceidratio".into()),
            traces_sampler_arg: Some("0.25".into()),
            ..base.clone()
        })
        .unwrap()
        .unwrap();
        assert_eq!(own.endpoint, "https://traces.example/in");
        assert_eq!(own.service_name.as_deref(), Some("tasks-eu"));
        assert_eq!(
            own.sampler,
            TraceSampler {
                parent_based: false,
                ratio: 0.25
            }
        );
        let refused = |settings: Settings| trace_export(&settings).unwrap_err().setting;
        assert_eq!(
            refused(Settings {
                otlp_protocol: Some("grpc".into()),
                ..base.clone()
            }),
            "OTEL_EXPORTER_OTLP_PROTOCOL"
        );
        assert_eq!(
            refused(Settings {
                traces_sampler: Some("parentbased_traceidratio".into()),
                traces_sampler_arg: Some("-1".into()),
                ..base.clone()
            }),
            "OTEL_TRACES_SAMPLER_ARG"
        );
        assert_eq!(
            refused(Settings {
                otlp_traces_endpoint: Some("ftp://collector".into()),
                ..base.clone()
            }),
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        );
    }

    #[test]
    fn bad_settings_name_themselves() {
        let base =
            Settings::from_args(["taskql", "--jwt-secret", "0123456789abcdef0123456789abcdef"])
                .unwrap();
        let cases: Vec<(Settings, &str)> = vec![
            (
                Settings {
                    listen: "nope".into(),
                    ..base.clone()
                },
                "TASKQL_LISTEN",
            ),
            (
                Settings {
                    database_url: "mysql://x".into(),
                    ..base.clone()
                },
                "DATABASE_URL",
            ),
            (
                Settings {
                    max_attempts: "0".into(),
                    ..base.clone()
                },
                "TASKQL_MAX_ATTEMPTS",
            ),
            (
                Settings {
                    retention: Some("forever".into()),
                    ..base.clone()
                },
                "TASKQL_RETENTION",
            ),
            (
                // Would overflow taking it from now in the retention task.
                Settings {
                    retention: Some("100000000d".into()),
                    ..base.clone()
                },
                "TASKQL_RETENTION",
            ),
            (
                Settings {
                    jwt_secret: Some("short".into()),
                    ..base.clone()
                },
                "TASKQL_JWT_SECRET",
            ),
            (
                Settings {
                    database_url: "postgres://x/y".into(),
                    jwt_secret: None,
                    ..base.clone()
                },
                "TASKQL_JWT_SECRET",
            ),
            (
                Settings {
                    jwt_public_key_file: Some("/nonexistent.pem".into()),
                    jwt_secret: None,
                    ..base.clone()
                },
                "TASKQL_JWT_PUBLIC_KEY_FILE",
            ),
        ];
        for (settings, name) in cases {
            let err = Config::from_settings(&settings).expect_err(name);
            assert_eq!(err.setting, name);
            assert!(err.to_string().starts_with(name));
        }
        assert!(Config::from_settings(&base).is_ok());
        let longest = Config::from_settings(&Settings {
            retention: Some("36500d".into()),
            ..base
        })
        .unwrap();
        assert_eq!(
            longest.retention,
            Some(Duration::from_secs(36_500 * 86_400))
        );
    }

    #[test]
    fn defaults_come_from_the_parser() {
        let settings = Settings::from_args(["taskql"]).unwrap();
        assert_eq!(settings.max_attempts, "3");
        assert_eq!(settings.service_role, "service_role");
        assert_eq!(settings.shutdown_timeout, "10s");
    }

    #[test]
    fn reading_the_settings_writes_no_file() {
        let dir = std::env::temp_dir().join(format!("taskql-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let database = dir.join("tasks.db");
        let url = format!("sqlite://{}?mode=rwc", database.display());
        let config = Config::from_settings(
            &Settings::from_args(["taskql", "--database-url", url.as_str()]).unwrap(),
        )
        .unwrap();
        assert_eq!(config.backend, Backend::Sqlite);
        let secret_file = dir.join("tasks.db.jwt-secret");
        assert_eq!(config.local_secret_file(), Some(secret_file.as_path()));
        assert!(
            !secret_file.exists(),
            "parsing made {}",
            secret_file.display()
        );
        // Loading the key is the step that makes it, and reads it back after.
        let JwtKey::Secret(first) = config.load_key().unwrap() else {
            panic!("a local secret")
        };
        assert!(secret_file.exists());
        let JwtKey::Secret(again) = config.load_key().unwrap() else {
            panic!("a local secret")
        };
        assert_eq!(first, again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
