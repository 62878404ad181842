//! GraphQL over HTTP, as its spec (and graphql-http's audit suite) asks:
//!
//! - `POST /graphql` takes `application/json` only (anything else is 415:
//!   no cross-site "simple" requests), one operation or a batch;
//! - `GET /graphql?query=…` runs queries (urql sends short ones this way);
//!   a mutation over GET is 405 with `Allow: POST`; a browser asking for
//!   HTML gets GraphiQL instead;
//! - the answer is `application/graphql-response+json` when the client
//!   accepts it, else `application/json`, else 406;
//! - a request error (the document does not parse or validate, or its
//!   variables do not fit) has no `data`, and under the newer media type is
//!   a 400; a request that failed only because the database is unavailable
//!   is a 503.
use std::time::Instant;

use async_graphql::parser::types::OperationType;
use async_graphql::{Response, Variables};
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response as HttpResponse};
use futures::StreamExt as _;
use futures::stream::BoxStream;
use serde::Deserialize;
use std::future::Future;
use std::sync::Arc;
use tracing::Instrument as _;

use super::{HttpState, MAX_BATCH, request_error};
use crate::auth::{Caller, Presented};
use crate::db::deadline::{self, Deadline};
use crate::error::{ErrorCode, TaskError};
use crate::graphql::{self, WireResponse};

const GRAPHQL_RESPONSE_JSON: &str = "application/graphql-response+json; charset=utf-8";
const JSON: &str = "application/json; charset=utf-8";

/// The media type an answer is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MediaType {
    /// `application/graphql-response+json`: statuses say what happened.
    GraphqlResponse,
    /// `application/json`: 200 for every well-formed request.
    Json,
}

/// The quality (`q`) the `Accept` header gives each media range we serve.
struct Accepts {
    graphql_response: f32,
    json: f32,
    html: f32,
    event_stream: f32,
}

fn accepts(headers: &HeaderMap) -> Option<Accepts> {
    let header = headers.get(header::ACCEPT)?.to_str().ok()?;
    let mut accepts = Accepts {
        graphql_response: 0.0,
        json: 0.0,
        html: 0.0,
        event_stream: 0.0,
    };
    for range in header.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "application/graphql-response+json" => {
                accepts.graphql_response = accepts.graphql_response.max(q)
            }
            "application/json" | "application/*" | "*/*" => accepts.json = accepts.json.max(q),
            "text/html" => accepts.html = accepts.html.max(q),
            "text/event-stream" => accepts.event_stream = accepts.event_stream.max(q),
            _ => {}
        }
    }
    Some(accepts)
}

/// The media type to answer in; `None` when the client accepts neither.
fn negotiate(headers: &HeaderMap) -> Option<MediaType> {
    let Some(accepts) = accepts(headers) else {
        return Some(MediaType::Json);
    };
    if accepts.graphql_response > 0.0 && accepts.graphql_response >= accepts.json {
        Some(MediaType::GraphqlResponse)
    } else if accepts.json > 0.0 {
        Some(MediaType::Json)
    } else {
        None
    }
}

/// Whether the client asks for an event stream (graphql-sse sends only
/// `text/event-stream`) over JSON. A client that accepts both as much (urql
/// lists `text/event-stream` among JSON types) gets JSON.
pub(crate) fn wants_event_stream(headers: &HeaderMap) -> bool {
    accepts(headers)
        .is_some_and(|a| a.event_stream > 0.0 && a.event_stream > a.graphql_response.max(a.json))
}

/// Whether a GET comes from a browser that wants a page, not data.
pub fn wants_html(headers: &HeaderMap) -> bool {
    accepts(headers)
        .is_some_and(|a| a.html > 0.0 && a.html >= a.graphql_response && a.html >= a.json)
}

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
    pub(super) name: Option<String>,
    pub(super) kind: Option<OperationType>,
    /// Introspection of the schema's description (see `hide_schema_description`).
    pub(super) schema_description: Vec<(String, String)>,
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

    /// An operation refused before it ran (its persisted document unknown,
    /// say): logged as such.
    pub(super) fn refused(name: Option<String>) -> Self {
        Self::named(name)
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
pub(super) fn prepare(
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
pub(super) fn bounded(
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

/// The status an answer gets.
fn status_of(responses: &[Response], media: MediaType, batch: bool) -> StatusCode {
    if batch {
        return StatusCode::OK;
    }
    let Some(response) = responses.first() else {
        return StatusCode::OK;
    };
    let unavailable = !response.errors.is_empty()
        && response.data == async_graphql::Value::Null
        && response
            .errors
            .iter()
            .all(|e| graphql::error_code(e) == ErrorCode::ServiceUnavailable.as_str());
    if unavailable {
        StatusCode::SERVICE_UNAVAILABLE
    } else if media == MediaType::GraphqlResponse && graphql::is_request_error(response) {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    }
}

fn answer(responses: Vec<Response>, media: MediaType, batch: bool) -> HttpResponse {
    let status = status_of(&responses, media, batch);
    let body = if batch {
        let wire: Vec<WireResponse<'_>> = responses.iter().map(WireResponse::from).collect();
        serde_json::to_vec(&wire)
    } else {
        serde_json::to_vec(&WireResponse::from(&responses[0]))
    };
    let body = match body {
        Ok(body) => body,
        Err(err) => {
            tracing::error!(error = %err, "cannot serialize a GraphQL response");
            return request_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::InternalServerError,
                "internal server error".into(),
            );
        }
    };
    let content_type = match media {
        MediaType::GraphqlResponse => GRAPHQL_RESPONSE_JSON,
        MediaType::Json => JSON,
    };
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response()
}

pub(super) fn request_id(headers: &HeaderMap) -> &str {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
}

/// A request with the document it runs (see `persisted`), or why it cannot run.
type Resolved = Result<async_graphql::Request, async_graphql::ServerError>;

/// Runs the operations and answers in `media`.
async fn run(
    state: &HttpState,
    headers: &HeaderMap,
    caller: Caller,
    requests: Vec<Resolved>,
    media: MediaType,
    batch: bool,
) -> HttpResponse {
    let request_id = request_id(headers);
    // One deadline for the request, its operations together.
    let deadline = Deadline::now() + state.db.settings().request_timeout;
    let mut responses = Vec::with_capacity(requests.len());
    for request in requests {
        let request = match request {
            Ok(request) => request,
            Err(refused) => {
                let mut response = Response::from_errors(vec![refused]);
                Operation::refused(None).answer(state, request_id, &mut response);
                responses.push(response);
                continue;
            }
        };
        let (request, mut operation) = prepare(state, request);
        let span = crate::telemetry::graphql_span(
            operation.kind.map(|kind| kind_name(Some(kind))),
            operation.name.as_deref(),
        );
        let execute = state.schema.execute(request.data(caller.clone()));
        let mut response = by_deadline(deadline, operation.kind, execute.instrument(span)).await;
        operation.answer(state, request_id, &mut response);
        responses.push(response);
    }
    answer(responses, media, batch)
}

fn not_acceptable() -> HttpResponse {
    request_error(
        StatusCode::NOT_ACCEPTABLE,
        ErrorCode::NotAcceptable,
        "accept application/graphql-response+json or application/json".into(),
    )
}

/// Whether the body is declared JSON (any charset other than UTF-8 is not).
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mut parts = value.split(';');
    let media = parts.next().unwrap_or_default().trim();
    media.eq_ignore_ascii_case("application/json")
        && parts.all(|param| match param.split_once('=') {
            Some((name, value)) if name.trim().eq_ignore_ascii_case("charset") => {
                value.trim().trim_matches('"').eq_ignore_ascii_case("utf-8")
            }
            _ => true,
        })
}

pub async fn post(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Body,
) -> HttpResponse {
    state.metrics.http_requests.inc();
    if wants_event_stream(&headers) && is_json(&headers) {
        return super::sse::post(state, headers, body).await;
    }
    if !is_json(&headers) {
        return request_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::UnsupportedMediaType,
            "send the request as JSON with Content-Type: application/json".into(),
        );
    }
    let Some(media) = negotiate(&headers) else {
        return not_acceptable();
    };
    let bytes = match super::read_body(&state, &headers, body).await {
        Ok(bytes) => bytes,
        Err(response) => return response,
    };
    let (requests, batch) = match parse_body(&bytes) {
        Ok(parsed) => parsed,
        Err(malformed) => return malformed.into_response(),
    };
    let caller = state.auth.caller(Presented::Headers(&headers));
    let requests = requests
        .into_iter()
        .map(|mut request| {
            state
                .persisted
                .resolve(&caller, &mut request)
                .map(|()| request)
        })
        .collect();
    run(&state, &headers, caller, requests, media, batch).await
}

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

/// `GET /graphql`: GraphiQL for a browser, else the query in the URL.
pub async fn get(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> HttpResponse {
    if wants_html(&headers) {
        return super::graphiql().await.into_response();
    }
    state.metrics.http_requests.inc();
    let event_stream = wants_event_stream(&headers);
    let media = match negotiate(&headers) {
        Some(media) => media,
        None if event_stream => MediaType::Json,
        None => return not_acceptable(),
    };
    let mut request = match parse_query_string(query.as_deref().unwrap_or_default()) {
        Ok(request) => request,
        Err(malformed) => return malformed.into_response(),
    };
    if event_stream {
        return super::sse::get(state, headers, request).await;
    }
    // The document a hash names, to know whether it is a mutation.
    let caller = state.auth.caller(Presented::Headers(&headers));
    let resolved = state.persisted.resolve(&caller, &mut request);
    if resolved.is_ok() && is_mutation(&state, &request) {
        return mutation_over_get();
    }
    let request = resolved.map(|()| request);
    run(&state, &headers, caller, vec![request], media, false).await
}

/// Whether the operation a request runs is a mutation.
pub(super) fn is_mutation(state: &HttpState, request: &async_graphql::Request) -> bool {
    state
        .documents
        .document(&request.query)
        .is_some_and(|document| {
            graphql::operation_type(&document, request.operation_name.as_deref())
                == Some(OperationType::Mutation)
        })
}

/// Only queries over GET: a GET must not change anything.
pub(super) fn mutation_over_get() -> HttpResponse {
    let mut response = request_error(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::MethodNotAllowed,
        "mutations must be sent with POST".into(),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("POST"));
    response
}

/// A GET's `query`, `operationName`, and JSON-encoded `variables` and `extensions`.
fn parse_query_string(query: &str) -> Result<async_graphql::Request, Malformed> {
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
