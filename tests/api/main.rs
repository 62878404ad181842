//! The GraphQL API over real HTTP: lifecycle, isolation, auth, roles, limits.
#[path = "../common/mod.rs"]
mod common;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

mod auth;
mod errors;
mod http;
mod lifecycle;
mod persisted;

const TASK_FIELDS: &str = "id type status resultId errorMessage metadata progress attempts createdAt updatedAt startedAt completedAt";

async fn create(app: &TestApp, token: &str, task_type: &str) -> Value {
    let input = json!({ "type": task_type, "metadata": { "prompt": "a red fox" } });
    app.create_task(token, input, TASK_FIELDS).await
}

async fn get(app: &TestApp, token: &str, id: &str) -> Value {
    app.gql(
        Some(token),
        &format!("query($id: ID!) {{ task(id: $id) {{ {TASK_FIELDS} }} }}"),
        json!({ "id": id }),
    )
    .await
}
