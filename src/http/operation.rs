//! One road for every GraphQL operation, whatever carried it (`POST` or
//! `GET /graphql`, an event stream, either websocket protocol); the
//! transports only frame what comes out:
//!
//! 1. parse: the wire form (a JSON body, a query string, a websocket
//!    payload) into a request, or [`Malformed`];
//! 2. authenticate: the transport hands over the [`Caller`] that
//!    `crate::auth` found;
//! 3. [`start`]: the document a persisted-query hash names (or why it
//!    cannot run), then the cached parse and what the log says of it;
//! 4. [`execute`] (one answer by the request's deadline) or [`responses`]
//!    (a stream: a query's or mutation's answer by the deadline, a
//!    subscription's events for as long as it lives);
//! 5. [`Operation::answer`]: the schema's description hidden, errors coded,
//!    the first answer logged and counted.
use std::future::Future;
use std::time::Instant;

use async_graphql::parser::types::OperationType;
use async_graphql::{Response, ServerError, Variables};
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response as HttpResponse};
use futures::StreamExt as _;
use futures::stream::BoxStream;
use serde::Deserialize;
use tracing::Instrument as _;

use super::{HttpState, MAX_BATCH, request_error};
use crate::auth::Caller;
use crate::db::deadline::{self, Deadline};
use crate::error::{ErrorCode, TaskError};
use crate::graphql;

/// One operation as a client sends it, in a POST body or a GET query string.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WireRequest {
    query: Option<String>,
    #[serde(default)]
    operation_name: Option<String>,
    #[serde(default)]
    variables: Option<Variables>,
    #[serde(default)]
    extensions: Option<std::collections::HashMap<String, async_graphql::Value>>,
}

/// Why a request is not a well-formed GraphQL-over-HTTP request: a 400.
pub(crate) struct Malformed(String);

impl IntoResponse for Malformed {
    fn into_response(self) -> HttpResponse {
        request_error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, self.0)
    }
}

fn malformed(message: String) -> Malformed {
    Malformed(message)
}

impl WireRequest {
    pub(crate) fn into_request(self) -> Result<async_graphql::Request, Malformed> {
        let persisted = self
            .extensions
            .as_ref()
            .is_some_and(|e| e.contains_key("persistedQuery"));
        // A persisted query may come without its document: its hash names it.
        let Some(query) = self.query.or_else(|| persisted.then(String::new)) else {
            return Err(malformed(
                "the request has no query: send {\"query\": \"…\"}".into(),
            ));
        };
        let mut request = async_graphql::Request::new(query);
        if let Some(name) = self.operation_name {
            request = request.operation_name(name);
        }
        if let Some(variables) = self.variables {
            request = request.variables(variables);
        }
        if let Some(extensions) = self.extensions {
            request.extensions = async_graphql::Extensions(extensions);
        }
        Ok(request)
    }
}

/// What the log line says of an operation, and what its answer needs.
pub(super) struct Operation {
    name: Option<String>,
    pub(super) kind: Option<OperationType>,
    /// Introspection of the schema's description (see `hide_schema_description`).
    schema_description: Vec<(String, String)>,
    started: Instant,
    /// Whether its first answer was logged and counted.
    recorded: bool,
}

impl Operation {
    fn named(name: Option<String>) -> Self {
        Self {
            name,
            kind: None,
            schema_description: Vec::new(),
            started: Instant::now(),
            recorded: false,
        }
    }

    /// Whether it is a mutation (never, when it was refused before it ran:
    /// its document is unknown).
    pub(super) fn is_mutation(&self) -> bool {
        self.kind == Some(OperationType::Mutation)
    }

    /// Readies one of the operation's answers for the wire, as every
    /// transport does: the schema's description hidden, the errors coded.
    /// The first answer also logs and counts the operation.
    pub(super) fn answer(&mut self, state: &HttpState, request_id: &str, response: &mut Response) {
        graphql::hide_schema_description(response, &self.schema_description);
        graphql::finish(response);
        if !self.recorded {
            self.recorded = true;
            record_operation(state, request_id, self, response);
        }
    }
}

/// Hands the engine the cached parse of the request's document.
fn prepare(
    state: &HttpState,
    mut request: async_graphql::Request,
) -> (async_graphql::Request, Operation) {
    let mut operation = Operation::named(request.operation_name.clone());
    if let Some(document) = state.documents.document(&request.query) {
        // The log names the operation run, even when the request did not.
        if let Some((name, kind)) = graphql::chosen_operation(&document, operation.name.as_deref())
        {
            operation.kind = Some(kind);
            if operation.name.is_none() {
                operation.name = name.map(str::to_owned);
            }
        }
        if request.query.contains("__schema") {
            operation.schema_description =
                graphql::schema_description_keys(&document, operation.name.as_deref());
        }
        request.set_parsed_query(document);
    }
    (request, operation)
}

/// The answer to an operation cut at its request's deadline: the database
/// did not answer in time, and a mutation's change may have been made.
fn past_deadline(kind: Option<OperationType>) -> Response {
    let error = if kind == Some(OperationType::Mutation) {
        TaskError::Unconfirmed("the request's deadline passed".into())
    } else {
        TaskError::Unavailable("the request's deadline passed".into())
    };
    tracing::warn!(
        kind = kind_name(kind),
        "an operation passed its request's deadline"
    );
    Response::from_errors(vec![graphql::server_error(error)])
}

/// Runs one operation to end by `deadline` (see `crate::db::deadline`).
async fn by_deadline(
    deadline: Deadline,
    kind: Option<OperationType>,
    execute: impl Future<Output = Response>,
) -> Response {
    deadline::until(deadline, execute)
        .await
        .unwrap_or_else(|_| past_deadline(kind))
}

/// An operation's responses on a stream transport: a query's or a
/// mutation's one answer within `TASKQL_REQUEST_TIMEOUT` from now. A
/// subscription waits as long as it likes for changes; its start and each
/// read it makes have deadlines of their own, in the service.
fn bounded(
    state: &HttpState,
    kind: Option<OperationType>,
    mut responses: BoxStream<'static, Response>,
) -> BoxStream<'static, Response> {
    if kind == Some(OperationType::Subscription) {
        return responses;
    }
    let deadline = Deadline::now() + state.db.settings().request_timeout;
    futures::stream::once(async move {
        deadline::until(deadline, responses.next())
            .await
            .unwrap_or_else(|_| Some(past_deadline(kind)))
    })
    .filter_map(std::future::ready)
    .boxed()
}

fn kind_name(kind: Option<OperationType>) -> &'static str {
    match kind {
        Some(OperationType::Query) => "query",
        Some(OperationType::Mutation) => "mutation",
        Some(OperationType::Subscription) => "subscription",
        None => "-",
    }
}

/// Logs one line per operation (who asked what, how long it took, how it
/// ended) and counts it in the metrics.
fn record_operation(
    state: &HttpState,
    request_id: &str,
    operation: &Operation,
    response: &Response,
) {
    let seconds = operation.started.elapsed().as_secs_f64();
    let outcome = response
        .errors
        .first()
        .map(graphql::error_code)
        .unwrap_or("ok");
    state
        .metrics
        .request(kind_name(operation.kind), outcome, seconds);
    for error in &response.errors {
        state.metrics.error(graphql::error_code(error));
    }
    tracing::info!(
        target: "taskql::request",
        request_id,
        operation = operation.name.as_deref().unwrap_or("-"),
        kind = kind_name(operation.kind),
        duration_ms = seconds * 1000.0,
        outcome,
        "graphql"
    );
}

/// Step 3 of the road: resolves the request's document (see
/// `persisted`) and prepares it. The operation, with the request to run or
/// the error that refused it before it ran.
pub(super) fn start(
    state: &HttpState,
    caller: &Caller,
    mut request: async_graphql::Request,
) -> (Operation, Result<async_graphql::Request, ServerError>) {
    match state.persisted.resolve(caller, &mut request) {
        Ok(()) => {
            let (request, operation) = prepare(state, request);
            (operation, Ok(request))
        }
        Err(refused) => (
            Operation::named(request.operation_name.clone()),
            Err(refused),
        ),
    }
}

/// Step 4 for a transport with one answer: runs the operation `start`
/// gave, in its trace span, by `deadline` (an HTTP request's, shared by
/// its operations).
pub(super) async fn execute(
    state: &HttpState,
    operation: &Operation,
    started: Result<async_graphql::Request, ServerError>,
    caller: &Caller,
    deadline: Deadline,
) -> Response {
    let request = match started {
        Ok(request) => request,
        Err(refused) => return Response::from_errors(vec![refused]),
    };
    let span = crate::telemetry::graphql_span(
        operation.kind.map(|kind| kind_name(Some(kind))),
        operation.name.as_deref(),
    );
    let execute = state.schema.execute(request.data(caller.clone()));
    by_deadline(deadline, operation.kind, execute.instrument(span)).await
}

/// Step 4 for a stream transport: the operation's responses, `run` by the
/// transport (with its caller or its session's data), bounded as
/// [`bounded`] says. A request refused before it ran answers once with why.
pub(super) fn responses(
    state: &HttpState,
    operation: &Operation,
    started: Result<async_graphql::Request, ServerError>,
    run: impl FnOnce(async_graphql::Request) -> BoxStream<'static, Response>,
) -> BoxStream<'static, Response> {
    match started {
        Ok(request) => bounded(state, operation.kind, run(request)),
        Err(refused) => {
            futures::stream::once(async move { Response::from_errors(vec![refused]) }).boxed()
        }
    }
}

/// The request id the request-id layer gave the request (or the client sent).
pub(super) fn request_id(headers: &HeaderMap) -> &str {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
}

/// A `POST` body: one operation, or a batch of 1 to [`MAX_BATCH`]; whether it was a batch.
pub(super) fn parse_body(bytes: &Bytes) -> Result<(Vec<async_graphql::Request>, bool), Malformed> {
    let not_json = |err: serde_json::Error| {
        malformed(format!(
            "the body is not a GraphQL request in JSON: {}",
            crate::error::echo(&err.to_string())
        ))
    };
    // JSON text is UTF-8, all of it. serde_json checks only the strings it
    // keeps, so invalid bytes in a field taskql skips would pass unseen.
    let text = std::str::from_utf8(bytes).map_err(|err| {
        malformed(format!(
            "the body is not a GraphQL request in JSON: invalid UTF-8 at byte {}",
            err.valid_up_to()
        ))
    })?;
    let batch = text
        .bytes()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| b == b'[');
    if batch {
        let list: Vec<WireRequest> = serde_json::from_str(text).map_err(not_json)?;
        if list.is_empty() || list.len() > MAX_BATCH {
            return Err(malformed(format!(
                "a batch must hold 1 to {MAX_BATCH} operations"
            )));
        }
        let requests = list
            .into_iter()
            .map(WireRequest::into_request)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((requests, true))
    } else {
        let single: WireRequest = serde_json::from_str(text).map_err(not_json)?;
        Ok((vec![single.into_request()?], false))
    }
}

/// A GET's `query`, `operationName`, and JSON-encoded `variables` and `extensions`.
pub(super) fn parse_query_string(query: &str) -> Result<async_graphql::Request, Malformed> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Params {
        query: Option<String>,
        operation_name: Option<String>,
        variables: Option<String>,
        extensions: Option<String>,
    }
    let params: Params = serde_urlencoded::from_str(query)
        .map_err(|err| malformed(format!("the query string does not parse: {err}")))?;
    fn json<T: serde::de::DeserializeOwned>(
        field: &str,
        text: Option<String>,
    ) -> Result<Option<T>, Malformed> {
        match text.as_deref().map(str::trim) {
            None | Some("") | Some("null") => Ok(None),
            Some(text) => serde_json::from_str(text).map(Some).map_err(|err| {
                malformed(format!(
                    "{field} must be a JSON object: {}",
                    crate::error::echo(&err.to_string())
                ))
            }),
        }
    }
    WireRequest {
        query: params.query,
        operation_name: params.operation_name.filter(|name| !name.is_empty()),
        variables: json("variables", params.variables)?,
        extensions: json("extensions", params.extensions)?,
    }
    .into_request()
}
