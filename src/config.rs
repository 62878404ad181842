//! One typed configuration from flags and environment, validated at start.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::auth::JwtKey;

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
    #[arg(long, env = "TASKQL_JWT_PUBLIC_KEY_FILE", global = true)]
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
    /// Claims before a task whose leases keep expiring fails.
    #[arg(long, env = "TASKQL_MAX_ATTEMPTS", default_value = "3", global = true)]
    pub max_attempts: String,
    /// Delete finished tasks older than this (e.g. 30d); off when unset.
    #[arg(long, env = "TASKQL_RETENTION", global = true)]
    pub retention: Option<String>,
    /// Database connection pool size (SQLite uses at most 8).
    #[arg(
        long,
        env = "TASKQL_DB_MAX_CONNECTIONS",
        default_value = "10",
        global = true
    )]
    pub db_max_connections: String,
    /// Subscriptions one websocket connection may run at once.
    #[arg(
        long,
        env = "TASKQL_MAX_SUBSCRIPTIONS_PER_CONNECTION",
        default_value = "200",
        global = true
    )]
    pub max_subscriptions_per_connection: String,
    /// Log filter.
    #[arg(long = "log", env = "RUST_LOG", default_value = "info", global = true)]
    pub log: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            database_url: "sqlite://taskql.db?mode=rwc".into(),
            listen: "127.0.0.1:8000".into(),
            jwt_secret: None,
            jwt_public_key_file: None,
            jwt_issuer: None,
            jwt_audience: None,
            service_role: "service_role".into(),
            max_attempts: "3".into(),
            retention: None,
            db_max_connections: "10".into(),
            max_subscriptions_per_connection: "200".into(),
            log: "info".into(),
        }
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

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub listen: SocketAddr,
    pub jwt_key: JwtKey,
    /// Set when the key was made for local use beside a SQLite file.
    pub local_secret_file: Option<PathBuf>,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    pub service_role: String,
    pub max_attempts: i32,
    pub retention: Option<Duration>,
    pub db_max_connections: u32,
    pub max_subscriptions_per_connection: usize,
}

/// Parses `45s`, `15m`, `12h`, `30d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    (seconds > 0).then(|| Duration::from_secs(seconds))
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

impl Config {
    /// Validates every setting. With no JWT settings on SQLite, a local
    /// secret beside the database file is made (or reused).
    pub fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        let url = settings.database_url.trim().to_owned();
        let is_sqlite = url.starts_with("sqlite:");
        if !is_sqlite && !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
            return Err(bad(
                "DATABASE_URL",
                "must start with sqlite:// or postgres://",
            ));
        }
        let listen: SocketAddr = settings.listen.trim().parse().map_err(|_| {
            bad(
                "TASKQL_LISTEN",
                format!(
                    "'{}' is not an address like 127.0.0.1:8000",
                    settings.listen
                ),
            )
        })?;
        let secret = settings.jwt_secret.as_deref().filter(|s| !s.is_empty());
        let mut local_secret_file = None;
        let jwt_key = match (secret, &settings.jwt_public_key_file) {
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
                JwtKey::Secret(secret.to_owned())
            }
            (None, Some(path)) => {
                let pem = std::fs::read(path).map_err(|err| {
                    bad(
                        "TASKQL_JWT_PUBLIC_KEY_FILE",
                        format!("cannot read {}: {err}", path.display()),
                    )
                })?;
                JwtKey::PublicKeyPem(pem)
            }
            (None, None) if is_sqlite => {
                let database = sqlite_file(&url).unwrap_or_else(|| PathBuf::from("taskql.db"));
                let path = local_secret_path(&database);
                let secret = crate::auth::load_or_create_local_secret(&path).map_err(|err| {
                    bad(
                        "TASKQL_JWT_SECRET",
                        format!(
                            "unset, and the local secret {} cannot be written: {err}",
                            path.display()
                        ),
                    )
                })?;
                local_secret_file = Some(path);
                JwtKey::Secret(secret)
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
            Some(text) => Some(parse_duration(text).ok_or_else(|| {
                bad(
                    "TASKQL_RETENTION",
                    format!("'{text}' is not a duration like 30d, 12h or 90m"),
                )
            })?),
        };
        let db_max_connections = parse_positive(
            "TASKQL_DB_MAX_CONNECTIONS",
            &settings.db_max_connections,
            1000,
        )? as u32;
        let max_subscriptions_per_connection = parse_positive(
            "TASKQL_MAX_SUBSCRIPTIONS_PER_CONNECTION",
            &settings.max_subscriptions_per_connection,
            100_000,
        )? as usize;
        let config = Self {
            database_url: url,
            listen,
            jwt_key,
            local_secret_file,
            jwt_issuer: settings.jwt_issuer.clone().filter(|s| !s.is_empty()),
            jwt_audience: settings.jwt_audience.clone().filter(|s| !s.is_empty()),
            service_role,
            max_attempts,
            retention,
            db_max_connections,
            max_subscriptions_per_connection,
        };
        config.authenticator()?;
        Ok(config)
    }

    pub fn authenticator(&self) -> Result<crate::auth::Authenticator, ConfigError> {
        crate::auth::Authenticator::new(
            &self.jwt_key,
            self.jwt_issuer.as_deref(),
            self.jwt_audience.as_deref(),
            &self.service_role,
        )
        .map_err(|problem| bad("TASKQL_JWT_PUBLIC_KEY_FILE", problem))
    }

    pub fn is_postgres(&self) -> bool {
        !self.database_url.starts_with("sqlite:")
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
    fn bad_settings_name_themselves() {
        let base = Settings {
            jwt_secret: Some("0123456789abcdef0123456789abcdef".into()),
            ..Settings::default()
        };
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
    }
}
