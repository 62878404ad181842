//! `taskStats` and `retryTask`: counts that stay exact through every kind of
//! change and under concurrent writers, each view's scope, throughput
//! windows, durations on known data, the oldest wait, leases; retries and
//! their events; a worker's `taskEvents` across users.
#[path = "../common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::ws::WsClient;
use common::*;
use entity::TaskStatus;
use sea_orm::{ConnectionTrait, Statement};
use serde_json::{Value, json};
use taskql::auth::CurrentUser;
use taskql::db::Db;
use taskql::service::{ClaimRequest, StatsRequest, StatusUpdate, TaskService, TaskStore, Worker};

mod counts;
mod durations;
mod retry;
mod throughput;

const STATS: &str = "query($minutes: Int) { taskStats { \
    byStatus { status count } \
    byType { type pending processing completed failed cancelled } \
    throughput(minutes: $minutes) { at created completed failed } \
    durations { type waitP50Ms waitP95Ms runP50Ms runP95Ms runP99Ms } \
    oldestPendingAgeSeconds \
    workers { workerId tasks nextLeaseExpiry } } }";

async fn stats(app: &TestApp, token: &str) -> Value {
    let body = app.gql(Some(token), STATS, json!({})).await;
    assert!(body["errors"].is_null(), "{body}");
    body["data"]["taskStats"].clone()
}

/// `UPDATE tasks SET {set}` of one task, behind the service's back (ids
/// are blobs on SQLite, so the id is bound).
async fn update_task(app: &TestApp, id: uuid::Uuid, set: &str) {
    set_on(&app.db, id, set).await;
}

async fn set_on(db: &Db, id: uuid::Uuid, set: &str) {
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        format!("UPDATE tasks SET {set} WHERE id = $1"),
        [id.into()],
    ))
    .await
    .unwrap();
}

/// The task `w` claims next (there is one).
async fn claim_next(service: &TaskStore, w: &Worker) -> entity::Task {
    service
        .claim_task(w, ClaimRequest::default())
        .await
        .unwrap()
        .unwrap()
}

/// `w` moves its task `id` to `status`.
async fn set_status(service: &TaskStore, w: &Worker, id: uuid::Uuid, status: TaskStatus) {
    service
        .update_task_status(w, StatusUpdate::new(id, status))
        .await
        .unwrap();
}

fn minute_of(point: &Value) -> i64 {
    let at = chrono::DateTime::parse_from_rfc3339(point["at"].as_str().unwrap()).unwrap();
    assert_eq!(at.timestamp() % 60, 0, "a point starts a minute: {point}");
    at.timestamp() / 60
}

/// Consecutive minutes, oldest first, the last being the current one.
fn assert_minutes_in_a_row(points: &[Value]) {
    let first = minute_of(&points[0]);
    for (i, point) in points.iter().enumerate() {
        assert_eq!(minute_of(point), first + i as i64, "{point}");
    }
    let now = chrono::Utc::now().timestamp() / 60;
    let last = minute_of(points.last().unwrap());
    assert!((now - 1..=now).contains(&last), "last {last}, now {now}");
}

/// A timestamp as the server stores it (microseconds, UTC).
fn taskql_time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
}

/// Each time column set to its time, for `update_task`.
fn times(columns: &[(&str, chrono::DateTime<chrono::Utc>)]) -> String {
    let set: Vec<String> = columns
        .iter()
        .map(|(column, at)| format!("{column} = '{}'", taskql_time(*at)))
        .collect();
    set.join(", ")
}

/// Sets a task's time `column` to `seconds` ago.
async fn set_seconds_ago(app: &TestApp, id: uuid::Uuid, column: &str, seconds: i64) {
    let at = chrono::Utc::now() - chrono::TimeDelta::seconds(seconds);
    update_task(app, id, &times(&[(column, at)])).await;
}
