//! taskql against clients nobody here wrote: graphql-http's GraphQL-over-HTTP
//! audit suite, and urql set up as its docs say (queries over GET when they
//! fit in a URL, subscriptions over `graphql-ws`). Both run from tests/js,
//! which installs itself on first use.
mod common;

use std::time::Duration;

use common::js::{NodeOutput, NodeScript};
use common::spawn_app;
use serde_json::{Value, json};

/// GraphQL-over-HTTP audits that taskql knowingly fails, by audit id, each
/// with why. Only MAY audits may be listed: a MUST or SHOULD failure always
/// fails the test.
const ALLOWED_MAY_FAILURES: &[(&str, &str)] = &[];

const NODE_TIMEOUT: Duration = Duration::from_secs(90);

/// Runs a script of tests/js to its end and parses the one JSON line it
/// prints; the script must succeed.
async fn run_node(script: NodeScript) -> Value {
    parse_report(script.finish(NODE_TIMEOUT).await)
}

fn parse_report(output: NodeOutput) -> Value {
    assert!(
        output.status.success(),
        "node failed ({}): {}\n{}",
        output.status,
        output.diagnostics,
        output.stdout
    );
    output.report()
}

#[tokio::test]
async fn the_graphql_over_http_audits_find_no_must_or_should_failure() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let report = run_node(NodeScript::start(
        "http_audit.mjs",
        &[("TASKQL_URL", &app.base), ("TASKQL_TOKEN", &alice)],
    ))
    .await;
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

    let mut script = NodeScript::start(
        "urql_client.mjs",
        &[
            ("TASKQL_URL", &app.base),
            ("TASKQL_WS_URL", &app.ws_url),
            ("TASKQL_TOKEN", &alice),
            ("TASKQL_TASK_ID", &id),
        ],
    );
    // The script says `ready` on stderr once its subscription holds the
    // first state; anything else it writes there is kept for the failure.
    if script.ready(NODE_TIMEOUT).await {
        complete_as_worker(&app, &id).await;
    }
    let report = parse_report(script.finish(NODE_TIMEOUT).await);

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
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let schema_file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schema.graphql");
    let report = run_node(NodeScript::start(
        "schema_check.mjs",
        &[
            ("TASKQL_URL", &app.base),
            ("TASKQL_TOKEN", &alice),
            ("SCHEMA_FILE", schema_file.to_str().expect("a UTF-8 path")),
        ],
    ))
    .await;
    assert_eq!(
        report["equal"],
        json!(true),
        "introspection:\n{}\nschema.graphql:\n{}\n{report}",
        report["introspected"].as_str().unwrap_or_default(),
        report["file"].as_str().unwrap_or_default()
    );
}
