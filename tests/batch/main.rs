//! The batched mutations through the real router: `createTasks` (all or
//! nothing, input order, idempotency keys), `claimTasks` (the order, caps
//! and pauses of `claimTask`), `completeTasks` and `heartbeatTasks` (one
//! report's conflict leaves the others applied), under racing workers and
//! for callers who are not workers. On SQLite by default, on PostgreSQL when
//! `TASKQL_TEST_DATABASE_URL` is set.
#[path = "../common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::*;
use serde_json::{Value, json};

mod access;
mod claims;
mod creates;
mod racing;
mod reports;

const FIELDS: &str = "id type status metadata userId priority attempts progress resultId \
                      workerId leaseExpiresAt runAt updatedAt completedAt";

/// A batched mutation's document: `head`, then `{ FIELDS }` of its
/// tasks, or of its reports' tasks when `reports`.
fn document(head: &str, reports: bool) -> String {
    if reports {
        format!("mutation{head} {{ id error {{ code message }} task {{ {FIELDS} }} }} }}")
    } else {
        format!("mutation{head} {{ {FIELDS} }} }}")
    }
}

/// `createTasks` as the owner of `token`; the whole answer.
async fn try_create_tasks(app: &TestApp, token: &str, inputs: &[Value]) -> Value {
    let query = document(
        "($inputs: [CreateTaskInput!]!) { createTasks(inputs: $inputs)",
        false,
    );
    app.gql(Some(token), &query, json!({ "inputs": inputs }))
        .await
}

/// `createTasks` as the owner of `token`: the tasks, in input order.
async fn create_tasks(app: &TestApp, token: &str, inputs: &[Value]) -> Vec<Value> {
    list(
        data(try_create_tasks(app, token, inputs).await),
        "createTasks",
    )
}

/// `claimTasks` with every variable: types, limit, lease and worker.
fn claim_document() -> String {
    document(
        "($types: [String!], $limit: Int!, $lease: Int, $worker: String) \
         { claimTasks(types: $types, limit: $limit, leaseSeconds: $lease, workerId: $worker)",
        false,
    )
}

/// `claimTasks` with `token`, a 60 s lease and worker id "w"; the whole answer.
async fn try_claim_tasks(app: &TestApp, token: &str, types: Value, limit: i64) -> Value {
    let variables = json!({ "types": types, "limit": limit, "lease": 60, "worker": "w" });
    app.gql(Some(token), &claim_document(), variables).await
}

/// `claimTasks` as a worker named `worker_id` with a `lease` of seconds: the tasks.
async fn claim_tasks_as(
    app: &TestApp,
    types: Value,
    limit: i64,
    lease: i64,
    worker_id: &str,
) -> Vec<Value> {
    let variables = json!({ "types": types, "limit": limit, "lease": lease, "worker": worker_id });
    let body = app
        .gql(Some(&app.worker_token()), &claim_document(), variables)
        .await;
    list(data(body), "claimTasks")
}

/// `claimTasks` as worker "w" with a 60 s lease: the tasks.
async fn claim_tasks(app: &TestApp, types: Value, limit: i64) -> Vec<Value> {
    claim_tasks_as(app, types, limit, 60, "w").await
}

/// `completeTasks` with `token`; the whole answer.
async fn try_complete_tasks(app: &TestApp, token: &str, input: &[Value]) -> Value {
    let query = document(
        "($input: [CompleteTaskInput!]!) { completeTasks(input: $input)",
        true,
    );
    app.gql(Some(token), &query, json!({ "input": input }))
        .await
}

/// `completeTasks` as a worker: the reports, in input order.
async fn complete_tasks(app: &TestApp, input: &[Value]) -> Vec<Value> {
    let body = try_complete_tasks(app, &app.worker_token(), input).await;
    list(data(body), "completeTasks")
}

/// `heartbeatTasks` with `token` and `lease`; the whole answer.
async fn try_heartbeat_tasks(
    app: &TestApp,
    token: &str,
    input: &[Value],
    lease: Option<i64>,
) -> Value {
    let query = document(
        "($input: [HeartbeatTaskInput!]!, $lease: Int) \
         { heartbeatTasks(input: $input, leaseSeconds: $lease)",
        true,
    );
    app.gql(
        Some(token),
        &query,
        json!({ "input": input, "lease": lease }),
    )
    .await
}

/// `heartbeatTasks` as a worker: the reports, in input order.
async fn heartbeat_tasks(app: &TestApp, input: &[Value], lease: Option<i64>) -> Vec<Value> {
    let body = try_heartbeat_tasks(app, &app.worker_token(), input, lease).await;
    list(data(body), "heartbeatTasks")
}

/// The list `field` of a GraphQL `data`.
fn list(data: Value, field: &str) -> Vec<Value> {
    data[field]
        .as_array()
        .unwrap_or_else(|| panic!("{field} is a list: {data}"))
        .clone()
}

/// The completion of a claimed task, fenced by the attempt its claim returned.
fn completion(task: &Value) -> Value {
    json!({
        "id": task["id"],
        "expectedAttempt": task["attempts"],
        "resultId": format!("r-{}", id_of(task)),
    })
}

/// The `extensions.index` of the first error, if any.
fn error_index(body: &Value) -> Option<u64> {
    body["errors"][0]["extensions"]["index"].as_u64()
}

/// A whole answer is one error with `code` naming input `index`.
fn assert_refused_at(body: &Value, code: &str, index: u64, what: &str) {
    assert_eq!(
        (error_code(body), error_index(body)),
        (Some(code), Some(index)),
        "{what}: {body}"
    );
    assert!(body["data"].is_null(), "{what}: no data: {body}");
}

/// The `error.code` of a report, or `None` for a report that applied.
fn report_code(report: &Value) -> Option<&str> {
    report["error"]["code"].as_str()
}

/// The task as a worker sees it.
async fn task_of(app: &TestApp, id: &str) -> Value {
    let query = format!("query($id: ID!) {{ task(id: $id) {{ {FIELDS} }} }}");
    let body = app
        .gql(Some(&app.worker_token()), &query, json!({ "id": id }))
        .await;
    data(body)["task"].clone()
}

/// `cancelTask` as the owner of `token`: the task's new status.
async fn cancel(app: &TestApp, token: &str, id: &str) -> Value {
    let query = "mutation($id: ID!) { cancelTask(id: $id) { status } }";
    data(app.gql(Some(token), query, json!({ "id": id })).await)["cancelTask"]["status"].clone()
}

/// `setTaskTypePolicy` as a worker.
async fn set_policy(app: &TestApp, task_type: &str, policy: Value) {
    let query = "mutation($type: String!, $policy: TaskTypePolicyInput!) {
      setTaskTypePolicy(type: $type, policy: $policy) { type }
    }";
    let variables = json!({ "type": task_type, "policy": policy });
    data(app.gql(Some(&app.worker_token()), query, variables).await);
}

/// Lets `task_type` be claimed again at once after a retryable failure.
async fn retry_at_once(app: &TestApp, task_type: &str) {
    let backoff = json!({ "initialSeconds": 0, "factor": 1, "maxSeconds": 0, "jitter": false });
    set_policy(app, task_type, json!({ "backoff": backoff })).await;
}

/// Fails `task` (claimed, of a type under `retry_at_once`) retryably and
/// claims it again: its new claim, on the next attempt. Its first worker's
/// attempt is stale from then on.
async fn claim_again(app: &TestApp, task: &Value) -> Value {
    let input = json!({
        "id": task["id"], "status": "FAILED", "errorMessage": "try again",
        "expectedAttempt": task["attempts"], "retryable": true,
    });
    let failed = data(app.update_status(input, "status").await);
    assert_eq!(failed["updateTaskStatus"]["status"], "PENDING");
    let again = claim_tasks_as(app, json!([task["type"]]), 1, 60, "w2").await;
    assert_eq!(again.len(), 1, "the failed task is claimable again");
    assert_eq!(again[0]["id"], task["id"]);
    assert_eq!(
        again[0]["attempts"].as_i64(),
        task["attempts"].as_i64().map(|a| a + 1)
    );
    again[0].clone()
}

/// Inputs of `n` tasks of `task_type`, labelled `{prefix}-{i}` in their metadata.
fn inputs(task_type: &str, prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({ "type": task_type, "metadata": { "label": format!("{prefix}-{i}") } }))
        .collect()
}

/// The ids of `tasks`.
fn ids(tasks: &[Value]) -> Vec<String> {
    tasks.iter().map(id_of).collect()
}
