//! Heartbeats: they keep a task processing, are a conflict after a cancel, and are fenced by the attempt.

use super::*;

#[tokio::test]
async fn heartbeats_keep_a_task_processing_past_its_first_lease() {
    let app = spawn_app().await;
    let worker = app.worker_token();
    let task = create_via_api(&app, &app.user_token("alice"), json!({ "type": "image" })).await;
    let id = gql_id(&task);
    let claimed = data(app.gql(Some(&worker), CLAIM, json!({ "lease": 2 })).await);
    assert_eq!(claimed["claimTask"]["id"], task["id"]);
    let first_lease: DateTime<Utc> = fetch(&app.db, id).await.lease_expires_at.expect("leased");

    // Heartbeat well inside each 2 s lease until the first lease is long
    // past (several reaper passes), with the real reaper running.
    let mut progress = 0;
    while Utc::now() < first_lease + chrono::Duration::milliseconds(2500) {
        tokio::time::sleep(Duration::from_millis(400)).await;
        progress = (progress + 10).min(100);
        let beat = data(
            app.gql(
                Some(&worker),
                HEARTBEAT,
                json!({ "id": id, "progress": progress, "lease": 2, "attempt": 1 }),
            )
            .await,
        );
        assert_eq!(beat["heartbeatTask"]["status"], "PROCESSING");
        assert_eq!(beat["heartbeatTask"]["progress"], progress);
    }
    let alive = fetch(&app.db, id).await;
    assert_eq!((alive.status, alive.attempts), (TaskStatus::Processing, 1));
    assert!(alive.lease_expires_at.expect("leased") > first_lease);

    // Silence: the same reaper now takes it back.
    let requeued = once_reaped(&app.db, id, TaskStatus::Pending).await;
    assert_eq!(requeued.attempts, 1);
    let beat = app
        .gql(Some(&worker), HEARTBEAT, json!({ "id": id, "attempt": 1 }))
        .await;
    assert_eq!(
        error_code(&beat),
        Some("CONFLICT"),
        "a requeued task is not ours: {beat}"
    );
}

#[tokio::test]
async fn a_heartbeat_after_cancel_is_conflict() {
    let app = spawn_app().await;
    let (alice, worker) = (app.user_token("alice"), app.worker_token());
    let task = create_via_api(&app, &alice, json!({ "type": "image" })).await;
    let claimed = data(app.gql(Some(&worker), CLAIM, json!({ "lease": 60 })).await);
    assert_eq!(claimed["claimTask"]["id"], task["id"]);
    let beat = data(
        app.gql(
            Some(&worker),
            HEARTBEAT,
            json!({ "id": task["id"], "progress": 30, "attempt": 1 }),
        )
        .await,
    );
    assert_eq!(beat["heartbeatTask"]["progress"], 30);

    let cancelled = data(
        app.gql(Some(&alice), CANCEL, json!({ "id": task["id"] }))
            .await,
    );
    assert_eq!(cancelled["cancelTask"]["status"], "CANCELLED");

    for variables in [
        json!({ "id": task["id"], "progress": 60, "attempt": 1 }),
        json!({ "id": task["id"], "progress": 60 }),
    ] {
        let body = app.gql(Some(&worker), HEARTBEAT, variables).await;
        assert_eq!(error_code(&body), Some("CONFLICT"), "{body}");
    }
    let body = app
        .gql(
            Some(&worker),
            UPDATE,
            json!({ "input": { "id": task["id"], "status": "COMPLETED", "resultId": "x", "expectedAttempt": 1 } }),
        )
        .await;
    assert_eq!(error_code(&body), Some("CONFLICT"), "{body}");
    let last = fetch(&app.db, gql_id(&task)).await;
    assert_eq!(
        (last.status, last.progress),
        (TaskStatus::Cancelled, Some(30))
    );
    assert!(last.result_id.is_none());
}

#[tokio::test]
async fn heartbeat_through_the_service_checks_the_attempt() {
    let test = TestDb::new().await;
    let (service, db) = test.service().await;
    let task = new_task(service.as_ref(), &alice(), "image").await;
    service
        .claim_task(&as_worker(), claim_request("a", 60))
        .await
        .unwrap();
    expire_leases(&db, &[task.id]).await;
    assert_eq!(service.reap_expired_leases().await.unwrap().requeued, 1);
    let again = service
        .claim_task(&as_worker(), claim_request("b", 60))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.attempts, 2);

    // The same heartbeat, from the worker of each attempt.
    let from_attempt = |attempt| Heartbeat {
        task_id: task.id,
        progress: Some(50),
        lease: lease(60),
        expected_attempt: Some(attempt),
    };
    let stale = service.heartbeat_task(&as_worker(), from_attempt(1)).await;
    assert!(matches!(stale, Err(TaskError::Conflict(_))), "{stale:?}");
    let current = service
        .heartbeat_task(&as_worker(), from_attempt(2))
        .await
        .unwrap();
    assert_eq!((current.progress, current.attempts), (Some(50), 2));
    let missing = service
        .heartbeat_task(
            &as_worker(),
            Heartbeat {
                task_id: Uuid::now_v7(),
                progress: None,
                lease: None,
                expected_attempt: None,
            },
        )
        .await;
    assert!(matches!(missing, Err(TaskError::NotFound)), "{missing:?}");
}
