//! Slow and idle clients: the header and body timeouts, and connections beyond the descriptor limit.

use super::*;

/// A request head that never ends, for clients that send it byte by byte.
fn endless_head(addr: std::net::SocketAddr) -> Vec<u8> {
    let mut head = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: slowloris\r\n");
    while head.len() < 400 {
        head.push_str("X-Padding: slow-client-padding\r\n");
    }
    head.into_bytes()
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
