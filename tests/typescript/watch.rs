//! `watchTask` across a killed server: it resolves with the final state that
//! was reached while no server ran.

use taskql::service::{StatusUpdate, TaskService};

use crate::common::edge::server::Server;
use crate::common::{TestDb, as_worker, token_for};
use crate::package::{Script, node_or_skip};
use crate::{SCRIPT_TIMEOUT, assert_reconnected_with_a_fresh_token};

async fn watch_completes_across_a_server_kill(test: &str, transport: &str) {
    if node_or_skip(test).is_none() {
        return;
    }
    let db = TestDb::new().await;
    let mut server = Server::start(&db.url, &[]).await;
    let token = token_for("alice", None);
    let mut script = Script::start(
        "watch_restart.mjs",
        &[
            ("TASKQL_URL", &server.base),
            ("TASKQL_USER_TOKEN", &token),
            ("TASKQL_TRANSPORT", transport),
        ],
    );
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
}

#[tokio::test]
async fn watch_task_over_sse_resolves_completed_across_a_server_kill() {
    watch_completes_across_a_server_kill(
        "watch_task_over_sse_resolves_completed_across_a_server_kill",
        "sse",
    )
    .await;
}

#[tokio::test]
async fn watch_task_over_websockets_resolves_completed_across_a_server_kill() {
    watch_completes_across_a_server_kill(
        "watch_task_over_websockets_resolves_completed_across_a_server_kill",
        "ws",
    )
    .await;
}
