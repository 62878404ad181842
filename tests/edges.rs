//! Production edge failures, reproduced with real sockets against the real
//! `taskql` binary: slow and idle clients, a low descriptor limit, shutdown
//! under half-sent requests, a PostgreSQL outage, huge bodies, websockets
//! that never initialise, and huge inputs echoed in errors.
//!
//! Each test prints what it measured (`cargo test --test edges -- --nocapture`)
//! before it asserts, so a failure still shows the numbers.
mod common;
#[path = "common/ws.rs"]
mod ws;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::net::TcpStream;

use common::edge::{Server, SlowClients, begin, wait_until};
use common::{TestDb, token_for};

/// The short timeouts the tests run with, instead of the 10 s defaults.
const TIMEOUT: Duration = Duration::from_secs(2);
const TIMEOUT_SETTING: &str = "2s";
/// How long past a timeout the server may take to act on it.
const MARGIN: Duration = Duration::from_secs(4);

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

/// A request head that never ends, for clients that send it byte by byte.
fn endless_head(addr: std::net::SocketAddr) -> Vec<u8> {
    let mut head = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: slowloris\r\n");
    while head.len() < 400 {
        head.push_str("X-Padding: slow-client-padding\r\n");
    }
    head.into_bytes()
}

fn seconds(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

#[tokio::test]
async fn slow_header_clients_are_closed_after_the_header_timeout_while_others_are_served() {
    let run = begin("slow_header_clients_are_closed").await;
    let db = TestDb::new().await;
    let mut server = Server::start(&db.url, &[("TASKQL_HEADER_TIMEOUT", TIMEOUT_SETTING)]).await;
    let token = token_for("alice", None);

    let clients = SlowClients::connect(
        server.addr,
        200,
        b"",
        &endless_head(server.addr),
        Duration::from_secs(1),
    )
    .await;
    let connected = Instant::now();
    let asked = Instant::now();
    let normal = server
        .graphql(&token, LIST_TASKS, json!({}), Duration::from_secs(5))
        .await;
    let answered_in = asked.elapsed();
    let open_meanwhile = clients.open();
    wait_until(TIMEOUT + MARGIN, || clients.open() == 0).await;
    let watched = connected.elapsed();
    let still_open = clients.open();
    let outcomes = clients.finish().await;
    let slowest = outcomes.iter().filter_map(|o| o.closed_after).max();
    eprintln!(
        "slow headers: a normal request answered in {} ({} of 200 slow clients open then): {:?}; \
         after {}: {still_open} of 200 still open, slowest closed after {:?}; server alive: {}",
        seconds(answered_in),
        open_meanwhile,
        normal.as_ref().map(|(status, _)| status),
        seconds(watched),
        slowest,
        server.is_running(),
    );

    let (status, body) = normal.expect("a normal request is served while slow clients wait");
    assert_eq!(status, 200, "{body}");
    assert!(body["data"]["tasks"]["nodes"].is_array(), "{body}");
    assert!(answered_in < Duration::from_secs(2), "served slowly");
    assert_eq!(
        still_open, 0,
        "the server must close clients that take over {TIMEOUT:?} to send a request head"
    );
    assert!(server.is_running());
    drop(run);
}

#[tokio::test]
async fn slow_body_clients_get_408_and_their_descriptors_are_released() {
    let run = begin("slow_body_clients_get_408").await;
    let db = TestDb::new().await;
    let mut server = Server::start(&db.url, &[("TASKQL_BODY_TIMEOUT", TIMEOUT_SETTING)]).await;
    let token = token_for("alice", None);
    let warm = server
        .graphql(&token, LIST_TASKS, json!({}), Duration::from_secs(5))
        .await;
    assert!(matches!(warm, Ok((200, _))), "{warm:?}");
    let baseline = server.open_fds();

    let head = format!(
        "POST /graphql HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n",
        server.addr
    );
    let drip = format!(
        "{{\"query\":\"{{ tasks {{ nodes {{ id }} }} }}\",\"variables\":{{\"pad\":\"{}",
        "a".repeat(200)
    );
    let clients = SlowClients::connect(
        server.addr,
        200,
        head.as_bytes(),
        drip.as_bytes(),
        Duration::from_secs(1),
    )
    .await;
    let connected = Instant::now();
    let mut peak = 0;
    wait_until(Duration::from_secs(2), || {
        peak = peak.max(server.open_fds());
        peak >= baseline + 150
    })
    .await;
    wait_until(TIMEOUT + MARGIN, || clients.open() == 0).await;
    let watched = connected.elapsed();
    let still_open = clients.open();
    // Counted while the clients still hold their ends: only the server's
    // closing can release its descriptors.
    let mut after = server.open_fds();
    wait_until(Duration::from_secs(1), || {
        after = server.open_fds();
        after <= baseline + 16
    })
    .await;
    let outcomes = clients.finish().await;

    let timed_out = outcomes
        .iter()
        .filter(|o| o.response.as_ref().is_some_and(|r| r.status == 408))
        .count();
    let coded = outcomes
        .iter()
        .filter_map(|o| o.response.as_ref())
        .filter(|r| r.error_code().as_deref() == Some("REQUEST_TIMEOUT"))
        .count();
    let other: Vec<_> = outcomes
        .iter()
        .filter_map(|o| o.response.as_ref())
        .filter(|r| r.status != 408)
        .map(|r| r.status)
        .collect();
    let silent = outcomes
        .iter()
        .filter(|o| o.closed_after.is_some() && o.response.is_none())
        .count();
    eprintln!(
        "slow bodies: after {}: {still_open} of 200 still open; {timed_out} got 408 \
         ({coded} with REQUEST_TIMEOUT), {silent} closed without a response, other statuses {other:?}; \
         open fds: {baseline} before, {peak} with the clients, {after} after",
        seconds(watched),
    );

    assert!(peak >= baseline + 150, "the slow clients were not accepted");
    assert_eq!(
        still_open, 0,
        "the server must end requests whose body takes over {TIMEOUT:?}"
    );
    assert!(other.is_empty(), "statuses other than 408: {other:?}");
    assert_eq!(timed_out, coded, "every 408 carries code REQUEST_TIMEOUT");
    assert!(
        after <= baseline + 16,
        "open descriptors: {baseline} before, {after} after the slow clients were closed"
    );
    assert!(server.is_running());
    drop(run);
}

/// Lines of the server's log about failing to accept connections.
fn accept_trouble(lines: &[String]) -> Vec<&String> {
    lines
        .iter()
        .filter(|line| {
            let line = line.to_lowercase();
            line.contains("too many open files")
                || line.contains("os error 24")
                || line.contains("emfile")
                || (line.contains("accept") && (line.contains("error") || line.contains("fail")))
        })
        .collect()
}

#[tokio::test]
async fn idle_connections_beyond_the_descriptor_limit_wait_and_new_clients_are_served() {
    let run = begin("idle_connections_beyond_the_descriptor_limit").await;
    let db = TestDb::new().await;
    let mut server =
        Server::start_with_open_files(&db.url, &[("TASKQL_HEADER_TIMEOUT", TIMEOUT_SETTING)], 256)
            .await;
    let token = token_for("alice", None);
    let warm = server
        .graphql(&token, CREATE_TASK, json!({}), Duration::from_secs(5))
        .await;
    assert!(matches!(warm, Ok((200, _))), "{warm:?}");
    let baseline = server.open_fds();

    // 300 connections that send nothing: more than 256 descriptors allow.
    let idle = SlowClients::connect(server.addr, 300, b"", b"", Duration::from_secs(1)).await;
    let opened = Instant::now();
    let bound = Duration::from_secs(8);
    let health = async {
        let asked = Instant::now();
        (server.get_status("/healthz", bound).await, asked.elapsed())
    };
    let create = async {
        let asked = Instant::now();
        let result = server.graphql(&token, CREATE_TASK, json!({}), bound).await;
        (result, asked.elapsed())
    };
    let ((health, health_in), (created, created_in)) = tokio::join!(health, create);
    let mut peak = server.open_fds();
    wait_until(
        Duration::from_secs(12).saturating_sub(opened.elapsed()),
        || {
            peak = peak.max(server.open_fds());
            idle.open() == 0
        },
    )
    .await;
    let watched = opened.elapsed();
    let still_open = idle.open();
    let outcomes = idle.finish().await;
    let last_closed = outcomes.iter().filter_map(|o| o.closed_after).max();
    let alive = server.is_running();
    let log = server.log_lines();
    let trouble = accept_trouble(&log);
    eprintln!(
        "ulimit -n 256, 300 idle connections: /healthz {health:?} in {}; createTask {:?} in {}; \
         after {}: {still_open} of 300 idle still open (last closed after {last_closed:?}); \
         open fds {baseline} before, peak {peak}; alive: {alive}; {} log lines about accepting{}",
        seconds(health_in),
        created
            .as_ref()
            .map(|(status, body)| (status, error_codes(body))),
        seconds(created_in),
        seconds(watched),
        trouble.len(),
        trouble
            .first()
            .map(|line| format!(", the first: {line}"))
            .unwrap_or_default(),
    );

    assert!(alive, "taskql died under the descriptor limit");
    assert_eq!(health, Ok(200), "/healthz must be served within {bound:?}");
    let (status, body) = created.expect("a GraphQL request is served too");
    assert_eq!(status, 200, "{body}");
    assert!(body["data"]["createTask"]["id"].is_string(), "{body}");
    assert_eq!(
        still_open, 0,
        "idle connections must be closed after the header timeout"
    );
    assert!(
        trouble.len() <= 5,
        "the server logged accept errors {} times: it loops on them",
        trouble.len()
    );
    drop(run);
}

#[tokio::test]
async fn sigterm_closes_websockets_with_1001_and_exits_0_despite_half_sent_requests() {
    let run = begin("sigterm_closes_websockets_and_exits").await;
    let db = TestDb::new().await;
    let mut server = Server::start(
        &db.url,
        &[
            ("TASKQL_SHUTDOWN_TIMEOUT", TIMEOUT_SETTING),
            // Longer than the test: only the shutdown timeout can end these.
            ("TASKQL_HEADER_TIMEOUT", "60s"),
            ("TASKQL_BODY_TIMEOUT", "60s"),
        ],
    )
    .await;
    let token = token_for("alice", None);

    let mut socket = ws::WsClient::connect_as(&server.ws_url, &token).await;
    let mut events = socket.subscribe(
        "subscription { taskEvents { kind task { id } } }",
        json!({}),
    );
    // The subscription is live once it relays a change.
    let mut live = false;
    for _ in 0..5 {
        let created = server
            .graphql(&token, CREATE_TASK, json!({}), Duration::from_secs(5))
            .await;
        assert!(matches!(created, Ok((200, _))), "{created:?}");
        if events.next_within(Duration::from_secs(1)).await.is_some() {
            live = true;
            break;
        }
    }
    assert!(live, "the subscription relayed no change");

    let half_heads = SlowClients::connect(
        server.addr,
        3,
        b"POST /graphql HTTP/1.1\r\nHost: x\r\nContent-Ty",
        b"",
        Duration::from_secs(1),
    )
    .await;
    let head = format!(
        "POST /graphql HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"query\":"
    );
    let half_bodies =
        SlowClients::connect(server.addr, 3, head.as_bytes(), b"", Duration::from_secs(1)).await;
    let ports = [half_heads.ports.clone(), half_bodies.ports.clone()].concat();
    let accepted = wait_until(Duration::from_secs(2), || {
        server.accepted_from(&ports) == ports.len()
    })
    .await;
    assert!(accepted, "the half-sent requests were not accepted");

    server.terminate();
    let signalled = Instant::now();
    let deadline = TIMEOUT + Duration::from_secs(3);
    // Stops accepting: a new connection is refused.
    let mut refused_after = None;
    while signalled.elapsed() < Duration::from_millis(1500) {
        if let Err(err) = TcpStream::connect(server.addr).await
            && err.kind() == std::io::ErrorKind::ConnectionRefused
        {
            refused_after = Some(signalled.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_until(deadline.saturating_sub(signalled.elapsed()), || {
        socket.is_closed()
    })
    .await;
    let socket_closed_after = signalled.elapsed();
    let close = if socket.is_closed() {
        Some(socket.closed(Duration::ZERO).await)
    } else {
        None
    };
    let exit = server
        .exit_within(deadline.saturating_sub(signalled.elapsed()))
        .await;
    let exited_after = signalled.elapsed();
    // For the report: does it exit once the half-sent clients hang up?
    let mut exit_once_hung_up = None;
    if exit.is_none() {
        half_heads.finish().await;
        half_bodies.finish().await;
        let hung_up = Instant::now();
        exit_once_hung_up = server
            .exit_within(Duration::from_secs(3))
            .await
            .map(|status| (status, hung_up.elapsed()));
    }
    eprintln!(
        "SIGTERM: new connections refused after {refused_after:?}; websocket close {close:?} \
         (seen after {}); exit {exit:?} after {}; without the half-sent clients: {exit_once_hung_up:?}",
        seconds(socket_closed_after),
        seconds(exited_after),
    );

    assert!(
        refused_after.is_some(),
        "new connections are still accepted after SIGTERM"
    );
    let (code, reason) = close.expect("the websocket was not closed");
    assert_eq!(code, Some(1001), "close code ({reason})");
    let status = exit.expect("taskql did not exit within the shutdown timeout and a margin");
    assert_eq!(status.code(), Some(0), "{status:?}");
    drop(run);
}
