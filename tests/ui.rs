//! The dashboard at /ui: its page and assets as served, and the page itself
//! in a real headless browser (Debian's Chromium, driven by playwright-core
//! from tests/browser) following the server live.
mod common;

use std::process::Stdio;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[tokio::test]
async fn the_page_and_its_assets_are_served_from_the_binary() {
    let app = spawn_app().await;
    let page = app.get("/ui").await;
    assert_eq!(page.status(), 200);
    let header = |name: &str| {
        page.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    assert!(header("content-type").starts_with("text/html"));
    assert_eq!(header("cache-control"), "no-cache");
    let policy = header("content-security-policy");
    assert!(policy.contains("script-src 'self'") && policy.contains("connect-src 'self'"));
    let html = page.text().await.unwrap();
    let script = html
        .split("src=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a script tag")
        .to_owned();
    assert!(script.starts_with("/ui/assets/app.js?v="), "{script}");

    let mut bodies = vec![html];
    for (path, content_type) in [
        (script.as_str(), "text/javascript"),
        ("/ui/assets/app.css", "text/css"),
    ] {
        let asset = app.get(path).await;
        assert_eq!(asset.status(), 200, "{path}");
        let headers = asset.headers().clone();
        assert!(
            headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with(content_type)
        );
        assert_eq!(headers["cache-control"], "public, max-age=86400");
        bodies.push(asset.text().await.unwrap());
    }
    assert_eq!(app.get("/ui/assets/nope.js").await.status(), 404);
    assert_eq!(app.get("/ui/assets/..%2Fhttp.rs").await.status(), 404);
    // Nothing in the page points anywhere else (the SVG namespace is a name, not a request).
    for body in &bodies {
        let elsewhere = body
            .replace("http://www.w3.org/2000/svg", "")
            .contains("://");
        assert!(!elsewhere, "the page refers to another host");
    }
}

/// A token whose `exp` passed an hour ago.
fn expired_token() -> String {
    let now = chrono::Utc::now().timestamp();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({ "sub": "alice", "exp": now - 3600, "iat": now - 7200 }),
        &jsonwebtoken::EncodingKey::from_secret(TEST_SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn the_dashboard_follows_the_server_live_in_a_browser() {
    let Some(chromium) = js::chromium_or_skip("the_dashboard_follows_the_server_live_in_a_browser")
    else {
        return;
    };
    let script = js::npm_package("tests/browser").join("ui.mjs");
    let mut app = spawn_app().await;
    let address = app.base.trim_start_matches("http://").to_owned();
    let database = app.database.clone();
    // UPDATE_SCREENSHOTS=1 writes the screenshots into docs/ (for the README).
    let keep = std::env::var("UPDATE_SCREENSHOTS").is_ok_and(|v| v == "1");
    let temp = tempfile::tempdir().unwrap();
    let shots = if keep {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs")
    } else {
        temp.path().to_owned()
    };
    let users = json!({
        "alice": app.user_token("alice"),
        "bob": app.user_token("bob"),
        "carol": app.user_token("carol"),
    });
    let mut node = tokio::process::Command::new("node")
        .arg(&script)
        .env("TASKQL_URL", &app.base)
        .env("TASKQL_WORKER_TOKEN", app.worker_token())
        .env("TASKQL_USER_TOKENS", users.to_string())
        .env("TASKQL_EXPIRED_TOKEN", expired_token())
        .env("CHROMIUM", &chromium)
        .env("SCREENSHOT_DIR", &shots)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let mut to_node = node.stdin.take().unwrap();
    let mut from_node = BufReader::new(node.stdout.take().unwrap()).lines();
    let mut last = String::new();
    let deadline = std::time::Duration::from_secs(240);
    let conversation = async {
        while let Some(line) = from_node.next_line().await.unwrap() {
            match line.as_str() {
                // The server goes away (as on SIGTERM: websockets close) …
                "stop" => app.stop().await,
                // … and comes back where it was, on the same database.
                "start" => app = spawn_app_at(database.clone(), &address).await,
                _ => {
                    last = line;
                    continue;
                }
            }
            to_node
                .write_all(format!("{line} done\n").as_bytes())
                .await
                .unwrap();
        }
    };
    tokio::time::timeout(deadline, conversation)
        .await
        .expect("the browser test finishes");
    let output = node.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let result: Value = serde_json::from_str(&last)
        .unwrap_or_else(|e| panic!("no result from the browser ({e}): {last}\n{stderr}"));
    assert!(result["error"].is_null(), "{result:#}\n{stderr}");

    assert_eq!(
        result["fragmentCleared"], true,
        "the token leaves the address bar"
    );
    assert!(
        result["who"].as_str().unwrap().contains("worker"),
        "{result:#}"
    );
    assert!(
        result["emptyMessage"]
            .as_str()
            .unwrap()
            .starts_with("No tasks yet")
    );
    assert_eq!(result["emptyOldest"], "nothing is pending");
    assert_eq!(result["listAfterCreates"].as_array().unwrap().len(), 6);
    assert_eq!(
        result["userColumn"], true,
        "a worker sees whose tasks they are"
    );
    assert!(result["workersTable"].as_str().unwrap().contains("gpu-1"));
    assert_eq!(
        result["retried"]["task"],
        json!({ "status": "PENDING", "attempts": 1, "errorMessage": null }),
        "a retry keeps the attempts (the fencing number)"
    );
    let retried = result["retriedFields"].as_str().unwrap();
    assert!(
        retried.contains("in line#") && retried.contains("of its type"),
        "a retried task is back in its type's line: {retried}"
    );
    let refusal = result["refusal"].as_str().unwrap();
    assert!(
        refusal.contains("CONFLICT") && refusal.contains("PENDING"),
        "{refusal}"
    );
    assert_eq!(result["cancelled"]["task"]["status"], "CANCELLED");
    assert_eq!(result["filteredCancelled"].as_array().unwrap().len(), 1);
    assert_eq!(
        result["counts"],
        json!({ "PENDING": "3", "PROCESSING": "1", "COMPLETED": "1", "FAILED": "0", "CANCELLED": "1" })
    );

    // Alice's page: her tasks only, before and after a live change.
    let alices: Vec<&Value> = result["alices"].as_array().unwrap().iter().collect();
    let mut shown: Vec<&Value> = result["userRowsAfter"].as_array().unwrap().iter().collect();
    shown.sort_by_key(|v| v.as_str());
    let mut expected = alices.clone();
    expected.sort_by_key(|v| v.as_str());
    assert_eq!(shown, expected, "alice sees exactly her own tasks");
    assert_eq!(result["userRows"].as_array().unwrap().len(), 3);
    assert_eq!(result["userColumnForUser"], false);
    assert!(!result["userWho"].as_str().unwrap().contains("worker"));

    assert!(
        result["expiredNotice"]
            .as_str()
            .unwrap()
            .contains("not accepted"),
        "{result:#}"
    );
    assert_eq!(result["expiredConn"], "expired");
    assert!(
        result["awayNotice"]
            .as_str()
            .unwrap()
            .contains("does not answer")
    );
    assert!(result["afterRestart"].is_string());
    assert_eq!(
        result["chainWaiting"], "0 of 1 before it completed; waits for 1",
        "{result:#}"
    );
    assert!(
        result["chainBefore"].as_str().unwrap().contains("PENDING"),
        "{result:#}"
    );
    assert!(
        result["chainResult"]
            .as_str()
            .unwrap()
            .contains("\"frames\": 240"),
        "{result:#}"
    );
    assert!(
        result["chainAfter"]
            .as_str()
            .unwrap()
            .contains("video.encode"),
        "{result:#}"
    );
    assert_eq!(result["chainDone"], "1 of 1 before it completed");
    assert!(
        result["firstSubscribeAfter"].is_null(),
        "the first subscription starts from now: {result:#}"
    );
    assert!(
        result["resumedAfter"]
            .as_str()
            .is_some_and(|c| !c.is_empty()),
        "after the restart the page resumes taskEvents from its last cursor: {result:#}"
    );
    assert_eq!(
        result["listReadsOnResume"], 0,
        "a resumed stream replays what changed; the page does not reload the list: {result:#}"
    );
    assert_eq!(
        result["externalRequests"],
        json!([]),
        "the page loads nothing from elsewhere"
    );
    assert_eq!(result["consoleErrors"], json!([]), "{result:#}");
}
