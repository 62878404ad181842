//! GraphQL over Server-Sent Events: graphql-sse's "distinct connections
//! mode" on `/graphql`. A request that accepts `text/event-stream` (a `POST`
//! with a JSON body, or a `GET` with the query in the URL) gets one stream:
//! `event: next` with each result, then `event: complete`.
//!
//! The stream runs through the same schema as the websocket; this module
//! only turns its responses into events. Like a websocket it needs a valid
//! token (else 401 before anything runs), takes one of the
//! `TASKQL_MAX_WEBSOCKETS` places (else 503), gets a keep-alive comment
//! every `TASKQL_KEEPALIVE_INTERVAL`, and ends when the token expires or the
//! server shuts down. Those ends send no `complete`, so graphql-sse
//! reconnects, asking its `headers` for a token again, as a websocket client
//! does after a 4403 close.
use std::convert::Infallible;
use std::sync::Arc;

use async_graphql::Response;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response as HttpResponse};
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::OwnedSemaphorePermit;

use super::operation::{self, Operation};
use super::{HttpState, mutation_over_get, request_error, shut_down, streams_full};
use crate::auth::{Caller, CurrentUser, Presented, expiry};
use crate::error::ErrorCode;
use crate::graphql::WireResponse;

const EVENT_STREAM: &str = "text/event-stream; charset=utf-8";
const COMPLETE: &[u8] = b"event: complete\ndata:\n\n";
const KEEPALIVE: &[u8] = b":\n\n";

/// `POST /graphql` with `Accept: text/event-stream`.
pub(super) async fn post(state: Arc<HttpState>, headers: HeaderMap, body: Body) -> HttpResponse {
    let user = match authenticate(&state, &headers) {
        Ok(user) => user,
        Err(refused) => return *refused,
    };
    let Ok(slot) = state.websocket_slots.clone().try_acquire_owned() else {
        return streams_full();
    };
    let bytes = match super::read_body(&state, &headers, body).await {
        Ok(bytes) => bytes,
        Err(response) => return response,
    };
    let (mut requests, batch) = match operation::parse_body(&bytes) {
        Ok(parsed) => parsed,
        Err(malformed) => return malformed.into_response(),
    };
    if batch {
        return request_error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "an event stream carries one operation: send it alone, not in a list".into(),
        );
    }
    respond(state, &headers, user, requests.remove(0), slot, false)
}

/// `GET /graphql?query=…` with `Accept: text/event-stream`.
pub(super) async fn get(
    state: Arc<HttpState>,
    headers: HeaderMap,
    request: async_graphql::Request,
) -> HttpResponse {
    let user = match authenticate(&state, &headers) {
        Ok(user) => user,
        Err(refused) => return *refused,
    };
    let Ok(slot) = state.websocket_slots.clone().try_acquire_owned() else {
        return streams_full();
    };
    respond(state, &headers, user, request, slot, true)
}

/// The caller, who must hold a valid token: a stream outlives the request,
/// so nothing is streamed to a caller who could not run anything.
fn authenticate(state: &HttpState, headers: &HeaderMap) -> Result<CurrentUser, Box<HttpResponse>> {
    let refusal = match state.auth.caller(Presented::Headers(headers)).signed_in() {
        Ok(user) => return Ok(user.clone()),
        Err(refusal) => refusal,
    };
    let mut response = request_error(
        StatusCode::UNAUTHORIZED,
        ErrorCode::Unauthenticated,
        refusal.to_string(),
    );
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Err(Box::new(response))
}

/// Starts the operation and answers with its event stream.
fn respond(
    state: Arc<HttpState>,
    headers: &HeaderMap,
    user: CurrentUser,
    request: async_graphql::Request,
    slot: OwnedSemaphorePermit,
    over_get: bool,
) -> HttpResponse {
    let request_id = operation::request_id(headers).to_owned();
    let expires_at = user.expires_at;
    let caller = Caller::Authenticated(user);
    let (operation, started) = operation::start(&state, &caller, request);
    if over_get && operation.is_mutation() {
        return mutation_over_get();
    }
    // A request refused before it ran is reported in a `next`, as the protocol asks.
    let responses = operation::responses(&state, &operation, started, |request| {
        state.schema.execute_stream(request.data(caller))
    });
    let events = Events {
        state,
        operation,
        request_id,
        expires_at,
        _slot: slot,
    };
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(EVENT_STREAM)),
            // Neither a cache nor a buffering proxy (nginx) may hold events back.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        Body::from_stream(events.stream(responses)),
    )
        .into_response()
}

/// What a stream needs while it runs.
struct Events {
    state: Arc<HttpState>,
    operation: Operation,
    request_id: String,
    expires_at: Option<u64>,
    /// The stream's place among `TASKQL_MAX_WEBSOCKETS`, given back when it ends.
    _slot: OwnedSemaphorePermit,
}

/// What wakes a stream.
enum Step {
    Next(Option<Box<Response>>),
    KeepAlive,
    Expired,
    ShutDown,
}

impl Events {
    fn stream(
        self,
        mut responses: BoxStream<'static, Response>,
    ) -> impl futures::Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
        async_stream::stream! {
            // Held, by name, for as long as the stream lives.
            let _slot = self._slot;
            let interval = self.state.keepalive_interval;
            let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut shutdown = self.state.shutdown.clone();
            let expiry = expiry(self.expires_at);
            tokio::pin!(expiry);
            let mut operation = self.operation;
            loop {
                let step = tokio::select! {
                    biased;
                    _ = shut_down(&mut shutdown) => Step::ShutDown,
                    _ = &mut expiry => Step::Expired,
                    next = responses.next() => Step::Next(next.map(Box::new)),
                    _ = keepalive.tick() => Step::KeepAlive,
                };
                match step {
                    Step::Next(Some(mut response)) => {
                        operation.answer(&self.state, &self.request_id, &mut response);
                        match serde_json::to_string(&WireResponse::from(&*response)) {
                            Ok(json) => yield Ok(Bytes::from(format!("event: next\ndata: {json}\n\n"))),
                            Err(err) => {
                                tracing::error!(error = %err, "cannot serialize a GraphQL response");
                                break;
                            }
                        }
                    }
                    Step::Next(None) => {
                        yield Ok(Bytes::from_static(COMPLETE));
                        break;
                    }
                    Step::KeepAlive => yield Ok(Bytes::from_static(KEEPALIVE)),
                    // No `complete`: the client reconnects, with a new token.
                    Step::Expired => {
                        yield Ok(Bytes::from_static(b": the token has expired\n\n"));
                        break;
                    }
                    Step::ShutDown => {
                        yield Ok(Bytes::from_static(b": server shutting down\n\n"));
                        break;
                    }
                }
            }
        }
    }
}
