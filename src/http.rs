//! HTTP and websocket transport: routes, auth extraction, limits.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_graphql::http::ALL_WEBSOCKET_PROTOCOLS;
use async_graphql::{BatchRequest, Data};
use async_graphql_axum::{GraphQLProtocol, GraphQLResponse, GraphQLWebSocket};
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use futures::{SinkExt, StreamExt};
use tokio::sync::watch;
use tower_http::cors::{Any, CorsLayer};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

use crate::auth::Authenticator;
use crate::graphql::{Caller, LiveSubscriptions, SubscriptionCounter, TaskSchema};

/// Largest request body accepted on POST /graphql.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Most operations one batched request may carry.
pub const MAX_BATCH: usize = 20;
/// How long a websocket may stay open without `connection_init`.
pub const CONNECTION_INIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `/readyz` waits for the database before it answers 503.
pub const READY_TIMEOUT: Duration = Duration::from_secs(1);
/// Server pings this often; a client silent for three periods is dropped.
pub const PING_INTERVAL: Duration = Duration::from_secs(15);

pub struct HttpState {
    pub schema: TaskSchema,
    pub auth: Authenticator,
    pub db: crate::db::Db,
    pub live_subscriptions: LiveSubscriptions,
    pub max_subscriptions_per_connection: usize,
    pub shutdown: watch::Receiver<bool>,
    pub metrics: Arc<Metrics>,
    pub events: crate::events::EventBus,
}

#[derive(Default)]
pub struct Metrics {
    pub http_requests: AtomicU64,
    pub websocket_connections: AtomicU64,
    pub websocket_connections_total: AtomicU64,
}

#[derive(Clone, Default)]
struct UuidRequestId;

impl MakeRequestId for UuidRequestId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
            .ok()
            .map(RequestId::new)
    }
}

pub fn router(state: Arc<HttpState>) -> Router {
    let trace = TraceLayer::new_for_http().make_span_with(|request: &axum::http::Request<Body>| {
        let request_id = request
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id)
    });
    Router::new()
        .route("/graphql", get(graphiql).post(graphql_post))
        .route("/graphql/ws", get(graphql_ws))
        .route("/graphql/assets/{name}", get(graphiql_asset))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(crate::ui::routes())
        .with_state(state)
        // Frontends on other origins send the token in a header, never in a
        // cookie, so any origin may call; nothing ambient is exposed.
        .layer(
            CorsLayer::new()
                .allow_origin(Any)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
                .expose_headers([HeaderName::from_static("x-request-id")])
                .max_age(Duration::from_secs(600)),
        )
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(trace)
        .layer(SetRequestIdLayer::x_request_id(UuidRequestId))
}

/// The caller an `Authorization` value makes: a bad token is rejected, never anonymous.
fn verify(auth: &Authenticator, header: &str) -> Caller {
    match auth.authenticate_header(header) {
        Ok(user) => Caller::Authenticated(user),
        Err(err) => Caller::Rejected(err.to_string()),
    }
}

fn caller_from_headers(auth: &Authenticator, headers: &HeaderMap) -> Caller {
    match headers.get(header::AUTHORIZATION) {
        None => Caller::Anonymous,
        Some(value) => match value.to_str() {
            Ok(value) => verify(auth, value),
            Err(_) => Caller::Rejected("the Authorization header is not text".into()),
        },
    }
}

/// A transport-level error in the GraphQL response shape.
fn request_error(status: StatusCode, code: &str, message: String) -> Response {
    let body = serde_json::json!({
        "errors": [{ "message": message, "extensions": { "code": code } }]
    });
    (status, axum::Json(body)).into_response()
}

async fn graphql_post(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    state.metrics.http_requests.fetch_add(1, Ordering::Relaxed);
    let too_large = || {
        request_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            format!("the request body is over {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES) {
        return too_large();
    }
    let bytes = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(bytes) => bytes,
        Err(_) => return too_large(),
    };
    let request: BatchRequest = match serde_json::from_slice(&bytes) {
        Ok(request) => request,
        Err(err) => {
            return request_error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                format!("the body is not a GraphQL request in JSON: {err}"),
            );
        }
    };
    if let BatchRequest::Batch(list) = &request
        && list.len() > MAX_BATCH
    {
        return request_error(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            format!("a batch may hold at most {MAX_BATCH} operations"),
        );
    }
    let caller = caller_from_headers(&state.auth, &headers);
    let response = state.schema.execute_batch(request.data(caller)).await;
    GraphQLResponse::from(response).into_response()
}

async fn graphiql() -> Html<&'static str> {
    Html(include_str!("graphiql/index.html"))
}

/// GraphiQL's scripts and styles, vendored into the binary: the page works
/// offline and runs no third-party script next to a user's token.
async fn graphiql_asset(axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    let (body, content_type): (&'static [u8], &str) = match name.as_str() {
        "graphiql.min.js" => (
            include_bytes!("graphiql/graphiql.min.js"),
            "text/javascript",
        ),
        "graphiql.min.css" => (include_bytes!("graphiql/graphiql.min.css"), "text/css"),
        "react.production.min.js" => (
            include_bytes!("graphiql/react.production.min.js"),
            "text/javascript",
        ),
        "react-dom.production.min.js" => (
            include_bytes!("graphiql/react-dom.production.min.js"),
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

async fn metrics(State(state): State<Arc<HttpState>>) -> Response {
    let m = &state.metrics;
    let body = format!(
        "# TYPE taskql_http_graphql_requests_total counter\n\
         taskql_http_graphql_requests_total {}\n\
         # TYPE taskql_websocket_connections gauge\n\
         taskql_websocket_connections {}\n\
         # TYPE taskql_websocket_connections_total counter\n\
         taskql_websocket_connections_total {}\n\
         # TYPE taskql_subscriptions gauge\n\
         taskql_subscriptions {}\n\
         # TYPE taskql_task_events_total counter\n\
         taskql_task_events_total {}\n\
         # TYPE taskql_event_topics gauge\n\
         taskql_event_topics {}\n",
        m.http_requests.load(Ordering::Relaxed),
        m.websocket_connections.load(Ordering::Relaxed),
        m.websocket_connections_total.load(Ordering::Relaxed),
        state.live_subscriptions.0.load(Ordering::Relaxed),
        state.events.published_count(),
        state.events.topic_count(),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// The token in a `connection_init` payload: `{"Authorization": "Bearer …"}`,
/// `{"authorization": …}`, `{"token": "…"}`, or the same under `headers`.
fn caller_from_init(auth: &Authenticator, payload: &serde_json::Value) -> Caller {
    let lookup = |object: &serde_json::Value| -> Option<Result<String, String>> {
        for key in ["Authorization", "authorization"] {
            if let Some(value) = object.get(key) {
                return Some(
                    value
                        .as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| key.to_owned()),
                );
            }
        }
        object.get("token").map(|value| {
            value
                .as_str()
                .map(|t| format!("Bearer {t}"))
                .ok_or_else(|| "token".to_owned())
        })
    };
    let found = lookup(payload).or_else(|| payload.get("headers").and_then(lookup));
    match found {
        None => Caller::Anonymous,
        Some(Err(key)) => Caller::Rejected(format!("connection_init {key} must be a string")),
        Some(Ok(header)) => verify(auth, &header),
    }
}

async fn graphql_ws(
    State(state): State<Arc<HttpState>>,
    protocol: GraphQLProtocol,
    upgrade: WebSocketUpgrade,
) -> Response {
    upgrade
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .max_message_size(MAX_BODY_BYTES)
        .on_upgrade(move |socket| serve_socket(state, socket, protocol))
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// Runs one websocket: the GraphQL protocol, plus server pings, the
/// `connection_init` deadline and a clean close on shutdown.
async fn serve_socket(state: Arc<HttpState>, socket: WebSocket, protocol: GraphQLProtocol) {
    state
        .metrics
        .websocket_connections
        .fetch_add(1, Ordering::Relaxed);
    state
        .metrics
        .websocket_connections_total
        .fetch_add(1, Ordering::Relaxed);
    let (mut sink, stream) = socket.split();
    let (outbox, mut outgoing) = futures::channel::mpsc::channel::<Message>(64);

    let started = Instant::now();
    let last_seen = Arc::new(AtomicU64::new(0));
    let initialized = Arc::new(AtomicBool::new(false));
    let stream = {
        let last_seen = last_seen.clone();
        stream.inspect(move |_| {
            last_seen.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        })
    };

    let auth = state.auth.clone();
    let counter = SubscriptionCounter {
        active: Default::default(),
        limit: state.max_subscriptions_per_connection,
    };
    // The token's `exp` (0: none yet): the socket closes when it passes.
    let expires_at = Arc::new(AtomicU64::new(0));
    let on_init = {
        let initialized = initialized.clone();
        let expires_at = expires_at.clone();
        move |payload: serde_json::Value| async move {
            initialized.store(true, Ordering::Relaxed);
            let caller = caller_from_init(&auth, &payload);
            if let Caller::Authenticated(user) = &caller {
                expires_at.store(user.expires_at.unwrap_or(0), Ordering::Relaxed);
            }
            let mut data = Data::default();
            data.insert(caller);
            data.insert(counter);
            Ok(data)
        }
    };
    let graphql = GraphQLWebSocket::new_with_pair(
        outbox.clone().sink_map_err(|_| ()),
        stream,
        state.schema.clone(),
        protocol,
    )
    .on_connection_init(on_init)
    .serve();

    let supervise = {
        let mut outbox = outbox.clone();
        let mut shutdown = state.shutdown.clone();
        async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(1));
            let mut last_ping = Instant::now();
            loop {
                let stopping = tokio::select! {
                    _ = ticker.tick() => false,
                    _ = shutdown.wait_for(|down| *down) => true,
                };
                if stopping {
                    let _ = outbox.send(close(1001, "server shutting down")).await;
                    return;
                }
                let exp = expires_at.load(Ordering::Relaxed);
                let now = chrono::Utc::now().timestamp().max(0) as u64;
                if exp != 0 && now > exp.saturating_add(crate::auth::LEEWAY_SECS) {
                    let _ = outbox
                        .send(close(4403, "Forbidden: the token has expired"))
                        .await;
                    return;
                }
                if !initialized.load(Ordering::Relaxed)
                    && started.elapsed() > CONNECTION_INIT_TIMEOUT
                {
                    let _ = outbox
                        .send(close(4408, "Connection initialisation timeout"))
                        .await;
                    return;
                }
                let silent =
                    started.elapsed().as_millis() as u64 - last_seen.load(Ordering::Relaxed);
                if Duration::from_millis(silent) > PING_INTERVAL * 3 {
                    let _ = outbox.send(close(1001, "no answer to pings")).await;
                    return;
                }
                if last_ping.elapsed() >= PING_INTERVAL {
                    last_ping = Instant::now();
                    if outbox
                        .send(Message::Ping(Default::default()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    };

    let write = async move {
        while let Some(message) = outgoing.next().await {
            let closing = matches!(message, Message::Close(_));
            if sink.send(message).await.is_err() || closing {
                break;
            }
        }
        let _ = sink.close().await;
    };

    let run = async move {
        tokio::select! {
            _ = graphql => {}
            _ = supervise => {}
        }
        // Dropping the last sender ends the writer once it has sent what is queued.
        drop(outbox);
    };
    tokio::join!(run, write);
    state
        .metrics
        .websocket_connections
        .fetch_sub(1, Ordering::Relaxed);
}
