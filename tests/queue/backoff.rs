//! Retryable failures: the backoff between attempts, its growth and jitter, and the end at `maxAttempts`.

use super::*;

fn seconds(delta: chrono::TimeDelta) -> f64 {
    delta.num_microseconds().expect("a short delta") as f64 / 1e6
}

/// Makes a backed-off task runnable now, as if its backoff had passed.
async fn backoff_passed(db: &impl ConnectionTrait, id: &str) {
    let past = Utc::now() - chrono::Duration::seconds(1);
    set_time(db, id, Column::RunAt, past).await;
}

/// The delay a backed-off task waits: `runAt` minus the time of the
/// failure (its `updatedAt`), in seconds.
fn delay_of(task: &Value) -> f64 {
    seconds(time(&task["runAt"]) - time(&task["updatedAt"]))
}

/// Asserts that `delay` is `want` seconds, to the millisecond.
fn assert_delay(delay: f64, want: f64, what: &str) {
    assert!(
        (delay - want).abs() < 0.001,
        "{what}: waits {delay} s, not {want} s"
    );
}

/// Fails attempt `attempt` of `id` retryably and checks that it backs off
/// for `wait` seconds; the task as the failure left it.
async fn fail_and_back_off(
    app: &TestApp,
    id: &str,
    attempt: i64,
    message: Option<&str>,
    wait: f64,
) -> Value {
    let before = Utc::now();
    let failed = data(fail(app, id, attempt, message, true).await)["updateTaskStatus"].clone();
    let after = Utc::now();
    assert_eq!(failed["status"], "PENDING", "attempt {attempt}: {failed}");
    assert_eq!(failed["attempts"], attempt, "a backoff keeps attempts");
    assert!(failed["workerId"].is_null() && failed["leaseExpiresAt"].is_null());
    assert!(failed["completedAt"].is_null());
    let run_at = time(&failed["runAt"]);
    assert!(
        run_at > before,
        "runAt {run_at} is after the failure at {before}"
    );
    assert!(
        run_at <= after + chrono::Duration::microseconds((wait * 1e6) as i64 + 1000),
        "runAt {run_at} is at most {wait} s after {after}"
    );
    assert_delay(delay_of(&failed), wait, &format!("attempt {attempt}"));
    failed
}

/// Claims `id` again once its backoff (until `run_at`) has passed, and
/// not before.
async fn claim_after_backoff(app: &TestApp, id: &str, run_at: DateTime<Utc>) -> Value {
    let early = claim(app, json!(null)).await;
    // The server claimed before this answer came: had it come before runAt,
    // the claim was early. (A slow answer checks nothing here.)
    if Utc::now() < run_at {
        assert!(
            early.is_null(),
            "claimed before its runAt {run_at}: {early}"
        );
    }
    let again = if early.is_null() {
        eventually("the backoff to pass", Duration::from_secs(10), || async {
            let task = claim(app, json!(null)).await;
            (!task.is_null()).then_some(task)
        })
        .await
    } else {
        early
    };
    assert_eq!(again["id"], json!(id));
    // A claim's time is its updatedAt.
    assert!(
        time(&again["updatedAt"]) >= run_at,
        "claimed before its runAt {run_at}: {again}"
    );
    again
}

#[tokio::test]
async fn a_retryable_failure_backs_off_then_fails_for_good_at_max_attempts() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    set_policy(
        &app,
        "flaky",
        json!({ "maxAttempts": 3, "backoff": { "initialSeconds": 0.3, "factor": 2, "jitter": false } }),
    )
    .await;
    let created = create(&app, &alice, json!({ "type": "flaky" })).await;
    let id = id_of(&created);
    assert_eq!(created["maxAttempts"], 3, "the type's policy");

    assert_eq!(claim(&app, json!(null)).await["attempts"], 1);
    let failed = fail_and_back_off(&app, &id, 1, Some("boom 1"), 0.3).await;
    assert_eq!(failed["errorMessage"], "boom 1");
    let again = claim_after_backoff(&app, &id, time(&failed["runAt"])).await;
    assert_eq!(again["attempts"], 2);
    assert_eq!(again["errorMessage"], "boom 1", "kept while it runs again");

    // No new message: the last one is kept. The delay doubles.
    let failed = fail_and_back_off(&app, &id, 2, None, 0.6).await;
    assert_eq!(failed["errorMessage"], "boom 1");
    let seen = task(&app, &alice, &id).await;
    assert_eq!(
        (&seen["status"], &seen["errorMessage"]),
        (&json!("PENDING"), &json!("boom 1")),
        "what the owner sees while it waits"
    );
    let again = claim_after_backoff(&app, &id, time(&failed["runAt"])).await;
    assert_eq!(again["attempts"], 3);

    // The third attempt is the last: a retryable failure is final.
    let last = data(fail(&app, &id, 3, Some("boom 3"), true).await)["updateTaskStatus"].clone();
    assert_eq!(
        (&last["status"], &last["errorMessage"], &last["attempts"]),
        (&json!("FAILED"), &json!("boom 3"), &json!(3))
    );
    assert!(!last["completedAt"].is_null() && last["leaseExpiresAt"].is_null());
    assert!(claim(&app, json!(null)).await.is_null(), "failed for good");
    let seen = task(&app, &alice, &id).await;
    assert_eq!(
        (&seen["status"], &seen["errorMessage"]),
        (&json!("FAILED"), &json!("boom 3"))
    );

    // Without retryable, FAILED is final even with attempts left.
    let other = id_of(&create(&app, &alice, json!({ "type": "flaky" })).await);
    assert_eq!(claim(&app, json!(null)).await["id"], json!(other));
    let failed =
        data(fail(&app, &other, 1, Some("fatal"), false).await)["updateTaskStatus"].clone();
    assert_eq!(failed["status"], "FAILED");
    assert!(claim(&app, json!(null)).await.is_null());
}

#[tokio::test]
async fn backoff_grows_by_its_factor_up_to_max_seconds() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    set_policy(
        &app,
        "render",
        json!({ "backoff": { "initialSeconds": 10, "factor": 2, "maxSeconds": 25, "jitter": false } }),
    )
    .await;
    let id = id_of(&create(&app, &alice, json!({ "type": "render", "maxAttempts": 5 })).await);
    // After attempt n: 10 × 2^(n−1), at most 25.
    for (attempt, want) in [(1, 10.0), (2, 20.0), (3, 25.0), (4, 25.0)] {
        let claimed = claim(&app, json!(null)).await;
        assert_eq!(
            (&claimed["id"], &claimed["attempts"]),
            (&json!(id), &json!(attempt))
        );
        let failed =
            data(fail(&app, &id, attempt, Some("again"), true).await)["updateTaskStatus"].clone();
        assert_eq!(failed["status"], "PENDING", "attempt {attempt}");
        assert_delay(delay_of(&failed), want, &format!("attempt {attempt}"));
        assert!(
            claim(&app, json!(null)).await.is_null(),
            "attempt {attempt}: backing off"
        );
        backoff_passed(&app.db, &id).await;
    }
    let claimed = claim(&app, json!(null)).await;
    assert_eq!(claimed["attempts"], 5);
    let last = data(fail(&app, &id, 5, Some("again"), true).await)["updateTaskStatus"].clone();
    assert_eq!(last["status"], "FAILED", "the fifth attempt was the last");
}

#[tokio::test]
async fn jittered_backoff_waits_in_the_upper_half_of_the_delay() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    set_policy(
        &app,
        "jittery",
        json!({ "backoff": { "initialSeconds": 8, "factor": 2 } }),
    )
    .await;
    let policy = set_policy(&app, "jittery", json!({})).await;
    assert_eq!(
        policy["policy"]["backoff"]["jitter"], true,
        "jitter is on by default"
    );
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(id_of(
            &create(&app, &alice, json!({ "type": "jittery" })).await,
        ));
    }
    let mut delays = Vec::new();
    for round in 1..=2 {
        // After attempt 1 the delay is 8 s, after attempt 2 16 s.
        let full = 8.0 * f64::from(round);
        for _ in &ids {
            let claimed = claim(&app, json!(null)).await;
            assert_eq!(claimed["attempts"], round);
            let failed =
                data(fail(&app, &id_of(&claimed), round.into(), Some("x"), true).await)["updateTaskStatus"].clone();
            assert_eq!(failed["status"], "PENDING");
            let delay = delay_of(&failed);
            assert!(
                (full / 2.0 - 0.001..=full + 0.001).contains(&delay),
                "after attempt {round}: {delay} s is outside [{}, {full}]",
                full / 2.0
            );
            delays.push(delay);
        }
        assert!(claim(&app, json!(null)).await.is_null());
        for id in &ids {
            backoff_passed(&app.db, id).await;
        }
    }
    let distinct: HashSet<u64> = delays.iter().map(|d| d.to_bits()).collect();
    assert!(distinct.len() > 1, "every delay was the same: {delays:?}");
}
