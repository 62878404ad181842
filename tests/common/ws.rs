//! A small GraphQL-over-websocket client for tests: it speaks
//! `graphql-transport-ws` (and enough of the legacy `graphql-ws` for a
//! smoke test) over a real socket, and gives each subscription its own queue
//! of what the server sent for it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// Longest a test waits for any one message before it fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

pub const TRANSPORT_WS: &str = "graphql-transport-ws";
pub const LEGACY_WS: &str = "graphql-ws";

/// What the server sent for one subscription, or how the socket ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `next` (`data` in the legacy protocol): one result, data and/or errors.
    Next(Value),
    /// `error`: the operation failed before it produced results.
    Error(Value),
    /// `complete`: the server ended the subscription.
    Complete,
    /// The socket closed: the close code and reason (`None` without a close frame).
    Closed(Option<u16>, String),
}

impl Event {
    /// The GraphQL errors this event carries, if any.
    pub fn errors(&self) -> Option<&Vec<Value>> {
        match self {
            Event::Next(payload) => payload["errors"].as_array().filter(|e| !e.is_empty()),
            Event::Error(Value::Array(errors)) => Some(errors),
            _ => None,
        }
    }

    /// `extensions.code` of the first error.
    pub fn error_code(&self) -> Option<&str> {
        self.errors()?.first()?["extensions"]["code"].as_str()
    }

    /// The `data` of a `next`, unless it is null.
    pub fn data(&self) -> Option<&Value> {
        match self {
            Event::Next(payload) => payload.get("data").filter(|d| !d.is_null()),
            _ => None,
        }
    }
}

type Routes = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Event>>>>;
type CloseInfo = Option<(Option<u16>, String)>;

/// One websocket connection to `/graphql/ws`.
pub struct WsClient {
    outgoing: mpsc::UnboundedSender<Message>,
    routes: Routes,
    /// Messages without an id: `connection_ack`, `pong`, `connection_error`, `ka`.
    control: mpsc::UnboundedReceiver<Value>,
    closed: watch::Receiver<CloseInfo>,
    protocol: &'static str,
    next_id: AtomicU64,
    tasks: Vec<JoinHandle<()>>,
}

impl WsClient {
    /// Opens the socket with the `graphql-transport-ws` subprotocol; no
    /// `connection_init` is sent yet.
    pub async fn open(url: &str) -> Self {
        Self::open_with(url, TRANSPORT_WS).await
    }

    pub async fn open_with(url: &str, protocol: &'static str) -> Self {
        let mut request = url.into_client_request().expect("a websocket url");
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(protocol));
        let handshake = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(request));
        let Ok(connected) = handshake.await else {
            panic!("websocket handshake with {url} timed out");
        };
        let (socket, response) =
            connected.unwrap_or_else(|e| panic!("websocket handshake with {url} failed: {e}"));
        assert_eq!(
            response
                .headers()
                .get("Sec-WebSocket-Protocol")
                .and_then(|v| v.to_str().ok()),
            Some(protocol),
            "the server must pick the subprotocol the client asked for"
        );
        let (mut sink, mut stream) = socket.split();
        let (outgoing, mut to_send) = mpsc::unbounded_channel::<Message>();
        let routes: Routes = Default::default();
        let (control_tx, control) = mpsc::unbounded_channel();
        let (closed_tx, closed) = watch::channel(None);

        let writer = tokio::spawn(async move {
            while let Some(message) = to_send.recv().await {
                if sink.send(message).await.is_err() {
                    break;
                }
            }
        });
        let reader = {
            let routes = routes.clone();
            let outgoing = outgoing.clone();
            tokio::spawn(async move {
                let mut close = (None, String::new());
                while let Some(message) = stream.next().await {
                    let text = match message {
                        Ok(Message::Text(text)) => text,
                        Ok(Message::Close(frame)) => {
                            if let Some(frame) = frame {
                                close = (Some(u16::from(frame.code)), frame.reason.to_string());
                            }
                            break;
                        }
                        Ok(_) => continue,
                        Err(err) => {
                            close.1 = err.to_string();
                            break;
                        }
                    };
                    let message: Value = serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("the server sent non-JSON {text:?}: {e}"));
                    let route = |id: &Value, event: Event, last: bool| {
                        let id = id.as_str().expect("a message id").to_owned();
                        let mut routes = routes.lock().unwrap();
                        if let Some(tx) = routes.get(&id) {
                            let _ = tx.send(event);
                        }
                        if last {
                            routes.remove(&id);
                        }
                    };
                    match message["type"].as_str().unwrap_or_default() {
                        "next" | "data" => route(
                            &message["id"],
                            Event::Next(message["payload"].clone()),
                            false,
                        ),
                        "error" => route(
                            &message["id"],
                            Event::Error(message["payload"].clone()),
                            true,
                        ),
                        "complete" => route(&message["id"], Event::Complete, true),
                        "ping" => {
                            let _ =
                                outgoing.send(Message::text(json!({"type": "pong"}).to_string()));
                        }
                        _ => {
                            let _ = control_tx.send(message);
                        }
                    }
                }
                let event = Event::Closed(close.0, close.1.clone());
                for (_, tx) in routes.lock().unwrap().drain() {
                    let _ = tx.send(event.clone());
                }
                let _ = closed_tx.send(Some(close));
            })
        };
        Self {
            outgoing,
            routes,
            control,
            closed,
            protocol,
            next_id: AtomicU64::new(1),
            tasks: vec![writer, reader],
        }
    }

    /// Opens a socket and completes `connection_init` with `payload`.
    pub async fn connect(url: &str, payload: Value) -> Self {
        let mut client = Self::open(url).await;
        client.init(payload).await;
        client
    }

    /// Opens a socket authenticated the usual way: `{"Authorization": "Bearer …"}`.
    pub async fn connect_as(url: &str, token: &str) -> Self {
        Self::connect(url, json!({ "Authorization": format!("Bearer {token}") })).await
    }

    pub fn send(&self, message: Value) {
        let _ = self.outgoing.send(Message::text(message.to_string()));
    }

    /// Sends `connection_init` and waits for `connection_ack`.
    pub async fn init(&mut self, payload: Value) {
        self.send(json!({ "type": "connection_init", "payload": payload }));
        let ack = self.next_control().await.unwrap_or_else(|| {
            panic!(
                "socket closed instead of acknowledging the connection: {:?}",
                self.closed.borrow().clone()
            )
        });
        assert_eq!(
            ack["type"], "connection_ack",
            "expected connection_ack, got {ack}"
        );
    }

    async fn next_control(&mut self) -> Option<Value> {
        tokio::time::timeout(DEADLINE, self.control.recv())
            .await
            .expect("no connection_ack within the deadline")
    }

    /// The next message without an id (`connection_ack`, `pong`,
    /// `connection_error`), or `None` once the socket closed without one.
    pub async fn control_message(&mut self) -> Option<Value> {
        self.next_control().await
    }

    /// Starts an operation; its messages go to the returned handle.
    pub fn subscribe(&self, query: &str, variables: Value) -> Subscription {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed).to_string();
        let (tx, rx) = mpsc::unbounded_channel();
        self.routes.lock().unwrap().insert(id.clone(), tx);
        let kind = if self.protocol == LEGACY_WS {
            "start"
        } else {
            "subscribe"
        };
        self.send(json!({
            "id": id,
            "type": kind,
            "payload": { "query": query, "variables": variables },
        }));
        Subscription {
            id,
            events: rx,
            outgoing: self.outgoing.clone(),
            protocol: self.protocol,
        }
    }

    /// Waits until the server closes the socket; the close code and reason.
    pub async fn closed(&mut self, within: Duration) -> (Option<u16>, String) {
        let closed = tokio::time::timeout(within, self.closed.wait_for(|c| c.is_some()))
            .await
            .unwrap_or_else(|_| panic!("the server did not close the socket within {within:?}"))
            .expect("reader alive until close");
        closed.clone().expect("set")
    }

    /// Whether the server has closed the socket (without waiting).
    pub fn is_closed(&self) -> bool {
        self.closed.borrow().is_some()
    }
}

impl Drop for WsClient {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One operation on a `WsClient`.
pub struct Subscription {
    pub id: String,
    events: mpsc::UnboundedReceiver<Event>,
    outgoing: mpsc::UnboundedSender<Message>,
    protocol: &'static str,
}

impl Subscription {
    /// The next message for this operation; fails the test after `DEADLINE`.
    pub async fn next(&mut self) -> Event {
        self.next_within(DEADLINE)
            .await
            .unwrap_or_else(|| panic!("subscription {}: nothing within {DEADLINE:?}", self.id))
    }

    /// The next message, or `None` if none came within `within`.
    pub async fn next_within(&mut self, within: Duration) -> Option<Event> {
        match tokio::time::timeout(within, self.events.recv()).await {
            Ok(Some(event)) => Some(event),
            // Routes are dropped only after `complete`, `error` or close.
            Ok(None) => panic!("subscription {}: read past its end", self.id),
            Err(_) => None,
        }
    }

    /// The data of the next `next`; fails on anything else.
    pub async fn next_data(&mut self) -> Value {
        let event = self.next().await;
        match event.data() {
            Some(data) if event.errors().is_none() => data.clone(),
            _ => panic!("subscription {}: expected data, got {event:?}", self.id),
        }
    }

    /// Every `next` payload until the operation ends, and how it ended.
    pub async fn until_end(&mut self) -> (Vec<Value>, Event) {
        let mut results = Vec::new();
        loop {
            match self.next().await {
                Event::Next(payload) => results.push(payload),
                end => return (results, end),
            }
        }
    }

    /// Tells the server to stop this operation.
    pub fn stop(&self) {
        let kind = if self.protocol == LEGACY_WS {
            "stop"
        } else {
            "complete"
        };
        let _ = self.outgoing.send(Message::text(
            json!({ "id": self.id, "type": kind }).to_string(),
        ));
    }
}
