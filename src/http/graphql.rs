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
use async_graphql::Response;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response as HttpResponse};
use std::sync::Arc;

use super::{HttpState, mutation_over_get, operation, request_error};
use crate::auth::Presented;
use crate::db::deadline::Deadline;
use crate::error::ErrorCode;
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

/// Runs the operations, one after the other by one deadline, and answers
/// in `media`.
/// With `queries_only` (a GET), a mutation is refused with 405 before it runs.
async fn run(
    state: &HttpState,
    headers: &HeaderMap,
    requests: Vec<async_graphql::Request>,
    media: MediaType,
    batch: bool,
    queries_only: bool,
) -> HttpResponse {
    let caller = state.auth.caller(Presented::Headers(headers));
    let request_id = operation::request_id(headers);
    // One deadline for the request, its operations together.
    let deadline = Deadline::now() + state.db.settings().request_timeout;
    let mut responses = Vec::with_capacity(requests.len());
    for request in requests {
        let (mut operation, started) = operation::start(state, &caller, request);
        if queries_only && operation.is_mutation() {
            return mutation_over_get();
        }
        let mut response = operation::execute(state, &operation, started, &caller, deadline).await;
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
    let (requests, batch) = match operation::parse_body(&bytes) {
        Ok(parsed) => parsed,
        Err(malformed) => return malformed.into_response(),
    };
    run(&state, &headers, requests, media, batch, false).await
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
    let request = match operation::parse_query_string(query.as_deref().unwrap_or_default()) {
        Ok(request) => request,
        Err(malformed) => return malformed.into_response(),
    };
    if event_stream {
        return super::sse::get(state, headers, request).await;
    }
    run(&state, &headers, vec![request], media, false, true).await
}
