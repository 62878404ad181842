//! Idempotent creates: concurrent creates with one key make one task.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_with_one_idempotency_key_make_one_task() {
    let app = Arc::new(spawn_app().await);
    let input =
        json!({ "type": "image", "metadata": { "prompt": "a fox" }, "idempotencyKey": "job-42" });
    let start = Arc::new(Barrier::new(20));
    let creators: Vec<_> = (0..20)
        .map(|_| {
            let (app, start, input) = (app.clone(), start.clone(), input.clone());
            tokio::spawn(async move {
                let token = app.user_token("alice");
                start.wait().await;
                create_via_api(&app, &token, input).await
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for creator in creators {
        let task = creator.await.expect("creator");
        assert_eq!(task["status"], "PENDING");
        ids.insert(gql_id(&task));
    }
    assert_eq!(ids.len(), 1, "all 20 got the same task");
    let alices = Tasks::find()
        .filter(Column::UserId.eq("alice"))
        .all(&app.db)
        .await
        .unwrap();
    assert_eq!(alices.len(), 1);
    assert_eq!(alices[0].version, 1, "the repeats changed nothing");
    let repeat = create_via_api(&app, &app.user_token("alice"), input.clone()).await;
    assert!(ids.contains(&gql_id(&repeat)), "a later retry gets it too");

    let bobs = create_via_api(&app, &app.user_token("bob"), input.clone()).await;
    assert!(!ids.contains(&gql_id(&bobs)), "keys are per user");

    let other_type =
        json!({ "type": "report", "metadata": { "prompt": "a fox" }, "idempotencyKey": "job-42" });
    let body = app
        .gql(
            Some(&app.user_token("alice")),
            CREATE,
            json!({ "input": other_type }),
        )
        .await;
    assert_eq!(error_code(&body), Some("CONFLICT"), "{body}");
    assert_eq!(all_tasks(&app.db).await.len(), 2);
}
