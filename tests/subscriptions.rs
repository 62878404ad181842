//! Live task status over a real websocket: `taskUpdated` and `taskEvents`
//! through `/graphql/ws` with the `graphql-transport-ws` protocol, on the
//! real server. On PostgreSQL, also across two instances on one database.
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::ws::{self, DEADLINE, Event, WsClient};
use common::{
    TestApp, TestDb, alice, as_worker, data, spawn_app, spawn_app_with,
    two_apps_on_postgres_or_skip,
};
use futures::StreamExt;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use serde_json::{Value, json};
use taskql::service::{NewTask, StatusUpdate, TaskService};

const WATCH: &str = "subscription Watch($id: ID!) {
  taskUpdated(id: $id) { id status progress resultId errorMessage }
}";
const EVENTS: &str = "subscription { taskEvents { kind task { id status progress resultId } } }";
const CREATE: &str =
    "mutation Create($input: CreateTaskInput!) { createTask(input: $input) { id status } }";
const UPDATE: &str = "mutation Update($input: UpdateTaskStatusInput!) {
  updateTaskStatus(input: $input) { id status progress resultId }
}";

/// Creates a task as the owner of `token`; its id.
async fn create_task(app: &TestApp, token: &str) -> String {
    let input = json!({ "type": "image.generate", "metadata": { "prompt": "a cat" } });
    let task = app.create_task(token, input, "id").await;
    task["id"].as_str().expect("an id").to_owned()
}

/// Moves a task as a worker would: `updateTaskStatus` with the service role.
async fn set_status(app: &TestApp, id: &str, status: &str, extra: Value) -> Value {
    let mut input = json!({ "id": id, "status": status });
    if let (Some(input), Some(extra)) = (input.as_object_mut(), extra.as_object()) {
        input.extend(extra.clone());
    }
    data(
        app.update_status(input, "id status progress resultId")
            .await,
    )["updateTaskStatus"]
        .clone()
}

async fn delete_task(app: &TestApp, token: &str, id: &str) {
    let body = app
        .gql(
            Some(token),
            "mutation($id: ID!) { deleteTask(id: $id) }",
            json!({ "id": id }),
        )
        .await;
    assert_eq!(
        body["data"]["deleteTask"], true,
        "deleteTask failed: {body}"
    );
}

fn new_task() -> NewTask {
    NewTask {
        task_type: "image.generate".into(),
        metadata: Some(json!({ "prompt": "a cat" })),
        idempotency_key: None,
        ..Default::default()
    }
}

fn completion(task_id: uuid::Uuid, result_id: &str) -> StatusUpdate {
    StatusUpdate {
        task_id,
        status: entity::TaskStatus::Completed,
        result_id: Some(result_id.to_owned()),
        error_message: None,
        progress: None,
        expected_attempt: None,
        retryable: false,
    }
}

/// (status, progress, resultId) of each `taskUpdated` result.
fn states(results: &[Value]) -> Vec<(String, Value, Value)> {
    results
        .iter()
        .map(|payload| {
            assert!(payload["errors"].is_null(), "unexpected errors: {payload}");
            let task = &payload["data"]["taskUpdated"];
            (
                task["status"].as_str().expect("a status").to_owned(),
                task["progress"].clone(),
                task["resultId"].clone(),
            )
        })
        .collect()
}

fn owned(states: &[(&str, Value, Value)]) -> Vec<(String, Value, Value)> {
    states
        .iter()
        .map(|(s, p, r)| (s.to_string(), p.clone(), r.clone()))
        .collect()
}

/// Asserts the operation failed with `code` and no data, then completed.
async fn expect_error(sub: &mut ws::Subscription, code: &str) -> Value {
    let event = sub.next().await;
    assert_eq!(
        event.error_code(),
        Some(code),
        "expected {code}, got {event:?}"
    );
    assert!(
        event.data().is_none(),
        "an error must carry no data: {event:?}"
    );
    let message = event.errors().expect("errors")[0]["message"].clone();
    if !matches!(event, Event::Error(_)) {
        assert_eq!(
            sub.next().await,
            Event::Complete,
            "the failed operation must end"
        );
    }
    message
}

/// Makes sure a `taskEvents` subscription is live: creates throw-away tasks
/// for alice until one's CREATED arrives. Later events all follow it. A
/// change committed just before the subscription may still arrive first (a
/// stream without `after` starts at the last event its instance had read
/// from the change log); those are passed over.
async fn wait_until_live(app: &TestApp, events: &mut ws::Subscription) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while tokio::time::Instant::now() < deadline {
        let probe = app
            .service
            .create_task(&alice(), new_task())
            .await
            .expect("create a probe task")
            .id
            .to_string();
        while let Some(event) = events.next_within(Duration::from_millis(300)).await {
            let data = event
                .data()
                .unwrap_or_else(|| panic!("taskEvents failed: {event:?}"));
            let id = data["taskEvents"]["task"]["id"].as_str().expect("an id");
            if id == probe {
                return;
            }
        }
    }
    panic!("the taskEvents subscription never went live");
}

#[tokio::test]
async fn task_updated_sends_the_current_state_then_every_change_then_completes() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let id = create_task(&app, &alice).await;
    let client = WsClient::connect_as(&app.ws_url, &alice).await;

    let mut watch = client.subscribe(WATCH, json!({ "id": id }));
    let first = watch.next_data().await;
    assert_eq!(first["taskUpdated"]["id"], id);
    assert_eq!(first["taskUpdated"]["status"], "PENDING");

    set_status(&app, &id, "PROCESSING", json!({ "progress": 40 })).await;
    set_status(&app, &id, "COMPLETED", json!({ "resultId": "concept-42" })).await;

    let (results, end) = watch.until_end().await;
    assert_eq!(
        states(&results),
        owned(&[
            ("PROCESSING", json!(40), Value::Null),
            ("COMPLETED", json!(100), json!("concept-42")),
        ])
    );
    assert_eq!(
        end,
        Event::Complete,
        "the server completes after a final state"
    );
}

#[tokio::test]
async fn a_finished_task_gives_its_final_state_and_completes() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let client = WsClient::connect_as(&app.ws_url, &alice).await;

    let completed = create_task(&app, &alice).await;
    set_status(
        &app,
        &completed,
        "COMPLETED",
        json!({ "resultId": "concept-1" }),
    )
    .await;
    let failed = create_task(&app, &alice).await;
    set_status(&app, &failed, "PROCESSING", json!({})).await;
    set_status(
        &app,
        &failed,
        "FAILED",
        json!({ "errorMessage": "out of memory" }),
    )
    .await;
    let cancelled = create_task(&app, &alice).await;
    let body = app
        .gql(
            Some(&alice),
            "mutation($id: ID!) { cancelTask(id: $id) { status } }",
            json!({ "id": cancelled }),
        )
        .await;
    assert_eq!(body["data"]["cancelTask"]["status"], "CANCELLED", "{body}");

    for (id, status, field, value) in [
        (&completed, "COMPLETED", "resultId", "concept-1"),
        (&failed, "FAILED", "errorMessage", "out of memory"),
        (&cancelled, "CANCELLED", "status", "CANCELLED"),
    ] {
        let mut watch = client.subscribe(WATCH, json!({ "id": id }));
        let (results, end) = watch.until_end().await;
        assert_eq!(results.len(), 1, "only the final state: {results:?}");
        let task = &results[0]["data"]["taskUpdated"];
        assert_eq!(task["status"], status, "{task}");
        assert_eq!(task[field], value, "{task}");
        assert_eq!(end, Event::Complete);
    }
}

#[tokio::test]
async fn deleting_a_watched_task_completes_its_subscription() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let id = create_task(&app, &alice).await;
    let client = WsClient::connect_as(&app.ws_url, &alice).await;
    let mut watch = client.subscribe(WATCH, json!({ "id": id }));
    assert_eq!(watch.next_data().await["taskUpdated"]["status"], "PENDING");

    delete_task(&app, &alice, &id).await;
    let (results, end) = watch.until_end().await;
    assert!(
        results.is_empty(),
        "nothing after the deletion: {results:?}"
    );
    assert_eq!(end, Event::Complete);
}

#[tokio::test]
async fn another_users_task_is_not_found_but_a_worker_may_watch_any_task() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let id = create_task(&app, &alice).await;

    let bob = WsClient::connect_as(&app.ws_url, &app.user_token("bob")).await;
    let mut snoop = bob.subscribe(WATCH, json!({ "id": id }));
    let message = expect_error(&mut snoop, "NOT_FOUND").await;
    assert!(
        !message.as_str().unwrap_or_default().contains("alice"),
        "the error must not leak the owner: {message}"
    );
    // The same answer as for a task that does not exist at all.
    let mut absent = bob.subscribe(WATCH, json!({ "id": uuid::Uuid::now_v7().to_string() }));
    expect_error(&mut absent, "NOT_FOUND").await;
    let mut malformed = bob.subscribe(WATCH, json!({ "id": "not-a-task-id" }));
    expect_error(&mut malformed, "BAD_USER_INPUT").await;

    let worker = WsClient::connect_as(&app.ws_url, &app.worker_token()).await;
    let mut watch = worker.subscribe(WATCH, json!({ "id": id }));
    assert_eq!(watch.next_data().await["taskUpdated"]["status"], "PENDING");
    let body = app
        .gql(
            Some(&alice),
            "mutation($id: ID!) { cancelTask(id: $id) { status } }",
            json!({ "id": id }),
        )
        .await;
    assert!(body["errors"].is_null(), "{body}");
    let (results, end) = watch.until_end().await;
    assert_eq!(
        states(&results),
        owned(&[("CANCELLED", Value::Null, Value::Null)])
    );
    assert_eq!(end, Event::Complete);

    // Bob's socket still works for his own tasks.
    let bobs = create_task(&app, &app.user_token("bob")).await;
    let mut own = bob.subscribe(WATCH, json!({ "id": bobs }));
    assert_eq!(own.next_data().await["taskUpdated"]["id"], bobs);
}

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
async fn task_events_carry_the_callers_changes_only() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let bob = app.user_token("bob");
    let client = WsClient::connect_as(&app.ws_url, &alice).await;
    let mut events = client.subscribe(EVENTS, json!({}));
    wait_until_live(&app, &mut events).await;

    // Bob's changes come first: any of them leaking would arrive before alice's.
    let bobs = create_task(&app, &bob).await;
    set_status(&app, &bobs, "PROCESSING", json!({ "progress": 5 })).await;
    delete_task(&app, &bob, &bobs).await;

    let id = create_task(&app, &alice).await;
    set_status(&app, &id, "PROCESSING", json!({ "progress": 10 })).await;
    set_status(&app, &id, "COMPLETED", json!({ "resultId": "concept-7" })).await;
    delete_task(&app, &alice, &id).await;
    create_task(&app, &bob).await;
    let last = create_task(&app, &alice).await;

    let mut seen = Vec::new();
    while seen
        .last()
        .is_none_or(|(_, task): &(String, Value)| task["id"] != last)
    {
        let event = events.next().await;
        let data = event
            .data()
            .unwrap_or_else(|| panic!("taskEvents failed: {event:?}"));
        let event = &data["taskEvents"];
        seen.push((
            event["kind"].as_str().expect("kind").to_owned(),
            event["task"].clone(),
        ));
    }
    let summary: Vec<(&str, &str, &str, Value)> = seen
        .iter()
        .map(|(kind, task)| {
            let tag = if task["id"] == id {
                "task"
            } else if task["id"] == last {
                "last"
            } else {
                "OTHER"
            };
            (
                kind.as_str(),
                tag,
                task["status"].as_str().unwrap_or_default(),
                task["resultId"].clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("CREATED", "task", "PENDING", Value::Null),
            ("UPDATED", "task", "PROCESSING", Value::Null),
            ("UPDATED", "task", "COMPLETED", json!("concept-7")),
            // DELETED carries the last state.
            ("DELETED", "task", "COMPLETED", json!("concept-7")),
            ("CREATED", "last", "PENDING", Value::Null),
        ],
        "every change of alice's tasks, in order, and none of bob's"
    );
    assert_eq!(seen[1].1["progress"], 10);
    assert_eq!(seen[3].1["progress"], 100);
}

#[tokio::test]
async fn subscribing_while_the_task_completes_always_ends_with_the_final_state() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let client = WsClient::connect_as(&app.ws_url, &alice).await;
    let (mut saw_pending, mut saw_only_final) = (0, 0);

    for round in 0..100u32 {
        let task = app
            .service
            .create_task(&common::alice(), new_task())
            .await
            .expect("create");
        let result_id = format!("concept-{round}");
        // Vary who goes first: the completion through the service or over
        // HTTP, right away or after the subscribe message is on its way.
        let complete = async {
            for _ in 0..round % 4 {
                tokio::task::yield_now().await;
            }
            if round % 2 == 0 {
                app.service
                    .update_task_status(&as_worker(), completion(task.id, &result_id))
                    .await
                    .expect("complete");
            } else {
                set_status(
                    &app,
                    &task.id.to_string(),
                    "COMPLETED",
                    json!({ "resultId": result_id }),
                )
                .await;
            }
        };
        let subscribe = async {
            for _ in 0..(round / 4) % 3 {
                tokio::task::yield_now().await;
            }
            client.subscribe(WATCH, json!({ "id": task.id.to_string() }))
        };
        let (mut watch, ()) = tokio::join!(subscribe, complete);

        let (results, end) = watch.until_end().await;
        let states = states(&results);
        let last = states
            .last()
            .unwrap_or_else(|| panic!("round {round}: no result"));
        assert_eq!(
            (last.0.as_str(), &last.2),
            ("COMPLETED", &json!(result_id)),
            "round {round}: the final state must arrive, got {states:?}"
        );
        assert_eq!(end, Event::Complete, "round {round}");
        match states.len() {
            1 => saw_only_final += 1,
            2 => {
                assert_eq!(states[0].0, "PENDING", "round {round}");
                saw_pending += 1;
            }
            _ => panic!("round {round}: unexpected states {states:?}"),
        }
    }
    eprintln!("subscribed before completion {saw_pending} times, after {saw_only_final} times");
}

#[tokio::test]
async fn a_thousand_subscriptions_on_one_instance_all_see_their_task_complete() {
    const CONNECTIONS: usize = 10;
    const PER_CONNECTION: usize = 100;
    let app = spawn_app().await;
    let alice = app.user_token("alice");

    let service = app.service.clone();
    let tasks: Vec<entity::Task> = futures::stream::iter(0..CONNECTIONS * PER_CONNECTION)
        .map(|_| {
            let service = service.clone();
            async move {
                service
                    .create_task(&common::alice(), new_task())
                    .await
                    .expect("create")
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;

    let mut clients = Vec::new();
    let mut watches = Vec::new();
    for chunk in tasks.chunks(PER_CONNECTION) {
        let client = WsClient::connect_as(&app.ws_url, &alice).await;
        for task in chunk {
            watches.push((
                task.id,
                client.subscribe(WATCH, json!({ "id": task.id.to_string() })),
            ));
        }
        clients.push(client);
    }
    for (_, watch) in &mut watches {
        assert_eq!(watch.next_data().await["taskUpdated"]["status"], "PENDING");
    }
    assert_eq!(live_subscriptions(&app).await, CONNECTIONS * PER_CONNECTION);

    futures::stream::iter(tasks.iter().map(|task| {
        let service = service.clone();
        let result_id = format!("concept-{}", task.id);
        async move {
            service
                .update_task_status(&as_worker(), completion(task.id, &result_id))
                .await
                .expect("complete")
        }
    }))
    .buffer_unordered(16)
    .collect::<Vec<_>>()
    .await;

    for (id, watch) in &mut watches {
        let (results, end) = watch.until_end().await;
        assert_eq!(
            states(&results),
            owned(&[("COMPLETED", json!(100), json!(format!("concept-{id}")))]),
            "task {id}"
        );
        assert_eq!(end, Event::Complete, "task {id}");
    }
    // Finished streams give their place back.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while live_subscriptions(&app).await != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "subscriptions still counted as live"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(clients);
}

/// `taskql_subscriptions` from /metrics.
async fn live_subscriptions(app: &TestApp) -> usize {
    let text = app
        .http
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|line| line.strip_prefix("taskql_subscriptions "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no taskql_subscriptions in /metrics:\n{text}"))
}

#[tokio::test]
async fn one_connection_runs_at_most_its_limit_of_subscriptions() {
    let database = Arc::new(TestDb::new().await);
    let app = spawn_app_with(database, |settings| {
        settings.http.max_subscriptions_per_connection = 3;
    })
    .await;
    let alice = app.user_token("alice");
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(create_task(&app, &alice).await);
    }

    let client = WsClient::connect_as(&app.ws_url, &alice).await;
    let mut running = Vec::new();
    for id in &ids[..3] {
        let mut watch = client.subscribe(WATCH, json!({ "id": id }));
        assert_eq!(watch.next_data().await["taskUpdated"]["status"], "PENDING");
        running.push(watch);
    }
    let mut over = client.subscribe(WATCH, json!({ "id": ids[3] }));
    let message = expect_error(&mut over, "BAD_USER_INPUT").await;
    assert!(
        message.as_str().unwrap_or_default().contains('3'),
        "the error names the limit: {message}"
    );
    let mut over_events = client.subscribe(EVENTS, json!({}));
    expect_error(&mut over_events, "BAD_USER_INPUT").await;

    // Stopping one frees its place.
    running[0].stop();
    assert_eq!(running[0].next().await, Event::Complete);
    let mut again = client.subscribe(WATCH, json!({ "id": ids[3] }));
    assert_eq!(again.next_data().await["taskUpdated"]["id"], ids[3]);

    // The limit is per connection.
    let other = WsClient::connect_as(&app.ws_url, &alice).await;
    for id in &ids[..3] {
        let mut watch = other.subscribe(WATCH, json!({ "id": id }));
        assert_eq!(watch.next_data().await["taskUpdated"]["id"], *id);
        running.push(watch);
    }
    // Those still running on the first connection are unaffected.
    set_status(&app, &ids[1], "COMPLETED", json!({ "resultId": "r" })).await;
    let (results, end) = running[1].until_end().await;
    assert_eq!(states(&results)[0].0, "COMPLETED");
    assert_eq!(end, Event::Complete);
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
    let id = create_task(&app, &alice).await;
    let mut client = WsClient::connect_as(&app.ws_url, &alice).await;
    let mut watch = client.subscribe(WATCH, json!({ "id": id }));
    assert_eq!(watch.next_data().await["taskUpdated"]["status"], "PENDING");
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
async fn real_javascript_clients_follow_a_task_to_completion() {
    let js = common::js::npm_package("tests/js");
    let app = spawn_app().await;
    let run = tokio::process::Command::new("node")
        .arg(js.join("follow_task.mjs"))
        .env("TASKQL_HTTP_URL", &app.base)
        .env("TASKQL_WS_URL", &app.ws_url)
        .env("TASKQL_USER_TOKEN", app.user_token("alice"))
        .env("TASKQL_WORKER_TOKEN", app.worker_token())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the node script finishes")
        .expect("node runs (Node.js 20 must be installed)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "node failed: {stderr}\n{stdout}");
    let report: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("node printed no JSON ({e}): {stdout}\n{stderr}"));
    assert!(report["failure"].is_null(), "{report}");

    for client in ["graphqlWs", "subscriptionsTransportWs"] {
        let seen = &report[client];
        assert_eq!(
            seen["statuses"],
            json!(["PENDING", "PROCESSING", "COMPLETED"]),
            "{client}: {seen}"
        );
        assert_eq!(seen["last"]["resultId"], "concept-js", "{client}: {seen}");
        assert_eq!(seen["last"]["progress"], 100, "{client}: {seen}");
        assert_eq!(seen["errors"], json!([]), "{client}: {seen}");
        assert_eq!(
            seen["completed"], true,
            "{client}: the server completes: {seen}"
        );
    }
    // Without a token graphql-ws is closed with 4403 and sees nothing.
    let anonymous = &report["graphqlWsWithoutToken"];
    assert!(
        anonymous["errors"][0]
            .as_str()
            .is_some_and(|e| e.starts_with("closed 4403 Forbidden")),
        "{anonymous}"
    );
    assert_eq!(anonymous["statuses"], json!([]), "{anonymous}");
}

/// A separate connection for looking at and killing backends.
async fn admin(database: &TestDb) -> DatabaseConnection {
    taskql::db::connect(&database.url, 1)
        .await
        .expect("admin connection")
}

/// Backends of this database that LISTEN for task events (by the name they connect with).
async fn listener_pids(admin: &DatabaseConnection) -> Vec<i32> {
    admin
        .query_all_raw(Statement::from_string(
            admin.get_database_backend(),
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'taskql-listener' \
             AND pid <> pg_backend_pid()",
        ))
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|row| row.try_get::<i32>("", "pid").expect("pid"))
        .collect()
}

async fn wait_for_listeners(admin: &DatabaseConnection, count: usize, not: &[i32]) -> Vec<i32> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let pids: Vec<i32> = listener_pids(admin)
            .await
            .into_iter()
            .filter(|pid| !not.contains(pid))
            .collect();
        if pids.len() >= count {
            return pids;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{count} event listeners never connected (found {pids:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn on_postgres_a_watcher_on_one_instance_sees_changes_made_through_another() {
    let Some((a, b)) = two_apps_on_postgres_or_skip(
        "on_postgres_a_watcher_on_one_instance_sees_changes_made_through_another",
    )
    .await
    else {
        return;
    };
    let alice = a.user_token("alice");
    let admin = admin(&a.database).await;
    wait_for_listeners(&admin, 2, &[]).await;

    let client = WsClient::connect_as(&a.ws_url, &alice).await;
    let mut events = client.subscribe(EVENTS, json!({}));
    wait_until_live(&a, &mut events).await;

    let id = create_task(&b, &alice).await;
    let mut watch = client.subscribe(WATCH, json!({ "id": id }));
    assert_eq!(watch.next_data().await["taskUpdated"]["status"], "PENDING");

    // Progress through B back to back, faster than A could re-read the row:
    // straight through B's service, which its resolvers call.
    let task_id = uuid::Uuid::parse_str(&id).expect("a uuid");
    let mut expected = Vec::new();
    for progress in (5..100).step_by(5) {
        b.service
            .update_task_status(
                &as_worker(),
                StatusUpdate {
                    status: entity::TaskStatus::Processing,
                    progress: Some(progress),
                    result_id: None,
                    ..completion(task_id, "")
                },
            )
            .await
            .expect("progress through B");
        expected.push(("PROCESSING".to_owned(), json!(progress), Value::Null));
    }
    b.service
        .update_task_status(&as_worker(), completion(task_id, "concept-b"))
        .await
        .expect("complete through B");
    expected.push(("COMPLETED".to_owned(), json!(100), json!("concept-b")));

    let (results, end) = watch.until_end().await;
    assert_eq!(
        states(&results),
        expected,
        "every state made through B reaches the watcher on A"
    );
    assert_eq!(end, Event::Complete);

    delete_task(&b, &alice, &id).await;

    let mut kinds = Vec::new();
    while kinds.len() < expected.len() + 2 {
        let event = events.next().await;
        let data = event.data().unwrap_or_else(|| panic!("{event:?}"));
        let event = &data["taskEvents"];
        assert_eq!(event["task"]["id"], id, "{event}");
        kinds.push(format!(
            "{} {}",
            event["kind"].as_str().unwrap_or_default(),
            event["task"]["status"].as_str().unwrap_or_default()
        ));
    }
    let mut expected_kinds = vec!["CREATED PENDING".to_owned()];
    expected_kinds.extend(
        expected
            .iter()
            .map(|(status, _, _)| format!("UPDATED {status}")),
    );
    // The deletion carries the last state.
    expected_kinds.push("DELETED COMPLETED".to_owned());
    assert_eq!(
        kinds, expected_kinds,
        "taskEvents on A sees every change made through B"
    );
}

#[tokio::test]
async fn on_postgres_the_final_state_survives_a_lost_listener_connection() {
    const TASKS: usize = 20;
    let Some((a, b)) = two_apps_on_postgres_or_skip(
        "on_postgres_the_final_state_survives_a_lost_listener_connection",
    )
    .await
    else {
        return;
    };
    let alice = a.user_token("alice");
    let admin = admin(&a.database).await;
    let listeners = wait_for_listeners(&admin, 2, &[]).await;

    // Tasks in progress, watched on A; B will finish them.
    let mut ids = Vec::new();
    for _ in 0..2 * TASKS {
        let id = create_task(&b, &alice).await;
        set_status(&b, &id, "PROCESSING", json!({ "progress": 50 })).await;
        ids.push(id);
    }
    let client = WsClient::connect_as(&a.ws_url, &alice).await;
    let mut watches = Vec::new();
    for id in &ids {
        let mut watch = client.subscribe(WATCH, json!({ "id": id }));
        assert_eq!(
            watch.next_data().await["taskUpdated"]["status"],
            "PROCESSING"
        );
        watches.push(watch);
    }
    // And the whole feed of alice's changes, on A too.
    let events_client = WsClient::connect_as(&a.ws_url, &alice).await;
    let mut feed = events_client.subscribe(
        "subscription { taskEvents { kind task { id status resultId } } }",
        json!({}),
    );
    // The feed is live once it carries a change made now.
    let probe = create_task(&b, &alice).await;
    loop {
        let event = feed.next_data().await;
        if event["taskEvents"]["task"]["id"] == probe.as_str() {
            break;
        }
    }

    let killed = admin
        .query_all_raw(Statement::from_string(
            admin.get_database_backend(),
            "SELECT pg_terminate_backend(pid) AS killed FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'taskql-listener' \
             AND pid <> pg_backend_pid()",
        ))
        .await
        .expect("terminate the listeners");
    assert_eq!(
        killed.len(),
        listeners.len(),
        "both instances' listeners are cut off"
    );

    // During the gap (the listeners are reconnecting) ...
    futures::future::join_all(ids[..TASKS].iter().map(|id| {
        set_status(
            &b,
            id,
            "COMPLETED",
            json!({ "resultId": format!("done-{id}") }),
        )
    }))
    .await;
    // ... and after it.
    wait_for_listeners(&admin, 2, &listeners).await;
    futures::future::join_all(ids[TASKS..].iter().map(|id| {
        set_status(
            &b,
            id,
            "COMPLETED",
            json!({ "resultId": format!("done-{id}") }),
        )
    }))
    .await;

    for (id, watch) in ids.iter().zip(&mut watches) {
        let (results, end) = watch.until_end().await;
        let states = states(&results);
        assert_eq!(
            states.last().map(|s| (s.0.as_str(), s.2.clone())),
            Some(("COMPLETED", json!(format!("done-{id}")))),
            "task {id}: the final state must arrive, got {states:?}"
        );
        assert_eq!(end, Event::Complete, "task {id}");
    }
    // The feed catches up on what it missed while the listener was away:
    // every task's COMPLETED arrives, each once.
    let mut completed = std::collections::HashMap::new();
    while completed.len() < ids.len() {
        let event = feed.next_data().await;
        let task = &event["taskEvents"]["task"];
        if task["status"] == "COMPLETED" {
            *completed
                .entry(task["id"].as_str().unwrap().to_owned())
                .or_insert(0) += 1;
        }
    }
    assert!(
        ids.iter().all(|id| completed.get(id) == Some(&1)),
        "{completed:?}"
    );
}

#[tokio::test]
async fn on_postgres_a_task_with_large_metadata_crosses_instances_whole() {
    let Some((a, b)) = two_apps_on_postgres_or_skip(
        "on_postgres_a_task_with_large_metadata_crosses_instances_whole",
    )
    .await
    else {
        return;
    };
    let alice = a.user_token("alice");
    wait_for_listeners(&admin(&a.database).await, 2, &[]).await;

    // Far more than a NOTIFY payload may carry (8000 bytes).
    let prompt = "a cat in a hat, ".repeat(3000);
    let body = b
        .gql(
            Some(&alice),
            CREATE,
            json!({ "input": { "type": "image.generate", "metadata": { "prompt": prompt } } }),
        )
        .await;
    let id = body["data"]["createTask"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("createTask failed: {body}"))
        .to_owned();
    let client = WsClient::connect_as(&a.ws_url, &alice).await;
    let mut watch = client.subscribe(
        "subscription($id: ID!) { taskUpdated(id: $id) { status resultId metadata } }",
        json!({ "id": id }),
    );
    assert_eq!(watch.next_data().await["taskUpdated"]["status"], "PENDING");

    set_status(&b, &id, "PROCESSING", json!({ "progress": 10 })).await;
    set_status(&b, &id, "COMPLETED", json!({ "resultId": "big" })).await;
    let (results, end) = watch.until_end().await;
    let seen: Vec<(&str, &Value)> = results
        .iter()
        .map(|r| {
            let task = &r["data"]["taskUpdated"];
            assert_eq!(
                task["metadata"]["prompt"],
                prompt.as_str(),
                "metadata intact"
            );
            (
                task["status"].as_str().unwrap_or_default(),
                &task["resultId"],
            )
        })
        .collect();
    assert_eq!(
        seen,
        [("PROCESSING", &Value::Null), ("COMPLETED", &json!("big"))]
    );
    assert_eq!(end, Event::Complete);
}

#[tokio::test]
async fn a_socket_closes_when_its_token_expires() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let id = create_task(&app, &alice).await;
    // Still valid within the 30 s leeway for about two more seconds.
    let now = chrono::Utc::now().timestamp();
    let expiring = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({ "sub": "alice", "exp": now - 28 }),
        &jsonwebtoken::EncodingKey::from_secret(common::TEST_SECRET.as_bytes()),
    )
    .unwrap();
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

#[tokio::test]
async fn a_client_that_hangs_up_mid_update_still_lets_watchers_see_the_change() {
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, TransactionTrait};
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let id = create_task(&app, &alice).await;
    let client = WsClient::connect_as(&app.ws_url, &alice).await;
    let mut watch = client.subscribe(WATCH, json!({ "id": id }));
    assert_eq!(watch.next_data().await["taskUpdated"]["status"], "PENDING");

    // Another connection holds the row (a write lock on SQLite), so the
    // update waits in the database while its client gives up.
    let other = app.database.connect().await;
    let blocker = other.begin().await.unwrap();
    let uuid: uuid::Uuid = id.parse().unwrap();
    entity::Tasks::update_many()
        .col_expr(
            entity::tasks::Column::Version,
            sea_orm::prelude::Expr::col(entity::tasks::Column::Version),
        )
        .filter(entity::tasks::Column::Id.eq(uuid))
        .exec(&blocker)
        .await
        .unwrap();
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let sent = impatient
        .post(format!("{}/graphql", app.base))
        .bearer_auth(app.worker_token())
        .json(&json!({
            "query": UPDATE,
            "variables": { "input": { "id": id, "status": "COMPLETED", "resultId": "kept" } }
        }))
        .send()
        .await;
    assert!(sent.is_err(), "the client gave up before the answer");
    blocker.rollback().await.unwrap();

    // The change committed once the row was free, and its event went out.
    let (results, end) = watch.until_end().await;
    let last = results.last().expect("a change arrived");
    assert_eq!(
        last["data"]["taskUpdated"]["status"], "COMPLETED",
        "{results:?}"
    );
    assert_eq!(last["data"]["taskUpdated"]["resultId"], "kept");
    assert_eq!(end, Event::Complete);
}
