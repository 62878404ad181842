//! The change log behind `taskEvents(after:)`: a resumed stream replays
//! exactly the events after its cursor and then continues live with no gap
//! and no repeat, on any instance, after a restart, under concurrent writes
//! and bulk statements, and for changes whose writer never woke anyone.
//! Pruned cursors are `CURSOR_EXPIRED`. On SQLite by default; on PostgreSQL
//! when `TASKQL_TEST_DATABASE_URL` is set (some tests only mean something
//! there and say they were skipped otherwise).
#[path = "../common/mod.rs"]
mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::ws::{self, Event, WsClient};
use common::{
    TestApp, TestDb, alice, as_worker, bob, data, spawn_app, spawn_app_with,
    two_apps_on_postgres_or_skip, worker,
};
use entity::{TaskStatus, Tasks};
use futures::StreamExt;
use futures::stream::BoxStream;
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter};
use serde_json::{Value, json};
use taskql::auth::CurrentUser;
use taskql::error::TaskResult;
use taskql::service::live::bus::{TaskEvent, TaskEventKind};
use taskql::service::live::changelog::{decode_cursor, encode_cursor};
use taskql::service::{NewTask, StatusUpdate, TaskService, TaskStore};
use uuid::Uuid;

mod log;
mod replay;
mod restarts;

const EVENTS: &str = "subscription Events($after: String) {
  taskEvents(after: $after) {
    cursor
    kind
    task { id userId type status progress attempts resultId workerId updatedAt }
  }
}";
const WATCH: &str = "subscription Watch($id: ID!) {
  taskUpdated(id: $id) { id status progress }
}";

/// Longest a test waits for any one event.
const WAIT: Duration = Duration::from_secs(10);
/// How long a stream is watched to show that nothing (more) arrives.
const QUIET: Duration = Duration::from_millis(600);
/// Longest a change committed behind every instance's back may take to
/// reach a subscriber (the readers' tick is 250 ms).
const ORPHAN_LATENCY: Duration = Duration::from_secs(3);

type Events = BoxStream<'static, TaskResult<TaskEvent>>;

fn task_of(task_type: &str) -> NewTask {
    NewTask {
        task_type: task_type.into(),
        metadata: Some(json!({ "prompt": "a cat" })),
        idempotency_key: None,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------
// GraphQL over the websocket

/// The `taskEvents` payload of the next message; fails on errors, on the
/// end of the operation, and after `WAIT`.
async fn next_event(sub: &mut ws::Subscription) -> Value {
    let event = sub
        .next_within(WAIT)
        .await
        .unwrap_or_else(|| panic!("subscription {}: no event within {WAIT:?}", sub.id));
    match event.data() {
        Some(data) if event.errors().is_none() => data["taskEvents"].clone(),
        _ => panic!("subscription {}: expected an event, got {event:?}", sub.id),
    }
}

async fn next_events(sub: &mut ws::Subscription, count: usize) -> Vec<Value> {
    let mut events = Vec::with_capacity(count);
    for _ in 0..count {
        events.push(next_event(sub).await);
    }
    events
}

/// Fails if the subscription sends anything within `QUIET`.
async fn assert_quiet(sub: &mut ws::Subscription, why: &str) {
    if let Some(event) = sub.next_within(QUIET).await {
        panic!("{why}: got {event:?}");
    }
}

/// The log position a `taskEvents` cursor stands for (to check order).
fn pos(event: &Value) -> i64 {
    let cursor = event["cursor"].as_str().expect("a cursor");
    decode_cursor(cursor).unwrap_or_else(|e| panic!("{cursor:?} is not a cursor: {e:?}"))
}

/// (kind, task id, status) of each event.
fn summary(events: &[Value]) -> Vec<(String, String, String)> {
    events
        .iter()
        .map(|event| {
            (
                event["kind"].as_str().expect("kind").to_owned(),
                event["task"]["id"].as_str().expect("id").to_owned(),
                event["task"]["status"].as_str().expect("status").to_owned(),
            )
        })
        .collect()
}

fn expect(rows: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    rows.iter()
        .map(|(kind, id, status)| (kind.to_string(), id.to_string(), status.to_string()))
        .collect()
}

fn assert_increasing(events: &[Value], what: &str) {
    let positions: Vec<i64> = events.iter().map(pos).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "{what}: positions must strictly increase: {positions:?}"
    );
}

/// Makes `subs` (`taskEvents` subscriptions that all see alice's tasks)
/// live: creates probe tasks for alice until every one has delivered the
/// newest probe's CREATED, and returns that event as each received it.
/// Nothing but probes may arrive before it.
async fn go_live(app: &TestApp, subs: &mut [&mut ws::Subscription]) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    let mut probes = HashSet::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "taskEvents subscriptions never went live"
        );
        let probe = app
            .service
            .create_task(&alice(), task_of("probe"))
            .await
            .expect("create a probe")
            .id
            .to_string();
        probes.insert(probe.clone());
        let mut reached = Vec::new();
        for sub in subs.iter_mut() {
            let mut found = None;
            while let Some(event) = sub.next_within(Duration::from_millis(300)).await {
                let event = match event.data() {
                    Some(data) if event.errors().is_none() => data["taskEvents"].clone(),
                    _ => panic!("taskEvents failed: {event:?}"),
                };
                let id = event["task"]["id"].as_str().expect("an id");
                assert!(probes.contains(id), "an event before the probe: {event}");
                if id == probe {
                    found = Some(event);
                    break;
                }
            }
            reached.push(found);
        }
        if reached.iter().all(Option::is_some) {
            return reached.into_iter().flatten().collect();
        }
    }
}

async fn gql_ok(app: &TestApp, token: &str, query: &str, variables: Value) -> Value {
    data(app.gql(Some(token), query, variables).await)
}

async fn create_via_gql(app: &TestApp, token: &str, task_type: &str) -> String {
    let task = app
        .create_task(token, json!({ "type": task_type }), "id")
        .await;
    task["id"].as_str().expect("an id").to_owned()
}

/// `updateTaskStatus` as a worker.
async fn set_status(app: &TestApp, id: &str, status: &str, extra: Value) {
    let mut input = json!({ "id": id, "status": status });
    if let (Some(input), Some(extra)) = (input.as_object_mut(), extra.as_object()) {
        input.extend(extra.clone());
    }
    data(app.update_status(input, "id").await);
}

async fn on_task(app: &TestApp, token: &str, mutation: &str, id: &str) -> Value {
    gql_ok(
        app,
        token,
        &format!("mutation($id: ID!) {{ {mutation}(id: $id) {{ id status }} }}"),
        json!({ "id": id }),
    )
    .await[mutation]
        .clone()
}

async fn delete_via_gql(app: &TestApp, token: &str, id: &str) {
    let done = gql_ok(
        app,
        token,
        "mutation($id: ID!) { deleteTask(id: $id) }",
        json!({ "id": id }),
    )
    .await;
    assert_eq!(done["deleteTask"], true, "{done}");
}

// ---------------------------------------------------------------------------
// The service's streams

async fn next_of(stream: &mut Events) -> TaskEvent {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .unwrap_or_else(|_| panic!("no event within {WAIT:?}"))
        .expect("the stream ended")
        .expect("the stream failed")
}

/// [`go_live`] for the service's streams; returns the probe's position.
/// Events of changes committed before (which a stream opened without
/// `after` may still receive) are skipped.
async fn go_live_streams(service: &TaskStore, streams: &mut [&mut Events]) -> i64 {
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "streams never went live");
        let probe = service
            .create_task(&alice(), task_of("probe"))
            .await
            .expect("create a probe")
            .id;
        let mut reached = Vec::new();
        for stream in streams.iter_mut() {
            let mut found = None;
            while let Ok(event) =
                tokio::time::timeout(Duration::from_millis(300), stream.next()).await
            {
                let event = event.expect("the stream ended").expect("the stream failed");
                if event.task.id == probe {
                    found = Some(event.pos);
                    break;
                }
            }
            reached.push(found);
        }
        if let [Some(first), ..] = reached[..]
            && reached.iter().all(|pos| *pos == Some(first))
        {
            return first;
        }
    }
}

/// Asserts the next event of each stream is the CREATED of `id`: nothing
/// else (no repeat, nothing of another user) came before it.
async fn next_is_created(streams: &mut [&mut Events], id: Uuid, what: &str) {
    for (i, stream) in streams.iter_mut().enumerate() {
        let event = next_of(stream).await;
        assert_eq!(
            (event.kind, event.task.id),
            (TaskEventKind::Created, id),
            "{what} (stream {i}): the next event must be the marker's"
        );
    }
}

/// A plain connection to the test's database: no taskql service on it, so
/// nothing is woken by what it writes.
async fn plain_connection(url: &str) -> DatabaseConnection {
    taskql::db::connect(url, 1)
        .await
        .expect("a plain connection")
}

/// Inserts a PENDING task for `user` with a plain SQL statement; its id.
async fn raw_insert(conn: &DatabaseConnection, user: &str, task_type: &str) -> Uuid {
    let model = entity::tasks::ActiveModel::pending(
        user.into(),
        task_type.into(),
        json!({ "raw": true }),
        None,
        chrono::Utc::now(),
    );
    let id = model.id.clone().unwrap();
    Tasks::insert(model)
        .exec(conn)
        .await
        .expect("a raw INSERT of a task");
    id
}
