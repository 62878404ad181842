//! `followEvents` across a killed server, in Node and in headless Chromium
//! (the same follower, follow_core.mjs): the changes made while it was
//! down and after it came back are all delivered, once each, in the order
//! `taskEvents` read in full gives them.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};
use taskql::service::{NewTask, StatusUpdate, TaskService};

use crate::common::edge::server::Server;
use crate::common::ws::WsClient;
use crate::common::{TEST_SECRET, TestDb, alice, as_worker, token_for};
use crate::{Runtime, SCRIPT_TIMEOUT, assert_reconnected_with_a_fresh_token};

const EVENTS: &str = "subscription($after: String) {
  taskEvents(after: $after) { cursor kind task { id type status } }
}";
const CREATE: &str =
    "mutation($input: CreateTaskInput!) { createTask(input: $input) { id status } }";
const CANCEL: &str = "mutation($id: ID!) { cancelTask(id: $id) { id status } }";
/// Changes made while the server is down: creates, then some of those moved on.
const CREATED_WHILE_DOWN: usize = 40;
const CREATED_AFTER: usize = 10;

/// (cursor, kind, task id, type, status) of an event as the script reports it.
fn row(event: &Value) -> (String, String, String, String, String) {
    let text = |key: &str| event[key].as_str().unwrap_or_default().to_owned();
    (
        text("cursor"),
        text("kind"),
        text("id"),
        text("type"),
        text("status"),
    )
}

async fn gql(server: &Server, token: &str, query: &str, variables: Value) -> Value {
    let (status, body) = server
        .graphql(token, query, variables, Duration::from_secs(10))
        .await
        .expect("the server answers");
    assert_eq!(status, 200, "{body}");
    assert!(body.get("errors").is_none(), "{body}");
    body["data"].clone()
}

async fn events_resume_across_a_server_kill(test: &str, transport: &str, runtime: Runtime) {
    let db = TestDb::new().await;
    let mut server = Server::start(&db.url, &[]).await;
    let token = token_for("alice", None);
    // What the token function gives from its second call on: another token
    // of alice's, valid for longer.
    let refreshed = taskql::auth::issue_token(
        TEST_SECRET,
        "alice",
        None,
        Duration::from_secs(7200),
        None,
        None,
    )
    .expect("token");
    assert_ne!(token, refreshed);
    let env = [
        ("TASKQL_URL", server.base.as_str()),
        ("TASKQL_USER_TOKEN", token.as_str()),
        ("TASKQL_USER_TOKEN_2", refreshed.as_str()),
        ("TASKQL_TRANSPORT", transport),
    ];
    let scripts = ("follow_events.mjs", "browser_follow.mjs");
    let Some(mut script) = runtime.start(test, scripts, &env) else {
        return;
    };
    let ready = script.ready(SCRIPT_TIMEOUT).await;
    let start = ready["cursor"].as_str().expect("a cursor").to_owned();

    crate::kill(&mut server).await;
    // Many changes while no server runs, straight through the service on
    // the same database: they are in the change log only.
    let (service, pool) = db.service().await;
    let mut down = Vec::new();
    for i in 0..CREATED_WHILE_DOWN {
        let task = service
            .create_task(
                &alice(),
                NewTask {
                    task_type: "batch.down".into(),
                    metadata: Some(json!({ "i": i })),
                    ..Default::default()
                },
            )
            .await
            .expect("create");
        down.push(task.id);
    }
    for (i, id) in down.iter().enumerate().take(CREATED_WHILE_DOWN / 2) {
        let status = if i % 2 == 0 {
            entity::TaskStatus::Processing
        } else {
            entity::TaskStatus::Cancelled
        };
        service
            .update_task_status(&as_worker(), StatusUpdate::new(*id, status))
            .await
            .expect("update");
    }
    drop(service);
    pool.close().await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let server = crate::restart_at(&db.url, &server).await;

    // More once it is back, then the marker the script stops at.
    for i in 0..CREATED_AFTER {
        let input = json!({ "type": "batch.up", "metadata": { "i": i } });
        let created = gql(&server, &token, CREATE, json!({ "input": input })).await;
        if i % 3 == 0 {
            let id = created["createTask"]["id"].clone();
            gql(&server, &token, CANCEL, json!({ "id": id })).await;
        }
    }
    let marker = json!({ "type": "marker.done" });
    gql(&server, &token, CREATE, json!({ "input": marker })).await;
    let report = script.report(SCRIPT_TIMEOUT).await;
    let delivered: Vec<_> = report["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(row)
        .collect();

    // The whole log after the start, as taskEvents replays it.
    let reader = WsClient::connect_as(&server.ws_url, &token).await;
    let mut full = reader.subscribe(EVENTS, json!({ "after": start }));
    let mut log = Vec::new();
    loop {
        let data = full.next_data().await;
        let event = &data["taskEvents"];
        let task = &event["task"];
        let row = row(&json!({
            "cursor": event["cursor"], "kind": event["kind"], "id": task["id"],
            "type": task["type"], "status": task["status"],
        }));
        let last = row.3 == "marker.done";
        log.push(row);
        if last {
            break;
        }
    }

    assert_eq!(
        delivered.first().map(|e| e.0.as_str()),
        Some(start.as_str())
    );
    assert_eq!(
        delivered[1..],
        log[..],
        "what the client delivered after its first event is the log after it, in order"
    );
    let cursors: HashSet<&str> = delivered.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(cursors.len(), delivered.len(), "no event twice");
    let count = |kind: &str, ty: &str| {
        delivered
            .iter()
            .filter(|e| e.1 == kind && e.3 == ty)
            .count()
    };
    assert_eq!(count("CREATED", "batch.down"), CREATED_WHILE_DOWN);
    assert_eq!(count("UPDATED", "batch.down"), CREATED_WHILE_DOWN / 2);
    assert_eq!(count("CREATED", "batch.up"), CREATED_AFTER);
    assert_eq!(count("UPDATED", "batch.up"), CREATED_AFTER.div_ceil(3));
    assert_eq!(report["cursor"].as_str(), log.last().map(|e| e.0.as_str()));
    assert_reconnected_with_a_fresh_token(&report);
    runtime.assert_page_was_clean(&report, &server.base);
}

#[tokio::test]
async fn follow_events_over_sse_resumes_after_a_server_kill_missing_nothing_and_nothing_twice() {
    events_resume_across_a_server_kill(
        "follow_events_over_sse_resumes_after_a_server_kill_missing_nothing_and_nothing_twice",
        "sse",
        Runtime::Node,
    )
    .await;
}

#[tokio::test]
async fn follow_events_over_websockets_resumes_after_a_server_kill_missing_nothing_and_nothing_twice()
 {
    events_resume_across_a_server_kill(
        "follow_events_over_websockets_resumes_after_a_server_kill_missing_nothing_and_nothing_twice",
        "ws",
        Runtime::Node,
    )
    .await;
}

#[tokio::test]
async fn in_chromium_follow_events_over_sse_resumes_after_a_server_kill_missing_nothing_and_nothing_twice()
 {
    events_resume_across_a_server_kill(
        "in_chromium_follow_events_over_sse_resumes_after_a_server_kill_missing_nothing_and_nothing_twice",
        "sse",
        Runtime::Chromium,
    )
    .await;
}

#[tokio::test]
async fn in_chromium_follow_events_over_websockets_resumes_after_a_server_kill_missing_nothing_and_nothing_twice()
 {
    events_resume_across_a_server_kill(
        "in_chromium_follow_events_over_websockets_resumes_after_a_server_kill_missing_nothing_and_nothing_twice",
        "ws",
        Runtime::Chromium,
    )
    .await;
}
