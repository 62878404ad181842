//! `claimTask` through the API: the requested types, the lease's bounds, and who may claim.

use super::*;

#[tokio::test]
async fn claim_task_takes_only_the_requested_types_and_is_null_when_idle() {
    let app = spawn_app().await;
    let (user, worker) = (app.user_token("alice"), app.worker_token());
    let claim = |types: Value| {
        let (app, worker) = (&app, &worker);
        async move {
            data(
                app.gql(
                    Some(worker),
                    CLAIM,
                    json!({ "types": types, "lease": 60, "worker": "w" }),
                )
                .await,
            )["claimTask"]
                .clone()
        }
    };

    assert!(claim(Value::Null).await.is_null(), "empty queue");
    let image_1 = create_via_api(&app, &user, json!({ "type": "image" })).await;
    let report = create_via_api(&app, &user, json!({ "type": "report" })).await;
    let image_2 = create_via_api(&app, &user, json!({ "type": "image" })).await;
    let email = create_via_api(&app, &user, json!({ "type": "email" })).await;

    let types = json!(["report", "email"]);
    assert_eq!(claim(types.clone()).await["id"], report["id"]);
    let second = claim(types.clone()).await;
    assert_eq!(
        (&second["id"], &second["type"]),
        (&email["id"], &json!("email"))
    );
    assert!(
        claim(types.clone()).await.is_null(),
        "images are pending, but not of the requested types"
    );
    assert!(claim(json!(["video"])).await.is_null());

    assert_eq!(claim(json!(["image"])).await["id"], image_1["id"]);
    let last = claim(Value::Null).await;
    assert_eq!(
        (&last["id"], &last["status"]),
        (&image_2["id"], &json!("PROCESSING"))
    );
    assert!(claim(Value::Null).await.is_null());
    assert_statuses(&app.db, &[("processing", 4)]).await;
}

#[tokio::test]
async fn lease_seconds_out_of_bounds_is_bad_user_input() {
    let app = spawn_app().await;
    let worker = app.worker_token();
    let task = create_via_api(&app, &app.user_token("alice"), json!({ "type": "image" })).await;

    for bad in [0, -1, 3601] {
        let body = app.gql(Some(&worker), CLAIM, json!({ "lease": bad })).await;
        assert_eq!(
            error_code(&body),
            Some("BAD_USER_INPUT"),
            "lease {bad}: {body}"
        );
    }
    let still = fetch(&app.db, gql_id(&task)).await;
    assert_eq!((still.status, still.attempts), (TaskStatus::Pending, 0));

    let claimed = data(
        app.gql(Some(&worker), CLAIM, json!({ "lease": 3600 }))
            .await,
    );
    assert_eq!(claimed["claimTask"]["id"], task["id"]);
    for bad in [0, 3601] {
        let body = app
            .gql(
                Some(&worker),
                HEARTBEAT,
                json!({ "id": task["id"], "lease": bad }),
            )
            .await;
        assert_eq!(
            error_code(&body),
            Some("BAD_USER_INPUT"),
            "lease {bad}: {body}"
        );
    }
    let body = app
        .gql(
            Some(&worker),
            HEARTBEAT,
            json!({ "id": task["id"], "lease": 1 }),
        )
        .await;
    assert_eq!(data(body)["heartbeatTask"]["status"], "PROCESSING");
}

#[tokio::test]
async fn a_user_token_cannot_claim_heartbeat_or_update() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let task = create_via_api(&app, &alice, json!({ "type": "image" })).await;
    let attempts = [
        (CLAIM, json!({})),
        (HEARTBEAT, json!({ "id": task["id"], "progress": 10 })),
        (
            UPDATE,
            json!({ "input": { "id": task["id"], "status": "COMPLETED", "resultId": "mine" } }),
        ),
    ];
    for (query, variables) in attempts {
        let body = app.gql(Some(&alice), query, variables).await;
        assert_eq!(error_code(&body), Some("FORBIDDEN"), "{query}: {body}");
    }
    let unchanged = fetch(&app.db, gql_id(&task)).await;
    assert_eq!(
        (unchanged.status, unchanged.attempts, unchanged.version),
        (TaskStatus::Pending, 0, 1)
    );
}
