//! `watchTask` across a killed server, in Node and in headless Chromium: it
//! resolves with the final state that was reached while no server ran.

use taskql::service::{StatusUpdate, TaskService};

use crate::common::edge::server::Server;
use crate::common::{TestDb, as_worker, token_for};
use crate::{Runtime, SCRIPT_TIMEOUT, assert_reconnected_with_a_fresh_token};

async fn watch_completes_across_a_server_kill(test: &str, transport: &str, runtime: Runtime) {
    let db = TestDb::new().await;
    let mut server = Server::start(&db.url, &[]).await;
    let token = token_for("alice", None);
    let env = [
        ("TASKQL_URL", server.base.as_str()),
        ("TASKQL_USER_TOKEN", token.as_str()),
        ("TASKQL_TRANSPORT", transport),
    ];
    let scripts = ("watch_restart.mjs", "browser_restart.mjs");
    let Some(mut script) = runtime.start(test, scripts, &env) else {
        return;
    };
    let ready = script.ready(SCRIPT_TIMEOUT).await;
    let id: uuid::Uuid = ready["id"]
        .as_str()
        .expect("an id")
        .parse()
        .expect("a uuid");

    crate::kill(&mut server).await;
    // With no server running, a worker's process (here the service on the
    // same database) takes the task and completes it.
    let (service, pool) = db.service().await;
    for update in [
        StatusUpdate {
            progress: Some(60),
            ..StatusUpdate::new(id, entity::TaskStatus::Processing)
        },
        StatusUpdate {
            result_id: Some("concept-after-kill".into()),
            ..StatusUpdate::new(id, entity::TaskStatus::Completed)
        },
    ] {
        service
            .update_task_status(&as_worker(), update)
            .await
            .expect("the update applies");
    }
    drop(service);
    pool.close().await;
    // Down a while: the client retries meanwhile.
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let _server = crate::restart_at(&db.url, &server).await;

    let report = script.report(SCRIPT_TIMEOUT).await;
    assert_eq!(
        report["final"],
        serde_json::json!({ "id": id.to_string(), "status": "COMPLETED", "resultId": "concept-after-kill" }),
        "{report}"
    );
    let states: Vec<&str> = report["states"]
        .as_array()
        .expect("states")
        .iter()
        .map(|s| s["status"].as_str().unwrap_or_default())
        .collect();
    // PROCESSING came and went while no server ran: the first state after
    // the reconnect is the final one, and nothing is given twice.
    assert_eq!(states, ["PENDING", "COMPLETED"], "{report}");
    assert_reconnected_with_a_fresh_token(&report);
    runtime.assert_page_was_clean(&report, &server.base);
}

#[tokio::test]
async fn watch_task_over_sse_resolves_completed_across_a_server_kill() {
    watch_completes_across_a_server_kill(
        "watch_task_over_sse_resolves_completed_across_a_server_kill",
        "sse",
        Runtime::Node,
    )
    .await;
}

#[tokio::test]
async fn watch_task_over_websockets_resolves_completed_across_a_server_kill() {
    watch_completes_across_a_server_kill(
        "watch_task_over_websockets_resolves_completed_across_a_server_kill",
        "ws",
        Runtime::Node,
    )
    .await;
}

#[tokio::test]
async fn in_chromium_watch_task_over_sse_resolves_completed_across_a_server_kill() {
    watch_completes_across_a_server_kill(
        "in_chromium_watch_task_over_sse_resolves_completed_across_a_server_kill",
        "sse",
        Runtime::Chromium,
    )
    .await;
}

#[tokio::test]
async fn in_chromium_watch_task_over_websockets_resolves_completed_across_a_server_kill() {
    watch_completes_across_a_server_kill(
        "in_chromium_watch_task_over_websockets_resolves_completed_across_a_server_kill",
        "ws",
        Runtime::Chromium,
    )
    .await;
}
