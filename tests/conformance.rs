//! taskql against clients nobody here wrote: graphql-http's GraphQL-over-HTTP
//! audit suite, and urql set up as its docs say (queries over GET when they
//! fit in a URL, subscriptions over `graphql-ws`). Both run from tests/js,
//! which installs itself on first use.
mod common;

use std::process::Stdio;
use std::time::Duration;

use common::spawn_app;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

/// GraphQL-over-HTTP audits that taskql knowingly fails, by audit id, each
/// with why. Only MAY audits may be listed: a MUST or SHOULD failure always
/// fails the test.
const ALLOWED_MAY_FAILURES: &[(&str, &str)] = &[];

const NODE_TIMEOUT: Duration = Duration::from_secs(90);

/// Runs a script of tests/js to its end and parses the one JSON line it prints.
async fn run_node(command: tokio::process::Command) -> Value {
    let mut command = command;
    let run = command.kill_on_drop(true).output();
    let output = tokio::time::timeout(NODE_TIMEOUT, run)
        .await
        .expect("the node script finishes")
        .expect("node runs (Node.js 20 must be installed)");
    parse_report(
        &output.stdout,
        &String::from_utf8_lossy(&output.stderr),
        output.status,
    )
}

fn parse_report(stdout: &[u8], stderr: &str, status: std::process::ExitStatus) -> Value {
    let stdout = String::from_utf8_lossy(stdout);
    assert!(
        status.success(),
        "node failed ({status}): {stderr}\n{stdout}"
    );
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("node printed no JSON ({e}): {stdout}\n{stderr}"))
}

#[tokio::test]
async fn the_graphql_over_http_audits_find_no_must_or_should_failure() {
    let js = common::js::npm_package("tests/js");
    let app = spawn_app().await;
    let mut command = tokio::process::Command::new("node");
    command
        .arg(js.join("http_audit.mjs"))
        .env("TASKQL_URL", &app.base)
        .env("TASKQL_TOKEN", app.user_token("alice"));
    let report = run_node(command).await;
    eprintln!(
        "graphql-http audits: {} passed, {} failed",
        report["passed"], report["failed"]
    );
    assert!(
        report["passed"].as_u64().is_some_and(|n| n > 0),
        "no audit ran: {report}"
    );

    let failures = report["failures"].as_array().expect("a list of failures");
    let failing_ids: Vec<&str> = failures.iter().filter_map(|f| f["id"].as_str()).collect();
    let unexpected: Vec<String> = failures
        .iter()
        .filter(|f| {
            f["level"] != "MAY" || !ALLOWED_MAY_FAILURES.iter().any(|(id, _)| f["id"] == *id)
        })
        .map(|f| {
            let text = |key: &str| f[key].as_str().unwrap_or("?").to_owned();
            format!(
                "{} {}: {} ({})",
                text("id"),
                text("level"),
                text("reason"),
                text("name")
            )
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "{} audits fail that may not:\n{}",
        unexpected.len(),
        unexpected.join("\n")
    );
    // An allowance the server no longer needs goes, so the list stays true.
    let passing_but_allowed: Vec<&str> = ALLOWED_MAY_FAILURES
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !failing_ids.contains(id))
        .collect();
    assert!(
        passing_but_allowed.is_empty(),
        "these audits pass now: remove them from ALLOWED_MAY_FAILURES: {passing_but_allowed:?}"
    );
}

#[tokio::test]
async fn urql_queries_a_task_and_follows_it_to_completion() {
    let js = common::js::npm_package("tests/js");
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let created = app
        .gql(
            Some(&alice),
            "mutation($input: CreateTaskInput!) { createTask(input: $input) { id } }",
            json!({ "input": { "type": "urql.render", "metadata": { "prompt": "a fox" } } }),
        )
        .await;
    let id = created["data"]["createTask"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no task: {created}"))
        .to_owned();

    let mut child = tokio::process::Command::new("node")
        .arg(js.join("urql_client.mjs"))
        .env("TASKQL_URL", &app.base)
        .env("TASKQL_WS_URL", &app.ws_url)
        .env("TASKQL_TOKEN", &alice)
        .env("TASKQL_TASK_ID", &id)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs (Node.js 20 must be installed)");
    // The script says `ready` on stderr once its subscription holds the
    // first state; anything else it writes there is kept for the failure.
    let mut stderr = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
    let mut diagnostics = String::new();
    let ready = tokio::time::timeout(NODE_TIMEOUT, async {
        while let Ok(Some(line)) = stderr.next_line().await {
            if line == "ready" {
                return true;
            }
            diagnostics.push_str(&line);
            diagnostics.push('\n');
        }
        false
    })
    .await
    .unwrap_or(false);
    if ready {
        complete_as_worker(&app, &id).await;
    }
    let rest_of_stderr = tokio::spawn(async move {
        let mut rest = String::new();
        while let Ok(Some(line)) = stderr.next_line().await {
            rest.push_str(&line);
            rest.push('\n');
        }
        rest
    });
    let output = tokio::time::timeout(NODE_TIMEOUT, child.wait_with_output())
        .await
        .expect("the node script finishes")
        .expect("node ran");
    diagnostics.push_str(&rest_of_stderr.await.unwrap_or_default());
    let report = parse_report(&output.stdout, &diagnostics, output.status);

    let query = &report["query"];
    assert!(query["error"].is_null(), "the query failed: {report:#}");
    assert_eq!(query["data"]["task"]["id"], id.as_str(), "{report:#}");
    assert_eq!(query["data"]["task"]["status"], "PENDING", "{report:#}");
    assert!(report["failure"].is_null(), "{report:#}");
    let seen = &report["subscription"];
    assert_eq!(
        seen["statuses"],
        json!(["PENDING", "PROCESSING", "COMPLETED"]),
        "{report:#}"
    );
    assert_eq!(seen["last"]["id"], id.as_str(), "{report:#}");
    assert_eq!(seen["last"]["resultId"], "concept-urql", "{report:#}");
    assert_eq!(seen["errors"], json!([]), "{report:#}");
    assert_eq!(
        seen["completed"], true,
        "the server ends the subscription after COMPLETED: {report:#}"
    );
}

/// Claims the task and completes it over HTTP, as a worker does.
async fn complete_as_worker(app: &common::TestApp, id: &str) {
    let worker = app.worker_token();
    let claimed = app
        .gql(
            Some(&worker),
            r#"mutation { claimTask(types: ["urql.render"], workerId: "urql-test") { id attempts } }"#,
            json!({}),
        )
        .await;
    assert_eq!(claimed["data"]["claimTask"]["id"], id, "{claimed}");
    let completed = app
        .gql(
            Some(&worker),
            "mutation($input: UpdateTaskStatusInput!) { updateTaskStatus(input: $input) { status } }",
            json!({ "input": {
                "id": id,
                "status": "COMPLETED",
                "resultId": "concept-urql",
                "expectedAttempt": claimed["data"]["claimTask"]["attempts"],
            } }),
        )
        .await;
    assert_eq!(
        completed["data"]["updateTaskStatus"]["status"], "COMPLETED",
        "{completed}"
    );
}

#[test]
fn every_allowed_audit_failure_says_why() {
    for (id, reason) in ALLOWED_MAY_FAILURES {
        assert!(
            !id.is_empty() && !reason.trim().is_empty() && !reason.contains('\n'),
            "{id}: give one line of reason: {reason:?}"
        );
    }
}

/// What introspection tells a client is what schema.graphql says: no
/// description of the engine's own, `@specifiedBy` on DateTime.
#[tokio::test]
async fn introspection_describes_the_schema_in_schema_graphql() {
    let js = common::js::npm_package("tests/js");
    let app = spawn_app().await;
    let mut command = tokio::process::Command::new("node");
    command
        .arg(js.join("schema_check.mjs"))
        .env("TASKQL_URL", &app.base)
        .env("TASKQL_TOKEN", app.user_token("alice"))
        .env(
            "SCHEMA_FILE",
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schema.graphql"),
        );
    let report = run_node(command).await;
    assert_eq!(
        report["equal"],
        json!(true),
        "introspection:\n{}\nschema.graphql:\n{}\n{report}",
        report["introspected"].as_str().unwrap_or_default(),
        report["file"].as_str().unwrap_or_default()
    );
}
