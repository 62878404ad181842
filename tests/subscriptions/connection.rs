//! The connection: `connection_init` and its payloads, protocol violations, invalid operations, sockets that never initialise or whose token expires, and a server that stops.

use super::*;

#[tokio::test]
async fn a_connection_init_without_a_valid_token_is_closed_with_4403() {
    let app = spawn_app().await;
    let forged = taskql::auth::issue_token(
        "another-secret-entirely-0123456789",
        "alice",
        None,
        Duration::from_secs(3600),
        None,
        None,
    )
    .expect("token");
    let expired = common::expired_token_for("alice");

    let cases = [
        ("no payload", Value::Null),
        ("empty payload", json!({})),
        (
            "garbage token",
            json!({ "Authorization": "Bearer not.a.jwt" }),
        ),
        (
            "forged token",
            json!({ "Authorization": format!("Bearer {forged}") }),
        ),
        ("forged bare token", json!({ "token": forged })),
        ("expired token", json!({ "token": expired })),
        (
            "not bearer",
            json!({ "Authorization": "Basic YWxpY2U6c2VjcmV0" }),
        ),
        ("token not a string", json!({ "token": 42 })),
    ];
    for (case, payload) in cases {
        // graphql-transport-ws: 4403, the close clients refresh their token on.
        let mut client = WsClient::open(&app.ws_url).await;
        client.send(json!({ "type": "connection_init", "payload": payload.clone() }));
        let (code, reason) = client.closed(Duration::from_secs(10)).await;
        assert_eq!(code, Some(4403), "{case}: {reason}");
        assert!(reason.starts_with("Forbidden"), "{case}: {reason}");
        assert_eq!(
            client.control_message().await,
            None,
            "{case}: no connection_ack"
        );

        // The legacy protocol says why in connection_error, then closes.
        let mut legacy = WsClient::open_with(&app.ws_url, ws::LEGACY_WS).await;
        legacy.send(json!({ "type": "connection_init", "payload": payload }));
        let error = legacy
            .control_message()
            .await
            .unwrap_or_else(|| panic!("{case}: connection_error before the close"));
        assert_eq!(error["type"], "connection_error", "{case}: {error}");
        assert!(
            error["payload"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("Forbidden")),
            "{case}: {error}"
        );
        legacy.closed(Duration::from_secs(10)).await;
    }
}

#[tokio::test]
async fn protocol_violations_close_with_the_protocols_codes() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let id = create_task(&app, &alice).await;
    let within = Duration::from_secs(10);

    // A subscribe before connection_ack: 4401.
    let mut early = WsClient::open(&app.ws_url).await;
    let _never = early.subscribe(WATCH, json!({ "id": id }));
    assert_eq!(early.closed(within).await.0, Some(4401));

    // A second connection_init: 4429.
    let mut twice = WsClient::connect_as(&app.ws_url, &alice).await;
    twice.send(json!({ "type": "connection_init", "payload": { "token": alice } }));
    assert_eq!(twice.closed(within).await.0, Some(4429));

    // A second subscribe with the id of a live one: 4409, naming the id.
    let mut duplicate = WsClient::connect_as(&app.ws_url, &alice).await;
    let mut first = duplicate.subscribe(WATCH, json!({ "id": id }));
    assert_eq!(first.next_data().await["taskUpdated"]["id"], id);
    duplicate.send(json!({
        "id": first.id,
        "type": "subscribe",
        "payload": { "query": WATCH, "variables": { "id": id } },
    }));
    let (code, reason) = duplicate.closed(within).await;
    assert_eq!(code, Some(4409));
    assert_eq!(
        reason,
        format!("Subscriber for {} already exists", first.id)
    );

    // Malformed messages: 4400.
    for bad in [
        json!("not an object"),
        json!({ "type": "no_such_type" }),
        json!({ "type": "subscribe", "id": "1" }),
        json!({ "type": "subscribe", "id": "1", "payload": { "variables": {} } }),
    ] {
        let mut client = WsClient::connect_as(&app.ws_url, &alice).await;
        client.send(bad.clone());
        assert_eq!(client.closed(within).await.0, Some(4400), "{bad}");
    }

    // A ping is answered with a pong, before and after the handshake.
    let mut pinger = WsClient::open(&app.ws_url).await;
    pinger.send(json!({ "type": "ping" }));
    assert_eq!(
        pinger.control_message().await.map(|m| m["type"].clone()),
        Some(json!("pong"))
    );
    pinger.init(json!({ "token": alice })).await;
    pinger.send(json!({ "type": "ping", "payload": { "n": 1 } }));
    assert_eq!(
        pinger.control_message().await,
        Some(json!({ "type": "pong", "payload": { "n": 1 } }))
    );
}

#[tokio::test]
async fn an_operation_that_does_not_validate_gets_an_error_message_not_next() {
    let app = spawn_app().await;
    let client = WsClient::connect_as(&app.ws_url, &app.user_token("alice")).await;
    let mut bad = client.subscribe("subscription { noSuchField }", json!({}));
    match bad.next().await {
        Event::Error(errors) => {
            assert_eq!(
                errors[0]["extensions"]["code"], "BAD_USER_INPUT",
                "{errors}"
            );
        }
        other => panic!("expected an error message, got {other:?}"),
    }
    // The operation is over; the socket is not.
    let mut good = client.subscribe(EVENTS, json!({}));
    assert!(good.next_within(Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn every_documented_connection_init_payload_authenticates() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let id = create_task(&app, &alice).await;

    let payloads = [
        json!({ "Authorization": format!("Bearer {alice}") }),
        json!({ "authorization": format!("Bearer {alice}") }),
        json!({ "token": alice }),
        json!({ "headers": { "Authorization": format!("Bearer {alice}") } }),
    ];
    for payload in payloads {
        let client = WsClient::connect(&app.ws_url, payload.clone()).await;
        // Alice's own task is visible only if the socket is really alice's.
        let mut watch = client.subscribe(WATCH, json!({ "id": id }));
        let event = watch.next().await;
        let data = event
            .data()
            .unwrap_or_else(|| panic!("{payload}: expected alice's task, got {event:?}"));
        assert_eq!(data["taskUpdated"]["id"], id, "{payload}");
        assert_eq!(data["taskUpdated"]["status"], "PENDING", "{payload}");
    }
}

#[tokio::test]
async fn a_connection_that_never_initialises_is_closed() {
    let app = spawn_app().await;
    let mut silent = WsClient::open(&app.ws_url).await;
    let within = taskql::http::CONNECTION_INIT_TIMEOUT + Duration::from_secs(10);
    let (code, reason) = silent.closed(within).await;
    assert_eq!(
        code,
        Some(4408),
        "graphql-transport-ws init timeout, reason {reason:?}"
    );
}

#[tokio::test]
async fn stopping_the_server_closes_live_subscriptions() {
    let mut app = spawn_app().await;
    let alice = app.user_token("alice");
    let (_, mut client, mut watch) = watch_a_new_task(&app, &alice).await;
    let mut events = client.subscribe(EVENTS, json!({}));
    wait_until_live(&app, &mut events).await;

    let (stopped, closed) = tokio::join!(
        tokio::time::timeout(DEADLINE, app.stop()),
        client.closed(DEADLINE),
    );
    stopped.expect("the server future returns while websockets are open");
    assert_eq!(closed.0, Some(1001), "closed as going away: {closed:?}");
    for sub in [&mut watch, &mut events] {
        let (results, end) = sub.until_end().await;
        assert!(results.is_empty(), "nothing after shutdown: {results:?}");
        assert!(
            matches!(end, Event::Complete | Event::Closed(Some(1001), _)),
            "ended cleanly: {end:?}"
        );
    }
}

#[tokio::test]
async fn a_socket_closes_when_its_token_expires() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let id = create_task(&app, &alice).await;
    let expiring = common::expiring_token_for("alice");
    let mut client = WsClient::connect_as(&app.ws_url, &expiring).await;
    let mut watch = client.subscribe(WATCH, json!({ "id": id }));
    assert_eq!(watch.next_data().await["taskUpdated"]["status"], "PENDING");
    let (code, reason) = client.closed(DEADLINE).await;
    assert_eq!(code, Some(4403), "closed for the expired token: {reason}");
    assert!(reason.contains("expired"), "{reason}");
    let (results, _) = watch.until_end().await;
    assert!(
        results.is_empty(),
        "nothing after the token expired: {results:?}"
    );
}
