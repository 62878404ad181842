//! Errors reach the client's user as `TaskqlError`s carrying the server's
//! `extensions.code`, and a pruned cursor is `CURSOR_EXPIRED`, said to the
//! caller rather than skipped; `stop()` ends a watch with an AbortError, and
//! a callback that throws ends its follower with that error.

use std::time::Duration;

use serde_json::{Value, json};

use crate::SCRIPT_TIMEOUT;
use crate::common::{spawn_app, token_for};
use crate::package::{Script, node_or_skip};

/// Asserts that `report[key]` is a TaskqlError with `code`.
fn assert_code(report: &Value, key: &str, code: &str) {
    let error = &report[key];
    assert_eq!(error["thrown"], true, "{key}: {report}");
    assert_eq!(error["code"], code, "{key}: {error}");
    assert_eq!(error["name"], "TaskqlError", "{key}: {error}");
    assert_eq!(error["isTaskqlError"], true, "{key}: {error}");
}

#[tokio::test]
async fn server_errors_are_typed_errors_with_their_code() {
    if node_or_skip("server_errors_are_typed_errors_with_their_code").is_none() {
        return;
    }
    let app = spawn_app().await;
    let token = token_for("alice", None);
    let script = Script::start(
        "errors.mjs",
        &[("TASKQL_URL", &app.base), ("TASKQL_USER_TOKEN", &token)],
    );
    let report = script.report(SCRIPT_TIMEOUT).await;
    for (key, code) in [
        ("missingTask", "NOT_FOUND"),
        ("notAnId", "BAD_USER_INPUT"),
        ("badType", "BAD_USER_INPUT"),
        ("cancelMissing", "NOT_FOUND"),
        ("anonymous", "UNAUTHENTICATED"),
        ("watchMissingSse", "NOT_FOUND"),
        ("watchMissingWs", "NOT_FOUND"),
        ("badCursor", "BAD_USER_INPUT"),
    ] {
        assert_code(&report, key, code);
    }
    assert_eq!(report["missingTask"]["instanceOf"], true, "{report}");
    assert_eq!(
        report["cancelled"],
        json!({ "status": "CANCELLED", "id": true })
    );
    let stopped = &report["stopped"];
    assert_eq!(stopped["thrown"], true, "{report}");
    assert_eq!(stopped["name"], "AbortError", "{report}");
    assert_eq!(stopped["states"], json!(["PENDING"]), "{report}");
    for transport in ["sse", "ws"] {
        let ended = &report[format!("throwingOnEvent_{transport}")];
        assert_eq!(
            ended,
            &json!({
                "message": format!("the caller's own {transport} error"),
                "calls": 1,
                "cursor": null,
                "probed": true,
            }),
            "an onEvent that throws ends the follower once, with its error"
        );
    }
}

#[tokio::test]
async fn a_pruned_cursor_is_cursor_expired_then_on_expired_goes_on_live() {
    let test = "a_pruned_cursor_is_cursor_expired_then_on_expired_goes_on_live";
    if node_or_skip(test).is_none() {
        return;
    }
    let app = spawn_app().await;
    let token = token_for("alice", None);
    let mut script = Script::start(
        "expired.mjs",
        &[("TASKQL_URL", &app.base), ("TASKQL_USER_TOKEN", &token)],
    );
    let ready = script.ready(SCRIPT_TIMEOUT).await;
    assert!(ready["cursor"].is_string(), "{ready}");
    // A newer event, then the log pruned past the script's cursor.
    app.create_task(&token, json!({ "type": "after.cursor" }), "id")
        .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let pruned = app
        .service
        .prune_events(Duration::from_millis(1))
        .await
        .expect("prune");
    assert!(pruned >= 2, "pruned {pruned}");
    script.say("go").await;
    let report = script.report(SCRIPT_TIMEOUT).await;

    assert_code(&report, "withoutOnExpired", "CURSOR_EXPIRED");
    let expiries = report["expiries"].as_array().expect("expiries");
    assert_eq!(expiries.len(), 1, "onExpired once: {report}");
    assert_eq!(expiries[0]["code"], "CURSOR_EXPIRED", "{report}");
    assert_eq!(report["liveAfterExpiry"], true, "{report}");
    assert_eq!(report["replayedOld"], false, "{report}");
    assert_eq!(report["stoppedDone"], "AbortError", "{report}");
}
