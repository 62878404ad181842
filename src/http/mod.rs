//! HTTP transport: routes, auth extraction, request bodies, limits.
//! GraphQL over HTTP is in `graphql`, event streams (graphql-sse) in `sse`,
//! websockets in `ws`, persisted documents in `persisted`.
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use tokio::sync::{Semaphore, watch};
use tower_http::cors::{Any, CorsLayer};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};

use crate::auth::Authenticator;
use crate::error::ErrorCode;
use crate::graphql::{DocumentCache, LiveSubscriptions, TaskSchema};
use crate::metrics::Metrics;

pub mod graphql;
mod operation;
pub mod persisted;
pub mod serve;
pub mod sse;
pub mod ws;

pub use ws::CONNECTION_INIT_TIMEOUT;

/// Largest request body accepted on POST /graphql.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// A body over the limit is read (and thrown away) up to this much, so that
/// a client still sending it gets to read the 413 instead of a reset.
pub const MAX_DRAINED_BYTES: usize = 16 * 1024 * 1024;
/// Most operations one batched request may carry.
pub const MAX_BATCH: usize = 20;
/// Longest `/readyz` waits for the database before it answers 503.
pub const READY_TIMEOUT: Duration = Duration::from_secs(1);

pub struct HttpState {
    pub schema: TaskSchema,
    pub auth: Authenticator,
    pub db: crate::db::Db,
    pub documents: DocumentCache,
    pub live_subscriptions: LiveSubscriptions,
    pub max_subscriptions_per_connection: usize,
    /// One permit per websocket or event stream the server may hold.
    pub websocket_slots: Arc<Semaphore>,
    /// How often websockets are pinged and event streams get a comment.
    pub keepalive_interval: Duration,
    /// Documents registered by hash, and the trusted ones.
    pub persisted: persisted::PersistedDocuments,
    /// Longest a request body may take to arrive.
    pub body_timeout: Duration,
    pub shutdown: watch::Receiver<bool>,
    pub metrics: Arc<Metrics>,
}

#[derive(Clone, Default)]
struct UuidRequestId;

impl MakeRequestId for UuidRequestId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let mut text = uuid::Uuid::encode_buffer();
        let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
        HeaderValue::from_str(id).ok().map(RequestId::new)
    }
}

pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/graphql", get(graphql::get).post(graphql::post))
        .route("/graphql/ws", get(ws::upgrade))
        .route("/graphql/assets/{name}", get(graphiql_asset))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(crate::ui::routes())
        .route_layer(axum::middleware::from_fn(crate::telemetry::trace_request))
        .with_state(state)
        // Frontends on other origins send the token in a header, never in a
        // cookie, so any origin may call; nothing ambient is exposed.
        .layer(
            CorsLayer::new()
                .allow_origin(Any)
                .allow_methods([Method::GET, Method::POST])
                // W3C trace context, which browser instrumentation adds.
                .allow_headers([
                    header::AUTHORIZATION,
                    header::CONTENT_TYPE,
                    HeaderName::from_static("traceparent"),
                    HeaderName::from_static("tracestate"),
                ])
                .expose_headers([HeaderName::from_static("x-request-id")])
                .max_age(Duration::from_secs(600)),
        )
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(UuidRequestId))
}

/// A transport-level error in the GraphQL response shape.
pub(crate) fn request_error(status: StatusCode, code: ErrorCode, message: String) -> Response {
    let body = serde_json::json!({
        "errors": [{ "message": message, "extensions": { "code": code.as_str() } }]
    });
    (status, axum::Json(body)).into_response()
}

/// Only queries over GET: a GET must not change anything.
pub(crate) fn mutation_over_get() -> Response {
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

/// The answer when the server holds as many websockets and event streams
/// as `TASKQL_MAX_WEBSOCKETS` allows.
pub(crate) fn streams_full() -> Response {
    request_error(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::ServiceUnavailable,
        "the server holds as many websockets and event streams as it allows; try again later"
            .into(),
    )
}

/// An error after which the connection closes: the rest of the request
/// was not read, so it cannot carry another one.
fn closing_error(status: StatusCode, code: ErrorCode, message: String) -> Response {
    let mut response = request_error(status, code, message);
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn too_large() -> Response {
    closing_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::PayloadTooLarge,
        format!("the request body is over {MAX_BODY_BYTES} bytes"),
    )
}

/// Reads a request body of at most [`MAX_BODY_BYTES`] within the body
/// timeout: 408 when it is too slow, 413 when it is too big.
pub(crate) async fn read_body(
    state: &HttpState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, Response> {
    let deadline = tokio::time::Instant::now() + state.body_timeout;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    let mut chunks = body.into_data_stream();
    if declared.is_some_and(|n| n > MAX_BODY_BYTES) {
        if declared.is_some_and(|n| n <= MAX_DRAINED_BYTES) {
            drain(&mut chunks, deadline).await;
        }
        return Err(too_large());
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0));
    loop {
        let chunk = match tokio::time::timeout_at(deadline, chunks.next()).await {
            Err(_) => {
                return Err(closing_error(
                    StatusCode::REQUEST_TIMEOUT,
                    ErrorCode::RequestTimeout,
                    format!(
                        "the request body did not arrive within {} s",
                        state.body_timeout.as_secs_f64()
                    ),
                ));
            }
            Ok(None) => return Ok(body.into()),
            Ok(Some(Err(_))) => {
                return Err(closing_error(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::BadRequest,
                    "the request body could not be read".into(),
                ));
            }
            Ok(Some(Ok(chunk))) => chunk,
        };
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            drain(&mut chunks, deadline).await;
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
}

/// Reads and drops the rest of a body, up to [`MAX_DRAINED_BYTES`] and the deadline.
async fn drain(chunks: &mut axum::body::BodyDataStream, deadline: tokio::time::Instant) {
    let mut drained = 0;
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(deadline, chunks.next()).await {
        drained += chunk.len();
        if drained > MAX_DRAINED_BYTES {
            break;
        }
    }
}

pub(crate) async fn graphiql() -> Html<&'static str> {
    Html(include_str!("../graphiql/index.html"))
}

/// GraphiQL's scripts and styles, vendored into the binary: the page works
/// offline and runs no third-party script next to a user's token.
async fn graphiql_asset(axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    let (body, content_type): (&'static [u8], &str) = match name.as_str() {
        "graphiql.min.js" => (
            include_bytes!("../graphiql/graphiql.min.js"),
            "text/javascript",
        ),
        "graphiql.min.css" => (include_bytes!("../graphiql/graphiql.min.css"), "text/css"),
        "react.production.min.js" => (
            include_bytes!("../graphiql/react.production.min.js"),
            "text/javascript",
        ),
        "react-dom.production.min.js" => (
            include_bytes!("../graphiql/react-dom.production.min.js"),
            "text/javascript",
        ),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        body,
    )
        .into_response()
}

async fn readyz(State(state): State<Arc<HttpState>>) -> Response {
    match state.db.ping(READY_TIMEOUT).await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(err) => {
            tracing::warn!(error = %err, "readiness check failed");
            (StatusCode::SERVICE_UNAVAILABLE, "database unreachable").into_response()
        }
    }
}

/// `/metrics`: OpenMetrics to a scraper that asks for it (Prometheus does),
/// else the classic text format.
async fn metrics(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    let live = state.live_subscriptions.0.load(Ordering::Relaxed);
    state.metrics.subscriptions.set(live as i64);
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    let body = state.metrics.render(state.db.stats(), openmetrics);
    let content_type = if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain; version=0.0.4; charset=utf-8"
    };
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// Resolves once the server begins to shut down: long-lived transports (a
/// websocket, an event stream) end on it.
pub(super) async fn shut_down(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|down| *down).await;
}
