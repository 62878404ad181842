//! The GraphQL API. Resolvers only translate: they take the caller from the
//! request (or connection) data and call `TaskService`.
//!
//! What both transports (HTTP and websockets) do around the engine lives here
//! too: parsed documents are cached by their text, and every error leaves
//! with a stable `extensions.code`.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_graphql::parser::types::{
    DocumentOperations, ExecutableDocument, OperationType, Selection, SelectionSet,
};
use async_graphql::{Context, ErrorExtensions, ID, Response, Schema, ServerError, Value};
use tokio::sync::watch;
use uuid::Uuid;

use crate::auth::{Caller, CurrentUser};
use crate::error::{ErrorCode, TaskError};
use crate::service::{TaskService, Worker};

mod mutation;
pub mod policy;
mod query;
mod subscription;
pub mod types;

pub use mutation::MutationRoot;
pub use query::QueryRoot;
pub use subscription::{LiveSubscriptions, SubscriptionCounter, SubscriptionRoot};

pub type TaskSchema = Schema<QueryRoot, MutationRoot, SubscriptionRoot>;

/// Deepest query accepted; GraphiQL's introspection query needs about 13.
pub const MAX_DEPTH: usize = 20;
/// Most expensive query accepted; one `tasks(first: 100)` page with every
/// field of edges and nodes costs about 3000.
pub const MAX_COMPLEXITY: usize = 5000;

/// Flips to `true` when the server shuts down; live subscriptions end.
#[derive(Clone)]
pub struct Shutdown(pub watch::Receiver<bool>);

pub fn build_schema(
    service: Arc<dyn TaskService>,
    shutdown: watch::Receiver<bool>,
    live: LiveSubscriptions,
) -> TaskSchema {
    Schema::build(QueryRoot, MutationRoot, SubscriptionRoot)
        .data(service)
        .data(Shutdown(shutdown))
        .data(live)
        .limit_depth(MAX_DEPTH)
        .limit_complexity(MAX_COMPLEXITY)
        .limit_recursive_depth(32)
        .limit_directives(16)
        .finish()
}

/// The SDL the server exports, as kept in `schema.graphql`: what
/// introspection describes (`@specifiedBy` included).
pub fn sdl() -> String {
    Schema::build(QueryRoot, MutationRoot, SubscriptionRoot)
        .finish()
        .sdl_with_options(async_graphql::SDLExportOptions::new().include_specified_by())
}

/// A service error as GraphQL reports it, with its `extensions.code`.
pub(crate) fn graphql_error(err: TaskError) -> async_graphql::Error {
    err.extend()
}

/// A service error as an error of a whole response (it has no location).
pub(crate) fn server_error(err: TaskError) -> async_graphql::ServerError {
    let mut error = async_graphql::ServerError::new(err.to_string(), None);
    error.extensions = graphql_error(err).extensions;
    error
}

pub(crate) fn service<'a>(ctx: &Context<'a>) -> &'a Arc<dyn TaskService> {
    ctx.data_unchecked::<Arc<dyn TaskService>>()
}

/// The authenticated caller, or UNAUTHENTICATED.
pub(crate) fn current_user<'a>(ctx: &Context<'a>) -> async_graphql::Result<&'a CurrentUser> {
    ctx.data_opt::<Caller>()
        .unwrap_or(&Caller::Anonymous)
        .signed_in()
        .map_err(|refusal| graphql_error(TaskError::Unauthenticated(refusal.to_string())))
}

/// The caller as a worker (service role), else FORBIDDEN.
pub(crate) fn worker(ctx: &Context<'_>) -> async_graphql::Result<Worker> {
    Worker::new(current_user(ctx)?).map_err(graphql_error)
}

pub(crate) fn task_id(id: &ID) -> async_graphql::Result<Uuid> {
    parse_task_id(id).map_err(graphql_error)
}

/// `id` as a task id, or BAD_USER_INPUT quoting it.
pub(crate) fn parse_task_id(id: &ID) -> Result<Uuid, TaskError> {
    Uuid::parse_str(id.as_str()).map_err(|_| {
        TaskError::invalid(format!(
            "'{}' is not a task id",
            crate::error::echo(id.as_str())
        ))
    })
}

/// `leaseSeconds` as a duration; the service says which are allowed.
pub(crate) fn lease(seconds: Option<i32>) -> Option<Duration> {
    seconds.map(|s| Duration::from_secs(s.max(0) as u64))
}

/// Parsed documents by their text. Clients send the same few operations
/// over and over; parsing one costs more than the rest of a small request.
pub struct DocumentCache {
    documents: Mutex<HashMap<Box<str>, Arc<ExecutableDocument>>>,
}

/// Documents the cache holds before it starts over.
const CACHED_DOCUMENTS: usize = 512;
/// Longer documents are parsed every time rather than kept.
const MAX_CACHED_QUERY: usize = 16 * 1024;

impl Default for DocumentCache {
    fn default() -> Self {
        Self {
            documents: Mutex::new(HashMap::with_capacity(CACHED_DOCUMENTS)),
        }
    }
}

impl DocumentCache {
    /// The parsed `query`, from the cache or parsed now; `None` when it
    /// does not parse (the engine then reports why).
    pub fn document(&self, query: &str) -> Option<ExecutableDocument> {
        let lock = || self.documents.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(document) = lock().get(query).cloned() {
            return Some(ExecutableDocument::clone(&document));
        }
        let document = async_graphql::parser::parse_query(query).ok()?;
        if query.len() <= MAX_CACHED_QUERY {
            let mut documents = lock();
            if documents.len() >= CACHED_DOCUMENTS {
                // Many distinct documents: start over rather than track ages.
                documents.clear();
            }
            documents.insert(query.into(), Arc::new(document.clone()));
        }
        Some(document)
    }
}

/// The operation a document runs for `operation_name`, if it names one.
pub fn operation_type(
    document: &ExecutableDocument,
    operation_name: Option<&str>,
) -> Option<OperationType> {
    chosen_operation(document, operation_name).map(|(_, ty)| ty)
}

/// The operation a request runs: the one it names, or the document's only
/// one. Its name (`None` when anonymous) and type; `None` when there is no
/// such operation.
pub fn chosen_operation<'a>(
    document: &'a ExecutableDocument,
    operation_name: Option<&str>,
) -> Option<(Option<&'a str>, OperationType)> {
    match (&document.operations, operation_name) {
        (DocumentOperations::Single(operation), _) => Some((None, operation.node.ty)),
        (DocumentOperations::Multiple(operations), Some(name)) => operations
            .get_key_value(name)
            .map(|(name, operation)| (Some(name.as_str()), operation.node.ty)),
        (DocumentOperations::Multiple(operations), None) if operations.len() == 1 => operations
            .iter()
            .next()
            .map(|(name, operation)| (Some(name.as_str()), operation.node.ty)),
        (DocumentOperations::Multiple(_), None) => None,
    }
}

/// Where a document asks for `__schema { description }`: pairs of response
/// keys (the `__schema` field's, then the `description` field's).
///
/// The engine answers that field with a text of its own about schemas in
/// general; taskql's schema has no description, so [`hide_schema_description`]
/// answers null, as `schema.graphql` says.
pub fn schema_description_keys(
    document: &ExecutableDocument,
    operation_name: Option<&str>,
) -> Vec<(String, String)> {
    let operation = match (&document.operations, operation_name) {
        (DocumentOperations::Single(operation), _) => Some(operation),
        (DocumentOperations::Multiple(operations), Some(name)) => operations.get(name),
        (DocumentOperations::Multiple(operations), None) => operations.values().next(),
    };
    let Some(operation) = operation else {
        return Vec::new();
    };
    let mut keys = Vec::new();
    for schema in fields_named(document, &operation.node.selection_set.node, "__schema") {
        for description in fields_named(document, &schema.selection_set.node, "description") {
            keys.push((
                schema.response_key().node.to_string(),
                description.response_key().node.to_string(),
            ));
        }
    }
    keys
}

/// The fields called `name` in a selection set, through fragments.
fn fields_named<'a>(
    document: &'a ExecutableDocument,
    set: &'a SelectionSet,
    name: &str,
) -> Vec<&'a async_graphql::parser::types::Field> {
    let mut found = Vec::new();
    for item in &set.items {
        match &item.node {
            Selection::Field(field) if field.node.name.node == name => found.push(&field.node),
            Selection::Field(_) => {}
            Selection::InlineFragment(fragment) => found.extend(fields_named(
                document,
                &fragment.node.selection_set.node,
                name,
            )),
            Selection::FragmentSpread(spread) => {
                if let Some(fragment) = document.fragments.get(&spread.node.fragment_name.node) {
                    found.extend(fields_named(
                        document,
                        &fragment.node.selection_set.node,
                        name,
                    ));
                }
            }
        }
    }
    found
}

/// Answers null at the keys [`schema_description_keys`] found.
pub fn hide_schema_description(response: &mut Response, keys: &[(String, String)]) {
    let Value::Object(data) = &mut response.data else {
        return;
    };
    for (schema, description) in keys {
        if let Some(Value::Object(fields)) = data.get_mut(schema.as_str())
            && let Some(value) = fields.get_mut(description.as_str())
        {
            *value = Value::Null;
        }
    }
}

/// Longest error message sent; longer ones (an engine error pointing into
/// a huge document) are cut.
const MAX_MESSAGE_CHARS: usize = 300;

/// Readies a response for the wire: errors the engine raised itself
/// (syntax, validation, limits, mistyped arguments) are the client's input,
/// so BAD_USER_INPUT; ours carry their code already. Messages quote at most
/// [`crate::error::MAX_ECHO_CHARS`] of any input.
pub fn finish(response: &mut Response) {
    for error in &mut response.errors {
        let extensions = error.extensions.get_or_insert_with(Default::default);
        if extensions.get("code").is_none() {
            extensions.set("code", Value::from(ErrorCode::BadUserInput.as_str()));
        }
        if error.message.len() > crate::error::MAX_ECHO_CHARS {
            error.message = shorten_message(&error.message);
        }
    }
}

/// Cuts every quoted piece of `message` (the engine quotes names and
/// values the client sent) to [`crate::error::MAX_ECHO_CHARS`], and the
/// whole to [`MAX_MESSAGE_CHARS`].
fn shorten_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(4 * MAX_MESSAGE_CHARS));
    for (i, piece) in message.split('"').enumerate() {
        if i > 0 {
            out.push('"');
        }
        // Odd pieces are inside quotes.
        if i % 2 == 1 {
            out.push_str(&crate::error::echo(piece));
        } else {
            out.push_str(piece);
        }
    }
    if out.chars().count() > MAX_MESSAGE_CHARS {
        out = out.chars().take(MAX_MESSAGE_CHARS).collect::<String>() + "…";
    }
    out
}

/// Whether the operation never ran: the document did not parse or validate,
/// or its variables did not fit. Such a response carries no `data` at all.
/// Errors raised while running always have a path; these never do.
pub fn is_request_error(response: &Response) -> bool {
    !response.errors.is_empty()
        && response.data == Value::Null
        && response.errors.iter().all(|error| error.path.is_empty())
}

/// The code of an error (after [`finish`]).
pub fn error_code(error: &ServerError) -> &str {
    match error.extensions.as_ref().and_then(|e| e.get("code")) {
        Some(Value::String(code)) => code,
        _ => ErrorCode::BadUserInput.as_str(),
    }
}

/// A response as sent: without `data` when the operation never ran.
#[derive(serde::Serialize)]
pub struct WireResponse<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a Value>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    errors: &'a [ServerError],
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    extensions: &'a std::collections::BTreeMap<String, Value>,
}

impl<'a> From<&'a Response> for WireResponse<'a> {
    fn from(response: &'a Response) -> Self {
        Self {
            data: (!is_request_error(response)).then_some(&response.data),
            errors: &response.errors,
            extensions: &response.extensions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_quote_little_of_the_input() {
        let huge = "x".repeat(100_000);
        let message = format!("Unknown field \"{huge}\" on type \"Query\".");
        let short = shorten_message(&message);
        assert!(short.starts_with("Unknown field \"xxx"), "{short}");
        assert!(short.ends_with("…\" on type \"Query\"."), "{short}");
        assert!(short.chars().count() < 160, "{}", short.chars().count());
        let caret = format!(
            " --> 1:9\n  |\n1 | {{ {huge}\n  |{}^---",
            " ".repeat(100_000)
        );
        assert!(shorten_message(&caret).chars().count() <= MAX_MESSAGE_CHARS + 1);
        assert_eq!(shorten_message("plain"), "plain");
    }
}
