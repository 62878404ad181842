//! `result`: the JSON a worker's completion leaves on its task, bounded,
//! carried in events, cleared by a retry, seen only by who may see the task.

use std::sync::Arc;

use super::*;
use common::sse::{self, EventStream, Message};

const RESULT: &str = "id status resultId result";

#[tokio::test]
async fn a_completion_leaves_its_result_for_the_owner_and_workers() {
    let mut app = spawn_app().await;
    let id = create(&app, "image").await;
    let (claimed, attempt) = claim(&app, "image").await;
    assert_eq!(claimed, id);
    let result =
        json!({"url": "s3://bucket/a.png", "size": [1024, 768], "tags": ["sky"], "score": 0.5});
    let done = app
        .update_status(
            json!({"id": id, "status": "COMPLETED", "expectedAttempt": attempt,
                   "resultId": "img-1", "result": result}),
            RESULT,
        )
        .await;
    assert_eq!(data(done)["updateTaskStatus"]["result"], result);

    let mine = data(read(&app, &app.user_token("alice"), &id, RESULT).await);
    assert_eq!(mine["task"]["result"], result);
    assert_eq!(mine["task"]["resultId"], "img-1");
    let seen = data(read(&app, &app.worker_token(), &id, RESULT).await);
    assert_eq!(seen["task"]["result"], result);
    // Another user does not see the task, so not its result either.
    let other = read(&app, &app.user_token("bob"), &id, RESULT).await;
    assert!(other["data"]["task"].is_null(), "{other}");
    assert_eq!(error_code(&other), Some("NOT_FOUND"), "{other}");

    // An exact repeat answers the task; a different result is refused.
    let again = app
        .update_status(
            json!({"id": id, "status": "COMPLETED", "expectedAttempt": attempt,
                   "resultId": "img-1", "result": result}),
            RESULT,
        )
        .await;
    assert_eq!(data(again)["updateTaskStatus"]["result"], result);
    let changed = app
        .update_status(
            json!({"id": id, "status": "COMPLETED", "expectedAttempt": attempt,
                   "result": {"url": "elsewhere"}}),
            RESULT,
        )
        .await;
    assert_eq!(error_code(&changed), Some("CONFLICT"), "{changed}");
    app.stop().await;
}

#[tokio::test]
async fn a_result_any_json_but_null_is_kept_as_sent() {
    let mut app = spawn_app().await;
    for result in [
        json!("a string"),
        json!(42),
        json!([1, "two", null]),
        json!(true),
    ] {
        create(&app, "any").await;
        let (id, attempt) = claim(&app, "any").await;
        let done = app
            .update_status(
                json!({"id": id, "status": "COMPLETED", "expectedAttempt": attempt, "result": result}),
                RESULT,
            )
            .await;
        assert_eq!(data(done)["updateTaskStatus"]["result"], result);
        let read = data(read(&app, &app.user_token("alice"), &id, RESULT).await);
        assert_eq!(read["task"]["result"], result);
    }
    app.stop().await;
}

#[tokio::test]
async fn a_bad_result_is_refused_and_changes_nothing() {
    let mut app = spawn_app_with(Arc::new(TestDb::new().await), |settings| {
        settings.tasks.max_result_bytes = 1000
    })
    .await;
    let id = create(&app, "image").await;
    let (_, attempt) = claim(&app, "image").await;
    let big = json!({ "blob": "x".repeat(1000) });
    let cases = [
        (
            json!({"id": id, "status": "COMPLETED", "expectedAttempt": attempt, "result": big}),
            "the limit is 1000",
        ),
        (
            json!({"id": id, "status": "COMPLETED", "expectedAttempt": attempt, "result": {"k": "a\u{0}b"}}),
            "NUL",
        ),
        (
            json!({"id": id, "status": "PROCESSING", "expectedAttempt": attempt, "progress": 5, "result": {"k": 1}}),
            "COMPLETED",
        ),
        (
            json!({"id": id, "status": "FAILED", "expectedAttempt": attempt, "result": {"k": 1}}),
            "COMPLETED",
        ),
    ];
    for (input, says) in cases {
        let refused = app.update_status(input.clone(), RESULT).await;
        assert_eq!(
            error_code(&refused),
            Some("BAD_USER_INPUT"),
            "{input}: {refused}"
        );
        let message = refused["errors"][0]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{input}: {message}");
    }
    // In a batch, the input's index names it and nothing is written.
    let batch = app
        .gql(
            Some(&app.worker_token()),
            "mutation($input: [CompleteTaskInput!]!) { completeTasks(input: $input) { id } }",
            json!({ "input": [{"id": id, "expectedAttempt": attempt, "result": big}] }),
        )
        .await;
    assert_eq!(error_code(&batch), Some("BAD_USER_INPUT"), "{batch}");
    assert_eq!(batch["errors"][0]["extensions"]["index"], 0, "{batch}");
    let task = data(
        read(
            &app,
            &app.user_token("alice"),
            &id,
            "status result progress",
        )
        .await,
    );
    assert_eq!(task["task"]["status"], "PROCESSING");
    assert!(task["task"]["result"].is_null());
    app.stop().await;
}

#[tokio::test]
async fn batched_completions_leave_each_its_own_result() {
    let mut app = spawn_app().await;
    for _ in 0..3 {
        create(&app, "thumb").await;
    }
    let mut claimed = Vec::new();
    for _ in 0..3 {
        claimed.push(claim(&app, "thumb").await);
    }
    let input: Vec<Value> = claimed
        .iter()
        .enumerate()
        .map(|(i, (id, attempt))| {
            let mut item = json!({"id": id, "expectedAttempt": attempt});
            // The middle one leaves no result.
            if i != 1 {
                item["result"] = json!({ "n": i });
            }
            item
        })
        .collect();
    let body = app
        .gql(
            Some(&app.worker_token()),
            "mutation($input: [CompleteTaskInput!]!) { completeTasks(input: $input) { id error { code } task { id result } } }",
            json!({ "input": input }),
        )
        .await;
    let reports = data(body)["completeTasks"].clone();
    for (i, report) in reports.as_array().expect("reports").iter().enumerate() {
        assert!(report["error"].is_null(), "{report}");
        let want = if i == 1 {
            Value::Null
        } else {
            json!({ "n": i })
        };
        assert_eq!(report["task"]["result"], want, "report {i}");
    }

    app.stop().await;
}

#[tokio::test]
async fn a_retried_task_has_no_result_and_events_carry_it() {
    let mut app = spawn_app().await;
    let id = create(&app, "render").await;
    let alice = app.user_token("alice");
    let query = json!({
        "query": "subscription($id: ID!) { taskUpdated(id: $id) { status result } }",
        "variables": { "id": id },
    });
    let mut events = EventStream::new(sse::post(&app, Some(&alice), &query).await);
    assert_eq!(events.next_data().await["taskUpdated"]["status"], "PENDING");

    let (_, attempt) = claim(&app, "render").await;
    let result = json!({ "frames": 240 });
    app.update_status(
        json!({"id": id, "status": "COMPLETED", "expectedAttempt": attempt, "result": result}),
        RESULT,
    )
    .await;
    let (payloads, end) = events.until_end().await;
    assert_eq!(end, Message::Complete);
    let last = payloads.last().expect("the completion's event");
    assert_eq!(last["data"]["taskUpdated"]["status"], "COMPLETED");
    assert_eq!(last["data"]["taskUpdated"]["result"], result);

    // A failed task that is retried starts again with no result.
    let id = create(&app, "render").await;
    let (_, attempt) = claim(&app, "render").await;
    app.update_status(
        json!({"id": id, "status": "FAILED", "expectedAttempt": attempt, "errorMessage": "boom"}),
        RESULT,
    )
    .await;
    let retried = app
        .gql(
            Some(&alice),
            "mutation($id: ID!) { retryTask(id: $id) { status result errorMessage } }",
            json!({ "id": id }),
        )
        .await;
    let retried = data(retried)["retryTask"].clone();
    assert_eq!(retried["status"], "PENDING");
    assert!(retried["result"].is_null() && retried["errorMessage"].is_null());
    app.stop().await;
}
