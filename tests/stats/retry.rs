//! `retryTask`: failed or cancelled tasks back to pending, its events for watchers and other instances, and the owner, worker and lease a task shows.

use super::*;

const TASK: &str = "id status attempts progress resultId errorMessage startedAt completedAt userId workerId leaseExpiresAt";

#[tokio::test]
async fn retry_puts_failed_or_cancelled_tasks_back_to_pending() {
    let app = spawn_app().await;
    let service = &app.service;
    let w = as_worker();
    let alice_token = app.user_token("alice");
    let retry = |token: String, id: uuid::Uuid| {
        let app = &app;
        async move {
            app.gql(
                Some(&token),
                &format!("mutation($id: ID!) {{ retryTask(id: $id) {{ {TASK} }} }}"),
                json!({ "id": id }),
            )
            .await
        }
    };

    // A failed task, retried by its owner: as new, but for attempts, which
    // never go down (the fencing number).
    let failed = new_task(service.as_ref(), &alice(), "image").await;
    service
        .claim_task(
            &w,
            ClaimRequest {
                worker_id: Some("gpu-1".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut failure = StatusUpdate::new(failed.id, TaskStatus::Failed);
    failure.error_message = Some("out of memory".into());
    failure.result_id = Some("partial-1".into());
    failure.progress = Some(70);
    let before = service.update_task_status(&w, failure).await.unwrap();
    let body = retry(alice_token.clone(), failed.id).await;
    let task = &body["data"]["retryTask"];
    assert_eq!(
        task,
        &json!({
            "id": failed.id.to_string(), "status": "PENDING", "attempts": 1, "progress": null,
            "resultId": null, "errorMessage": null, "startedAt": null, "completedAt": null,
            "userId": "alice", "workerId": null, "leaseExpiresAt": null,
        }),
        "{body}"
    );
    let stored = service.get_task(failed.id, &alice()).await.unwrap();
    assert_eq!(stored.version, before.version + 1);
    // It can be claimed again, as attempt 2.
    let again = claim_next(service, &w).await;
    assert_eq!((again.id, again.attempts), (failed.id, 2));

    // A cancelled task of bob's, retried by a worker.
    let cancelled = new_task(service.as_ref(), &bob(), "image").await;
    service.cancel_task(cancelled.id, &bob()).await.unwrap();
    let body = retry(app.worker_token(), cancelled.id).await;
    assert_eq!(body["data"]["retryTask"]["status"], "PENDING", "{body}");

    // Bob's task is NOT_FOUND to alice, and unchanged.
    service.cancel_task(cancelled.id, &bob()).await.unwrap();
    let body = retry(alice_token.clone(), cancelled.id).await;
    assert_eq!(error_code(&body), Some("NOT_FOUND"), "{body}");
    assert_eq!(
        service.get_task(cancelled.id, &bob()).await.unwrap().status,
        TaskStatus::Cancelled
    );
    let body = retry(alice_token.clone(), uuid::Uuid::now_v7()).await;
    assert_eq!(error_code(&body), Some("NOT_FOUND"), "{body}");

    // PENDING, PROCESSING and COMPLETED tasks: CONFLICT naming the status.
    let pending = new_task(service.as_ref(), &alice(), "text").await;
    assert_conflict_naming(&retry(alice_token.clone(), pending.id).await, "PENDING");
    // (`again` is PROCESSING.)
    assert_conflict_naming(&retry(alice_token.clone(), failed.id).await, "PROCESSING");
    set_status(service, &w, failed.id, TaskStatus::Completed).await;
    assert_conflict_naming(&retry(alice_token.clone(), failed.id).await, "COMPLETED");
    let body = app
        .gql(None, "mutation { retryTask(id: \"x\") { id } }", json!({}))
        .await;
    assert_eq!(error_code(&body), Some("UNAUTHENTICATED"));
}

/// Asserts `body` is a CONFLICT whose message names the task's `status`.
fn assert_conflict_naming(body: &Value, status: &str) {
    assert_eq!(error_code(body), Some("CONFLICT"), "{body}");
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains(status), "{body}");
}

/// Waits until `events` (a `taskEvents` stream that sees `owner`'s tasks) is
/// live: creates probe tasks until one arrives.
async fn wait_until_live(app: &TestApp, owner: &CurrentUser, events: &mut ws::Subscription) {
    for _ in 0..50 {
        let probe = new_task(app.service.as_ref(), owner, "probe")
            .await
            .id
            .to_string();
        while let Some(event) = events.next_within(Duration::from_millis(200)).await {
            if event.data().unwrap_or_else(|| panic!("{event:?}"))["taskEvents"]["task"]["id"]
                == probe.as_str()
            {
                return;
            }
        }
    }
    panic!("the taskEvents subscription never went live");
}

/// The next `taskEvents` event about `id`.
async fn next_about(events: &mut ws::Subscription, id: &str) -> Value {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), events.next())
            .await
            .expect("an event in time");
        let data = event.data().unwrap_or_else(|| panic!("{event:?}")).clone();
        if data["taskEvents"]["task"]["id"] == id {
            return data["taskEvents"].clone();
        }
    }
}

#[tokio::test]
async fn a_retry_is_an_event_for_watchers_and_other_instances() {
    let app = spawn_app().await;
    // On PostgreSQL, a second instance on the same database hears it too.
    let other = if app.database.is_postgres {
        Some(spawn_app_with(app.database.clone(), |_| {}).await)
    } else {
        None
    };
    let task = new_task(app.service.as_ref(), &alice(), "image").await;
    app.service.cancel_task(task.id, &alice()).await.unwrap();
    let id = task.id.to_string();
    let query = "subscription { taskEvents { kind task { id status attempts userId } } }";
    let mut watchers = Vec::new();
    for base in std::iter::once(&app).chain(other.as_ref()) {
        let client = WsClient::connect_as(&base.ws_url, &app.user_token("alice")).await;
        let events = client.subscribe(query, json!({}));
        watchers.push((client, events));
    }
    for (_, events) in &mut watchers {
        wait_until_live(&app, &alice(), events).await;
    }
    let body = app
        .gql(
            Some(&app.user_token("alice")),
            "mutation($id: ID!) { retryTask(id: $id) { status } }",
            json!({ "id": id }),
        )
        .await;
    assert_eq!(body["data"]["retryTask"]["status"], "PENDING", "{body}");
    for (_, events) in &mut watchers {
        let event = next_about(events, &id).await;
        assert_eq!(
            event,
            json!({ "kind": "UPDATED", "task": { "id": id, "status": "PENDING", "attempts": 0, "userId": "alice" } })
        );
    }
}

#[tokio::test]
async fn a_workers_task_events_carry_every_users_changes() {
    let app = spawn_app().await;
    let query = "subscription { taskEvents { kind task { id status userId } } }";
    let worker_client = WsClient::connect_as(&app.ws_url, &app.worker_token()).await;
    let mut everything = worker_client.subscribe(query, json!({}));
    let bob_client = WsClient::connect_as(&app.ws_url, &app.user_token("bob")).await;
    let mut bobs = bob_client.subscribe(query, json!({}));
    wait_until_live(&app, &bob(), &mut everything).await;
    wait_until_live(&app, &bob(), &mut bobs).await;
    // Bob's stream may still hold probes the worker's stream went live on.
    let marker = new_task(app.service.as_ref(), &bob(), "marker")
        .await
        .id
        .to_string();
    next_about(&mut bobs, &marker).await;
    next_about(&mut everything, &marker).await;

    let alices = new_task(app.service.as_ref(), &alice(), "image")
        .await
        .id
        .to_string();
    app.service
        .delete_task(alices.parse().unwrap(), &alice())
        .await
        .unwrap();
    let last = new_task(app.service.as_ref(), &bob(), "image")
        .await
        .id
        .to_string();
    let created = next_about(&mut everything, &alices).await;
    assert_eq!(created["kind"], "CREATED");
    assert_eq!(created["task"]["userId"], "alice");
    assert_eq!(
        next_about(&mut everything, &alices).await["kind"],
        "DELETED"
    );
    assert_eq!(next_about(&mut everything, &last).await["kind"], "CREATED");
    // Bob's stream went from his probe to his next task: nothing of alice's.
    let next = bobs.next().await;
    assert_eq!(
        next.data().unwrap()["taskEvents"]["task"]["id"],
        last,
        "{next:?}"
    );
}

#[tokio::test]
async fn tasks_show_owner_worker_and_lease_and_filter_by_owner() {
    let app = spawn_app().await;
    let service = &app.service;
    new_task(service.as_ref(), &alice(), "image").await;
    new_task(service.as_ref(), &bob(), "image").await;
    let claimed = service
        .claim_task(
            &as_worker(),
            ClaimRequest {
                worker_id: Some("gpu-7".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .unwrap();
    let query = "query($user: String) { tasks(userId: $user) { nodes { userId workerId leaseExpiresAt } } }";
    let body = app
        .gql(Some(&app.worker_token()), query, json!({ "user": "alice" }))
        .await;
    let nodes = body["data"]["tasks"]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{body}");
    assert_eq!(nodes[0]["userId"], "alice");
    assert_eq!(nodes[0]["workerId"], "gpu-7");
    let lease =
        chrono::DateTime::parse_from_rfc3339(nodes[0]["leaseExpiresAt"].as_str().unwrap()).unwrap();
    assert_eq!(
        lease.timestamp_micros(),
        claimed.lease_expires_at.unwrap().timestamp_micros()
    );
    let all = app
        .gql(Some(&app.worker_token()), query, json!({ "user": null }))
        .await;
    assert_eq!(all["data"]["tasks"]["nodes"].as_array().unwrap().len(), 2);
    // A user naming someone else gets nothing of theirs.
    let body = app
        .gql(
            Some(&app.user_token("alice")),
            query,
            json!({ "user": "bob" }),
        )
        .await;
    assert_eq!(body["data"]["tasks"]["nodes"], json!([]), "{body}");
    let body = app
        .gql(Some(&app.user_token("alice")), query, json!({ "user": "" }))
        .await;
    assert_eq!(error_code(&body), Some("BAD_USER_INPUT"), "{body}");
}
