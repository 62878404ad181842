//! Pipelines and fair limits through the real router: a task's `result`
//! left by its completion, tasks that wait for others (`dependsOn`), and
//! caps per concurrency key and rate limits. On SQLite by default, on PostgreSQL when
//! `TASKQL_TEST_DATABASE_URL` is set.
#[path = "../common/mod.rs"]
mod common;

use common::*;
use serde_json::{Value, json};

mod dependencies;
mod keys;
mod racing;
mod rates;
mod results;

/// Claims the next task of `task_type` as worker `worker_id`: the task
/// (`id attempts type concurrencyKey`), or `None` when none is runnable.
async fn claim_as(app: &TestApp, task_type: &str, worker_id: &str) -> Option<Value> {
    let fields = "id attempts type concurrencyKey";
    let task = app
        .claim_task(json!([task_type]), None, worker_id, fields)
        .await;
    (!task.is_null()).then_some(task)
}

/// The id of the task a claim of `task_type` takes, if any.
async fn claimed_id(app: &TestApp, task_type: &str) -> Option<String> {
    claim_as(app, task_type, "w").await.map(|task| id_of(&task))
}

/// Claims the next task of `task_type` as the test worker: its id and attempt.
async fn claim(app: &TestApp, task_type: &str) -> (String, i64) {
    let task = claim_as(app, task_type, "w")
        .await
        .expect("a task to claim");
    (id_of(&task), task["attempts"].as_i64().expect("attempts"))
}

/// Completes attempt `attempt` of task `id` as the test worker, leaving
/// `result` (none when null).
async fn complete(app: &TestApp, id: &str, attempt: i64, result: Value) {
    let mut input = json!({"id": id, "status": "COMPLETED", "expectedAttempt": attempt});
    if !result.is_null() {
        input["result"] = result;
    }
    let done = app.update_status(input, "status").await;
    assert_eq!(
        data(done)["updateTaskStatus"]["status"],
        "COMPLETED",
        "{id}"
    );
}

/// Alice's new task of `task_type`: its id.
async fn create(app: &TestApp, task_type: &str) -> String {
    let task = app
        .create_task(&app.user_token("alice"), json!({ "type": task_type }), "id")
        .await;
    id_of(&task)
}

/// `task(id)` as the owner of `token`, with `fields`; the whole answer.
async fn read(app: &TestApp, token: &str, id: &str, fields: &str) -> Value {
    app.gql(
        Some(token),
        &format!("query($id: ID!) {{ task(id: $id) {{ {fields} }} }}"),
        json!({ "id": id }),
    )
    .await
}
