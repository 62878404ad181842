//! Exactly-once claims: concurrent claimers through the service and GraphQL, and the oldest task first.

use super::*;

/// Every claim a claimer made, in its order.
type Claims = Vec<Vec<(Uuid, i32)>>;

/// Asserts that `claims` took each of `ids` exactly once, on its first attempt.
fn assert_exactly_once(claims: &Claims, ids: &[Uuid]) {
    let flat: Vec<(Uuid, i32)> = claims.iter().flatten().copied().collect();
    let unique: HashSet<Uuid> = flat.iter().map(|(id, _)| *id).collect();
    assert_eq!(flat.len(), ids.len(), "claims made (duplicates or losses)");
    assert_eq!(unique.len(), ids.len(), "a task was claimed twice");
    assert_eq!(unique, ids.iter().copied().collect(), "claimed other tasks");
    assert!(flat.iter().all(|(_, attempts)| *attempts == 1));
    assert!(
        claims.iter().filter(|c| !c.is_empty()).count() > 1,
        "only one claimer ever won: {:?}",
        claims.iter().map(Vec::len).collect::<Vec<_>>()
    );
}

/// Every one of `ids` is COMPLETED with the result its claimer reported.
async fn assert_all_completed(db: &impl ConnectionTrait, ids: &[Uuid]) {
    let tasks = all_tasks(db).await;
    assert_eq!(
        by_status(&tasks),
        BTreeMap::from([("completed", ids.len())])
    );
    for task in tasks {
        assert_eq!(task.result_id, Some(format!("r-{}", task.id)));
        assert_eq!((task.attempts, task.version), (1, 3), "{task:?}");
        assert!(task.lease_expires_at.is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_service_claimers_take_each_of_1000_tasks_exactly_once() {
    let test = TestDb::new().await;
    let (service, db) = test.service().await;
    let ids = create_many(&service, &alice(), "concept.image", MANY).await;

    let start = Arc::new(Barrier::new(CLAIMERS));
    let claimers: Vec<_> = (0..CLAIMERS)
        .map(|c| {
            let (service, start) = (service.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                let mut mine = Vec::new();
                while let Some(task) = service
                    .claim_task(&as_worker(), claim_request(&format!("w{c}"), 60))
                    .await
                    .expect("claim")
                {
                    assert_eq!(task.status, TaskStatus::Processing);
                    assert_eq!(task.worker_id.as_deref(), Some(format!("w{c}").as_str()));
                    service
                        .update_task_status(
                            &as_worker(),
                            completion(task.id, task.attempts, &format!("r-{}", task.id)),
                        )
                        .await
                        .expect("complete");
                    mine.push((task.id, task.attempts));
                }
                mine
            })
        })
        .collect();
    let mut claims = Claims::new();
    for claimer in claimers {
        claims.push(claimer.await.expect("claimer"));
    }
    assert_exactly_once(&claims, &ids);
    assert_all_completed(&db, &ids).await;
    assert!(
        service
            .claim_task(&as_worker(), claim_request("late", 60))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_graphql_claimers_take_each_of_1000_tasks_exactly_once() {
    let app = spawn_app().await;
    let ids = create_many(&app.service, &alice(), "concept.image", MANY).await;
    let app = Arc::new(app);

    let start = Arc::new(Barrier::new(CLAIMERS));
    let claimers: Vec<_> = (0..CLAIMERS)
        .map(|c| {
            let (app, start) = (app.clone(), start.clone());
            tokio::spawn(async move {
                let token = app.worker_token();
                start.wait().await;
                let mut mine = Vec::new();
                loop {
                    let claimed = data(
                        app.gql(
                            Some(&token),
                            CLAIM,
                            json!({ "lease": 60, "worker": format!("w{c}") }),
                        )
                        .await,
                    )["claimTask"]
                        .clone();
                    if claimed.is_null() {
                        return mine;
                    }
                    assert_eq!(claimed["status"], "PROCESSING");
                    let (id, attempts) = (gql_id(&claimed), claimed["attempts"].as_i64().unwrap());
                    let input = json!({
                        "id": id, "status": "COMPLETED",
                        "resultId": format!("r-{id}"), "expectedAttempt": attempts,
                    });
                    let done = data(
                        app.gql(Some(&token), UPDATE, json!({ "input": input }))
                            .await,
                    );
                    assert_eq!(done["updateTaskStatus"]["status"], "COMPLETED");
                    mine.push((id, attempts as i32));
                }
            })
        })
        .collect();
    let mut claims = Claims::new();
    for claimer in claimers {
        claims.push(claimer.await.expect("claimer"));
    }
    assert_exactly_once(&claims, &ids);
    assert_all_completed(&app.db, &ids).await;
}

#[tokio::test]
async fn a_single_claimer_takes_the_oldest_task_first() {
    let test = TestDb::new().await;
    let (service, db) = test.service().await;
    let mut created = Vec::new();
    for i in 0..30 {
        let task_type = if i % 2 == 0 { "image" } else { "report" };
        created.push(new_task(service.as_ref(), &alice(), task_type).await);
    }
    let mut by_age = created.clone();
    by_age.sort_by_key(|t| (t.created_at, t.id));
    assert_eq!(
        by_age.iter().map(|t| t.id).collect::<Vec<_>>(),
        created.iter().map(|t| t.id).collect::<Vec<_>>(),
        "tasks created one after another are ordered by created_at"
    );

    let mut claimed = Vec::new();
    while let Some(task) = service
        .claim_task(&as_worker(), claim_request("w", 60))
        .await
        .unwrap()
    {
        claimed.push(task);
    }
    assert_eq!(
        claimed.iter().map(|t| t.id).collect::<Vec<_>>(),
        created.iter().map(|t| t.id).collect::<Vec<_>>()
    );
    assert!(
        claimed
            .windows(2)
            .all(|w| w[0].created_at <= w[1].created_at)
    );
    assert_statuses(&db, &[("processing", 30)]).await;
}
