//! Subscriptions over websockets, in both protocols clients speak:
//! `graphql-transport-ws` (the graphql-ws library's, as its protocol
//! document says) and the legacy `graphql-ws` of subscriptions-transport-ws.
//!
//! A socket first waits, small, for `connection_init` (at most
//! [`CONNECTION_INIT_TIMEOUT`]). A missing, bad or expired token closes it
//! with 4403, the signal graphql-ws and Apollo clients use to refresh the
//! token and reconnect; the legacy protocol gets `connection_error` and a
//! close instead. Protocol violations close with the protocol's codes: 4400
//! malformed message, 4401 subscribe before `connection_ack`, 4408 no
//! `connection_init` in time, 4409 a second subscribe with a live id, 4429 a
//! second `connection_init`. The server pings every keep-alive interval
//! (`TASKQL_KEEPALIVE_INTERVAL`) and drops a client silent for three of
//! them; it closes with 1001 on shutdown and with 4403 when the token expires.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_graphql::http::ALL_WEBSOCKET_PROTOCOLS;
use async_graphql::{Data, Response};
use async_graphql_axum::GraphQLProtocol;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response as HttpResponse};
use futures::stream::{AbortHandle, BoxStream, SelectAll, SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::OwnedSemaphorePermit;

use super::operation::{self, Operation, WireRequest};
use super::{HttpState, MAX_BODY_BYTES, shut_down, streams_full};
use crate::auth::{Caller, CurrentUser, Presented, Refusal};
use crate::graphql::{self, SubscriptionCounter, WireResponse};

/// How long a websocket may stay open without `connection_init`.
pub const CONNECTION_INIT_TIMEOUT: Duration = Duration::from_secs(10);
/// What a socket reads into at a time: messages are small, and a socket
/// waiting for its `connection_init` should cost little.
const READ_BUFFER: usize = 4 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// `graphql-transport-ws`.
    TransportWs,
    /// `graphql-ws`, subscriptions-transport-ws's protocol.
    Legacy,
}

/// `GET /graphql/ws`: upgrades, unless the server already holds its
/// limit of websockets (503).
pub async fn upgrade(
    State(state): State<Arc<HttpState>>,
    headers: axum::http::HeaderMap,
    // Refuses (400) a request that names neither protocol.
    _: GraphQLProtocol,
    upgrade: WebSocketUpgrade,
) -> HttpResponse {
    let Ok(slot) = state.websocket_slots.clone().try_acquire_owned() else {
        return streams_full();
    };
    let upgrade = upgrade
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .max_message_size(MAX_BODY_BYTES)
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0);
    let protocol = match upgrade.selected_protocol().map(|p| p.as_bytes()) {
        Some(b"graphql-transport-ws") => Protocol::TransportWs,
        Some(b"graphql-ws") => Protocol::Legacy,
        _ => return StatusCode::BAD_REQUEST.into_response(),
    };
    // The upgrade's request id names the socket's operations in the log.
    let request_id = operation::request_id(&headers).to_owned();
    upgrade.on_upgrade(move |socket| serve(state, socket, protocol, slot, request_id))
}

type Sink = SplitSink<WebSocket, Message>;
type Source = SplitStream<WebSocket>;

fn close(code: u16, reason: impl Into<String>) -> Message {
    let reason: String = reason.into();
    // A close reason may hold at most 123 bytes.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::Close(Some(CloseFrame {
        code,
        reason: reason[..end].into(),
    }))
}

fn text(value: serde_json::Value) -> Message {
    Message::Text(value.to_string().into())
}

/// Why a socket ends.
enum Ended {
    Closed,
    Close(u16, String),
}

async fn serve(
    state: Arc<HttpState>,
    socket: WebSocket,
    protocol: Protocol,
    _slot: OwnedSemaphorePermit,
    request_id: String,
) {
    let metrics = state.metrics.clone();
    metrics.websockets.inc();
    metrics.websockets_opened.inc();
    let (mut sink, mut source) = socket.split();
    let ended = match handshake(&state, &mut sink, &mut source, protocol).await {
        Ok(user) => {
            // Boxed: a socket still waiting for its init stays small.
            Box::pin(session(
                &state,
                &mut sink,
                &mut source,
                protocol,
                (user, &request_id),
            ))
            .await
        }
        Err(ended) => ended,
    };
    if let Ended::Close(code, reason) = ended {
        let _ = sink.send(close(code, reason)).await;
    }
    let _ = sink.close().await;
    metrics.websockets.dec();
}

/// A client message, in either protocol.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientMessage {
    ConnectionInit {
        #[serde(default)]
        payload: Option<serde_json::Value>,
    },
    Ping {
        #[serde(default)]
        payload: Option<serde_json::Value>,
    },
    Pong {},
    /// graphql-transport-ws.
    Subscribe {
        id: String,
        payload: WireRequest,
    },
    /// graphql-transport-ws.
    Complete {
        id: String,
    },
    /// Legacy.
    Start {
        id: String,
        payload: WireRequest,
    },
    /// Legacy.
    Stop {
        id: String,
    },
    /// Legacy.
    ConnectionTerminate {},
}

/// Reads the next client message: `Ok(None)` for a frame that is not one
/// (ping, pong), `Err` when the socket ends or the message is malformed.
fn parse(message: Message) -> Result<Option<ClientMessage>, Ended> {
    match message {
        Message::Text(text) => serde_json::from_str(text.as_str())
            .map(Some)
            .map_err(|err| Ended::Close(4400, format!("Invalid message: {err}"))),
        Message::Binary(_) => Err(Ended::Close(4400, "Messages must be text".into())),
        Message::Ping(_) | Message::Pong(_) => Ok(None),
        Message::Close(_) => Err(Ended::Closed),
    }
}

/// Waits for `connection_init` and checks its token.
async fn handshake(
    state: &HttpState,
    sink: &mut Sink,
    source: &mut Source,
    protocol: Protocol,
) -> Result<CurrentUser, Ended> {
    let deadline = tokio::time::Instant::now() + CONNECTION_INIT_TIMEOUT;
    let mut shutdown = state.shutdown.clone();
    loop {
        let received = tokio::select! {
            received = tokio::time::timeout_at(deadline, source.next()) => received,
            _ = shut_down(&mut shutdown) => {
                return Err(Ended::Close(1001, "server shutting down".into()));
            }
        };
        let message = match received {
            Err(_) => {
                return Err(
                    refuse(sink, protocol, 4408, "Connection initialisation timeout").await,
                );
            }
            Ok(None) | Ok(Some(Err(_))) => return Err(Ended::Closed),
            Ok(Some(Ok(message))) => message,
        };
        match parse(message)? {
            None => {}
            Some(ClientMessage::ConnectionInit { payload }) => {
                let payload = payload.unwrap_or_default();
                let caller = state.auth.caller(Presented::InitPayload(&payload));
                return match caller.signed_in() {
                    Ok(user) => {
                        send(sink, json!({ "type": "connection_ack" })).await?;
                        Ok(user.clone())
                    }
                    Err(Refusal::Anonymous) => Err(refuse(
                        sink,
                        protocol,
                        4403,
                        "Forbidden: send the token in connection_init's payload",
                    )
                    .await),
                    Err(refusal) => {
                        Err(refuse(sink, protocol, 4403, &format!("Forbidden: {refusal}")).await)
                    }
                };
            }
            Some(ClientMessage::Ping { payload }) => pong(sink, payload).await?,
            Some(ClientMessage::Subscribe { .. } | ClientMessage::Start { .. }) => {
                return Err(Ended::Close(4401, "Unauthorized".into()));
            }
            Some(ClientMessage::ConnectionTerminate {}) => return Err(Ended::Closed),
            Some(_) => {}
        }
    }
}

/// Ends the handshake: the legacy protocol says why in `connection_error` first.
async fn refuse(sink: &mut Sink, protocol: Protocol, code: u16, reason: &str) -> Ended {
    if protocol == Protocol::Legacy {
        let _ = sink
            .send(text(
                json!({ "type": "connection_error", "payload": { "message": reason } }),
            ))
            .await;
    }
    Ended::Close(code, reason.into())
}

async fn send(sink: &mut Sink, message: serde_json::Value) -> Result<(), Ended> {
    sink.send(text(message)).await.map_err(|_| Ended::Closed)
}

async fn pong(sink: &mut Sink, payload: Option<serde_json::Value>) -> Result<(), Ended> {
    let message = match payload {
        Some(payload) => json!({ "type": "pong", "payload": payload }),
        None => json!({ "type": "pong" }),
    };
    send(sink, message).await
}

/// One item of the merged subscription streams: an operation's next
/// response, or `None` when it ended.
type Item = (String, u64, Option<Response>);

/// The live operations of one socket.
struct Operations {
    /// Per id: which start of that id is live, and how to stop it.
    live: HashMap<String, Live>,
    /// Every live stream, merged; only the woken ones are polled.
    streams: SelectAll<BoxStream<'static, Item>>,
    starts: u64,
}

/// One operation running on a socket.
struct Live {
    /// Which start of its id it is.
    start: u64,
    running: AbortHandle,
    /// What its log line says, and what its answers hide.
    operation: Operation,
}

/// An initialised socket: runs subscriptions until the client leaves, the
/// server shuts down or the token expires.
async fn session(
    state: &HttpState,
    sink: &mut Sink,
    source: &mut Source,
    protocol: Protocol,
    (user, request_id): (CurrentUser, &str),
) -> Ended {
    let expiry = crate::auth::expiry(user.expires_at);
    tokio::pin!(expiry);
    let caller = Caller::Authenticated(user);
    let mut session_data = Data::default();
    session_data.insert(caller.clone());
    session_data.insert(SubscriptionCounter {
        active: Default::default(),
        limit: state.max_subscriptions_per_connection,
    });
    let session_data = Arc::new(session_data);
    let mut operations = Operations {
        live: HashMap::new(),
        streams: SelectAll::new(),
        starts: 0,
    };
    let mut shutdown = state.shutdown.clone();
    let keepalive = state.keepalive_interval;
    let mut ticker = tokio::time::interval(keepalive.min(Duration::from_secs(1)));
    let mut last_seen = Instant::now();
    let mut last_ping = Instant::now();
    loop {
        tokio::select! {
            received = source.next() => {
                last_seen = Instant::now();
                let message = match received {
                    None | Some(Err(_)) => return Ended::Closed,
                    Some(Ok(message)) => message,
                };
                let message = match parse(message) {
                    Ok(Some(message)) => message,
                    Ok(None) => continue,
                    Err(ended) => return ended,
                };
                if let Err(ended) = handle(state, sink, protocol, (&caller, &session_data), &mut operations, message).await {
                    return ended;
                }
            }
            Some((id, start, response)) = operations.streams.next(), if !operations.streams.is_empty() => {
                if let Err(ended) = deliver((state, request_id), sink, protocol, &mut operations, id, start, response).await {
                    return ended;
                }
            }
            _ = shut_down(&mut shutdown) => {
                return Ended::Close(1001, "server shutting down".into());
            }
            _ = &mut expiry => {
                return Ended::Close(4403, "Forbidden: the token has expired".into());
            }
            _ = ticker.tick() => {
                if last_seen.elapsed() > keepalive * 3 {
                    return Ended::Close(1001, "no answer to pings".into());
                }
                if last_ping.elapsed() >= keepalive {
                    last_ping = Instant::now();
                    if sink.send(Message::Ping(Default::default())).await.is_err() {
                        return Ended::Closed;
                    }
                }
            }
        }
    }
}

/// Acts on one message from an initialised client.
async fn handle(
    state: &HttpState,
    sink: &mut Sink,
    protocol: Protocol,
    (caller, session_data): (&Caller, &Arc<Data>),
    operations: &mut Operations,
    message: ClientMessage,
) -> Result<(), Ended> {
    match (protocol, message) {
        (_, ClientMessage::ConnectionInit { .. }) => {
            if protocol == Protocol::Legacy {
                let _ = send(
                    sink,
                    json!({ "type": "connection_error", "payload": { "message": "Too many initialisation requests" } }),
                )
                .await;
            }
            Err(Ended::Close(
                4429,
                "Too many initialisation requests".into(),
            ))
        }
        (_, ClientMessage::Ping { payload }) => pong(sink, payload).await,
        (_, ClientMessage::Pong {}) => Ok(()),
        (Protocol::TransportWs, ClientMessage::Subscribe { id, payload })
        | (Protocol::Legacy, ClientMessage::Start { id, payload }) => {
            if let Some(Live { running, .. }) = operations.live.get(&id) {
                if protocol == Protocol::TransportWs {
                    return Err(Ended::Close(
                        4409,
                        format!("Subscriber for {} already exists", crate::error::echo(&id)),
                    ));
                }
                // subscriptions-transport-ws replaces an operation restarted under its id.
                running.abort();
            }
            let request = match payload.into_request() {
                Ok(request) => request,
                Err(_) => {
                    return Err(Ended::Close(
                        4400,
                        "Invalid message: the payload has no query".into(),
                    ));
                }
            };
            start(state, (caller, session_data), operations, id, request);
            Ok(())
        }
        (Protocol::TransportWs, ClientMessage::Complete { id })
        | (Protocol::Legacy, ClientMessage::Stop { id }) => {
            if let Some(Live { running, .. }) = operations.live.remove(&id) {
                running.abort();
                // Confirms the stop; a client that no longer tracks the id ignores it.
                send(sink, json!({ "type": "complete", "id": id })).await?;
            }
            Ok(())
        }
        (Protocol::Legacy, ClientMessage::ConnectionTerminate {}) => Err(Ended::Closed),
        (_, _) => Err(Ended::Close(
            4400,
            "Invalid message: not a message of this protocol".into(),
        )),
    }
}

fn start(
    state: &HttpState,
    (caller, session_data): (&Caller, &Arc<Data>),
    operations: &mut Operations,
    id: String,
    request: async_graphql::Request,
) {
    operations.starts += 1;
    let start = operations.starts;
    let (operation, started) = operation::start(state, caller, request);
    // A request refused before it ran is answered like a document that does not validate.
    let responses = operation::responses(state, &operation, started, |request| {
        state
            .schema
            .execute_stream_with_session_data(request, session_data.clone())
    });
    let (responses, handle) = futures::stream::abortable(responses);
    let ended = id.clone();
    let stream = responses
        .map({
            let id = id.clone();
            move |response| (id.clone(), start, Some(response))
        })
        .chain(futures::stream::once(async move { (ended, start, None) }))
        .boxed();
    operations.live.insert(
        id,
        Live {
            start,
            running: handle,
            operation,
        },
    );
    operations.streams.push(stream);
}

/// Sends an operation's response, or its end.
async fn deliver(
    (state, request_id): (&HttpState, &str),
    sink: &mut Sink,
    protocol: Protocol,
    operations: &mut Operations,
    id: String,
    start: u64,
    response: Option<Response>,
) -> Result<(), Ended> {
    // A stream the client stopped (or replaced) may still yield: drop it.
    if operations
        .live
        .get(&id)
        .is_none_or(|live| live.start != start)
    {
        return Ok(());
    }
    let Some(mut response) = response else {
        operations.live.remove(&id);
        return send(sink, json!({ "type": "complete", "id": id })).await;
    };
    if let Some(live) = operations.live.get_mut(&id) {
        live.operation.answer(state, request_id, &mut response);
    }
    let message = if protocol == Protocol::TransportWs && graphql::is_request_error(&response) {
        // The operation never ran: `error` ends it; no `complete` follows.
        if let Some(Live { running, .. }) = operations.live.remove(&id) {
            running.abort();
        }
        json!({ "type": "error", "id": id, "payload": response.errors })
    } else {
        let kind = match protocol {
            Protocol::TransportWs => "next",
            Protocol::Legacy => "data",
        };
        // Written straight from the response: this is the message every
        // change of a watched task goes out as.
        let next = Next {
            kind,
            id: &id,
            payload: WireResponse::from(&response),
        };
        let text = serde_json::to_string(&next).map_err(|_| Ended::Closed)?;
        return sink
            .send(Message::Text(text.into()))
            .await
            .map_err(|_| Ended::Closed);
    };
    send(sink, message).await
}

/// A `next` (or legacy `data`) message.
#[derive(serde::Serialize)]
struct Next<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    payload: WireResponse<'a>,
}
