//! Live task status over a real websocket: `taskUpdated` and `taskEvents`
//! through `/graphql/ws` with the `graphql-transport-ws` protocol, on the
//! real server. On PostgreSQL, also across two instances on one database.
#[path = "../common/mod.rs"]
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

mod connection;
mod instances;
mod limits;
mod sse;
mod watch;

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

/// A new task of `token`'s user, watched over a socket of that user's from
/// its first state (PENDING, already seen): its id, the socket and the watch.
async fn watch_a_new_task(app: &TestApp, token: &str) -> (String, WsClient, ws::Subscription) {
    let id = create_task(app, token).await;
    let client = WsClient::connect_as(&app.ws_url, token).await;
    let mut watch = client.subscribe(WATCH, json!({ "id": id }));
    assert_eq!(watch.next_data().await["taskUpdated"]["status"], "PENDING");
    (id, client, watch)
}

/// `cancelTask` as the owner of `token`; the whole answer.
async fn cancel_task(app: &TestApp, token: &str, id: &str) -> Value {
    app.gql(
        Some(token),
        "mutation($id: ID!) { cancelTask(id: $id) { status } }",
        json!({ "id": id }),
    )
    .await
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
        result_id: Some(result_id.to_owned()),
        ..StatusUpdate::new(task_id, entity::TaskStatus::Completed)
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
