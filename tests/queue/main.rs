//! The queue through the real router: `runAt`, priority, the owners' turns,
//! retryable failures and their backoff, task type policies (attempts,
//! backoff, pause, the concurrency cap), and fencing across `retryTask` and
//! the reaper. On SQLite by default, on PostgreSQL when
//! `TASKQL_TEST_DATABASE_URL` is set.
#[path = "../common/mod.rs"]
mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use common::*;
use entity::tasks::Column;
use entity::{TaskStatus, Tasks};
use sea_orm::prelude::Expr;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter};
use serde_json::{Value, json};
use tokio::sync::Barrier;
use uuid::Uuid;

mod backoff;
mod cap;
mod fencing;
mod line;
mod pause;
mod policies;
mod priority;
mod run_at;
mod turns;

const FIELDS: &str = "id type status userId attempts priority maxAttempts runAt createdAt \
                      updatedAt startedAt completedAt errorMessage resultId workerId leaseExpiresAt";
const POLICY_FIELDS: &str = "type policy { maxAttempts backoff { initialSeconds factor maxSeconds jitter } concurrency paused } pending processing";

/// One app on a fresh database (dropped after the test).
async fn fresh_app() -> TestApp {
    fresh_app_with(|_| {}).await
}

async fn fresh_app_with(tweak: impl FnOnce(&mut taskql::config::Settings)) -> TestApp {
    spawn_app_with(Arc::new(TestDb::new().await), tweak).await
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Creates a task as the owner of `token`; every field of it.
async fn create(app: &TestApp, token: &str, input: Value) -> Value {
    app.create_task(token, input, FIELDS).await
}

/// `createTask`'s whole answer, errors included.
async fn try_create(app: &TestApp, token: &str, input: Value) -> Value {
    let query = format!(
        "mutation($input: CreateTaskInput!) {{ createTask(input: $input) {{ {FIELDS} }} }}"
    );
    app.gql(Some(token), &query, json!({ "input": input }))
        .await
}

/// `claimTask` as a worker with a 60 s lease: the task, or null.
async fn claim(app: &TestApp, types: Value) -> Value {
    claim_with(app, types, 60, "w").await
}

async fn claim_with(app: &TestApp, types: Value, lease: i64, worker_id: &str) -> Value {
    app.claim_task(types, Some(lease), worker_id, FIELDS).await
}

/// Claims until nothing is runnable; the claims in order.
async fn claim_all(app: &TestApp, types: Value) -> Vec<Value> {
    let mut claimed = Vec::new();
    loop {
        let task = claim(app, types.clone()).await;
        if task.is_null() {
            return claimed;
        }
        claimed.push(task);
    }
}

/// The ids of `claim_all`'s claims, in order.
async fn claimed_ids(app: &TestApp, types: Value) -> Vec<String> {
    claim_all(app, types).await.iter().map(id_of).collect()
}

/// Where `id` is among `claimed`, counting from 1 (0: not there).
fn place_of(claimed: &[String], id: &str) -> usize {
    claimed.iter().position(|c| c == id).map_or(0, |i| i + 1)
}

/// Sets the time `column` of task `id` behind the service's back.
async fn set_time(db: &impl ConnectionTrait, id: &str, column: Column, at: DateTime<Utc>) {
    Tasks::update_many()
        .col_expr(column, Expr::value(at))
        .filter(Column::Id.eq(Uuid::parse_str(id).expect("uuid")))
        .exec(db)
        .await
        .expect("set a time");
}

/// `updateTaskStatus(FAILED)` as a worker, fenced by `attempt`; the whole answer.
async fn fail(
    app: &TestApp,
    id: &str,
    attempt: i64,
    message: Option<&str>,
    retryable: bool,
) -> Value {
    let mut input =
        json!({ "id": id, "status": "FAILED", "expectedAttempt": attempt, "retryable": retryable });
    if let Some(message) = message {
        input["errorMessage"] = json!(message);
    }
    app.update_status(input, FIELDS).await
}

/// `updateTaskStatus(COMPLETED)` as a worker, fenced by `attempt`; the whole answer.
async fn complete(app: &TestApp, id: &str, attempt: i64) -> Value {
    let input = json!({ "id": id, "status": "COMPLETED", "resultId": format!("r-{id}"), "expectedAttempt": attempt });
    app.update_status(input, FIELDS).await
}

/// The task as its owner (the token's user) sees it.
async fn task(app: &TestApp, token: &str, id: &str) -> Value {
    let query = format!("query($id: ID!) {{ task(id: $id) {{ {FIELDS} }} }}");
    data(app.gql(Some(token), &query, json!({ "id": id })).await)["task"].clone()
}

/// `setTaskTypePolicy` with `token`; the whole answer.
async fn try_set_policy(app: &TestApp, token: &str, task_type: &str, policy: Value) -> Value {
    let query = format!(
        "mutation($type: String!, $policy: TaskTypePolicyInput!) {{
           setTaskTypePolicy(type: $type, policy: $policy) {{ {POLICY_FIELDS} }}
         }}"
    );
    app.gql(
        Some(token),
        &query,
        json!({ "type": task_type, "policy": policy }),
    )
    .await
}

/// `setTaskTypePolicy` as a worker: the task type it returns.
async fn set_policy(app: &TestApp, task_type: &str, policy: Value) -> Value {
    let body = try_set_policy(app, &app.worker_token(), task_type, policy).await;
    data(body)["setTaskTypePolicy"].clone()
}

/// `taskTypes` as a worker.
async fn task_types(app: &TestApp) -> Vec<Value> {
    let query = format!("{{ taskTypes {{ {POLICY_FIELDS} }} }}");
    let body = data(app.gql(Some(&app.worker_token()), &query, json!({})).await);
    body["taskTypes"].as_array().expect("a list").clone()
}
