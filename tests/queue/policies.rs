//! Task type policies: setting and reading them, their bounds, who may, and how they apply to tasks.

use super::*;

/// The policy of a type nobody set, on a server whose default is `max_attempts`.
fn default_policy(max_attempts: i64) -> Value {
    json!({
        "maxAttempts": max_attempts,
        "backoff": { "initialSeconds": 1.0, "factor": 2.0, "maxSeconds": 3600.0, "jitter": true },
        "concurrency": null,
        "paused": false,
    })
}

#[tokio::test]
async fn set_task_type_policy_returns_what_was_set_keeps_absent_fields_and_resets_nulls() {
    let app = fresh_app_with(|s| s.tasks.max_attempts = 4).await;
    let alice = app.user_token("alice");
    assert_eq!(
        task_types(&app).await,
        Vec::<Value>::new(),
        "a fresh database"
    );
    create(&app, &alice, json!({ "type": "image" })).await;
    create(&app, &alice, json!({ "type": "image" })).await;
    assert_eq!(claim(&app, json!(null)).await["type"], "image");
    assert_eq!(
        task_types(&app).await,
        vec![
            json!({ "type": "image", "policy": default_policy(4), "pending": 1, "processing": 1 })
        ],
        "a type with tasks and no policy has the defaults"
    );

    let everything = json!({
        "maxAttempts": 7,
        "backoff": { "initialSeconds": 0.5, "factor": 3.0, "maxSeconds": 60.0, "jitter": false },
        "concurrency": 4,
        "paused": true,
    });
    let set = set_policy(&app, "render", everything.clone()).await;
    assert_eq!(
        set,
        json!({ "type": "render", "policy": everything, "pending": 0, "processing": 0 })
    );

    // Absent fields stay: one backoff field, then nothing at all.
    let mut want = everything.clone();
    want["backoff"]["factor"] = json!(1.5);
    let set = set_policy(&app, "render", json!({ "backoff": { "factor": 1.5 } })).await;
    assert_eq!(set["policy"], want);
    assert_eq!(set_policy(&app, "render", json!({})).await["policy"], want);
    want["paused"] = json!(false);
    assert_eq!(
        set_policy(&app, "render", json!({ "paused": false })).await["policy"],
        want
    );

    // Explicit nulls: the server's default attempts, no cap; the rest stays.
    let set = set_policy(
        &app,
        "render",
        json!({ "maxAttempts": null, "concurrency": null }),
    )
    .await;
    want["maxAttempts"] = json!(4);
    want["concurrency"] = Value::Null;
    assert_eq!(set["policy"], want);
    // A null backoff or paused changes nothing.
    assert_eq!(
        set_policy(&app, "render", json!({ "backoff": null, "paused": null })).await["policy"],
        want
    );

    create(&app, &alice, json!({ "type": "render" })).await;
    assert_eq!(
        task_types(&app).await,
        vec![
            json!({ "type": "image", "policy": default_policy(4), "pending": 1, "processing": 1 }),
            json!({ "type": "render", "policy": want, "pending": 1, "processing": 0 }),
        ],
        "by name, with their queues"
    );
}

#[tokio::test]
async fn bad_policy_values_are_bad_user_input_and_change_nothing() {
    let app = fresh_app().await;
    let set = set_policy(
        &app,
        "render",
        json!({ "backoff": { "initialSeconds": 10, "maxSeconds": 100 } }),
    )
    .await;
    let before = set["policy"].clone();
    let cases = [
        ("render", json!({ "maxAttempts": 0 })),
        ("render", json!({ "maxAttempts": 101 })),
        ("render", json!({ "concurrency": 0 })),
        ("render", json!({ "concurrency": 100_001 })),
        ("render", json!({ "concurrency": -1 })),
        ("render", json!({ "backoff": { "initialSeconds": -1 } })),
        (
            "render",
            json!({ "backoff": { "initialSeconds": 604_801 } }),
        ),
        ("render", json!({ "backoff": { "maxSeconds": -1 } })),
        ("render", json!({ "backoff": { "maxSeconds": 604_801 } })),
        ("render", json!({ "backoff": { "factor": 0.5 } })),
        ("render", json!({ "backoff": { "factor": 101 } })),
        (
            "render",
            json!({ "backoff": { "initialSeconds": 5, "maxSeconds": 1 } }),
        ),
        // Against what is stored: the initial 10 s is above a max of 5 s.
        ("render", json!({ "backoff": { "maxSeconds": 5 } })),
        ("render", json!({ "backoff": { "initialSeconds": 101 } })),
        // A valid change alongside a bad one is refused whole.
        ("render", json!({ "paused": true, "maxAttempts": 0 })),
        ("Render", json!({ "paused": true })),
        ("a b", json!({ "paused": true })),
        ("", json!({ "paused": true })),
        (&*"x".repeat(65), json!({ "paused": true })),
    ];
    for (task_type, policy) in &cases {
        let body = try_set_policy(&app, &app.worker_token(), task_type, policy.clone()).await;
        assert_eq!(
            error_code(&body),
            Some("BAD_USER_INPUT"),
            "{task_type:?} {policy}: {body}"
        );
    }
    let types = task_types(&app).await;
    assert_eq!(types.len(), 1, "no other type got a policy: {types:?}");
    assert_eq!(types[0]["policy"], before, "render's policy is unchanged");

    // The bounds themselves are accepted.
    let edges = json!({
        "maxAttempts": 100,
        "backoff": { "initialSeconds": 0.0, "factor": 100.0, "maxSeconds": 604_800.0, "jitter": true },
        "concurrency": 100_000,
        "paused": false,
    });
    assert_eq!(
        set_policy(&app, "edge", edges.clone()).await["policy"],
        edges
    );
    let low = json!({ "maxAttempts": 1, "backoff": { "factor": 1.0, "maxSeconds": 0.0 }, "concurrency": 1 });
    let set = set_policy(&app, "edge", low).await;
    assert_eq!(
        (&set["policy"]["maxAttempts"], &set["policy"]["concurrency"]),
        (&json!(1), &json!(1))
    );
    assert_eq!(set["policy"]["backoff"]["factor"], json!(1.0));
    assert_eq!(set["policy"]["backoff"]["maxSeconds"], json!(0.0));
}

#[tokio::test]
async fn a_user_token_cannot_set_or_read_task_type_policies() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    create(&app, &alice, json!({ "type": "image" })).await;
    let body = try_set_policy(&app, &alice, "image", json!({ "paused": true })).await;
    assert_eq!(error_code(&body), Some("FORBIDDEN"), "{body}");
    let body = try_set_policy(&app, &alice, "mine", json!({ "maxAttempts": 9 })).await;
    assert_eq!(error_code(&body), Some("FORBIDDEN"), "{body}");
    let query = format!("{{ taskTypes {{ {POLICY_FIELDS} }} }}");
    let body = app.gql(Some(&alice), &query, json!({})).await;
    assert_eq!(error_code(&body), Some("FORBIDDEN"), "{body}");
    let body = app.gql(None, &query, json!({})).await;
    assert_eq!(error_code(&body), Some("UNAUTHENTICATED"), "{body}");

    assert_eq!(
        task_types(&app).await,
        vec![
            json!({ "type": "image", "policy": default_policy(3), "pending": 1, "processing": 0 })
        ],
        "nothing was set"
    );
    assert!(
        !claim(&app, json!(null)).await.is_null(),
        "image is not paused"
    );
}

#[tokio::test]
async fn a_tasks_own_max_attempts_overrides_its_types_policy_which_applies_to_later_tasks() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    let before = create(&app, &alice, json!({ "type": "report" })).await;
    assert_eq!(before["maxAttempts"], 3, "the server's default");

    set_policy(
        &app,
        "report",
        json!({ "maxAttempts": 1, "backoff": { "initialSeconds": 0 } }),
    )
    .await;
    let by_policy = create(&app, &alice, json!({ "type": "report" })).await;
    let own = create(&app, &alice, json!({ "type": "report", "maxAttempts": 2 })).await;
    assert_eq!(by_policy["maxAttempts"], 1);
    assert_eq!(own["maxAttempts"], 2);
    let unchanged = task(&app, &alice, &id_of(&before)).await;
    assert_eq!(unchanged["maxAttempts"], 3, "fixed when it was created");

    // Each budget holds: one attempt by the policy, two by its own.
    let mut outcomes = HashMap::new();
    for task in claim_all(&app, json!(null)).await {
        let failed =
            data(fail(&app, &id_of(&task), 1, Some("no"), true).await)["updateTaskStatus"].clone();
        outcomes.insert(id_of(&task), failed["status"].clone());
    }
    assert_eq!(
        outcomes,
        HashMap::from([
            (id_of(&before), json!("PENDING")),
            (id_of(&by_policy), json!("FAILED")),
            (id_of(&own), json!("PENDING")),
        ])
    );

    // Reset to the default: later tasks get 3 again, earlier ones keep theirs.
    set_policy(&app, "report", json!({ "maxAttempts": null })).await;
    let after = create(&app, &alice, json!({ "type": "report" })).await;
    assert_eq!(after["maxAttempts"], 3);
    assert_eq!(task(&app, &alice, &id_of(&own)).await["maxAttempts"], 2);
    assert_eq!(
        task(&app, &alice, &id_of(&by_policy)).await["maxAttempts"],
        1
    );
}
