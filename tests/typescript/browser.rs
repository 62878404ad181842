//! The client bundled for the browser, in headless Chromium (Debian's), on a
//! page of another origin: createTask and task through it, and a watch to
//! COMPLETED over Server-Sent Events and over websockets; and `useTask` of
//! `@taskql/client/react` in a React page.

use serde_json::json;

use crate::SCRIPT_TIMEOUT;
use crate::common::js::chromium_or_skip;
use crate::common::{spawn_app, token_for};
use crate::package::{Script, node_or_skip};

#[tokio::test]
async fn in_chromium_the_client_creates_reads_and_watches_a_task_to_completed() {
    let test = "in_chromium_the_client_creates_reads_and_watches_a_task_to_completed";
    if node_or_skip(test).is_none() {
        return;
    }
    let Some(chromium) = chromium_or_skip(test) else {
        return;
    };
    let app = spawn_app().await;
    let user = token_for("alice", None);
    let worker = token_for("worker-1", Some("service_role"));
    let script = Script::start(
        "browser.mjs",
        &[
            ("TASKQL_URL", &app.base),
            ("TASKQL_USER_TOKEN", &user),
            ("TASKQL_WORKER_TOKEN", &worker),
            ("CHROMIUM", chromium.to_str().expect("a UTF-8 path")),
        ],
    );
    let report = script.report(SCRIPT_TIMEOUT).await;
    // The page is on its own origin, not the server's.
    let origin = report["origin"].as_str().expect("an origin");
    assert!(origin.starts_with("http://localhost:"), "{report}");
    assert!(!app.base.starts_with(origin), "{report}");
    for transport in ["sse", "ws"] {
        let seen = &report["transports"][transport];
        let id = seen["created"]["id"].as_str().expect("an id");
        assert_eq!(
            seen["created"],
            json!({ "id": id, "status": "PENDING", "type": "image.generate" })
        );
        assert_eq!(
            seen["read"],
            json!({ "id": id, "status": "PENDING", "metadata": { "prompt": transport } })
        );
        assert_eq!(
            seen["final"],
            json!({ "id": id, "status": "COMPLETED", "resultId": format!("concept-{transport}") })
        );
        let states = seen["states"].as_array().expect("states");
        assert_eq!(states.first(), Some(&json!("PENDING")), "{seen}");
        assert_eq!(states.last(), Some(&json!("COMPLETED")), "{seen}");
        // The server's own record agrees.
        let task = app
            .gql(
                Some(&user),
                "query($id: ID!) { task(id: $id) { status resultId } }",
                json!({ "id": id }),
            )
            .await;
        assert_eq!(
            task["data"]["task"],
            json!({ "status": "COMPLETED", "resultId": format!("concept-{transport}") })
        );
    }
    assert_eq!(
        report["missing"],
        json!({ "thrown": true, "code": "NOT_FOUND", "isTaskqlError": true })
    );
    // useTask in a React page follows a task to its final state, and
    // shows the code of a task that does not exist.
    assert_eq!(
        report["react"],
        json!({
            "pending": "PENDING",
            "processing": "PROCESSING",
            "completed": "COMPLETED final",
            "missing": "error NOT_FOUND",
        })
    );
    assert_eq!(report["pageErrors"], json!([]), "{report}");
}
