//! Counts by type and status: zeros on an empty database, exact through every kind of change and concurrent writers, and each viewer's own.

use super::*;

/// (type, status) -> count, as the table holds it now.
async fn truth(db: &impl ConnectionTrait, user: Option<&str>) -> BTreeMap<(String, String), i64> {
    let (sql, values) = match user {
        Some(user) => (
            "SELECT type, status, COUNT(*) AS n FROM tasks WHERE user_id = $1 GROUP BY type, status",
            vec![user.into()],
        ),
        None => (
            "SELECT type, status, COUNT(*) AS n FROM tasks GROUP BY type, status",
            vec![],
        ),
    };
    db.query_all_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        sql,
        values,
    ))
    .await
    .unwrap()
    .iter()
    .map(|row| {
        (
            (
                row.try_get::<String>("", "type").unwrap(),
                row.try_get::<String>("", "status").unwrap(),
            ),
            row.try_get::<i64>("", "n").unwrap(),
        )
    })
    .collect()
}

/// The service's counts equal a COUNT(*) of the table, for `who`'s view.
async fn assert_exact(service: &TaskStore, db: &Db, who: &CurrentUser) {
    let stats = service
        .task_stats(
            who,
            StatsRequest {
                counts: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut counted = BTreeMap::new();
    for t in &stats.by_type {
        for (status, n) in t.counts.each() {
            if n != 0 {
                counted.insert((t.task_type.clone(), status.as_str().to_string()), n);
            }
        }
    }
    let owner = (!who.is_service).then_some(who.id.as_str());
    let expected = truth(db, owner).await;
    assert_eq!(counted, expected, "counts of {} are not exact", who.id);
    let total: i64 = expected.values().sum();
    assert_eq!(stats.by_status.total(), total);
}

async fn assert_all_exact(service: &TaskStore, db: &Db) {
    for who in [worker(), alice(), bob(), CurrentUser::user("carol")] {
        assert_exact(service, db, &who).await;
    }
}

#[tokio::test]
async fn an_empty_database_has_zeros_and_sixty_empty_minutes() {
    let app = spawn_app().await;
    for token in [app.worker_token(), app.user_token("alice")] {
        let stats = stats(&app, &token).await;
        assert_eq!(
            stats["byStatus"],
            json!([
                { "status": "PENDING", "count": 0 },
                { "status": "PROCESSING", "count": 0 },
                { "status": "COMPLETED", "count": 0 },
                { "status": "FAILED", "count": 0 },
                { "status": "CANCELLED", "count": 0 },
            ])
        );
        assert_eq!(stats["byType"], json!([]));
        assert_eq!(stats["durations"], json!([]));
        assert_eq!(stats["workers"], json!([]));
        assert!(stats["oldestPendingAgeSeconds"].is_null());
        let points = stats["throughput"].as_array().unwrap();
        assert_eq!(points.len(), 60);
        assert_minutes_in_a_row(points);
        assert!(
            points
                .iter()
                .all(|p| p["created"] == 0 && p["completed"] == 0 && p["failed"] == 0)
        );
    }
}

#[tokio::test]
async fn counts_follow_every_kind_of_change() {
    // The service alone, without the server's background reaper and fold,
    // so that each check sees only this test's changes.
    let database = TestDb::new().await;
    let (service, db) = database.service().await;
    let mut ids = Vec::new();
    for (user, task_type) in [
        (alice(), "image"),
        (alice(), "image"),
        (alice(), "text"),
        (bob(), "image"),
        (bob(), "text"),
        (bob(), "text"),
        (worker(), "image"),
    ] {
        ids.push(new_task(service.as_ref(), &user, task_type).await.id);
    }
    assert_all_exact(&service, &db).await;

    // Claims, a completion, a failure, a cancel of each kind, a delete.
    let w = as_worker();
    let claimed = claim_next(&service, &w).await;
    set_status(&service, &w, claimed.id, TaskStatus::Completed).await;
    let second = claim_next(&service, &w).await;
    let mut failure = StatusUpdate::new(second.id, TaskStatus::Failed);
    failure.error_message = Some("out of memory".into());
    service.update_task_status(&w, failure).await.unwrap();
    let third = claim_next(&service, &w).await;
    service.cancel_task(third.id, &worker()).await.unwrap();
    service.cancel_task(ids[4], &bob()).await.unwrap();
    service.delete_task(ids[5], &bob()).await.unwrap();
    assert_all_exact(&service, &db).await;

    // Retries of the failed and the cancelled ones.
    service.retry_task(second.id, &worker()).await.unwrap();
    service.retry_task(ids[4], &bob()).await.unwrap();
    assert_all_exact(&service, &db).await;

    // The reaper: one lease requeued, one failed for good.
    let a = claim_next(&service, &w).await;
    let b = claim_next(&service, &w).await;
    set_on(
        &db,
        a.id,
        "lease_expires_at = '2000-01-01T00:00:00+00:00', attempts = 5",
    )
    .await;
    set_on(&db, b.id, "lease_expires_at = '2000-01-01T00:00:00+00:00'").await;
    service.reap_expired_leases().await.unwrap();
    assert_all_exact(&service, &db).await;

    // Retention, then PostgreSQL's fold (a no-op on SQLite): still exact.
    db.execute_unprepared(
        "UPDATE tasks SET completed_at = '2000-01-01T00:00:00+00:00' WHERE completed_at IS NOT NULL",
    )
    .await
    .unwrap();
    assert!(
        service
            .prune_finished(Duration::from_secs(3600))
            .await
            .unwrap()
            > 0
    );
    assert_all_exact(&service, &db).await;
    service.fold_count_deltas().await.unwrap();
    assert_all_exact(&service, &db).await;
    if database.is_postgres {
        let deltas = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT COUNT(*) AS n FROM task_count_deltas",
            ))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(deltas.try_get::<i64>("", "n").unwrap(), 0, "folded");
    }

    // Everything deleted: no type is left, every status is 0.
    db.execute_unprepared("DELETE FROM tasks").await.unwrap();
    let stats = service
        .task_stats(&worker(), StatsRequest::all(60))
        .await
        .unwrap();
    assert!(stats.by_type.is_empty(), "{:?}", stats.by_type);
    assert_eq!(stats.by_status, Default::default());
}

/// A small deterministic random source, so a failure can be replayed.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, sides: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % sides
    }
}

#[tokio::test]
async fn counts_stay_exact_under_concurrent_writers() {
    let app = std::sync::Arc::new(spawn_app().await);
    let users = ["alice", "bob", "carol"];
    let types = ["image", "text", "audio"];
    let mut clients = Vec::new();
    for client in 0..8u64 {
        let app = app.clone();
        clients.push(tokio::spawn(async move {
            let mut dice = Dice(0x9e37_79b9_7f4a_7c15 ^ (client + 1));
            let worker = app.worker_token();
            for _ in 0..30 {
                let user = users[dice.roll(3) as usize];
                let token = app.user_token(user);
                let task_type = types[dice.roll(3) as usize];
                let created = app
                    .gql(
                        Some(&token),
                        "mutation($t: String!) { createTask(input: {type: $t}) { id } }",
                        json!({ "t": task_type }),
                    )
                    .await;
                let id = created["data"]["createTask"]["id"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{created}"))
                    .to_owned();
                let claim = app
                    .gql(
                        Some(&worker),
                        "mutation { claimTask(leaseSeconds: 30) { id } }",
                        json!({}),
                    )
                    .await;
                let claimed = claim["data"]["claimTask"]["id"].as_str().map(str::to_owned);
                let target = claimed.clone().unwrap_or_else(|| id.clone());
                let operation = match dice.roll(6) {
                    0 => "mutation($id: ID!) { updateTaskStatus(input: {id: $id, status: COMPLETED}) { id } }",
                    1 => "mutation($id: ID!) { updateTaskStatus(input: {id: $id, status: FAILED, errorMessage: \"no\"}) { id } }",
                    2 => "mutation($id: ID!) { cancelTask(id: $id) { id } }",
                    3 => "mutation($id: ID!) { deleteTask(id: $id) }",
                    4 => "mutation($id: ID!) { retryTask(id: $id) { id } }",
                    _ => "mutation($id: ID!) { heartbeatTask(id: $id, progress: 50) { id } }",
                };
                // Refusals (CONFLICT, NOT_FOUND after a racing delete) are part of the game.
                app.gql(Some(&worker), operation, json!({ "id": target }))
                    .await;
                if dice.roll(4) == 0 {
                    app.gql(
                        Some(&worker),
                        "mutation($id: ID!) { retryTask(id: $id) { id } }",
                        json!({ "id": target }),
                    )
                    .await;
                }
            }
        }));
    }
    // Meanwhile: reaper passes and (on PostgreSQL) folds, as the server runs them.
    let churn = {
        let app = app.clone();
        tokio::spawn(async move {
            for _ in 0..40 {
                app.service.reap_expired_leases().await.unwrap();
                app.service.fold_count_deltas().await.unwrap();
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    for client in clients {
        client.await.unwrap();
    }
    churn.await.unwrap();
    let total: i64 = truth(&app.db, None).await.values().sum();
    assert!(total > 100, "the clients made tasks: {total}");
    assert_all_exact(&app.service, &app.db).await;
    app.service.fold_count_deltas().await.unwrap();
    assert_all_exact(&app.service, &app.db).await;
}

#[tokio::test]
async fn a_user_sees_only_their_own_tasks_a_worker_sees_all() {
    let app = spawn_app().await;
    let service = &app.service;
    new_task(service.as_ref(), &alice(), "image").await;
    new_task(service.as_ref(), &bob(), "text").await;
    new_task(service.as_ref(), &bob(), "text").await;
    service
        .claim_task(
            &as_worker(),
            ClaimRequest {
                worker_id: Some("gpu-1".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();

    let alices = stats(&app, &app.user_token("alice")).await;
    assert_eq!(
        alices["byType"],
        json!([{ "type": "image", "pending": 0, "processing": 1, "completed": 0, "failed": 0, "cancelled": 0 }])
    );
    assert_eq!(
        alices["workers"],
        json!([{ "workerId": "gpu-1", "tasks": 1, "nextLeaseExpiry": alices["workers"][0]["nextLeaseExpiry"] }])
    );
    assert!(alices["oldestPendingAgeSeconds"].is_null(), "{alices}");
    let created: i64 = alices["throughput"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["created"].as_i64().unwrap())
        .sum();
    assert_eq!(created, 1);

    let bobs = stats(&app, &app.user_token("bob")).await;
    assert_eq!(
        bobs["byStatus"][0],
        json!({ "status": "PENDING", "count": 2 })
    );
    assert_eq!(bobs["workers"], json!([]));
    assert!(bobs["oldestPendingAgeSeconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(
        bobs["byType"].as_array().unwrap().len(),
        1,
        "no image: {bobs}"
    );

    let all = stats(&app, &app.worker_token()).await;
    let counts: Vec<i64> = all["byStatus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["count"].as_i64().unwrap())
        .collect();
    assert_eq!(counts, [2, 1, 0, 0, 0]);
    assert_eq!(all["byType"].as_array().unwrap().len(), 2);
}
