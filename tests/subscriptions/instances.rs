//! On PostgreSQL, across instances: changes made through another, a lost listener connection, and large metadata.

use super::*;

/// A separate connection for looking at and killing backends.
async fn admin(database: &TestDb) -> DatabaseConnection {
    taskql::db::connect(&database.url, 1)
        .await
        .expect("admin connection")
}

/// Backends of this database that LISTEN for task events (by the name they connect with).
async fn listener_pids(admin: &DatabaseConnection) -> Vec<i32> {
    admin
        .query_all_raw(Statement::from_string(
            admin.get_database_backend(),
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'taskql-listener' \
             AND pid <> pg_backend_pid()",
        ))
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|row| row.try_get::<i32>("", "pid").expect("pid"))
        .collect()
}

async fn wait_for_listeners(admin: &DatabaseConnection, count: usize, not: &[i32]) -> Vec<i32> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let pids: Vec<i32> = listener_pids(admin)
            .await
            .into_iter()
            .filter(|pid| !not.contains(pid))
            .collect();
        if pids.len() >= count {
            return pids;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{count} event listeners never connected (found {pids:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two instances on one PostgreSQL database once both listen for task
/// events, an admin connection to it, and the listeners' backends; `None`
/// (the test skipped) without PostgreSQL.
async fn two_listening_apps_or_skip(
    test: &str,
) -> Option<(TestApp, TestApp, DatabaseConnection, Vec<i32>)> {
    let (a, b) = two_apps_on_postgres_or_skip(test).await?;
    let admin = admin(&a.database).await;
    let listeners = wait_for_listeners(&admin, 2, &[]).await;
    Some((a, b, admin, listeners))
}

#[tokio::test]
async fn on_postgres_a_watcher_on_one_instance_sees_changes_made_through_another() {
    let Some((a, b, _, _)) = two_listening_apps_or_skip(
        "on_postgres_a_watcher_on_one_instance_sees_changes_made_through_another",
    )
    .await
    else {
        return;
    };
    let alice = a.user_token("alice");

    let client = WsClient::connect_as(&a.ws_url, &alice).await;
    let mut events = client.subscribe(EVENTS, json!({}));
    wait_until_live(&a, &mut events).await;

    let id = create_task(&b, &alice).await;
    let mut watch = client.subscribe(WATCH, json!({ "id": id }));
    assert_eq!(watch.next_data().await["taskUpdated"]["status"], "PENDING");

    // Progress through B back to back, faster than A could re-read the row:
    // straight through B's service, which its resolvers call.
    let task_id = uuid::Uuid::parse_str(&id).expect("a uuid");
    let mut expected = Vec::new();
    for progress in (5..100).step_by(5) {
        b.service
            .update_task_status(
                &as_worker(),
                StatusUpdate {
                    status: entity::TaskStatus::Processing,
                    progress: Some(progress),
                    result_id: None,
                    ..completion(task_id, "")
                },
            )
            .await
            .expect("progress through B");
        expected.push(("PROCESSING".to_owned(), json!(progress), Value::Null));
    }
    b.service
        .update_task_status(&as_worker(), completion(task_id, "concept-b"))
        .await
        .expect("complete through B");
    expected.push(("COMPLETED".to_owned(), json!(100), json!("concept-b")));

    let (results, end) = watch.until_end().await;
    assert_eq!(
        states(&results),
        expected,
        "every state made through B reaches the watcher on A"
    );
    assert_eq!(end, Event::Complete);

    delete_task(&b, &alice, &id).await;

    let mut kinds = Vec::new();
    while kinds.len() < expected.len() + 2 {
        let event = events.next().await;
        let data = event.data().unwrap_or_else(|| panic!("{event:?}"));
        let event = &data["taskEvents"];
        assert_eq!(event["task"]["id"], id, "{event}");
        kinds.push(format!(
            "{} {}",
            event["kind"].as_str().unwrap_or_default(),
            event["task"]["status"].as_str().unwrap_or_default()
        ));
    }
    let mut expected_kinds = vec!["CREATED PENDING".to_owned()];
    expected_kinds.extend(
        expected
            .iter()
            .map(|(status, _, _)| format!("UPDATED {status}")),
    );
    // The deletion carries the last state.
    expected_kinds.push("DELETED COMPLETED".to_owned());
    assert_eq!(
        kinds, expected_kinds,
        "taskEvents on A sees every change made through B"
    );
}

#[tokio::test]
async fn on_postgres_the_final_state_survives_a_lost_listener_connection() {
    const TASKS: usize = 20;
    let Some((a, b, admin, listeners)) = two_listening_apps_or_skip(
        "on_postgres_the_final_state_survives_a_lost_listener_connection",
    )
    .await
    else {
        return;
    };
    let alice = a.user_token("alice");

    // Tasks in progress, watched on A; B will finish them.
    let mut ids = Vec::new();
    for _ in 0..2 * TASKS {
        let id = create_task(&b, &alice).await;
        set_status(&b, &id, "PROCESSING", json!({ "progress": 50 })).await;
        ids.push(id);
    }
    let client = WsClient::connect_as(&a.ws_url, &alice).await;
    let mut watches = Vec::new();
    for id in &ids {
        let mut watch = client.subscribe(WATCH, json!({ "id": id }));
        assert_eq!(
            watch.next_data().await["taskUpdated"]["status"],
            "PROCESSING"
        );
        watches.push(watch);
    }
    // And the whole feed of alice's changes, on A too.
    let events_client = WsClient::connect_as(&a.ws_url, &alice).await;
    let mut feed = events_client.subscribe(
        "subscription { taskEvents { kind task { id status resultId } } }",
        json!({}),
    );
    // The feed is live once it carries a change made now.
    let probe = create_task(&b, &alice).await;
    loop {
        let event = feed.next_data().await;
        if event["taskEvents"]["task"]["id"] == probe.as_str() {
            break;
        }
    }

    let killed = admin
        .query_all_raw(Statement::from_string(
            admin.get_database_backend(),
            "SELECT pg_terminate_backend(pid) AS killed FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'taskql-listener' \
             AND pid <> pg_backend_pid()",
        ))
        .await
        .expect("terminate the listeners");
    assert_eq!(
        killed.len(),
        listeners.len(),
        "both instances' listeners are cut off"
    );

    // During the gap (the listeners are reconnecting) ...
    futures::future::join_all(ids[..TASKS].iter().map(|id| {
        set_status(
            &b,
            id,
            "COMPLETED",
            json!({ "resultId": format!("done-{id}") }),
        )
    }))
    .await;
    // ... and after it.
    wait_for_listeners(&admin, 2, &listeners).await;
    futures::future::join_all(ids[TASKS..].iter().map(|id| {
        set_status(
            &b,
            id,
            "COMPLETED",
            json!({ "resultId": format!("done-{id}") }),
        )
    }))
    .await;

    for (id, watch) in ids.iter().zip(&mut watches) {
        let (results, end) = watch.until_end().await;
        let states = states(&results);
        assert_eq!(
            states.last().map(|s| (s.0.as_str(), s.2.clone())),
            Some(("COMPLETED", json!(format!("done-{id}")))),
            "task {id}: the final state must arrive, got {states:?}"
        );
        assert_eq!(end, Event::Complete, "task {id}");
    }
    // The feed catches up on what it missed while the listener was away:
    // every task's COMPLETED arrives, each once.
    let mut completed = std::collections::HashMap::new();
    while completed.len() < ids.len() {
        let event = feed.next_data().await;
        let task = &event["taskEvents"]["task"];
        if task["status"] == "COMPLETED" {
            *completed
                .entry(task["id"].as_str().unwrap().to_owned())
                .or_insert(0) += 1;
        }
    }
    assert!(
        ids.iter().all(|id| completed.get(id) == Some(&1)),
        "{completed:?}"
    );
}

#[tokio::test]
async fn on_postgres_a_task_with_large_metadata_crosses_instances_whole() {
    let Some((a, b, _, _)) = two_listening_apps_or_skip(
        "on_postgres_a_task_with_large_metadata_crosses_instances_whole",
    )
    .await
    else {
        return;
    };
    let alice = a.user_token("alice");

    // Far more than a NOTIFY payload may carry (8000 bytes).
    let prompt = "a cat in a hat, ".repeat(3000);
    let body = b
        .gql(
            Some(&alice),
            CREATE,
            json!({ "input": { "type": "image.generate", "metadata": { "prompt": prompt } } }),
        )
        .await;
    let id = body["data"]["createTask"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("createTask failed: {body}"))
        .to_owned();
    let client = WsClient::connect_as(&a.ws_url, &alice).await;
    let mut watch = client.subscribe(
        "subscription($id: ID!) { taskUpdated(id: $id) { status resultId metadata } }",
        json!({ "id": id }),
    );
    assert_eq!(watch.next_data().await["taskUpdated"]["status"], "PENDING");

    set_status(&b, &id, "PROCESSING", json!({ "progress": 10 })).await;
    set_status(&b, &id, "COMPLETED", json!({ "resultId": "big" })).await;
    let (results, end) = watch.until_end().await;
    let seen: Vec<(&str, &Value)> = results
        .iter()
        .map(|r| {
            let task = &r["data"]["taskUpdated"];
            assert_eq!(
                task["metadata"]["prompt"],
                prompt.as_str(),
                "metadata intact"
            );
            (
                task["status"].as_str().unwrap_or_default(),
                &task["resultId"],
            )
        })
        .collect();
    assert_eq!(
        seen,
        [("PROCESSING", &Value::Null), ("COMPLETED", &json!("big"))]
    );
    assert_eq!(end, Event::Complete);
}
