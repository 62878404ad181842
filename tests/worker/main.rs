//! The worker protocol, under real concurrency: exactly-once claims, leases
//! and heartbeats, fencing, stuck-task recovery, idempotent creates,
//! retention, and the example worker end to end. On SQLite by default, on
//! PostgreSQL when `TASKQL_TEST_DATABASE_URL` is set.
#[path = "../common/mod.rs"]
mod common;

#[allow(dead_code)]
#[path = "../../examples/worker/client.rs"]
mod worker_client;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::*;
use entity::tasks::Column;
use entity::{Task, TaskStatus, Tasks};
use sea_orm::prelude::Expr;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder};
use serde_json::{Value, json};
use taskql::auth::CurrentUser;
use taskql::error::TaskError;
use taskql::service::{ClaimRequest, Heartbeat, StatusUpdate, TaskService};
use tokio::sync::Barrier;
use uuid::Uuid;

mod claim_api;
mod claims;
mod example_worker;
mod heartbeats;
mod idempotency;
mod leases;
mod retention;

const CLAIMERS: usize = 8;
const MANY: usize = 1000;

const CREATE: &str =
    "mutation($input: CreateTaskInput!) { createTask(input: $input) { id type status attempts } }";
const CLAIM: &str = "mutation($types: [String!], $lease: Int, $worker: String) {
  claimTask(types: $types, leaseSeconds: $lease, workerId: $worker) { id type status attempts }
}";
const HEARTBEAT: &str = "mutation($id: ID!, $progress: Int, $lease: Int, $attempt: Int) {
  heartbeatTask(id: $id, progress: $progress, leaseSeconds: $lease, expectedAttempt: $attempt) { id status progress attempts }
}";
const UPDATE: &str = "mutation($input: UpdateTaskStatusInput!) {
  updateTaskStatus(input: $input) { id status resultId errorMessage attempts }
}";
const CANCEL: &str = "mutation($id: ID!) { cancelTask(id: $id) { id status } }";
const TASK: &str =
    "query($id: ID!) { task(id: $id) { id status resultId errorMessage progress attempts } }";

async fn fetch(db: &impl ConnectionTrait, id: Uuid) -> Task {
    Tasks::find_by_id(id)
        .one(db)
        .await
        .expect("read task")
        .expect("task exists")
}

async fn all_tasks(db: &impl ConnectionTrait) -> Vec<Task> {
    Tasks::find()
        .order_by_asc(Column::CreatedAt)
        .order_by_asc(Column::Id)
        .all(db)
        .await
        .expect("read tasks")
}

/// Task `id` once the reaper has made it `status` (waiting up to 15 s).
async fn once_reaped(db: &impl ConnectionTrait, id: Uuid, status: TaskStatus) -> Task {
    let what = format!("the reaper to make the task {status:?}");
    eventually(&what, Duration::from_secs(15), || async {
        let task = fetch(db, id).await;
        (task.status == status).then_some(task)
    })
    .await
}

/// Puts the lease of `ids` in the past, as if their workers went silent long ago.
async fn expire_leases(db: &impl ConnectionTrait, ids: &[Uuid]) {
    let past = Utc::now() - chrono::Duration::minutes(5);
    Tasks::update_many()
        .col_expr(Column::LeaseExpiresAt, Expr::value(past))
        .filter(Column::Id.is_in(ids.to_vec()))
        .exec(db)
        .await
        .expect("expire leases");
}

fn by_status(tasks: &[Task]) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for task in tasks {
        *counts.entry(task.status.as_str()).or_default() += 1;
    }
    counts
}

/// The tasks in the table, counted by status, are exactly `want`.
async fn assert_statuses(db: &impl ConnectionTrait, want: &[(&str, usize)]) {
    assert_eq!(
        by_status(&all_tasks(db).await),
        want.iter().copied().collect::<BTreeMap<_, _>>()
    );
}

fn lease(seconds: u64) -> Option<Duration> {
    Some(Duration::from_secs(seconds))
}

fn claim_request(worker: &str, seconds: u64) -> ClaimRequest {
    ClaimRequest {
        types: Vec::new(),
        lease: lease(seconds),
        worker_id: Some(worker.into()),
    }
}

fn completion(id: Uuid, attempt: i32, result: &str) -> StatusUpdate {
    let mut update = StatusUpdate::new(id, TaskStatus::Completed);
    update.result_id = Some(result.into());
    update.expected_attempt = Some(attempt);
    update
}

/// `n` tasks of `task_type` for `user`, created by 8 concurrent callers.
async fn create_many(
    service: &Arc<impl TaskService + 'static>,
    user: &CurrentUser,
    task_type: &str,
    n: usize,
) -> Vec<Uuid> {
    let per = n.div_ceil(CLAIMERS);
    let creators: Vec<_> = (0..CLAIMERS)
        .map(|c| {
            let (service, user, task_type) = (service.clone(), user.clone(), task_type.to_owned());
            let count = per.min(n.saturating_sub(c * per));
            tokio::spawn(async move {
                let mut ids = Vec::with_capacity(count);
                for _ in 0..count {
                    ids.push(new_task(service.as_ref(), &user, &task_type).await.id);
                }
                ids
            })
        })
        .collect();
    let mut ids = Vec::with_capacity(n);
    for creator in creators {
        ids.extend(creator.await.expect("creator"));
    }
    assert_eq!(ids.len(), n);
    ids
}

fn gql_id(task: &Value) -> Uuid {
    Uuid::parse_str(task["id"].as_str().expect("id")).expect("uuid id")
}

async fn create_via_api(app: &TestApp, token: &str, input: Value) -> Value {
    app.create_task(token, input, "id type status attempts")
        .await
}
