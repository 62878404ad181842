//! Production edge failures, reproduced with real sockets against the real
//! `taskql` binary: slow and idle clients, a low descriptor limit, shutdown
//! under half-sent requests, a PostgreSQL outage, huge bodies, websockets
//! that never initialise, and huge inputs echoed in errors.
//!
//! Each test prints what it measured (`cargo test --test edges -- --nocapture`)
//! before it asserts, so a failure still shows the numbers.
#[path = "../common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use common::edge::proxy::{Proxy, ProxyMode, host_port, through};
use common::edge::raw::{SlowClients, Upgrade, open_uninitialised_socket, read_response};
use common::edge::server::Server;
use common::edge::{begin, http_client, wait_until};
use common::{TestDb, postgres_url_or_skip, token_for, ws};

mod big_inputs;
mod deadlines;
mod outages;
mod slow_clients;
mod websockets;

/// The short timeouts the tests run with, instead of the 10 s defaults.
const TIMEOUT: Duration = Duration::from_secs(2);
const TIMEOUT_SETTING: &str = "2s";
/// How long past a timeout the server may take to act on it.
const MARGIN: Duration = Duration::from_secs(4);
/// How long past its own deadline for a database call taskql may take to
/// answer (the response is written and read on a busy machine).
const DEADLINE_SLACK: Duration = Duration::from_millis(750);

const LIST_TASKS: &str = "{ tasks(first: 100) { nodes { id } } }";
const CREATE_TASK: &str = "mutation { createTask(input: {type: \"edge.test\"}) { id } }";

fn error_codes(body: &Value) -> Vec<String> {
    body["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|e| {
                    e["extensions"]["code"]
                        .as_str()
                        .unwrap_or("(none)")
                        .to_owned()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn seconds(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}
