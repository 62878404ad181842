//! `tasks` pages and `allTasks` over them: every task once, newest first.

use serde_json::Value;

use crate::SCRIPT_TIMEOUT;
use crate::common::{spawn_app, token_for};
use crate::package::{Script, node_or_skip};

fn ids(value: &Value) -> Vec<String> {
    value
        .as_array()
        .expect("a list")
        .iter()
        .map(|id| id.as_str().expect("an id").to_owned())
        .collect()
}

#[tokio::test]
async fn tasks_pages_and_all_tasks_give_every_task_once_newest_first() {
    let test = "tasks_pages_and_all_tasks_give_every_task_once_newest_first";
    if node_or_skip(test).is_none() {
        return;
    }
    let app = spawn_app().await;
    let token = token_for("alice", None);
    let script = Script::start(
        "pages.mjs",
        &[("TASKQL_URL", &app.base), ("TASKQL_USER_TOKEN", &token)],
    );
    let report = script.report(SCRIPT_TIMEOUT).await;
    let newest_first: Vec<String> = ids(&report["created"]).into_iter().rev().collect();
    let pages = report["pages"].as_array().expect("pages");
    let sizes: Vec<usize> = pages.iter().map(|p| ids(&p["ids"]).len()).collect();
    assert_eq!(sizes, [10, 10, 3], "{report}");
    let more: Vec<bool> = pages
        .iter()
        .map(|p| p["hasNextPage"].as_bool().expect("a bool"))
        .collect();
    assert_eq!(more, [true, true, false], "{report}");
    let paged: Vec<String> = pages.iter().flat_map(|p| ids(&p["ids"])).collect();
    assert_eq!(paged, newest_first, "page after page, newest first");
    assert_eq!(ids(&report["all"]), newest_first, "allTasks: the same");
    let mut cancelled = ids(&report["cancelled"]);
    cancelled.reverse();
    assert_eq!(
        ids(&report["onlyCancelled"]),
        cancelled,
        "a status filter, pages of 2"
    );
}
