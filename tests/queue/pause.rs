//! A paused type: skipped by claims, on this instance and on another at once.

use super::*;

#[tokio::test]
async fn a_paused_type_is_skipped_by_claims_and_its_tasks_can_still_be_cancelled_and_deleted() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    let running = create(&app, &alice, json!({ "type": "video" })).await;
    assert_eq!(claim(&app, json!(null)).await["id"], running["id"]);

    let paused = set_policy(&app, "video", json!({ "paused": true })).await;
    assert_eq!(paused["policy"]["paused"], true);
    assert_eq!(
        (&paused["pending"], &paused["processing"]),
        (&json!(0), &json!(1))
    );
    let doomed = create(&app, &alice, json!({ "type": "video", "priority": 100 })).await;
    let deleted = create(&app, &alice, json!({ "type": "video", "priority": 100 })).await;
    let waiting = create(&app, &alice, json!({ "type": "video", "priority": 100 })).await;
    let image = create(&app, &alice, json!({ "type": "image" })).await;

    assert_eq!(
        claim(&app, json!(null)).await["id"],
        image["id"],
        "another type is still claimed"
    );
    assert!(claim(&app, json!(null)).await.is_null());
    assert!(claim(&app, json!(["video"])).await.is_null());

    // What was running goes on; cancel and delete work.
    let done = data(complete(&app, &id_of(&running), 1).await);
    assert_eq!(done["updateTaskStatus"]["status"], "COMPLETED");
    let cancel = "mutation($id: ID!) { cancelTask(id: $id) { status } }";
    let body = data(
        app.gql(Some(&alice), cancel, json!({ "id": doomed["id"] }))
            .await,
    );
    assert_eq!(body["cancelTask"]["status"], "CANCELLED");
    let delete = "mutation($id: ID!) { deleteTask(id: $id) }";
    let body = data(
        app.gql(Some(&alice), delete, json!({ "id": deleted["id"] }))
            .await,
    );
    assert_eq!(body["deleteTask"], true);
    let video = task_types(&app)
        .await
        .into_iter()
        .find(|t| t["type"] == "video")
        .expect("video");
    assert_eq!(
        (&video["pending"], &video["processing"]),
        (&json!(1), &json!(0))
    );

    let resumed = set_policy(&app, "video", json!({ "paused": false })).await;
    assert_eq!(resumed["policy"]["paused"], false);
    assert_eq!(claim(&app, json!(["video"])).await["id"], waiting["id"]);
    assert!(claim(&app, json!(null)).await.is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pause_set_on_one_instance_stops_claims_on_another_at_once() {
    let Some((one, two)) =
        two_apps_on_postgres_or_skip("a_pause_set_on_one_instance_stops_claims_on_another_at_once")
            .await
    else {
        return;
    };
    let alice = one.user_token("alice");
    for _ in 0..3 {
        create(&one, &alice, json!({ "type": "video" })).await;
    }
    assert!(!claim(&two, json!(null)).await.is_null());
    set_policy(&one, "video", json!({ "paused": true })).await;
    assert!(
        claim(&two, json!(null)).await.is_null(),
        "paused everywhere"
    );
    set_policy(&one, "video", json!({ "paused": false })).await;
    assert!(!claim(&two, json!(null)).await.is_null());
}
