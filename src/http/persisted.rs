//! Persisted documents: Apollo's automatic persisted queries (a client sends
//! `extensions.persistedQuery = {version: 1, sha256Hash}`, and the document
//! itself only when the server asks for it), and the trusted-documents mode
//! (`TASKQL_TRUSTED_DOCUMENTS`) in which users may run only the documents of
//! a manifest. Every transport (HTTP, event streams, websockets) resolves a
//! request here before it runs.
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_graphql::{ErrorExtensionValues, ServerError, Value};
use sha2::{Digest, Sha256};

use crate::auth::Caller;
use crate::error::ErrorCode;

/// Registered documents the server keeps, at most; the oldest go first.
const REGISTERED_DOCUMENTS: usize = 1024;
/// Bytes of registered documents the server keeps, at most.
const REGISTERED_BYTES: usize = 8 * 1024 * 1024;

/// The documents a manifest trusts, by the id clients send for them.
#[derive(Debug, Default)]
pub struct TrustedDocuments {
    by_id: HashMap<String, Arc<str>>,
    /// The SHA-256 of every trusted document: its text sent in full is trusted too.
    hashes: HashSet<String>,
}

impl TrustedDocuments {
    /// The manifest `TASKQL_TRUSTED_DOCUMENTS` names, when it is set: one
    /// that cannot be used is a start-up error.
    pub fn configured(
        settings: &crate::config::HttpSettings,
    ) -> Result<Option<Arc<Self>>, crate::config::ConfigError> {
        settings
            .trusted_documents
            .as_deref()
            .map(|path| {
                Self::load(path).map(Arc::new).map_err(|problem| {
                    crate::config::ConfigError::new("TASKQL_TRUSTED_DOCUMENTS", problem)
                })
            })
            .transpose()
    }

    /// Reads a manifest: `{"<hash>": "<document>", …}`, or Apollo's
    /// `{"format": "apollo-persisted-query-manifest", "version": 1,
    /// "operations": [{"id", "body", "name", "type"}]}`. The problem, to
    /// follow the setting's name, when it cannot be used.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
        Self::parse(&text).map_err(|problem| format!("{}: {problem}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let json: serde_json::Value =
            serde_json::from_str(text).map_err(|err| format!("is not JSON: {err}"))?;
        let serde_json::Value::Object(object) = json else {
            return Err("must be a JSON object of hash to document".into());
        };
        let mut documents = Vec::new();
        if object.get("format").and_then(|f| f.as_str()) == Some("apollo-persisted-query-manifest")
        {
            let operations = object
                .get("operations")
                .and_then(|o| o.as_array())
                .ok_or("an Apollo manifest needs an `operations` list")?;
            for (i, operation) in operations.iter().enumerate() {
                let id = operation.get("id").and_then(|v| v.as_str());
                let body = operation.get("body").and_then(|v| v.as_str());
                match (id, body) {
                    (Some(id), Some(body)) => documents.push((id.to_owned(), body.to_owned())),
                    _ => return Err(format!("operation {i} needs a string `id` and `body`")),
                }
            }
        } else {
            for (id, body) in object {
                match body {
                    serde_json::Value::String(body) => documents.push((id, body)),
                    _ => return Err(format!("the document of '{id}' is not a string")),
                }
            }
        }
        let mut trusted = Self::default();
        for (id, body) in documents {
            if let Err(err) = async_graphql::parser::parse_query(&body) {
                return Err(format!("the document of '{id}' does not parse: {err}"));
            }
            trusted.hashes.insert(sha256_hex(&body));
            trusted.by_id.insert(id, body.into());
        }
        Ok(trusted)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

fn sha256_hex(text: &str) -> String {
    format!("{:x}", Sha256::digest(text.as_bytes()))
}

/// Documents clients registered by hash: bounded in count and bytes, so
/// clients cannot make the server's memory grow by registering more.
#[derive(Default)]
struct Registered {
    documents: HashMap<String, Arc<str>>,
    order: VecDeque<String>,
    bytes: usize,
}

impl Registered {
    fn insert(&mut self, hash: String, query: Arc<str>) {
        if query.len() > REGISTERED_BYTES || self.documents.contains_key(&hash) {
            return;
        }
        while self.documents.len() >= REGISTERED_DOCUMENTS
            || self.bytes + query.len() > REGISTERED_BYTES
        {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(gone) = self.documents.remove(&oldest) {
                self.bytes -= gone.len();
            }
        }
        self.bytes += query.len();
        self.order.push_back(hash.clone());
        self.documents.insert(hash, query);
    }
}

/// Persisted documents of one server.
pub struct PersistedDocuments {
    registered: Mutex<Registered>,
    trusted: Option<Arc<TrustedDocuments>>,
}

/// A request error with its `extensions.code`, as the client sees it.
fn refusal(code: ErrorCode, message: impl Into<String>) -> ServerError {
    let mut error = ServerError::new(message, None);
    let mut extensions = ErrorExtensionValues::default();
    extensions.set("code", Value::from(code.as_str()));
    error.extensions = Some(extensions);
    error
}

/// What `extensions.persistedQuery` holds.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct PersistedQuery {
    version: i64,
    sha256_hash: String,
}

impl PersistedDocuments {
    pub fn new(trusted: Option<Arc<TrustedDocuments>>) -> Self {
        Self {
            registered: Mutex::new(Registered::default()),
            trusted,
        }
    }

    /// Whether only trusted documents run for users.
    pub fn trusted_only(&self) -> bool {
        self.trusted.is_some()
    }

    /// Gives `request` the document it runs (from its hash, when it sent
    /// only that), or says why it cannot run.
    pub fn resolve(
        &self,
        caller: &Caller,
        request: &mut async_graphql::Request,
    ) -> Result<(), ServerError> {
        let persisted = match request.extensions.remove("persistedQuery") {
            None => None,
            Some(value) => {
                let json = value.into_json().unwrap_or_default();
                let persisted: PersistedQuery = serde_json::from_value(json).map_err(|_| {
                    refusal(
                        ErrorCode::BadRequest,
                        "extensions.persistedQuery must be {\"version\": 1, \"sha256Hash\": \"<hex>\"}",
                    )
                })?;
                if persisted.version != 1 {
                    return Err(refusal(
                        ErrorCode::PersistedQueryNotSupported,
                        "PersistedQueryNotSupported: only version 1 of persistedQuery is supported",
                    ));
                }
                Some(persisted.sha256_hash)
            }
        };
        let trusted_only = self.trusted.is_some() && !caller.is_service();
        if trusted_only && let Caller::Rejected(why) = caller {
            // A caller whose token failed learns that first.
            return Err(refusal(ErrorCode::Unauthenticated, why.clone()));
        }
        match (persisted, request.query.is_empty()) {
            (Some(hash), true) => {
                // A manifest's ids are looked up as they are; hashes in any case.
                let found = self.trusted_document(&hash).or_else(|| {
                    self.registered
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .documents
                        .get(&hash.to_ascii_lowercase())
                        .cloned()
                });
                let Some(query) = found else {
                    if trusted_only {
                        return Err(not_trusted());
                    }
                    return Err(refusal(
                        ErrorCode::PersistedQueryNotFound,
                        "PersistedQueryNotFound",
                    ));
                };
                request.query = query.to_string();
                Ok(())
            }
            (Some(hash), false) => {
                let actual = sha256_hex(&request.query);
                if !actual.eq_ignore_ascii_case(&hash) {
                    return Err(refusal(
                        ErrorCode::BadRequest,
                        "provided sha does not match query",
                    ));
                }
                if trusted_only && !self.is_trusted_text(&actual) {
                    return Err(not_trusted());
                }
                self.registered
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(actual, request.query.as_str().into());
                Ok(())
            }
            (None, _) if trusted_only => {
                if request.query.is_empty() || !self.is_trusted_text(&sha256_hex(&request.query)) {
                    return Err(not_trusted());
                }
                Ok(())
            }
            (None, _) => Ok(()),
        }
    }

    fn trusted_document(&self, id: &str) -> Option<Arc<str>> {
        self.trusted.as_ref()?.by_id.get(id).cloned()
    }

    fn is_trusted_text(&self, sha256: &str) -> bool {
        self.trusted
            .as_ref()
            .is_some_and(|trusted| trusted.hashes.contains(sha256))
    }
}

fn not_trusted() -> ServerError {
    refusal(
        ErrorCode::PersistedQueryRequired,
        "this server accepts only trusted documents: send the sha256Hash of one of them \
         in extensions.persistedQuery",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_documents_stay_within_their_bounds() {
        let mut registered = Registered::default();
        for i in 0..(REGISTERED_DOCUMENTS + 10) {
            registered.insert(format!("{i}"), format!("{{ n{i} }}").into());
        }
        assert_eq!(registered.documents.len(), REGISTERED_DOCUMENTS);
        assert!(
            !registered.documents.contains_key("0"),
            "the oldest went first"
        );
        let big: Arc<str> = "x".repeat(REGISTERED_BYTES / 2 + 1).into();
        registered.insert("big1".into(), big.clone());
        registered.insert("big2".into(), big);
        assert!(registered.bytes <= REGISTERED_BYTES);
        assert!(registered.documents.contains_key("big2"));
        assert!(!registered.documents.contains_key("big1"));
    }

    #[test]
    fn both_manifest_formats_load() {
        let plain = TrustedDocuments::parse(r#"{"abc": "query { tasks { totalCount } }"}"#)
            .expect("a plain manifest");
        assert_eq!(plain.len(), 1);
        let apollo = TrustedDocuments::parse(
            r#"{"format": "apollo-persisted-query-manifest", "version": 1,
                "operations": [{"id": "h1", "body": "query A { __typename }", "name": "A", "type": "query"}]}"#,
        )
        .expect("an Apollo manifest");
        assert!(apollo.by_id.contains_key("h1"));
        let broken = TrustedDocuments::parse(r#"{"abc": "query {"}"#).unwrap_err();
        assert!(broken.contains("'abc' does not parse"), "{broken}");
    }
}
