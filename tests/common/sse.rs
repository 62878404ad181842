//! A small reader of graphql-sse event streams for tests: it opens
//! `/graphql` with `Accept: text/event-stream` and hands back what the
//! server sent, one message at a time, comments included.
#![allow(dead_code)]

use std::time::Duration;

use serde_json::Value;

use super::TestApp;

/// Longest a test waits for any one message before it fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// One message of an event stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// `event: next` with its JSON data.
    Next(Value),
    /// `event: complete`.
    Complete,
    /// A comment line (`:` and what follows), such as a keep-alive.
    Comment(String),
    /// Some other event: its name and data.
    Other(String, String),
    /// The server ended the response.
    End,
}

/// An open event stream.
pub struct EventStream {
    response: reqwest::Response,
    buffer: String,
    ended: bool,
}

/// POSTs `body` asking for an event stream, with `token` if any.
pub async fn post(app: &TestApp, token: Option<&str>, body: &Value) -> reqwest::Response {
    post_to(&app.http, &app.base, token, body).await
}

pub async fn post_to(
    http: &reqwest::Client,
    base: &str,
    token: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    let mut request = http
        .post(format!("{base}/graphql"))
        .header("accept", "text/event-stream")
        .json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("request")
}

/// GETs `/graphql` with `params` asking for an event stream.
pub async fn get(app: &TestApp, token: Option<&str>, params: &[(&str, &str)]) -> reqwest::Response {
    let mut request = app
        .http
        .get(format!("{}/graphql", app.base))
        .header("accept", "text/event-stream")
        .query(params);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("request")
}

impl EventStream {
    /// Reads `response`, which must be a 200 event stream.
    pub fn new(response: reqwest::Response) -> Self {
        assert_eq!(response.status(), 200, "an event stream opens");
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert_eq!(content_type, "text/event-stream; charset=utf-8");
        Self {
            response,
            buffer: String::new(),
            ended: false,
        }
    }

    /// The next message, comments included; fails after [`DEADLINE`].
    pub async fn next_message(&mut self) -> Message {
        self.next_within(DEADLINE)
            .await
            .unwrap_or_else(|| panic!("nothing arrived within {DEADLINE:?}"))
    }

    /// The next message, or `None` when nothing came within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Message> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                return Some(parse(block.trim_end_matches('\n')));
            }
            if self.ended {
                return Some(Message::End);
            }
            match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Err(_) => return None,
                Ok(Ok(Some(chunk))) => {
                    self.buffer
                        .push_str(std::str::from_utf8(&chunk).expect("UTF-8 events"));
                }
                Ok(Ok(None)) | Ok(Err(_)) => self.ended = true,
            }
        }
    }

    /// The next message that is not a comment.
    pub async fn next_event(&mut self) -> Message {
        loop {
            match self.next_message().await {
                Message::Comment(_) => continue,
                other => return other,
            }
        }
    }

    /// The data of the next event, which must be a `next`.
    pub async fn next_data(&mut self) -> Value {
        match self.next_event().await {
            Message::Next(payload) => {
                assert!(
                    payload.get("errors").is_none(),
                    "unexpected errors: {payload}"
                );
                payload["data"].clone()
            }
            other => panic!("expected a next event, got {other:?}"),
        }
    }

    /// Every `next` payload until the stream completes or ends, and how it ended.
    pub async fn until_end(&mut self) -> (Vec<Value>, Message) {
        let mut payloads = Vec::new();
        loop {
            match self.next_event().await {
                Message::Next(payload) => payloads.push(payload),
                end => return (payloads, end),
            }
        }
    }
}

fn parse(block: &str) -> Message {
    let mut event = None;
    let mut data: Vec<&str> = Vec::new();
    let mut comment = None;
    for line in block.split('\n') {
        if let Some(text) = line.strip_prefix(':') {
            comment.get_or_insert(text.trim().to_owned());
        } else if let Some(name) = line.strip_prefix("event:") {
            event = Some(name.trim().to_owned());
        } else if let Some(text) = line.strip_prefix("data:") {
            data.push(text.strip_prefix(' ').unwrap_or(text));
        } else {
            panic!("a line that is no part of an event stream: {line:?}");
        }
    }
    let has_data = !data.is_empty();
    let data = data.join("\n");
    match event.as_deref() {
        None => Message::Comment(comment.unwrap_or_default()),
        Some("next") => Message::Next(
            serde_json::from_str(&data).unwrap_or_else(|e| panic!("next data {data:?}: {e}")),
        ),
        Some("complete") => {
            // EventSource calls no listener for an event without data.
            assert!(
                has_data && data.is_empty(),
                "complete carries an empty data field"
            );
            Message::Complete
        }
        Some(other) => Message::Other(other.to_owned(), data),
    }
}
