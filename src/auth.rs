//! Who is calling: the token a transport found (an `Authorization` header,
//! a websocket's `connection_init` payload) becomes a [`Caller`], and a
//! verified, unexpired JWT a `CurrentUser`. Every transport asks here, and
//! long-lived ones end on [`expiry`].
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{AuthConfig, ConfigError, KeySource};
use crate::error::TaskError;

/// Longest `sub` accepted; it is stored with every task the user owns.
pub const MAX_SUBJECT_LEN: usize = 255;

/// A user id a token may carry: 1 to [`MAX_SUBJECT_LEN`] bytes, no control
/// characters.
pub fn is_valid_subject(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_SUBJECT_LEN && !id.chars().any(char::is_control)
}
/// Clock skew allowed on `exp`.
pub const LEEWAY_SECS: u64 = 30;

/// The authenticated caller, taken from the request, never from an argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentUser {
    pub id: String,
    /// A worker: claims, heartbeats and updates any task, reads any task.
    pub is_service: bool,
    /// The token's `exp` (seconds since the epoch): a websocket outlives the
    /// check made when it connected, so operations on it check again.
    pub expires_at: Option<u64>,
}

/// Who sent a request, as the transport found it. Put in request data by the
/// HTTP handler and in connection data by the websocket handler.
#[derive(Debug, Clone)]
pub enum Caller {
    Anonymous,
    /// A token was sent but did not verify: never treated as anonymous.
    Rejected(String),
    Authenticated(CurrentUser),
}

/// Where a transport found the caller's token.
#[derive(Debug, Clone, Copy)]
pub enum Presented<'a> {
    /// An HTTP request's headers: `Authorization: Bearer <token>`.
    Headers(&'a axum::http::HeaderMap),
    /// A websocket's `connection_init` payload: `{"Authorization": "Bearer
    /// …"}`, `{"authorization": …}`, `{"token": "…"}`, or the same under
    /// `headers`.
    InitPayload(&'a serde_json::Value),
}

/// Why a caller may run nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No token at all.
    Anonymous,
    /// A token that did not verify, and why.
    Rejected(String),
    /// A token that verified but has expired since (with the leeway).
    Expired,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Anonymous => f.write_str("sign in: send 'Authorization: Bearer <token>'"),
            Self::Rejected(why) => f.write_str(why),
            Self::Expired => f.write_str("the token has expired; sign in again with a new one"),
        }
    }
}

impl Caller {
    /// The signed-in user whose token is still good, or why not.
    pub fn signed_in(&self) -> Result<&CurrentUser, Refusal> {
        match self {
            Self::Authenticated(user) if user.has_expired() => Err(Refusal::Expired),
            Self::Authenticated(user) => Ok(user),
            Self::Rejected(why) => Err(Refusal::Rejected(why.clone())),
            Self::Anonymous => Err(Refusal::Anonymous),
        }
    }

    /// Whether the caller is a signed-in worker (the service role).
    pub fn is_service(&self) -> bool {
        self.signed_in().is_ok_and(|user| user.is_service)
    }
}

/// Seconds since the epoch.
fn now_secs() -> u64 {
    chrono::Utc::now().timestamp().max(0) as u64
}

/// The token in one level of a `connection_init` payload, as an
/// `Authorization` value, or the key whose value is not a string.
fn token_in_init(object: &serde_json::Value) -> Option<Result<Cow<'_, str>, &'static str>> {
    for key in ["Authorization", "authorization"] {
        if let Some(value) = object.get(key) {
            return Some(value.as_str().map(Cow::Borrowed).ok_or(key));
        }
    }
    object.get("token").map(|value| {
        value
            .as_str()
            .map(|token| Cow::Owned(format!("Bearer {token}")))
            .ok_or("token")
    })
}

/// Resolves once a token expiring at `exp` has expired (with the leeway);
/// never for a token without `exp`. Long-lived transports (a websocket, an
/// event stream) end on it, so a client reconnects with a fresh token.
pub async fn expiry(exp: Option<u64>) {
    let Some(exp) = exp else {
        return std::future::pending().await;
    };
    let left = exp.saturating_add(LEEWAY_SECS).saturating_sub(now_secs()) + 1;
    tokio::time::sleep(std::time::Duration::from_secs(left)).await;
}

impl CurrentUser {
    /// Whether the token behind this caller has expired (with the leeway).
    pub fn has_expired(&self) -> bool {
        self.expires_at
            .is_some_and(|exp| now_secs() > exp.saturating_add(LEEWAY_SECS))
    }

    pub fn user(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            is_service: false,
            expires_at: None,
        }
    }

    pub fn service(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            is_service: true,
            expires_at: None,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// Required of users; a service key may lack it (Supabase's does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

/// Verifies bearer tokens. Built once from configuration and kept in app state.
#[derive(Clone)]
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
    issuer: Option<String>,
    audience: Option<String>,
    service_role: String,
    verified: Arc<VerifiedTokens>,
}

/// Tokens that verified, with the caller each makes. A client sends the same
/// token with every request until it expires; checking its signature and
/// claims again costs more than a small request's own work. Only an exact
/// token string finds its entry, and `exp` is checked on every use.
#[derive(Default)]
struct VerifiedTokens(Mutex<HashMap<Box<str>, CurrentUser>>);

/// Tokens kept before the cache starts over.
const VERIFIED_TOKENS: usize = 4096;

impl VerifiedTokens {
    fn get(&self, token: &str) -> Option<CurrentUser> {
        let user = self.lock().get(token).cloned()?;
        (!user.has_expired()).then_some(user)
    }

    fn insert(&self, token: &str, user: &CurrentUser) {
        let mut tokens = self.lock();
        if tokens.len() >= VERIFIED_TOKENS {
            tokens.clear();
        }
        tokens.insert(token.into(), user.clone());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, CurrentUser>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub use crate::config::JwtKey;

/// Why a key cannot check tokens, or a token cannot be signed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("is not a PEM RSA or EC public key")]
    NotAPublicKey,
    #[error("cannot sign the token: {0}")]
    Signing(#[from] jsonwebtoken::errors::Error),
}

impl Authenticator {
    /// The authenticator the token settings describe, checking tokens with
    /// `key` (from [`load_key`]).
    pub fn from_config(config: &AuthConfig, key: &JwtKey) -> Result<Self, ConfigError> {
        Self::new(
            key,
            config.issuer.as_deref(),
            config.audience.as_deref(),
            &config.service_role,
        )
        .map_err(|problem| ConfigError::new("TASKQL_JWT_PUBLIC_KEY_FILE", problem.to_string()))
    }

    pub fn new(
        key: &JwtKey,
        issuer: Option<&str>,
        audience: Option<&str>,
        service_role: &str,
    ) -> Result<Self, AuthError> {
        let (key, algorithms) = match key {
            JwtKey::Secret(secret) => (
                DecodingKey::from_secret(secret.as_bytes()),
                vec![Algorithm::HS256],
            ),
            JwtKey::PublicKeyPem(pem) => {
                if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
                    (key, vec![Algorithm::RS256])
                } else if let Ok(key) = DecodingKey::from_ec_pem(pem) {
                    (key, vec![Algorithm::ES256])
                } else {
                    return Err(AuthError::NotAPublicKey);
                }
            }
        };
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
        validation.leeway = LEEWAY_SECS;
        // `iss` and `aud` are checked below, where the role is known.
        validation.iss = None;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp"]);
        // A token is not usable before its `nbf` either (same leeway).
        validation.validate_nbf = true;
        Ok(Self {
            key,
            validation,
            issuer: issuer.map(str::to_owned),
            audience: audience.map(str::to_owned),
            service_role: service_role.to_owned(),
            verified: Default::default(),
        })
    }

    /// The caller a transport's token makes: none is anonymous, a bad one
    /// is rejected (never anonymous), a good one is authenticated.
    pub fn caller(&self, presented: Presented<'_>) -> Caller {
        let header = match presented {
            Presented::Headers(headers) => match headers.get(axum::http::header::AUTHORIZATION) {
                None => return Caller::Anonymous,
                Some(value) => match value.to_str() {
                    Ok(value) => Cow::Borrowed(value),
                    Err(_) => {
                        return Caller::Rejected("the Authorization header is not text".into());
                    }
                },
            },
            Presented::InitPayload(payload) => {
                let found = token_in_init(payload)
                    .or_else(|| payload.get("headers").and_then(token_in_init));
                match found {
                    None => return Caller::Anonymous,
                    Some(Err(key)) => {
                        return Caller::Rejected(format!("connection_init {key} must be a string"));
                    }
                    Some(Ok(header)) => header,
                }
            }
        };
        match self.authenticate_header(&header) {
            Ok(user) => Caller::Authenticated(user),
            Err(err) => Caller::Rejected(err.to_string()),
        }
    }

    /// Verifies an `Authorization` header value (`Bearer <jwt>`).
    pub fn authenticate_header(&self, header: &str) -> Result<CurrentUser, TaskError> {
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| {
                TaskError::Unauthenticated(
                    "the Authorization header must be 'Bearer <token>'".into(),
                )
            })?;
        self.authenticate_token(token.trim())
    }

    pub fn authenticate_token(&self, token: &str) -> Result<CurrentUser, TaskError> {
        if let Some(user) = self.verified.get(token) {
            return Ok(user);
        }
        let user = self.verify(token)?;
        self.verified.insert(token, &user);
        Ok(user)
    }

    fn verify(&self, token: &str) -> Result<CurrentUser, TaskError> {
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|err| {
                use jsonwebtoken::errors::ErrorKind;
                let why = match err.kind() {
                    ErrorKind::ExpiredSignature => "the token has expired",
                    ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)",
                    ErrorKind::InvalidSignature => "the token's signature does not verify",
                    ErrorKind::InvalidAlgorithm => "the token's algorithm is not accepted",
                    ErrorKind::InvalidIssuer => "the token's issuer is not accepted",
                    ErrorKind::InvalidAudience => "the token's audience is not accepted",
                    ErrorKind::MissingRequiredClaim(_) => "the token lacks a required claim",
                    _ => "the token is malformed",
                };
                TaskError::Unauthenticated(why.into())
            })?;
        let claims = data.claims;
        let is_service = claims.role.as_deref() == Some(self.service_role.as_str());
        // Users' tokens must name the configured issuer and audience. A
        // service key signed with the same key is trusted as it is:
        // Supabase's service_role key has `iss: "supabase"` and no `aud`.
        if !is_service {
            if let Some(issuer) = &self.issuer
                && claims.iss.as_deref() != Some(issuer.as_str())
            {
                return Err(TaskError::Unauthenticated(
                    "the token's issuer is not accepted".into(),
                ));
            }
            if let Some(audience) = &self.audience
                && !audience_contains(claims.aud.as_ref(), audience)
            {
                return Err(TaskError::Unauthenticated(
                    "the token's audience is not accepted".into(),
                ));
            }
        }
        let id = match claims.sub {
            Some(sub) => sub,
            None if is_service => self.service_role.clone(),
            None => {
                return Err(TaskError::Unauthenticated("the token has no sub".into()));
            }
        };
        if !is_valid_subject(&id) {
            return Err(TaskError::Unauthenticated(format!(
                "the token's sub must be 1 to {MAX_SUBJECT_LEN} bytes of printable text"
            )));
        }
        Ok(CurrentUser {
            id,
            is_service,
            expires_at: Some(claims.exp),
        })
    }
}

/// `aud` may be one string or a list of them.
fn audience_contains(aud: Option<&serde_json::Value>, expected: &str) -> bool {
    match aud {
        Some(serde_json::Value::String(aud)) => aud == expected,
        Some(serde_json::Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(expected)),
        _ => false,
    }
}

/// Signs an HS256 token, for `taskql token` and tests.
pub fn issue_token(
    secret: &str,
    user: &str,
    role: Option<&str>,
    ttl: std::time::Duration,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> Result<String, AuthError> {
    let now = chrono::Utc::now().timestamp().max(0) as u64;
    let claims = Claims {
        sub: Some(user.to_owned()),
        exp: now.saturating_add(ttl.as_secs()),
        role: Some(role.unwrap_or("authenticated").to_owned()),
        iss: issuer.map(str::to_owned),
        aud: audience.map(|a| serde_json::Value::String(a.to_owned())),
        iat: Some(now),
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// The key that checks (and, for a secret, signs) tokens. For a local
/// secret this is the step that makes its file, or reads it back.
pub fn load_key(config: &AuthConfig) -> Result<JwtKey, ConfigError> {
    match &config.key_source {
        KeySource::Configured(key) => Ok(key.clone()),
        KeySource::LocalSecret(path) => load_or_create_local_secret(path)
            .map(JwtKey::Secret)
            .map_err(|err| {
                ConfigError::new(
                    "TASKQL_JWT_SECRET",
                    format!(
                        "unset, and the local secret {} cannot be written: {err}",
                        path.display()
                    ),
                )
            }),
    }
}

/// Reads the local development secret beside the SQLite file, creating it
/// (mode 0600) on first use.
pub fn load_or_create_local_secret(path: &Path) -> std::io::Result<String> {
    if let Ok(secret) = std::fs::read_to_string(path) {
        let secret = secret.trim().to_owned();
        if secret.len() >= 32 {
            return Ok(secret);
        }
    }
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    use std::io::Write;
    let mut file = options.open(path)?;
    file.write_all(secret.as_bytes())?;
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loading_the_local_key_makes_it_once() {
        let dir = std::env::temp_dir().join(format!("taskql-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret_file = dir.join("tasks.db.jwt-secret");
        let config = AuthConfig {
            key_source: KeySource::LocalSecret(secret_file.clone()),
            issuer: None,
            audience: None,
            service_role: "service_role".into(),
        };
        let JwtKey::Secret(first) = load_key(&config).unwrap() else {
            panic!("a local secret")
        };
        assert!(secret_file.exists());
        let JwtKey::Secret(again) = load_key(&config).unwrap() else {
            panic!("a local secret")
        };
        assert_eq!(first, again);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A token is the same caller whichever way a transport carried it; a
    /// missing one is anonymous, a malformed one rejected.
    #[test]
    fn every_transport_finds_the_same_caller() {
        let secret = "a-unit-test-secret-0123456789abcdef";
        let auth =
            Authenticator::new(&JwtKey::Secret(secret.into()), None, None, "service_role").unwrap();
        let token = issue_token(
            secret,
            "alice",
            None,
            std::time::Duration::from_secs(60),
            None,
            None,
        )
        .unwrap();
        let bearer = format!("Bearer {token}");
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(axum::http::header::AUTHORIZATION, bearer.parse().unwrap());
        let carried = [
            Presented::Headers(&headers),
            Presented::InitPayload(&serde_json::json!({ "Authorization": bearer })),
            Presented::InitPayload(&serde_json::json!({ "authorization": bearer })),
            Presented::InitPayload(&serde_json::json!({ "token": token })),
            Presented::InitPayload(&serde_json::json!({ "headers": { "Authorization": bearer } })),
        ];
        for presented in carried {
            let caller = auth.caller(presented);
            let user = caller
                .signed_in()
                .unwrap_or_else(|why| panic!("{presented:?}: {why}"));
            assert_eq!((user.id.as_str(), user.is_service), ("alice", false));
        }
        let nothing = axum::http::HeaderMap::new();
        assert_eq!(
            auth.caller(Presented::Headers(&nothing))
                .signed_in()
                .unwrap_err(),
            Refusal::Anonymous
        );
        assert_eq!(
            auth.caller(Presented::InitPayload(&serde_json::json!({})))
                .signed_in()
                .unwrap_err(),
            Refusal::Anonymous
        );
        let not_text = serde_json::json!({ "token": 7 });
        assert_eq!(
            auth.caller(Presented::InitPayload(&not_text))
                .signed_in()
                .unwrap_err(),
            Refusal::Rejected("connection_init token must be a string".into())
        );
        let mut forged = axum::http::HeaderMap::new();
        forged.insert(
            axum::http::header::AUTHORIZATION,
            format!("{bearer}x").parse().unwrap(),
        );
        assert!(matches!(
            auth.caller(Presented::Headers(&forged)).signed_in(),
            Err(Refusal::Rejected(_))
        ));
        let expired = Caller::Authenticated(CurrentUser {
            expires_at: Some(now_secs() - LEEWAY_SECS - 5),
            ..CurrentUser::user("alice")
        });
        assert_eq!(expired.signed_in().unwrap_err(), Refusal::Expired);
    }
}
