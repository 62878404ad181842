//! The token settings: the key that checks tokens, the claims required of
//! them, and the role that makes a worker. `crate::auth` reads them.
use std::path::{Path, PathBuf};

use clap::Args;

use super::parse::{self, Setting};
use super::{Backend, ConfigError, DatabaseUrl};

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Tokens")]
pub struct AuthSettings {
    /// HS256 secret that signs tokens.
    #[arg(
        long = "jwt-secret",
        value_name = "JWT_SECRET",
        env = "TASKQL_JWT_SECRET",
        global = true,
        hide_env_values = true,
        value_parser = Setting(secret)
    )]
    pub secret: Option<String>,
    /// PEM public key (RSA or EC) for RS256/ES256 tokens.
    #[arg(
        long = "jwt-public-key-file",
        value_name = "JWT_PUBLIC_KEY_FILE",
        env = "TASKQL_JWT_PUBLIC_KEY_FILE",
        global = true,
        value_parser = Setting(|text| parse::path(text, "unset it, or give the path of a PEM public key"))
    )]
    pub public_key_file: Option<PathBuf>,
    /// Required `iss` claim.
    #[arg(
        long = "jwt-issuer",
        value_name = "JWT_ISSUER",
        env = "TASKQL_JWT_ISSUER",
        global = true,
        value_parser = Setting(|text| parse::not_blank(text, "give the required `iss`, or unset it to accept any"))
    )]
    pub issuer: Option<String>,
    /// Required `aud` claim.
    #[arg(
        long = "jwt-audience",
        value_name = "JWT_AUDIENCE",
        env = "TASKQL_JWT_AUDIENCE",
        global = true,
        value_parser = Setting(|text| parse::not_blank(text, "give the required `aud`, or unset it to accept any"))
    )]
    pub audience: Option<String>,
    /// The `role` claim that makes a worker.
    #[arg(
        long = "service-role",
        env = "TASKQL_SERVICE_ROLE",
        default_value = "service_role",
        global = true,
        value_parser = Setting(service_role)
    )]
    pub service_role: String,
}

fn secret(text: &str) -> Result<String, String> {
    let secret = parse::not_blank(
        text,
        "give one of at least 16 bytes, or unset it (on SQLite a local secret is then made)",
    )?;
    if secret.len() < 16 {
        return Err("must be at least 16 bytes long".into());
    }
    Ok(secret)
}

fn service_role(text: &str) -> Result<String, String> {
    match text.trim() {
        "" => Err("must not be empty".into()),
        role => Ok(role.to_owned()),
    }
}

/// The key that checks (and, for a secret, signs) tokens.
#[derive(Debug, Clone)]
pub enum JwtKey {
    Secret(String),
    PublicKeyPem(Vec<u8>),
}

/// Where the key that checks tokens comes from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// `TASKQL_JWT_SECRET` or `TASKQL_JWT_PUBLIC_KEY_FILE`.
    Configured(JwtKey),
    /// No JWT settings on SQLite: a secret kept in this file beside the
    /// database, made the first time `crate::auth::load_key` needs it.
    LocalSecret(PathBuf),
}

/// The token settings, checked together.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub key_source: KeySource,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub service_role: String,
}

impl AuthConfig {
    /// Reads a public key file, but writes nothing: with no JWT settings on
    /// SQLite, the key is a local secret beside the database file, not made here.
    pub fn new(settings: &AuthSettings, database: &DatabaseUrl) -> Result<Self, ConfigError> {
        let key_source = match (&settings.secret, &settings.public_key_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "TASKQL_JWT_SECRET",
                    "set either it or TASKQL_JWT_PUBLIC_KEY_FILE, not both",
                ));
            }
            (Some(secret), None) => KeySource::Configured(JwtKey::Secret(secret.clone())),
            (None, Some(path)) => {
                let pem = std::fs::read(path).map_err(|err| {
                    ConfigError::new(
                        "TASKQL_JWT_PUBLIC_KEY_FILE",
                        format!("cannot read {}: {err}", path.display()),
                    )
                })?;
                KeySource::Configured(JwtKey::PublicKeyPem(pem))
            }
            (None, None) if database.backend() == Backend::Sqlite => {
                let database = database
                    .sqlite_file()
                    .unwrap_or_else(|| PathBuf::from("taskql.db"));
                KeySource::LocalSecret(local_secret_path(&database))
            }
            (None, None) => {
                return Err(ConfigError::new(
                    "TASKQL_JWT_SECRET",
                    "must be set (or TASKQL_JWT_PUBLIC_KEY_FILE) when DATABASE_URL is PostgreSQL",
                ));
            }
        };
        Ok(Self {
            key_source,
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            service_role: settings.service_role.clone(),
        })
    }

    /// The local secret's file, when the key is one.
    pub fn local_secret_file(&self) -> Option<&Path> {
        match &self.key_source {
            KeySource::LocalSecret(path) => Some(path),
            KeySource::Configured(_) => None,
        }
    }
}

fn local_secret_path(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(".jwt-secret");
    PathBuf::from(name)
}
