//! `/metrics` as a Prometheus user reads it: the series an operator
//! graphs, with values that follow what the server did, in a format
//! `promtool check metrics` accepts.
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{spawn_app, tool_or_skip};
use serde_json::json;

/// The value of the series `name{labels}` (labels as written, sorted as the
/// server writes them), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// promtool (Debian's `prometheus` package), or `None` after saying why the
/// check is skipped; with `CI` set a missing promtool fails instead.
fn promtool_or_skip(test: &str) -> Option<PathBuf> {
    tool_or_skip(
        test,
        "PROMTOOL",
        "/usr/bin/promtool",
        "apt-get install prometheus",
    )
}

#[tokio::test]
async fn metrics_follow_requests_tasks_and_connections() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let worker = app.worker_token();
    let create = "mutation { createTask(input: {type: \"metrics.test\"}) { id } }";
    let mut ids = Vec::new();
    for _ in 0..2 {
        let created = app.gql(Some(&alice), create, json!({})).await;
        ids.push(
            created["data"]["createTask"]["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let claimed = app
        .gql(
            Some(&worker),
            "mutation { claimTask(types: [\"metrics.test\"]) { id attempts } }",
            json!({}),
        )
        .await;
    let claimed_id = claimed["data"]["claimTask"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = app
        .gql(
            Some(&worker),
            "mutation($id: ID!) { updateTaskStatus(input: {id: $id, status: COMPLETED, resultId: \"r\"}) { status } }",
            json!({ "id": claimed_id }),
        )
        .await;
    assert_eq!(done["data"]["updateTaskStatus"]["status"], "COMPLETED");
    let pending = ids.iter().find(|id| **id != claimed_id).expect("one left");
    let cancelled = app
        .gql(
            Some(&alice),
            "mutation($id: ID!) { cancelTask(id: $id) { status } }",
            json!({ "id": pending }),
        )
        .await;
    assert_eq!(cancelled["data"]["cancelTask"]["status"], "CANCELLED");
    // An error of the client's and one of authentication.
    app.gql(Some(&alice), "{ nope }", json!({})).await;
    app.gql(None, "{ tasks { nodes { id } } }", json!({})).await;

    // A Prometheus server asks for OpenMetrics and gets it.
    let scrape = app
        .http
        .get(format!("{}/metrics", app.base))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .unwrap();
    let content_type = scrape.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(scrape.text().await.unwrap().ends_with("# EOF\n"));
    // Anyone else (curl, promtool) gets the classic text format.
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = response.text().await.unwrap();

    let ok_mutations = value(
        &text,
        "taskql_graphql_request_duration_seconds_count{operation_type=\"mutation\",outcome=\"ok\"}",
    );
    assert!(ok_mutations.is_some_and(|n| n >= 4.0), "{text}");
    for code in ["BAD_USER_INPUT", "UNAUTHENTICATED"] {
        let errors = value(
            &text,
            &format!("taskql_graphql_errors_total{{code=\"{code}\"}}"),
        );
        assert_eq!(errors, Some(1.0), "{code}: {text}");
    }
    for transition in ["claimed", "completed", "cancelled"] {
        let counted = value(
            &text,
            &format!(
                "taskql_task_transitions_total{{transition=\"{transition}\",type=\"metrics.test\"}}"
            ),
        );
        assert_eq!(counted, Some(1.0), "{transition}: {text}");
    }
    assert!(
        value(&text, "taskql_db_pool_max_connections").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(
        value(&text, "taskql_db_pool_acquires_total").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    for series in [
        "taskql_http_graphql_requests_total",
        "taskql_websocket_connections",
        "taskql_subscriptions",
        "taskql_listener_reconnects_total",
        "taskql_db_pool_in_use_connections",
        "taskql_db_pool_acquire_timeouts_total",
    ] {
        assert!(value(&text, series).is_some(), "{series}: {text}");
    }

    // The tasks-by-status gauge comes from the counters within a few seconds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let text = app.get("/metrics").await.text().await.unwrap();
        if value(&text, "taskql_tasks{status=\"completed\"}") == Some(1.0) {
            // Everything the shipped Grafana dashboard plots is there by now.
            assert_dashboard_plots_exported_series(&text);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no tasks{{status=\"completed\"}} 1 within 15 s: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }

    let Some(promtool) = promtool_or_skip("metrics_follow_requests_tasks_and_connections") else {
        return;
    };
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write the metrics");
    let output = check.wait_with_output().expect("promtool finishes");
    assert!(
        output.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Checks that every series the shipped Grafana dashboard plots is in `text`.
fn assert_dashboard_plots_exported_series(text: &str) {
    let exported: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut plotted = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if !word.starts_with("taskql_") {
                    continue;
                }
                let family = ["_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|suffix| word.strip_suffix(suffix))
                    .unwrap_or(word);
                assert!(
                    exported.contains(family),
                    "docs/grafana-dashboard.json plots {word}, which /metrics does not have:\n{text}"
                );
                plotted += 1;
            }
        }
    }
    assert!(plotted >= 10, "the dashboard plots {plotted} series");
}

/// One operation, sent over each transport, is answered, counted and
/// introspected alike: HTTP, Server-Sent Events, and both websocket
/// protocols.
#[tokio::test]
async fn every_transport_counts_and_answers_an_operation_alike() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let query = "{ __schema { description queryType { name } } }";
    let series =
        "taskql_graphql_request_duration_seconds_count{operation_type=\"query\",outcome=\"ok\"}";
    let count = || async {
        let text = app
            .get("/metrics")
            .await
            .text()
            .await
            .expect("metrics text");
        value(&text, series).unwrap_or(0.0)
    };

    let mut answers = Vec::new();
    let before = count().await;
    answers.push(("http", app.gql(Some(&alice), query, json!({})).await));
    let mut events = common::sse::EventStream::new(
        common::sse::post(&app, Some(&alice), &json!({ "query": query })).await,
    );
    match events.next_event().await {
        common::sse::Message::Next(payload) => answers.push(("sse", payload)),
        other => panic!("sse: {other:?}"),
    }
    for protocol in [common::ws::TRANSPORT_WS, common::ws::LEGACY_WS] {
        let mut client = common::ws::WsClient::open_with(&app.ws_url, protocol).await;
        client
            .init(json!({ "Authorization": format!("Bearer {alice}") }))
            .await;
        let mut operation = client.subscribe(query, json!({}));
        let data = operation.next_data().await;
        answers.push((protocol, json!({ "data": data })));
    }
    let after = count().await;

    for (transport, answer) in &answers {
        assert_eq!(
            answer["data"],
            json!({ "__schema": { "description": null, "queryType": { "name": "Query" } } }),
            "{transport}: {answer}"
        );
    }
    assert_eq!(after - before, 4.0, "one count per transport");
}

/// The maintenance room's passes run on their own, and each run is timed
/// under its name: the reaper returns an expired lease to the queue, and
/// every pass an operator would look for has run without failing.
#[tokio::test]
async fn maintenance_passes_run_and_are_timed() {
    let database = std::sync::Arc::new(common::TestDb::new().await);
    let on_postgres = database.is_postgres;
    let app = common::spawn_app_with(database, |settings| {
        settings.tasks.retention = Some(taskql::config::Retention(Some(
            std::time::Duration::from_secs(30 * 86_400),
        )));
    })
    .await;
    let alice = app.user_token("alice");
    let worker = app.worker_token();
    let created = app
        .gql(
            Some(&alice),
            "mutation { createTask(input: {type: \"upkeep.test\"}) { id } }",
            json!({}),
        )
        .await;
    let id = created["data"]["createTask"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let claimed = app
        .gql(
            Some(&worker),
            "mutation { claimTask(types: [\"upkeep.test\"], leaseSeconds: 1) { id } }",
            json!({}),
        )
        .await;
    assert_eq!(claimed["data"]["claimTask"]["id"], json!(id), "{claimed}");

    // Nobody calls anything now: only the reaper can give the task back.
    common::eventually(
        "the reaper requeues the expired lease",
        std::time::Duration::from_secs(10),
        || {
            let (app, alice, id) = (&app, &alice, &id);
            async move {
                let task = app
                    .gql(
                        Some(alice),
                        "query($id: ID!) { task(id: $id) { status } }",
                        json!({ "id": id }),
                    )
                    .await;
                (task["data"]["task"]["status"] == "PENDING").then_some(())
            }
        },
    )
    .await;

    let mut passes = vec![
        "lease reaper",
        "tasks gauge",
        "task retention",
        "change log retention",
        "taskStats minutes retention",
    ];
    if on_postgres {
        passes.push("count folding");
    }
    let text = app.get("/metrics").await.text().await.unwrap();
    for pass in &passes {
        let ok = format!(
            "taskql_maintenance_pass_duration_seconds_count{{pass=\"{pass}\",outcome=\"ok\"}}"
        );
        assert!(
            value(&text, &ok).is_some_and(|runs| runs >= 1.0),
            "{ok} in:\n{text}"
        );
        let failed = format!("{{pass=\"{pass}\",outcome=\"failed\"}}");
        assert!(!text.contains(&failed), "{pass} failed:\n{text}");
    }
    let requeued = "taskql_task_transitions_total{transition=\"requeued\",type=\"upkeep.test\"}";
    assert_eq!(value(&text, requeued), Some(1.0), "{text}");
}
