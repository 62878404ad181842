//! Following tasks: `taskUpdated` from the current state to the final one (finished, deleted, another user's, racing the completion, a client hanging up), `taskEvents`, and real JavaScript clients.

use super::*;

#[tokio::test]
async fn task_updated_sends_the_current_state_then_every_change_then_completes() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let id = create_task(&app, &alice).await;
    let client = WsClient::connect_as(&app.ws_url, &alice).await;

    let mut watch = client.subscribe(WATCH, json!({ "id": id }));
    let first = watch.next_data().await;
    assert_eq!(first["taskUpdated"]["id"], id);
    assert_eq!(first["taskUpdated"]["status"], "PENDING");

    set_status(&app, &id, "PROCESSING", json!({ "progress": 40 })).await;
    set_status(&app, &id, "COMPLETED", json!({ "resultId": "concept-42" })).await;

    let (results, end) = watch.until_end().await;
    assert_eq!(
        states(&results),
        owned(&[
            ("PROCESSING", json!(40), Value::Null),
            ("COMPLETED", json!(100), json!("concept-42")),
        ])
    );
    assert_eq!(
        end,
        Event::Complete,
        "the server completes after a final state"
    );
}

#[tokio::test]
async fn a_finished_task_gives_its_final_state_and_completes() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let client = WsClient::connect_as(&app.ws_url, &alice).await;

    let completed = create_task(&app, &alice).await;
    set_status(
        &app,
        &completed,
        "COMPLETED",
        json!({ "resultId": "concept-1" }),
    )
    .await;
    let failed = create_task(&app, &alice).await;
    set_status(&app, &failed, "PROCESSING", json!({})).await;
    set_status(
        &app,
        &failed,
        "FAILED",
        json!({ "errorMessage": "out of memory" }),
    )
    .await;
    let cancelled = create_task(&app, &alice).await;
    let body = cancel_task(&app, &alice, &cancelled).await;
    assert_eq!(body["data"]["cancelTask"]["status"], "CANCELLED", "{body}");

    for (id, status, field, value) in [
        (&completed, "COMPLETED", "resultId", "concept-1"),
        (&failed, "FAILED", "errorMessage", "out of memory"),
        (&cancelled, "CANCELLED", "status", "CANCELLED"),
    ] {
        let mut watch = client.subscribe(WATCH, json!({ "id": id }));
        let (results, end) = watch.until_end().await;
        assert_eq!(results.len(), 1, "only the final state: {results:?}");
        let task = &results[0]["data"]["taskUpdated"];
        assert_eq!(task["status"], status, "{task}");
        assert_eq!(task[field], value, "{task}");
        assert_eq!(end, Event::Complete);
    }
}

#[tokio::test]
async fn deleting_a_watched_task_completes_its_subscription() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let (id, _client, mut watch) = watch_a_new_task(&app, &alice).await;

    delete_task(&app, &alice, &id).await;
    let (results, end) = watch.until_end().await;
    assert!(
        results.is_empty(),
        "nothing after the deletion: {results:?}"
    );
    assert_eq!(end, Event::Complete);
}

#[tokio::test]
async fn another_users_task_is_not_found_but_a_worker_may_watch_any_task() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let id = create_task(&app, &alice).await;

    let bob = WsClient::connect_as(&app.ws_url, &app.user_token("bob")).await;
    let mut snoop = bob.subscribe(WATCH, json!({ "id": id }));
    let message = expect_error(&mut snoop, "NOT_FOUND").await;
    assert!(
        !message.as_str().unwrap_or_default().contains("alice"),
        "the error must not leak the owner: {message}"
    );
    // The same answer as for a task that does not exist at all.
    let mut absent = bob.subscribe(WATCH, json!({ "id": uuid::Uuid::now_v7().to_string() }));
    expect_error(&mut absent, "NOT_FOUND").await;
    let mut malformed = bob.subscribe(WATCH, json!({ "id": "not-a-task-id" }));
    expect_error(&mut malformed, "BAD_USER_INPUT").await;

    let worker = WsClient::connect_as(&app.ws_url, &app.worker_token()).await;
    let mut watch = worker.subscribe(WATCH, json!({ "id": id }));
    assert_eq!(watch.next_data().await["taskUpdated"]["status"], "PENDING");
    let body = cancel_task(&app, &alice, &id).await;
    assert!(body["errors"].is_null(), "{body}");
    let (results, end) = watch.until_end().await;
    assert_eq!(
        states(&results),
        owned(&[("CANCELLED", Value::Null, Value::Null)])
    );
    assert_eq!(end, Event::Complete);

    // Bob's socket still works for his own tasks.
    let bobs = create_task(&app, &app.user_token("bob")).await;
    let mut own = bob.subscribe(WATCH, json!({ "id": bobs }));
    assert_eq!(own.next_data().await["taskUpdated"]["id"], bobs);
}

#[tokio::test]
async fn task_events_carry_the_callers_changes_only() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let bob = app.user_token("bob");
    let client = WsClient::connect_as(&app.ws_url, &alice).await;
    let mut events = client.subscribe(EVENTS, json!({}));
    wait_until_live(&app, &mut events).await;

    // Bob's changes come first: any of them leaking would arrive before alice's.
    let bobs = create_task(&app, &bob).await;
    set_status(&app, &bobs, "PROCESSING", json!({ "progress": 5 })).await;
    delete_task(&app, &bob, &bobs).await;

    let id = create_task(&app, &alice).await;
    set_status(&app, &id, "PROCESSING", json!({ "progress": 10 })).await;
    set_status(&app, &id, "COMPLETED", json!({ "resultId": "concept-7" })).await;
    delete_task(&app, &alice, &id).await;
    create_task(&app, &bob).await;
    let last = create_task(&app, &alice).await;

    let mut seen = Vec::new();
    while seen
        .last()
        .is_none_or(|(_, task): &(String, Value)| task["id"] != last)
    {
        let event = events.next().await;
        let data = event
            .data()
            .unwrap_or_else(|| panic!("taskEvents failed: {event:?}"));
        let event = &data["taskEvents"];
        seen.push((
            event["kind"].as_str().expect("kind").to_owned(),
            event["task"].clone(),
        ));
    }
    let summary: Vec<(&str, &str, &str, Value)> = seen
        .iter()
        .map(|(kind, task)| {
            let tag = if task["id"] == id {
                "task"
            } else if task["id"] == last {
                "last"
            } else {
                "OTHER"
            };
            (
                kind.as_str(),
                tag,
                task["status"].as_str().unwrap_or_default(),
                task["resultId"].clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("CREATED", "task", "PENDING", Value::Null),
            ("UPDATED", "task", "PROCESSING", Value::Null),
            ("UPDATED", "task", "COMPLETED", json!("concept-7")),
            // DELETED carries the last state.
            ("DELETED", "task", "COMPLETED", json!("concept-7")),
            ("CREATED", "last", "PENDING", Value::Null),
        ],
        "every change of alice's tasks, in order, and none of bob's"
    );
    assert_eq!(seen[1].1["progress"], 10);
    assert_eq!(seen[3].1["progress"], 100);
}

#[tokio::test]
async fn subscribing_while_the_task_completes_always_ends_with_the_final_state() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let client = WsClient::connect_as(&app.ws_url, &alice).await;
    let (mut saw_pending, mut saw_only_final) = (0, 0);

    for round in 0..100u32 {
        let task = app
            .service
            .create_task(&common::alice(), new_task())
            .await
            .expect("create");
        let result_id = format!("concept-{round}");
        // Vary who goes first: the completion through the service or over
        // HTTP, right away or after the subscribe message is on its way.
        let complete = async {
            for _ in 0..round % 4 {
                tokio::task::yield_now().await;
            }
            if round % 2 == 0 {
                app.service
                    .update_task_status(&as_worker(), completion(task.id, &result_id))
                    .await
                    .expect("complete");
            } else {
                set_status(
                    &app,
                    &task.id.to_string(),
                    "COMPLETED",
                    json!({ "resultId": result_id }),
                )
                .await;
            }
        };
        let subscribe = async {
            for _ in 0..(round / 4) % 3 {
                tokio::task::yield_now().await;
            }
            client.subscribe(WATCH, json!({ "id": task.id.to_string() }))
        };
        let (mut watch, ()) = tokio::join!(subscribe, complete);

        let (results, end) = watch.until_end().await;
        let states = states(&results);
        let last = states
            .last()
            .unwrap_or_else(|| panic!("round {round}: no result"));
        assert_eq!(
            (last.0.as_str(), &last.2),
            ("COMPLETED", &json!(result_id)),
            "round {round}: the final state must arrive, got {states:?}"
        );
        assert_eq!(end, Event::Complete, "round {round}");
        match states.len() {
            1 => saw_only_final += 1,
            2 => {
                assert_eq!(states[0].0, "PENDING", "round {round}");
                saw_pending += 1;
            }
            _ => panic!("round {round}: unexpected states {states:?}"),
        }
    }
    eprintln!("subscribed before completion {saw_pending} times, after {saw_only_final} times");
}

#[tokio::test]
async fn real_javascript_clients_follow_a_task_to_completion() {
    let js = common::js::npm_package("tests/js");
    let app = spawn_app().await;
    let run = tokio::process::Command::new("node")
        .arg(js.join("follow_task.mjs"))
        .env("TASKQL_HTTP_URL", &app.base)
        .env("TASKQL_WS_URL", &app.ws_url)
        .env("TASKQL_USER_TOKEN", app.user_token("alice"))
        .env("TASKQL_WORKER_TOKEN", app.worker_token())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the node script finishes")
        .expect("node runs (Node.js 20 must be installed)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "node failed: {stderr}\n{stdout}");
    let report: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("node printed no JSON ({e}): {stdout}\n{stderr}"));
    assert!(report["failure"].is_null(), "{report}");

    for client in ["graphqlWs", "subscriptionsTransportWs"] {
        let seen = &report[client];
        assert_eq!(
            seen["statuses"],
            json!(["PENDING", "PROCESSING", "COMPLETED"]),
            "{client}: {seen}"
        );
        assert_eq!(seen["last"]["resultId"], "concept-js", "{client}: {seen}");
        assert_eq!(seen["last"]["progress"], 100, "{client}: {seen}");
        assert_eq!(seen["errors"], json!([]), "{client}: {seen}");
        assert_eq!(
            seen["completed"], true,
            "{client}: the server completes: {seen}"
        );
    }
    // Without a token graphql-ws is closed with 4403 and sees nothing.
    let anonymous = &report["graphqlWsWithoutToken"];
    assert!(
        anonymous["errors"][0]
            .as_str()
            .is_some_and(|e| e.starts_with("closed 4403 Forbidden")),
        "{anonymous}"
    );
    assert_eq!(anonymous["statuses"], json!([]), "{anonymous}");
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_update_still_lets_watchers_see_the_change() {
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, TransactionTrait};
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let (id, _client, mut watch) = watch_a_new_task(&app, &alice).await;

    // Another connection holds the row (a write lock on SQLite), so the
    // update waits in the database while its client gives up.
    let other = app.database.connect().await;
    let blocker = other.begin().await.unwrap();
    let uuid: uuid::Uuid = id.parse().unwrap();
    entity::Tasks::update_many()
        .col_expr(
            entity::tasks::Column::Version,
            sea_orm::prelude::Expr::col(entity::tasks::Column::Version),
        )
        .filter(entity::tasks::Column::Id.eq(uuid))
        .exec(&blocker)
        .await
        .unwrap();
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let sent = impatient
        .post(format!("{}/graphql", app.base))
        .bearer_auth(app.worker_token())
        .json(&json!({
            "query": UPDATE,
            "variables": { "input": { "id": id, "status": "COMPLETED", "resultId": "kept" } }
        }))
        .send()
        .await;
    assert!(sent.is_err(), "the client gave up before the answer");
    blocker.rollback().await.unwrap();

    // The change committed once the row was free, and its event went out.
    let (results, end) = watch.until_end().await;
    let last = results.last().expect("a change arrived");
    assert_eq!(
        last["data"]["taskUpdated"]["status"], "COMPLETED",
        "{results:?}"
    );
    assert_eq!(last["data"]["taskUpdated"]["resultId"], "kept");
    assert_eq!(end, Event::Complete);
}
