//! Websockets: SIGTERM closes them with 1001 and exits 0, the cap, and sockets that never initialise.

use super::*;

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

#[tokio::test]
async fn websockets_beyond_the_cap_get_503_and_uninitialised_ones_close_with_4408() {
    let run = begin("websockets_beyond_the_cap_get_503").await;
    let db = TestDb::new().await;
    let mut server = Server::start(&db.url, &[("TASKQL_MAX_WEBSOCKETS", "100")]).await;
    let token = token_for("alice", None);
    let warm = server
        .graphql(&token, LIST_TASKS, json!({}), Duration::from_secs(5))
        .await;
    assert!(matches!(warm, Ok((200, _))), "{warm:?}");
    // One websocket first, so the baseline holds what the first one allocates
    // once; it must be gone before counting starts.
    let fds = server.open_fds();
    let warm = ws::WsClient::connect_as(&server.ws_url, &token).await;
    drop(warm);
    assert!(
        wait_until(Duration::from_secs(2), || server.open_fds() <= fds).await,
        "the warm-up websocket was not closed"
    );
    let rss_before = server.rss_kib();

    let opening = Instant::now();
    let upgrades: Vec<Upgrade> = futures::stream::iter(0..300)
        .map(|_| open_uninitialised_socket(&server.ws_url))
        .buffer_unordered(20)
        .collect()
        .await;
    let opened_in = opening.elapsed();
    let rss_open = server.rss_kib();
    let mut sockets = Vec::new();
    let mut refused = Vec::new();
    let mut failed = Vec::new();
    for upgrade in upgrades {
        match upgrade {
            Upgrade::Open(socket) => sockets.push(socket),
            Upgrade::Refused(status, body) => refused.push((status, body)),
            Upgrade::Failed(err) => failed.push(err),
        }
    }
    let accepted = sockets.len();
    let refused_503 = refused
        .iter()
        .filter(|(status, body)| {
            *status == 503
                && body
                    .as_ref()
                    .and_then(|b| b["errors"][0]["extensions"]["code"].as_str())
                    == Some("SERVICE_UNAVAILABLE")
        })
        .count();

    // connection_init is due within 10 s.
    let init_deadline = Duration::from_secs(10) + MARGIN;
    wait_until(init_deadline.saturating_sub(opening.elapsed()), || {
        sockets.iter().all(|s| s.is_finished())
    })
    .await;
    let mut codes = std::collections::BTreeMap::new();
    let mut last_close = None;
    let mut unclosed = 0;
    for socket in sockets {
        if socket.is_finished() {
            let (code, at) = socket.await.expect("socket reader");
            *codes.entry(code).or_insert(0) += 1;
            last_close = last_close.max(Some(at.duration_since(opening)));
        } else {
            socket.abort();
            unclosed += 1;
        }
    }
    let mut rss_after = server.rss_kib();
    // Generous: the allocator keeps freed pages (a second round of 300
    // sockets on today's server reuses them, so this is no leak), so what
    // comes back is bounded by the peak that the cap allows.
    let rss_limit = rss_before + 32 * 1024;
    wait_until(Duration::from_secs(5), || {
        rss_after = server.rss_kib();
        rss_after <= rss_limit
    })
    .await;
    eprintln!(
        "300 websockets without connection_init, at most 100: {accepted} opened, {} refused \
         ({refused_503} with 503 SERVICE_UNAVAILABLE; statuses {:?}), {} failed {:?}, in {}; \
         close codes {codes:?} (last after {last_close:?}), {unclosed} still open; \
         RSS {rss_before} KiB before, {rss_open} KiB with them open, {rss_after} KiB after",
        refused.len(),
        refused
            .iter()
            .map(|(s, _)| *s)
            .collect::<std::collections::BTreeSet<_>>(),
        failed.len(),
        failed.first(),
        seconds(opened_in),
    );

    assert_eq!(accepted, 100, "websockets opened with a cap of 100");
    assert_eq!(
        refused_503, 200,
        "upgrades beyond the cap get 503 SERVICE_UNAVAILABLE"
    );
    assert_eq!(unclosed, 0, "uninitialised sockets must be closed");
    assert_eq!(codes.get(&Some(4408)), Some(&100), "close codes {codes:?}");
    assert!(
        rss_after <= rss_limit,
        "RSS {rss_after} KiB after the sockets closed; {rss_before} KiB before"
    );
    // The slots are free again.
    let socket = ws::WsClient::connect_as(&server.ws_url, &token).await;
    assert!(!socket.is_closed());
    assert!(server.is_running());
    drop(run);
}
