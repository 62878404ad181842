//! GraphiQL in a real headless browser (Debian's Chromium, driven by
//! playwright-core from tests/browser): sign in through the printed link,
//! create a task, and watch a subscription reach COMPLETED.
mod common;

use std::process::Command;

use common::*;
use taskql::service::TaskService;

#[tokio::test]
async fn graphiql_runs_queries_and_subscriptions_in_a_browser() {
    let Some(chromium) =
        js::chromium_or_skip("graphiql_runs_queries_and_subscriptions_in_a_browser")
    else {
        return;
    };
    let script = js::npm_package("tests/browser").join("graphiql.mjs");
    let app = spawn_app().await;
    let screenshot = tempfile::Builder::new().suffix(".png").tempfile().unwrap();
    let output = tokio::process::Command::from({
        let mut command = Command::new("node");
        command
            .arg(&script)
            .env("TASKQL_URL", &app.base)
            .env("TASKQL_TOKEN", app.user_token("grace"))
            .env("TASKQL_WORKER_TOKEN", app.worker_token())
            .env("CHROMIUM", &chromium)
            .env("SCREENSHOT", screenshot.path());
        command
    })
    .output()
    .await
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stdout.lines().last().unwrap_or_default();
    let result: serde_json::Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("no result from the browser ({e}): {stdout}\n{stderr}"));
    assert!(result["error"].is_null(), "{result:#}");
    assert_eq!(result["signedInAs"], "as grace");
    assert_eq!(
        result["fragmentCleared"], true,
        "the token leaves the address bar"
    );
    assert_eq!(
        result["externalRequests"],
        serde_json::json!([]),
        "GraphiQL loads nothing from elsewhere"
    );
    assert_eq!(result["created"]["data"]["createTask"]["status"], "PENDING");
    assert_eq!(
        result["firstSubscriptionResponse"]["data"]["taskUpdated"]["status"],
        "PENDING"
    );
    let last = &result["lastSubscriptionResponse"]["data"]["taskUpdated"];
    assert_eq!(last["status"], "COMPLETED", "{result:#}");
    assert_eq!(last["resultId"], "concept-from-browser");
    // The task the browser created belongs to the browser's user.
    let id = result["created"]["data"]["createTask"]["id"]
        .as_str()
        .unwrap();
    let task = app
        .service
        .get_task(
            id.parse().unwrap(),
            &taskql::auth::CurrentUser::user("grace"),
        )
        .await
        .unwrap();
    assert_eq!(task.metadata["from"], "graphiql");
}
