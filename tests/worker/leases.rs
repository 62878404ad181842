//! Leases and the reaper: an expired lease requeues, attempts run out, late updates are fenced, and a completion or a second instance races the reaper.

use super::*;

/// `claimTask` by `worker_id` for `lease` seconds; the answer's data.
async fn claim_by(app: &TestApp, worker_id: &str, lease: u64) -> Value {
    let variables = json!({ "lease": lease, "worker": worker_id });
    data(app.gql(Some(&app.worker_token()), CLAIM, variables).await)
}

/// A new image task of alice's, claimed by `worker_id` for `lease` seconds:
/// its id and the claim.
async fn create_and_claim(app: &TestApp, lease: u64, worker_id: &str) -> (Uuid, Value) {
    let task = create_via_api(app, &app.user_token("alice"), json!({ "type": "image" })).await;
    let claimed = claim_by(app, worker_id, lease).await;
    assert_eq!(
        claimed["claimTask"]["id"], task["id"],
        "claimed the new task"
    );
    (gql_id(&task), claimed)
}

/// Every task, once all of them are `status` (waiting up to `timeout`).
async fn all_once(db: &impl ConnectionTrait, status: TaskStatus, timeout: Duration) -> Vec<Task> {
    let what = format!("every task to be {status:?}");
    eventually(&what, timeout, || async {
        let tasks = all_tasks(db).await;
        tasks.iter().all(|t| t.status == status).then_some(tasks)
    })
    .await
}

#[tokio::test]
async fn an_expired_lease_returns_the_task_to_pending_through_the_running_reaper() {
    let app = spawn_app().await;
    let (id, claimed) = create_and_claim(&app, 1, "w-crashed").await;
    assert_eq!(claimed["claimTask"]["attempts"], 1);

    // The worker goes silent; nothing but the server's reaper acts.
    let requeued = once_reaped(&app.db, id, TaskStatus::Pending).await;
    assert_eq!(requeued.attempts, 1, "attempts are kept");
    assert!(requeued.worker_id.is_none() && requeued.lease_expires_at.is_none());
    assert!(requeued.completed_at.is_none() && requeued.error_message.is_none());

    let again = claim_by(&app, "w-2", 60).await;
    assert_eq!(
        (&again["claimTask"]["id"], &again["claimTask"]["attempts"]),
        (&json!(id.to_string()), &json!(2))
    );
}

#[tokio::test]
async fn a_task_whose_leases_keep_expiring_fails_after_max_attempts() {
    let database = Arc::new(TestDb::new().await);
    let app = spawn_app_with(database, |s| s.tasks.max_attempts = 2).await;
    let worker = app.worker_token();
    let alice = app.user_token("alice");
    let task = create_via_api(&app, &alice, json!({ "type": "image" })).await;
    let id = gql_id(&task);

    for attempt in 1..=2 {
        let claimed = data(app.gql(Some(&worker), CLAIM, json!({ "lease": 60 })).await);
        assert_eq!(claimed["claimTask"]["attempts"], attempt);
        expire_leases(&app.db, &[id]).await;
        let want = if attempt < 2 {
            TaskStatus::Pending
        } else {
            TaskStatus::Failed
        };
        let reaped = once_reaped(&app.db, id, want).await;
        assert_eq!(reaped.attempts, attempt);
    }

    // The owner sees why it failed.
    let seen = data(app.gql(Some(&alice), TASK, json!({ "id": id })).await)["task"].clone();
    assert_eq!(seen["status"], "FAILED");
    let message = seen["errorMessage"].as_str().expect("an error message");
    assert!(
        message.contains("lease expired") && message.contains("2 attempt"),
        "{message}"
    );
    let failed = fetch(&app.db, id).await;
    assert!(failed.completed_at.is_some() && failed.lease_expires_at.is_none());
    let none = data(app.gql(Some(&worker), CLAIM, json!({})).await);
    assert!(
        none["claimTask"].is_null(),
        "a failed task is not claimed again"
    );
}

#[tokio::test]
async fn a_late_update_from_an_old_attempt_is_conflict_and_the_new_claim_wins() {
    let app = spawn_app().await;
    let worker = app.worker_token();
    let (id, first) = create_and_claim(&app, 60, "slow").await;
    assert_eq!(first["claimTask"]["attempts"], 1);
    expire_leases(&app.db, &[id]).await;
    once_reaped(&app.db, id, TaskStatus::Pending).await;
    let second = claim_by(&app, "fast", 60).await;
    assert_eq!(second["claimTask"]["attempts"], 2);

    // The slow worker wakes up: its heartbeat and its result are refused.
    let beat = app
        .gql(
            Some(&worker),
            HEARTBEAT,
            json!({ "id": id, "progress": 90, "attempt": 1 }),
        )
        .await;
    assert_eq!(error_code(&beat), Some("CONFLICT"), "{beat}");
    let late = json!({ "input": {
        "id": id, "status": "COMPLETED", "resultId": "from-slow", "expectedAttempt": 1,
    }});
    let body = app.gql(Some(&worker), UPDATE, late.clone()).await;
    assert_eq!(error_code(&body), Some("CONFLICT"), "{body}");
    let failing = json!({ "input": {
        "id": id, "status": "FAILED", "errorMessage": "slow gave up", "expectedAttempt": 1,
    }});
    let body = app.gql(Some(&worker), UPDATE, failing).await;
    assert_eq!(error_code(&body), Some("CONFLICT"), "{body}");
    let mid = fetch(&app.db, id).await;
    assert_eq!(
        (mid.status, mid.attempts, mid.progress),
        (TaskStatus::Processing, 2, None)
    );

    let done = json!({ "input": {
        "id": id, "status": "COMPLETED", "resultId": "from-fast", "expectedAttempt": 2,
    }});
    let body = data(app.gql(Some(&worker), UPDATE, done.clone()).await);
    assert_eq!(body["updateTaskStatus"]["resultId"], "from-fast");
    // The slow one retries; the fast one retries too (a no-op).
    let body = app.gql(Some(&worker), UPDATE, late).await;
    assert_eq!(error_code(&body), Some("CONFLICT"), "{body}");
    let body = data(app.gql(Some(&worker), UPDATE, done).await);
    assert_eq!(body["updateTaskStatus"]["status"], "COMPLETED");

    let last = fetch(&app.db, id).await;
    assert_eq!(last.status, TaskStatus::Completed);
    assert_eq!(last.result_id.as_deref(), Some("from-fast"));
    assert_eq!(last.attempts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_completion_racing_the_reaper_leaves_the_task_completed() {
    let test = TestDb::new().await;
    let (service, db) = test.service().await;
    let mut reaper_first = 0;
    for round in 0..50 {
        let task = new_task(service.as_ref(), &alice(), "image").await;
        let claimed = service
            .claim_task(&as_worker(), claim_request("w", 60))
            .await
            .unwrap()
            .expect("a task to claim");
        assert_eq!(claimed.id, task.id);
        expire_leases(&db, &[task.id]).await;

        let start = Arc::new(Barrier::new(2));
        let finish = {
            let (service, start) = (service.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                service
                    .update_task_status(&as_worker(), completion(task.id, 1, &format!("r-{round}")))
                    .await
            })
        };
        let reap = {
            let (service, start) = (service.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                service.reap_expired_leases().await
            })
        };
        let finished = finish.await.unwrap().expect("the completion is accepted");
        let reaped = reap.await.unwrap().expect("reaper pass");
        assert_eq!(finished.status, TaskStatus::Completed, "round {round}");
        assert_eq!(reaped.failed, 0);
        reaper_first += reaped.requeued;

        let last = fetch(&db, task.id).await;
        assert_eq!(
            last.status,
            TaskStatus::Completed,
            "round {round}: {last:?}"
        );
        assert_eq!(last.result_id, Some(format!("r-{round}")));
        assert_eq!(last.attempts, 1);
        assert!(last.lease_expires_at.is_none());
        // create, claim, (requeue), complete: nothing ran twice.
        assert_eq!(last.version, 3 + reaped.requeued as i64, "round {round}");
    }
    eprintln!("the reaper requeued first in {reaper_first} of 50 rounds");
    assert_statuses(&db, &[("completed", 50)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_reaping_one_database_requeue_each_task_once() {
    let (a, b) = two_apps().await;
    const N: usize = 300;
    const REAP_PASSES: usize = 8;
    let ids = create_many(&a.service, &alice(), "image", N).await;

    // Round 1 and 2: the leases lapse and both instances' reapers, plus
    // direct passes started at the same instant on each, race to requeue.
    for round in 1..=2 {
        for _ in 0..N {
            let service = if round == 1 { &b.service } else { &a.service };
            service
                .claim_task(&as_worker(), claim_request("w", 60))
                .await
                .unwrap()
                .expect("a task");
        }
        expire_leases(&a.db, &ids).await;
        let services = [a.service.clone(), b.service.clone()];
        let start = Arc::new(Barrier::new(REAP_PASSES));
        let passes: Vec<_> = (0..REAP_PASSES)
            .map(|i| {
                let (service, start) = (services[i % 2].clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    service.reap_expired_leases().await
                })
            })
            .collect();
        let mut direct = 0;
        for pass in passes {
            let outcome = pass.await.unwrap().expect("a reaper pass never fails");
            direct += outcome.requeued;
        }
        assert!(direct <= N, "requeued {direct} of {N}");
        let tasks = all_once(&a.db, TaskStatus::Pending, Duration::from_secs(15)).await;
        for task in &tasks {
            // Per round: one claim and one requeue, each once.
            assert_eq!(task.attempts, round, "{task:?}");
            assert_eq!(
                task.version,
                1 + 2 * round as i64,
                "requeued twice: {task:?}"
            );
        }
    }

    // Round 3 (the default 3 attempts): real 1 s leases lapse with only the
    // two background reapers running, and each task fails exactly once.
    for _ in 0..N {
        b.service
            .claim_task(&as_worker(), claim_request("w", 1))
            .await
            .unwrap()
            .expect("a task");
    }
    let tasks = all_once(&b.db, TaskStatus::Failed, Duration::from_secs(20)).await;
    for task in &tasks {
        assert_eq!((task.attempts, task.version), (3, 7), "{task:?}");
        let message = task.error_message.as_deref().unwrap_or_default();
        assert!(message.contains("after 3 attempt"), "{message}");
    }
}
