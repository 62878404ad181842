//! Who may call the batches: anyone signed in creates; only workers claim
//! and report.

use super::*;

#[tokio::test]
async fn a_user_token_is_forbidden_to_claim_complete_or_heartbeat_in_batches() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let created = create_tasks(&app, &alice, &inputs("image", "mine", 2)).await;

    let body = try_claim_tasks(&app, &alice, json!(null), 2).await;
    assert_eq!(error_code(&body), Some("FORBIDDEN"), "claimTasks: {body}");
    assert_eq!(
        task_of(&app, &id_of(&created[0])).await,
        created[0],
        "not claimed"
    );

    let claimed = claim_tasks(&app, json!(null), 2).await;
    assert_eq!(ids(&claimed), ids(&created));
    let completions: Vec<Value> = claimed.iter().map(completion).collect();
    let body = try_complete_tasks(&app, &alice, &completions).await;
    assert_eq!(
        error_code(&body),
        Some("FORBIDDEN"),
        "completeTasks: {body}"
    );
    let beats: Vec<Value> = claimed
        .iter()
        .map(|t| json!({ "id": t["id"], "expectedAttempt": 1, "progress": 70 }))
        .collect();
    let body = try_heartbeat_tasks(&app, &alice, &beats, Some(600)).await;
    assert_eq!(
        error_code(&body),
        Some("FORBIDDEN"),
        "heartbeatTasks: {body}"
    );
    for task in &claimed {
        assert_eq!(task_of(&app, &id_of(task)).await, *task, "untouched");
    }

    // A worker's own creates are its own.
    let workers = create_tasks(&app, &app.worker_token(), &inputs("image", "w", 1)).await;
    assert_eq!(workers[0]["userId"], "worker-1");
}

#[tokio::test]
async fn without_a_token_every_batch_is_unauthenticated() {
    let app = spawn_app().await;
    let id = uuid::Uuid::now_v7().to_string();
    let calls = [
        (
            "createTasks",
            "mutation { createTasks(inputs: [{ type: \"image\" }]) { id } }".to_owned(),
        ),
        (
            "claimTasks",
            "mutation { claimTasks(limit: 1) { id } }".to_owned(),
        ),
        (
            "completeTasks",
            format!(
                "mutation {{ completeTasks(input: [{{ id: \"{id}\", expectedAttempt: 1 }}]) {{ id }} }}"
            ),
        ),
        (
            "heartbeatTasks",
            format!(
                "mutation {{ heartbeatTasks(input: [{{ id: \"{id}\", expectedAttempt: 1 }}]) {{ id }} }}"
            ),
        ),
    ];
    for (name, query) in calls {
        let body = app.gql(None, &query, json!({})).await;
        assert_eq!(error_code(&body), Some("UNAUTHENTICATED"), "{name}: {body}");
    }
    assert_eq!(count_rows(&app.db).await, 0);
}
