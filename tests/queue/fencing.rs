//! Fencing across `retryTask` and the reaper: a report of an old attempt is a conflict.

use super::*;

async fn retry(app: &TestApp, token: &str, id: &str) -> Value {
    let query = format!("mutation($id: ID!) {{ retryTask(id: $id) {{ {FIELDS} }} }}");
    data(app.gql(Some(token), &query, json!({ "id": id })).await)["retryTask"].clone()
}

/// Puts the lease of `id` in the past, as if its worker went silent long ago.
async fn expire_lease(db: &impl ConnectionTrait, id: &str) {
    let past = Utc::now() - chrono::Duration::minutes(5);
    set_time(db, id, Column::LeaseExpiresAt, past).await;
}

#[tokio::test]
async fn retry_task_never_lowers_attempts_fences_the_old_worker_and_gives_a_fresh_budget() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    set_policy(
        &app,
        "fenced",
        json!({ "backoff": { "initialSeconds": 0 } }),
    )
    .await;
    let id = id_of(&create(&app, &alice, json!({ "type": "fenced", "maxAttempts": 2 })).await);

    // Two attempts, each a retryable failure: the second is final.
    for attempt in 1..=2 {
        let claimed = claim_with(&app, json!(null), 60, "w-old").await;
        assert_eq!(claimed["attempts"], attempt);
        let failed =
            data(fail(&app, &id, attempt, Some("flaky"), true).await)["updateTaskStatus"].clone();
        let want = if attempt < 2 { "PENDING" } else { "FAILED" };
        assert_eq!(failed["status"], want, "attempt {attempt}");
    }
    assert!(claim(&app, json!(null)).await.is_null());

    let before = Utc::now();
    let retried = retry(&app, &alice, &id).await;
    let after = Utc::now();
    assert_eq!(retried["status"], "PENDING");
    assert_eq!(retried["attempts"], 2, "attempts never goes down");
    assert_eq!(retried["maxAttempts"], 2);
    assert!(retried["errorMessage"].is_null() && retried["workerId"].is_null());
    let run_at = time(&retried["runAt"]);
    assert!(
        before - chrono::Duration::milliseconds(1) <= run_at && run_at <= after,
        "runAt {run_at} is the time of the retry"
    );

    let claimed = claim_with(&app, json!(null), 60, "w-new").await;
    assert_eq!(
        (&claimed["id"], &claimed["attempts"]),
        (&json!(id), &json!(3))
    );
    // The old worker's reports of attempt 2 are stale.
    let body = complete(&app, &id, 2).await;
    assert_eq!(error_code(&body), Some("CONFLICT"), "a late result: {body}");
    let body = fail(&app, &id, 2, Some("flaky"), true).await;
    assert_eq!(
        error_code(&body),
        Some("CONFLICT"),
        "a repeated failure: {body}"
    );
    let seen = task(&app, &alice, &id).await;
    assert_eq!(
        (&seen["status"], &seen["attempts"], &seen["workerId"]),
        (&json!("PROCESSING"), &json!(3), &json!("w-new"))
    );

    // A fresh budget of two: attempt 3 backs off, attempt 4 is final.
    let failed = data(fail(&app, &id, 3, Some("again"), true).await)["updateTaskStatus"].clone();
    assert_eq!(
        (&failed["status"], &failed["attempts"]),
        (&json!("PENDING"), &json!(3))
    );
    let claimed = claim(&app, json!(null)).await;
    assert_eq!(claimed["attempts"], 4);
    let failed = data(fail(&app, &id, 4, Some("again"), true).await)["updateTaskStatus"].clone();
    assert_eq!(
        (&failed["status"], &failed["attempts"]),
        (&json!("FAILED"), &json!(4))
    );
}

#[tokio::test]
async fn a_report_of_an_attempt_from_before_retry_task_is_conflict_even_before_the_next_claim() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    let cancel = "mutation($id: ID!) { cancelTask(id: $id) { status } }";
    let progress = |id: &str| json!({ "id": id, "status": "PROCESSING", "progress": 50, "expectedAttempt": 1 });
    // Reports of attempt 1, less the task's id.
    let failure =
        |message| json!({ "status": "FAILED", "errorMessage": message, "expectedAttempt": 1 });
    let mut retryable_failure = failure("flaky");
    retryable_failure["retryable"] = json!(true);
    let late_completion =
        json!({ "status": "COMPLETED", "resultId": "late", "expectedAttempt": 1 });
    // (what the old worker sends, how attempt 1 ended, the report)
    let cases = [
        (
            "a repeat of its retryable failure",
            "FAILED",
            retryable_failure,
        ),
        ("a repeat of its final failure", "FAILED", failure("flaky")),
        (
            "a completion after its failure",
            "FAILED",
            late_completion.clone(),
        ),
        (
            "a completion after the owner cancelled",
            "CANCELLED",
            late_completion,
        ),
        (
            "a failure after the owner cancelled",
            "CANCELLED",
            failure("gave up"),
        ),
    ];
    let mut wrong = Vec::new();
    for (n, (case, ended, report)) in cases.iter().enumerate() {
        // One attempt, which failed retryably (its last) or was cancelled.
        // A type per case: what one case leaves runnable is not claimed in another.
        let task_type = format!("case-{n}");
        let input = json!({ "type": task_type, "maxAttempts": 1 });
        let id = id_of(&create(&app, &alice, input).await);
        assert_eq!(
            claim_with(&app, json!([task_type]), 60, "w-old").await["id"],
            json!(id)
        );
        if *ended == "FAILED" {
            let failed = data(fail(&app, &id, 1, Some("flaky"), true).await);
            assert_eq!(failed["updateTaskStatus"]["status"], "FAILED", "{case}");
        } else {
            let body = data(app.gql(Some(&alice), cancel, json!({ "id": id })).await);
            assert_eq!(body["cancelTask"]["status"], "CANCELLED", "{case}");
        }
        let retried = retry(&app, &alice, &id).await;
        assert_eq!(
            (&retried["status"], &retried["attempts"]),
            (&json!("PENDING"), &json!(1))
        );

        // The worker of attempt 1 reports late; nobody has claimed the task since.
        let mut report = report.clone();
        report["id"] = json!(id);
        let body = app.update_status(report, FIELDS).await;
        let seen = task(&app, &alice, &id).await;
        let untouched = seen["status"] == "PENDING"
            && seen["runAt"] == retried["runAt"]
            && seen["errorMessage"].is_null()
            && seen["resultId"].is_null();
        if error_code(&body) != Some("CONFLICT") || !untouched {
            wrong.push(format!(
                "{case} (retried after {ended}): answered {}, and the task became {} (runAt {} -> {}, errorMessage {}, resultId {})",
                error_code(&body).unwrap_or("no error"),
                seen["status"],
                retried["runAt"],
                seen["runAt"],
                seen["errorMessage"],
                seen["resultId"],
            ));
        }
    }
    // A fenced progress report already requires PROCESSING.
    let id = id_of(
        &create(
            &app,
            &alice,
            json!({ "type": "progress", "maxAttempts": 1 }),
        )
        .await,
    );
    assert_eq!(claim(&app, json!(["progress"])).await["id"], json!(id));
    data(fail(&app, &id, 1, Some("flaky"), false).await);
    retry(&app, &alice, &id).await;
    let body = app.update_status(progress(&id), FIELDS).await;
    assert_eq!(error_code(&body), Some("CONFLICT"), "{body}");

    assert!(
        wrong.is_empty(),
        "a worker's report of an attempt from before retryTask must be CONFLICT and leave the retried task PENDING as it was:\n{}",
        wrong.join("\n")
    );
}

#[tokio::test]
async fn a_lease_expiring_at_the_end_of_the_budget_fails_the_task_and_retry_starts_a_new_one() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    let id = id_of(&create(&app, &alice, json!({ "type": "image", "maxAttempts": 2 })).await);

    // Each claim's 1 s lease runs out; the reaper (ours, or the server's) acts.
    let reaped = |want: &'static str| {
        let (app, alice, id) = (&app, &alice, &id);
        async move {
            eventually(
                &format!("the reaper to make the task {want}"),
                Duration::from_secs(10),
                || async move {
                    app.service
                        .reap_expired_leases()
                        .await
                        .expect("a reaper pass");
                    let seen = task(app, alice, id).await;
                    (seen["status"] == want).then_some(seen)
                },
            )
            .await
        }
    };
    for (attempt, want) in [(1, "PENDING"), (2, "FAILED"), (3, "PENDING"), (4, "FAILED")] {
        // Real 1 s leases for the first budget; after the retry, leases the
        // test puts in the past (quicker, and the same to the reaper).
        let lease = if attempt <= 2 { 1 } else { 60 };
        let claimed = claim_with(&app, json!(null), lease, "w-silent").await;
        assert_eq!(
            (&claimed["id"], &claimed["attempts"]),
            (&json!(id), &json!(attempt))
        );
        if attempt > 2 {
            expire_lease(&app.db, &id).await;
        }
        let seen = reaped(want).await;
        assert_eq!(seen["attempts"], attempt, "attempts are kept");
        assert!(seen["leaseExpiresAt"].is_null());
        if want == "FAILED" {
            let message = seen["errorMessage"].as_str().unwrap_or_default();
            assert!(message.contains("lease expired"), "{message}");
            assert!(claim(&app, json!(null)).await.is_null(), "failed for good");
            let body = complete(&app, &id, attempt).await;
            assert_eq!(error_code(&body), Some("CONFLICT"), "{body}");
            if attempt == 2 {
                let retried = retry(&app, &alice, &id).await;
                assert_eq!(
                    (&retried["status"], &retried["attempts"]),
                    (&json!("PENDING"), &json!(2))
                );
            }
        } else {
            assert!(seen["errorMessage"].is_null());
        }
    }
}
