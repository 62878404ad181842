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

/// Claims the next task of `task_type` as the test worker: its id and attempt.
async fn claim(app: &TestApp, task_type: &str) -> (String, i64) {
    let body = app
        .gql(
            Some(&app.worker_token()),
            "mutation($types: [String!]) { claimTask(types: $types) { id attempts } }",
            json!({ "types": [task_type] }),
        )
        .await;
    let task = &data(body)["claimTask"];
    (id_of(task), task["attempts"].as_i64().expect("attempts"))
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
