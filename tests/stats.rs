//! `taskStats` and `retryTask`: counts that stay exact through every kind of
//! change and under concurrent writers, each view's scope, throughput
//! windows, durations on known data, the oldest wait, leases; retries and
//! their events; a worker's `taskEvents` across users.
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::ws::WsClient;
use common::*;
use entity::TaskStatus;
use sea_orm::{ConnectionTrait, Statement};
use serde_json::{Value, json};
use taskql::auth::CurrentUser;
use taskql::db::Db;
use taskql::service::{
    ClaimRequest, SeaTaskService, StatsRequest, StatusUpdate, TaskService, Worker,
};

const STATS: &str = "query($minutes: Int) { taskStats { \
    byStatus { status count } \
    byType { type pending processing completed failed cancelled } \
    throughput(minutes: $minutes) { at created completed failed } \
    durations { type waitP50Ms waitP95Ms runP50Ms runP95Ms runP99Ms } \
    oldestPendingAgeSeconds \
    workers { workerId tasks nextLeaseExpiry } } }";

async fn stats(app: &TestApp, token: &str) -> Value {
    let body = app.gql(Some(token), STATS, json!({})).await;
    assert!(body["errors"].is_null(), "{body}");
    body["data"]["taskStats"].clone()
}

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
async fn assert_exact(service: &SeaTaskService, db: &Db, who: &CurrentUser) {
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

async fn assert_all_exact(service: &SeaTaskService, db: &Db) {
    for who in [worker(), alice(), bob(), CurrentUser::user("carol")] {
        assert_exact(service, db, &who).await;
    }
}

/// `UPDATE tasks SET {set}` of one task, behind the service's back (ids
/// are blobs on SQLite, so the id is bound).
async fn update_task(app: &TestApp, id: uuid::Uuid, set: &str) {
    set_on(&app.db, id, set).await;
}

async fn set_on(db: &Db, id: uuid::Uuid, set: &str) {
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        format!("UPDATE tasks SET {set} WHERE id = $1"),
        [id.into()],
    ))
    .await
    .unwrap();
}

/// The task `w` claims next (there is one).
async fn claim_next(service: &SeaTaskService, w: &Worker) -> entity::Task {
    service
        .claim_task(w, ClaimRequest::default())
        .await
        .unwrap()
        .unwrap()
}

/// `w` moves its task `id` to `status`.
async fn set_status(service: &SeaTaskService, w: &Worker, id: uuid::Uuid, status: TaskStatus) {
    service
        .update_task_status(w, StatusUpdate::new(id, status))
        .await
        .unwrap();
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

fn minute_of(point: &Value) -> i64 {
    let at = chrono::DateTime::parse_from_rfc3339(point["at"].as_str().unwrap()).unwrap();
    assert_eq!(at.timestamp() % 60, 0, "a point starts a minute: {point}");
    at.timestamp() / 60
}

/// Consecutive minutes, oldest first, the last being the current one.
fn assert_minutes_in_a_row(points: &[Value]) {
    let first = minute_of(&points[0]);
    for (i, point) in points.iter().enumerate() {
        assert_eq!(minute_of(point), first + i as i64, "{point}");
    }
    let now = chrono::Utc::now().timestamp() / 60;
    let last = minute_of(points.last().unwrap());
    assert!((now - 1..=now).contains(&last), "last {last}, now {now}");
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

#[tokio::test]
async fn throughput_covers_a_day_minute_by_minute() {
    let app = spawn_app().await;
    let service = &app.service;
    let w = as_worker();
    // Three tasks: one made 23 hours ago and completed 22 hours ago, one
    // failed 30 minutes ago, one made now.
    let old = new_task(service.as_ref(), &alice(), "image").await;
    let failed = new_task(service.as_ref(), &alice(), "image").await;
    new_task(service.as_ref(), &alice(), "image").await;
    for id in [old.id, failed.id] {
        service
            .claim_task(&w, ClaimRequest::default())
            .await
            .unwrap();
        let status = if id == old.id {
            TaskStatus::Completed
        } else {
            TaskStatus::Failed
        };
        set_status(service, &w, id, status).await;
    }
    let now = chrono::Utc::now();
    let at = |ago: chrono::TimeDelta| taskql_time(now - ago);
    update_task(
        &app,
        old.id,
        &format!(
            "created_at = '{}', completed_at = '{}'",
            at(chrono::TimeDelta::hours(23)),
            at(chrono::TimeDelta::hours(22)),
        ),
    )
    .await;
    update_task(
        &app,
        failed.id,
        &format!(
            "created_at = '{}', completed_at = '{}'",
            at(chrono::TimeDelta::minutes(31)),
            at(chrono::TimeDelta::minutes(30)),
        ),
    )
    .await;

    let body = app
        .gql(
            Some(&app.worker_token()),
            "query { taskStats { day: throughput(minutes: 1440) { at created completed failed } hour: throughput { at created completed failed } } }",
            json!({}),
        )
        .await;
    assert!(body["errors"].is_null(), "{body}");
    let day = body["data"]["taskStats"]["day"].as_array().unwrap().clone();
    let hour = body["data"]["taskStats"]["hour"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(day.len(), 1440);
    assert_eq!(hour.len(), 60);
    assert_minutes_in_a_row(&day);
    assert_eq!(
        &day[1380..],
        &hour[..],
        "the hour is the day's last 60 minutes"
    );
    let minute = |t: chrono::DateTime<chrono::Utc>| t.timestamp() / 60;
    let find = |points: &[Value], t: chrono::DateTime<chrono::Utc>| {
        points
            .iter()
            .find(|p| minute_of(p) == minute(t))
            .cloned()
            .unwrap()
    };
    let made_old = find(&day, now - chrono::TimeDelta::hours(23));
    assert_eq!(made_old["created"], 1, "{made_old}");
    assert_eq!(
        find(&day, now - chrono::TimeDelta::hours(22))["completed"],
        1
    );
    assert_eq!(
        find(&hour, now - chrono::TimeDelta::minutes(31))["created"],
        1
    );
    assert_eq!(
        find(&hour, now - chrono::TimeDelta::minutes(30))["failed"],
        1
    );
    let sum = |points: &[Value], key: &str| -> i64 {
        points.iter().map(|p| p[key].as_i64().unwrap()).sum()
    };
    assert_eq!(
        (
            sum(&day, "created"),
            sum(&day, "completed"),
            sum(&day, "failed")
        ),
        (3, 1, 1)
    );
    assert_eq!(
        (
            sum(&hour, "created"),
            sum(&hour, "completed"),
            sum(&hour, "failed")
        ),
        (2, 0, 1)
    );
}

/// A timestamp as the server stores it (microseconds, UTC).
fn taskql_time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
}

/// Sets a task's time `column` to `seconds` ago.
async fn set_seconds_ago(app: &TestApp, id: uuid::Uuid, column: &str, seconds: i64) {
    let at = taskql_time(chrono::Utc::now() - chrono::TimeDelta::seconds(seconds));
    update_task(app, id, &format!("{column} = '{at}'")).await;
}

#[tokio::test]
async fn bad_minutes_are_bad_user_input() {
    let app = spawn_app().await;
    for minutes in [0, -5, 1441] {
        let body = app
            .gql(
                Some(&app.worker_token()),
                "query($m: Int) { taskStats { byStatus { count } throughput(minutes: $m) { created } } }",
                json!({ "m": minutes }),
            )
            .await;
        assert_eq!(error_code(&body), Some("BAD_USER_INPUT"), "{body}");
        let message = body["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains("1440"), "{message}");
    }
    // A good window beside a bad one does not hide the bad one.
    let body = app
        .gql(
            Some(&app.worker_token()),
            "query { taskStats { a: throughput(minutes: 60) { created } b: throughput(minutes: 0) { created } } }",
            json!({}),
        )
        .await;
    assert_eq!(error_code(&body), Some("BAD_USER_INPUT"), "{body}");
    let ok = app
        .gql(
            Some(&app.worker_token()),
            "query { taskStats { throughput(minutes: 1) { created } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        ok["data"]["taskStats"]["throughput"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let anonymous = app
        .gql(
            None,
            "query { taskStats { byStatus { count } } }",
            json!({}),
        )
        .await;
    assert_eq!(error_code(&anonymous), Some("UNAUTHENTICATED"));
}

#[tokio::test]
async fn durations_are_percentiles_of_the_last_hour() {
    let app = spawn_app().await;
    let service = &app.service;
    // 100 tasks of "known": wait i*10 ms, run i*20 ms, finished 10 minutes
    // ago; half completed, half failed. Beside them, tasks that must not
    // count: cancelled, finished two hours ago, still processing.
    let mut known = Vec::new();
    for _ in 0..100 {
        known.push(new_task(service.as_ref(), &alice(), "known").await.id);
    }
    let cancelled = new_task(service.as_ref(), &alice(), "known").await.id;
    let old = new_task(service.as_ref(), &alice(), "known").await.id;
    let running = new_task(service.as_ref(), &bob(), "other").await.id;
    let base = chrono::Utc::now() - chrono::TimeDelta::minutes(20);
    let finished = chrono::Utc::now() - chrono::TimeDelta::minutes(10);
    for (i, id) in known.iter().enumerate() {
        let i = i as i64 + 1;
        let started = base + chrono::TimeDelta::milliseconds(i * 10);
        let status = if i % 2 == 0 { "completed" } else { "failed" };
        let completed = started + chrono::TimeDelta::milliseconds(i * 20);
        // completed_at must be within the hour; keep the run time exact by
        // moving created/started instead.
        let shift = finished - completed;
        update_task(
            &app,
            *id,
            &format!(
                "status = '{status}', created_at = '{}', started_at = '{}', completed_at = '{}'",
                taskql_time(base + shift),
                taskql_time(started + shift),
                taskql_time(completed + shift),
            ),
        )
        .await;
    }
    update_task(
        &app,
        cancelled,
        &format!(
            "status = 'cancelled', started_at = '{}', completed_at = '{}'",
            taskql_time(base),
            taskql_time(finished)
        ),
    )
    .await;
    update_task(
        &app,
        old,
        &format!(
            "status = 'completed', started_at = '{}', completed_at = '{}'",
            taskql_time(base - chrono::TimeDelta::hours(2)),
            taskql_time(base - chrono::TimeDelta::hours(2) + chrono::TimeDelta::seconds(100)),
        ),
    )
    .await;
    update_task(
        &app,
        running,
        &format!(
            "status = 'processing', started_at = '{}'",
            taskql_time(base)
        ),
    )
    .await;

    // Alice's view reads her rows: exact, as percentile_cont. A worker's
    // merges per-minute histograms: within a bucket (a factor 2^(1/8)) of
    // the value at the lower of the two ranks percentile_cont interpolates
    // between.
    for (token, exact) in [(app.user_token("alice"), true), (app.worker_token(), false)] {
        let view = stats(&app, &token).await;
        let durations = view["durations"].as_array().unwrap();
        assert_eq!(durations.len(), 1, "only 'known' finished: {durations:?}");
        let d = &durations[0];
        assert_eq!(d["type"], "known");
        for (key, interpolated, lower_rank) in [
            ("waitP50Ms", 505.0, 500.0),
            ("waitP95Ms", 950.5, 950.0),
            ("runP50Ms", 1010.0, 1000.0),
            ("runP95Ms", 1901.0, 1900.0),
            ("runP99Ms", 1980.2, 1980.0),
        ] {
            let got = d[key].as_f64().unwrap_or_else(|| panic!("{key}: {d}"));
            if exact {
                assert!(
                    (got - interpolated).abs() < 0.5,
                    "{key}: {got} != {interpolated}"
                );
            } else {
                assert_within_a_bucket(key, got, lower_rank);
            }
        }
    }
    let bobs = stats(&app, &app.user_token("bob")).await;
    assert_eq!(bobs["durations"], json!([]));
}

/// The bound docs/design.md states for a worker's percentiles: within a
/// factor 2^(1/8) of `value`, or within 1 ms below 1 ms (and 0.1 ms for
/// the rounding of times in SQLite's date arithmetic).
fn assert_within_a_bucket(what: &str, got: f64, value: f64) {
    let ratio = 2f64.powf(1.0 / 8.0);
    let slack = ((ratio - 1.0) * value).max(1.0) + 0.1;
    assert!(
        (got - value).abs() <= slack,
        "{what}: {got} is not within a bucket of {value}"
    );
}

#[tokio::test]
async fn oldest_pending_age_and_workers_with_leases() {
    let app = spawn_app().await;
    let service = &app.service;
    let oldest = new_task(service.as_ref(), &alice(), "image").await;
    for _ in 0..4 {
        new_task(service.as_ref(), &bob(), "image").await;
    }
    set_seconds_ago(&app, oldest.id, "created_at", 120).await;
    let all = stats(&app, &app.worker_token()).await;
    let age = all["oldestPendingAgeSeconds"].as_f64().unwrap();
    assert!((119.0..130.0).contains(&age), "{age}");
    let bobs = stats(&app, &app.user_token("bob")).await;
    assert!(bobs["oldestPendingAgeSeconds"].as_f64().unwrap() < 60.0);

    // gpu-1 holds two leases (the oldest task first), gpu-2 one whose
    // lease has run out (not reaped yet): only gpu-1 holds leases now.
    let w = as_worker();
    let claim = |worker_id: &str, lease: u64| ClaimRequest {
        worker_id: Some(worker_id.into()),
        lease: Some(Duration::from_secs(lease)),
        ..Default::default()
    };
    let first = service
        .claim_task(&w, claim("gpu-1", 30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.id, oldest.id);
    service.claim_task(&w, claim("gpu-1", 600)).await.unwrap();
    let expired = service
        .claim_task(&w, claim("gpu-2", 60))
        .await
        .unwrap()
        .unwrap();
    set_seconds_ago(&app, expired.id, "lease_expires_at", 1).await;
    let all = stats(&app, &app.worker_token()).await;
    let workers = all["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 1, "{workers:?}");
    assert_eq!(workers[0]["workerId"], "gpu-1");
    assert_eq!(workers[0]["tasks"], 2);
    let next =
        chrono::DateTime::parse_from_rfc3339(workers[0]["nextLeaseExpiry"].as_str().unwrap())
            .unwrap();
    let lease = first.lease_expires_at.unwrap();
    assert_eq!(
        next.timestamp_micros(),
        lease.timestamp_micros(),
        "the sooner lease"
    );
    let alices = stats(&app, &app.user_token("alice")).await;
    assert_eq!(alices["workers"][0]["tasks"], 1, "{alices}");
    assert!(alices["oldestPendingAgeSeconds"].is_null());
}

const TASK: &str = "id status attempts progress resultId errorMessage startedAt completedAt userId workerId leaseExpiresAt";

#[tokio::test]
async fn retry_puts_failed_or_cancelled_tasks_back_to_pending() {
    let app = spawn_app().await;
    let service = &app.service;
    let w = as_worker();
    let alice_token = app.user_token("alice");
    let retry = |token: String, id: uuid::Uuid| {
        let app = &app;
        async move {
            app.gql(
                Some(&token),
                &format!("mutation($id: ID!) {{ retryTask(id: $id) {{ {TASK} }} }}"),
                json!({ "id": id }),
            )
            .await
        }
    };

    // A failed task, retried by its owner: as new, but for attempts, which
    // never go down (the fencing number).
    let failed = new_task(service.as_ref(), &alice(), "image").await;
    service
        .claim_task(
            &w,
            ClaimRequest {
                worker_id: Some("gpu-1".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut failure = StatusUpdate::new(failed.id, TaskStatus::Failed);
    failure.error_message = Some("out of memory".into());
    failure.result_id = Some("partial-1".into());
    failure.progress = Some(70);
    let before = service.update_task_status(&w, failure).await.unwrap();
    let body = retry(alice_token.clone(), failed.id).await;
    let task = &body["data"]["retryTask"];
    assert_eq!(
        task,
        &json!({
            "id": failed.id.to_string(), "status": "PENDING", "attempts": 1, "progress": null,
            "resultId": null, "errorMessage": null, "startedAt": null, "completedAt": null,
            "userId": "alice", "workerId": null, "leaseExpiresAt": null,
        }),
        "{body}"
    );
    let stored = service.get_task(failed.id, &alice()).await.unwrap();
    assert_eq!(stored.version, before.version + 1);
    // It can be claimed again, as attempt 2.
    let again = claim_next(service, &w).await;
    assert_eq!((again.id, again.attempts), (failed.id, 2));

    // A cancelled task of bob's, retried by a worker.
    let cancelled = new_task(service.as_ref(), &bob(), "image").await;
    service.cancel_task(cancelled.id, &bob()).await.unwrap();
    let body = retry(app.worker_token(), cancelled.id).await;
    assert_eq!(body["data"]["retryTask"]["status"], "PENDING", "{body}");

    // Bob's task is NOT_FOUND to alice, and unchanged.
    service.cancel_task(cancelled.id, &bob()).await.unwrap();
    let body = retry(alice_token.clone(), cancelled.id).await;
    assert_eq!(error_code(&body), Some("NOT_FOUND"), "{body}");
    assert_eq!(
        service.get_task(cancelled.id, &bob()).await.unwrap().status,
        TaskStatus::Cancelled
    );
    let body = retry(alice_token.clone(), uuid::Uuid::now_v7()).await;
    assert_eq!(error_code(&body), Some("NOT_FOUND"), "{body}");

    // PENDING, PROCESSING and COMPLETED tasks: CONFLICT naming the status.
    let pending = new_task(service.as_ref(), &alice(), "text").await;
    let body = retry(alice_token.clone(), pending.id).await;
    assert_eq!(error_code(&body), Some("CONFLICT"), "{body}");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("PENDING"),
        "{body}"
    );
    // (`again` is PROCESSING.)
    let body = retry(alice_token.clone(), failed.id).await;
    assert_eq!(error_code(&body), Some("CONFLICT"), "{body}");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("PROCESSING")
    );
    set_status(service, &w, failed.id, TaskStatus::Completed).await;
    let body = retry(alice_token.clone(), failed.id).await;
    assert_eq!(error_code(&body), Some("CONFLICT"), "{body}");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("COMPLETED")
    );
    let body = app
        .gql(None, "mutation { retryTask(id: \"x\") { id } }", json!({}))
        .await;
    assert_eq!(error_code(&body), Some("UNAUTHENTICATED"));
}

/// Waits until `events` (a `taskEvents` stream that sees `owner`'s tasks) is
/// live: creates probe tasks until one arrives.
async fn wait_until_live(app: &TestApp, owner: &CurrentUser, events: &mut ws::Subscription) {
    for _ in 0..50 {
        let probe = new_task(app.service.as_ref(), owner, "probe")
            .await
            .id
            .to_string();
        while let Some(event) = events.next_within(Duration::from_millis(200)).await {
            if event.data().unwrap_or_else(|| panic!("{event:?}"))["taskEvents"]["task"]["id"]
                == probe.as_str()
            {
                return;
            }
        }
    }
    panic!("the taskEvents subscription never went live");
}

/// The next `taskEvents` event about `id`.
async fn next_about(events: &mut ws::Subscription, id: &str) -> Value {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), events.next())
            .await
            .expect("an event in time");
        let data = event.data().unwrap_or_else(|| panic!("{event:?}")).clone();
        if data["taskEvents"]["task"]["id"] == id {
            return data["taskEvents"].clone();
        }
    }
}

#[tokio::test]
async fn a_retry_is_an_event_for_watchers_and_other_instances() {
    let app = spawn_app().await;
    // On PostgreSQL, a second instance on the same database hears it too.
    let other = if app.database.is_postgres {
        Some(spawn_app_with(app.database.clone(), |_| {}).await)
    } else {
        None
    };
    let task = new_task(app.service.as_ref(), &alice(), "image").await;
    app.service.cancel_task(task.id, &alice()).await.unwrap();
    let id = task.id.to_string();
    let query = "subscription { taskEvents { kind task { id status attempts userId } } }";
    let mut watchers = Vec::new();
    for base in std::iter::once(&app).chain(other.as_ref()) {
        let client = WsClient::connect_as(&base.ws_url, &app.user_token("alice")).await;
        let events = client.subscribe(query, json!({}));
        watchers.push((client, events));
    }
    for (_, events) in &mut watchers {
        wait_until_live(&app, &alice(), events).await;
    }
    let body = app
        .gql(
            Some(&app.user_token("alice")),
            "mutation($id: ID!) { retryTask(id: $id) { status } }",
            json!({ "id": id }),
        )
        .await;
    assert_eq!(body["data"]["retryTask"]["status"], "PENDING", "{body}");
    for (_, events) in &mut watchers {
        let event = next_about(events, &id).await;
        assert_eq!(
            event,
            json!({ "kind": "UPDATED", "task": { "id": id, "status": "PENDING", "attempts": 0, "userId": "alice" } })
        );
    }
}

#[tokio::test]
async fn a_workers_task_events_carry_every_users_changes() {
    let app = spawn_app().await;
    let query = "subscription { taskEvents { kind task { id status userId } } }";
    let worker_client = WsClient::connect_as(&app.ws_url, &app.worker_token()).await;
    let mut everything = worker_client.subscribe(query, json!({}));
    let bob_client = WsClient::connect_as(&app.ws_url, &app.user_token("bob")).await;
    let mut bobs = bob_client.subscribe(query, json!({}));
    wait_until_live(&app, &bob(), &mut everything).await;
    wait_until_live(&app, &bob(), &mut bobs).await;
    // Bob's stream may still hold probes the worker's stream went live on.
    let marker = new_task(app.service.as_ref(), &bob(), "marker")
        .await
        .id
        .to_string();
    next_about(&mut bobs, &marker).await;
    next_about(&mut everything, &marker).await;

    let alices = new_task(app.service.as_ref(), &alice(), "image")
        .await
        .id
        .to_string();
    app.service
        .delete_task(alices.parse().unwrap(), &alice())
        .await
        .unwrap();
    let last = new_task(app.service.as_ref(), &bob(), "image")
        .await
        .id
        .to_string();
    let created = next_about(&mut everything, &alices).await;
    assert_eq!(created["kind"], "CREATED");
    assert_eq!(created["task"]["userId"], "alice");
    assert_eq!(
        next_about(&mut everything, &alices).await["kind"],
        "DELETED"
    );
    assert_eq!(next_about(&mut everything, &last).await["kind"], "CREATED");
    // Bob's stream went from his probe to his next task: nothing of alice's.
    let next = bobs.next().await;
    assert_eq!(
        next.data().unwrap()["taskEvents"]["task"]["id"],
        last,
        "{next:?}"
    );
}

#[tokio::test]
async fn tasks_show_owner_worker_and_lease_and_filter_by_owner() {
    let app = spawn_app().await;
    let service = &app.service;
    new_task(service.as_ref(), &alice(), "image").await;
    new_task(service.as_ref(), &bob(), "image").await;
    let claimed = service
        .claim_task(
            &as_worker(),
            ClaimRequest {
                worker_id: Some("gpu-7".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .unwrap();
    let query = "query($user: String) { tasks(userId: $user) { nodes { userId workerId leaseExpiresAt } } }";
    let body = app
        .gql(Some(&app.worker_token()), query, json!({ "user": "alice" }))
        .await;
    let nodes = body["data"]["tasks"]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{body}");
    assert_eq!(nodes[0]["userId"], "alice");
    assert_eq!(nodes[0]["workerId"], "gpu-7");
    let lease =
        chrono::DateTime::parse_from_rfc3339(nodes[0]["leaseExpiresAt"].as_str().unwrap()).unwrap();
    assert_eq!(
        lease.timestamp_micros(),
        claimed.lease_expires_at.unwrap().timestamp_micros()
    );
    let all = app
        .gql(Some(&app.worker_token()), query, json!({ "user": null }))
        .await;
    assert_eq!(all["data"]["tasks"]["nodes"].as_array().unwrap().len(), 2);
    // A user naming someone else gets nothing of theirs.
    let body = app
        .gql(
            Some(&app.user_token("alice")),
            query,
            json!({ "user": "bob" }),
        )
        .await;
    assert_eq!(body["data"]["tasks"]["nodes"], json!([]), "{body}");
    let body = app
        .gql(Some(&app.user_token("alice")), query, json!({ "user": "" }))
        .await;
    assert_eq!(error_code(&body), Some("BAD_USER_INPUT"), "{body}");
}

/// One task's times, as the table holds them now.
struct Row {
    user_id: String,
    status: String,
    created_at: chrono::DateTime<chrono::Utc>,
    completed_at: Option<chrono::DateTime<chrono::Utc>>,
}

async fn rows(db: &impl ConnectionTrait) -> Vec<Row> {
    db.query_all_raw(Statement::from_string(
        db.get_database_backend(),
        "SELECT user_id, status, created_at, completed_at FROM tasks",
    ))
    .await
    .unwrap()
    .iter()
    .map(|row| Row {
        user_id: row.try_get("", "user_id").unwrap(),
        status: row.try_get("", "status").unwrap(),
        created_at: row.try_get("", "created_at").unwrap(),
        completed_at: row.try_get("", "completed_at").unwrap(),
    })
    .collect()
}

fn minute_at(t: chrono::DateTime<chrono::Utc>) -> i64 {
    t.timestamp().div_euclid(60)
}

/// minute -> [created, completed, failed] of the tasks in the table now
/// (of `user`, or everyone's), from `first` on; only minutes with some.
fn ground_truth(rows: &[Row], user: Option<&str>, first: i64) -> BTreeMap<i64, [i64; 3]> {
    let mut minutes: BTreeMap<i64, [i64; 3]> = BTreeMap::new();
    for row in rows.iter().filter(|r| user.is_none_or(|u| r.user_id == u)) {
        let created = minute_at(row.created_at);
        if created >= first {
            minutes.entry(created).or_default()[0] += 1;
        }
        let index = match row.status.as_str() {
            "completed" => 1,
            "failed" => 2,
            _ => continue,
        };
        if let Some(done) = row.completed_at.map(minute_at)
            && done >= first
        {
            minutes.entry(done).or_default()[index] += 1;
        }
    }
    minutes
}

/// The day's throughput `token` sees: its first minute, and minute ->
/// [created, completed, failed] for the minutes with some.
async fn day_throughput(app: &TestApp, token: &str) -> (i64, BTreeMap<i64, [i64; 3]>) {
    let body = app
        .gql(
            Some(token),
            "query { taskStats { throughput(minutes: 1440) { at created completed failed } } }",
            json!({}),
        )
        .await;
    assert!(body["errors"].is_null(), "{body}");
    let points = body["data"]["taskStats"]["throughput"].as_array().unwrap();
    assert_eq!(points.len(), 1440);
    let mut minutes = BTreeMap::new();
    for point in points {
        let counts = ["created", "completed", "failed"].map(|k| point[k].as_i64().unwrap());
        if counts != [0; 3] {
            minutes.insert(minute_of(point), counts);
        }
    }
    (minute_of(&points[0]), minutes)
}

/// Every view's day of throughput equals what the table holds now.
async fn assert_throughput_exact(app: &TestApp, users: &[&str]) {
    let table = rows(&app.db).await;
    let mut views = vec![(None, app.worker_token())];
    views.extend(users.iter().map(|u| (Some(*u), app.user_token(u))));
    for (user, token) in views {
        let (first, seen) = day_throughput(app, &token).await;
        assert_eq!(
            seen,
            ground_truth(&table, user, first),
            "throughput of {user:?} is not what the table holds"
        );
    }
}

#[tokio::test]
async fn per_minute_counts_equal_the_table_through_every_kind_of_change() {
    let app = spawn_app().await;
    let service = &app.service;
    let w = as_worker();
    let carol = CurrentUser::user("carol");
    let users = ["alice", "bob", "carol"];
    let mut ids = Vec::new();
    for (i, task_type) in ["image", "text", "audio"]
        .iter()
        .cycle()
        .take(24)
        .enumerate()
    {
        let owner = [alice(), bob(), carol.clone()][i % 3].clone();
        ids.push(new_task(service.as_ref(), &owner, task_type).await.id);
    }
    // Claims and ends of every kind, then retries and deletes.
    let mut claimed = Vec::new();
    for _ in 0..16 {
        claimed.push(claim_next(service, &w).await);
    }
    for (i, task) in claimed.iter().enumerate() {
        let mut update = StatusUpdate::new(
            task.id,
            match i % 4 {
                0 | 1 => TaskStatus::Completed,
                2 => TaskStatus::Failed,
                _ => TaskStatus::Cancelled,
            },
        );
        if i % 4 == 2 {
            update.error_message = Some("no".into());
        }
        if i % 4 == 3 {
            service.cancel_task(task.id, &worker()).await.unwrap();
        } else {
            service.update_task_status(&w, update).await.unwrap();
        }
    }
    assert_throughput_exact(&app, &users).await;

    // Spread over the day, behind the service's back (every claimed task
    // has ended): created, started and finished minutes, hours or a day and
    // more ago (some out of the window).
    for (i, task) in claimed.iter().enumerate() {
        let ago = chrono::TimeDelta::minutes([3, 17, 59, 61, 130, 700, 1300, 1500][i % 8]);
        let created = chrono::Utc::now() - ago;
        let started = created + chrono::TimeDelta::milliseconds(150 * i as i64 + 3);
        let done = started + chrono::TimeDelta::seconds(7 * i as i64 + 1);
        update_task(
            &app,
            task.id,
            &format!(
                "created_at = '{}', started_at = '{}', completed_at = '{}'",
                taskql_time(created),
                taskql_time(started),
                taskql_time(done)
            ),
        )
        .await;
    }
    set_seconds_ago(&app, ids[20], "created_at", 90 * 60).await;
    assert_throughput_exact(&app, &users).await;

    // Retries of a failed and a cancelled task, deletes (one finished, one
    // pending, one of raw SQL), a type renamed and a status set by hand.
    let failed = claimed[2].id;
    let cancelled = claimed[3].id;
    service.retry_task(failed, &worker()).await.unwrap();
    service.retry_task(cancelled, &worker()).await.unwrap();
    let done = claimed[4].id;
    let owner_of = |id| {
        let i = ids.iter().position(|x| *x == id).unwrap();
        [alice(), bob(), carol.clone()][i % 3].clone()
    };
    service.delete_task(done, &owner_of(done)).await.unwrap();
    let pending = *ids
        .iter()
        .rev()
        .find(|id| claimed.iter().all(|c| c.id != **id))
        .unwrap();
    service
        .delete_task(pending, &owner_of(pending))
        .await
        .unwrap();
    app.db
        .execute_raw(Statement::from_sql_and_values(
            app.db.get_database_backend(),
            "DELETE FROM tasks WHERE id = $1",
            [claimed[5].id.into()],
        ))
        .await
        .unwrap();
    update_task(&app, claimed[8].id, "type = 'renamed'").await;
    update_task(&app, claimed[9].id, "status = 'failed'").await;
    assert_throughput_exact(&app, &users).await;

    // PostgreSQL's fold changes nothing that can be seen.
    app.service.fold_count_deltas().await.unwrap();
    assert_throughput_exact(&app, &users).await;
}

#[tokio::test]
async fn percentiles_from_merged_minutes_are_within_a_bucket_of_exact_ones() {
    let app = spawn_app().await;
    let service = &app.service;
    // 240 tasks of two types finished over the last 50 minutes, with waits
    // from 0.4 ms to about 20 minutes and runs from 2 ms to about an hour,
    // spread evenly on a log scale; a failed one among every three.
    let now = chrono::Utc::now();
    let mut expected: BTreeMap<&str, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for i in 0..240i64 {
        let task_type = if i % 2 == 0 { "even" } else { "odd" };
        let owner = if i % 5 == 0 { bob() } else { alice() };
        let id = new_task(service.as_ref(), &owner, task_type).await.id;
        let x = (i * 97 % 240) as f64 / 239.0;
        let wait_us = (400.0 * 3_000_000f64.powf(x)).round() as i64;
        let run_us = (2000.0 * 1_800_000f64.powf(1.0 - x)).round() as i64;
        let done = now - chrono::TimeDelta::seconds(5 + i * 12);
        let started = done - chrono::TimeDelta::microseconds(run_us);
        let created = started - chrono::TimeDelta::microseconds(wait_us);
        let status = if i % 3 == 0 { "failed" } else { "completed" };
        update_task(
            &app,
            id,
            &format!(
                "status = '{status}', created_at = '{}', started_at = '{}', completed_at = '{}'",
                taskql_time(created),
                taskql_time(started),
                taskql_time(done)
            ),
        )
        .await;
        let (waits, runs) = expected.entry(task_type).or_default();
        waits.push(wait_us as f64 / 1000.0);
        runs.push(run_us as f64 / 1000.0);
    }
    let view = stats(&app, &app.worker_token()).await;
    let durations = view["durations"].as_array().unwrap();
    assert_eq!(durations.len(), 2, "{durations:?}");
    for d in durations {
        let (waits, runs) = expected.get_mut(d["type"].as_str().unwrap()).unwrap();
        waits.sort_by(f64::total_cmp);
        runs.sort_by(f64::total_cmp);
        for (key, values, p) in [
            ("waitP50Ms", &*waits, 0.50),
            ("waitP95Ms", &*waits, 0.95),
            ("runP50Ms", &*runs, 0.50),
            ("runP95Ms", &*runs, 0.95),
            ("runP99Ms", &*runs, 0.99),
        ] {
            let lower_rank = values[(p * (values.len() - 1) as f64).floor() as usize];
            let got = d[key].as_f64().unwrap();
            assert_within_a_bucket(key, got, lower_rank);
            let exact = taskql::service::stats::percentile(values, p).unwrap();
            assert!(
                (got - exact).abs() <= 0.25 * exact + 1.0,
                "{key}: {got} against {exact}"
            );
        }
    }
    // Bob's view is his rows (of both types), exact.
    let bobs = stats(&app, &app.user_token("bob")).await;
    assert_eq!(bobs["durations"].as_array().unwrap().len(), 2, "{bobs}");
}

/// The bounds the triggers sort times by are the ones the service reads
/// percentiles with.
#[tokio::test]
async fn the_buckets_in_the_database_are_the_services() {
    let app = spawn_app().await;
    let bounds: Vec<f64> = app
        .db
        .query_all_raw(Statement::from_string(
            app.db.get_database_backend(),
            "SELECT lower_ms, CAST(bucket AS INTEGER) AS bucket FROM task_stats_buckets ORDER BY lower_ms",
        ))
        .await
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, row)| {
            assert_eq!(row.try_get::<i32>("", "bucket").unwrap(), i as i32 + 1);
            row.try_get::<f64>("", "lower_ms").unwrap()
        })
        .collect();
    assert_eq!(bounds.len(), taskql::service::stats::LAST_BUCKET as usize);
    for (i, bound) in bounds.iter().enumerate() {
        let (low, _) = taskql::service::stats::bucket_range(i as i32 + 1);
        assert!(
            (bound - low).abs() <= 1e-9 * low,
            "bucket {}: {bound} != {low}",
            i + 1
        );
    }
}

async fn stats_rows_before(db: &impl ConnectionTrait, minute: i64) -> i64 {
    db.query_one_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "SELECT COUNT(*) AS n FROM task_stats_minutes WHERE minute < $1",
        [minute.into()],
    ))
    .await
    .unwrap()
    .unwrap()
    .try_get::<i64>("", "n")
    .unwrap()
}

#[tokio::test]
async fn minutes_older_than_a_day_and_an_hour_are_pruned() {
    let app = spawn_app().await;
    let service = &app.service;
    let w = as_worker();
    // One task made and finished 1600 minutes ago, one 1400 minutes ago.
    let old = new_task(service.as_ref(), &alice(), "image").await.id;
    let recent = new_task(service.as_ref(), &alice(), "image").await.id;
    for _ in 0..2 {
        let task = claim_next(service, &w).await;
        set_status(service, &w, task.id, TaskStatus::Completed).await;
    }
    for (id, minutes) in [(old, 1600), (recent, 1400)] {
        let at = taskql_time(chrono::Utc::now() - chrono::TimeDelta::minutes(minutes));
        update_task(
            &app,
            id,
            &format!("created_at = '{at}', started_at = '{at}', completed_at = '{at}'"),
        )
        .await;
    }
    service.fold_count_deltas().await.unwrap();
    let kept_from = chrono::Utc::now().timestamp().div_euclid(60)
        - taskql::service::stats::STATS_MINUTES_KEPT
        + 1;
    assert!(
        stats_rows_before(&app.db, kept_from).await > 0,
        "the old minutes are there"
    );
    // (The server's own pass, at start and every minute, may prune first.)
    service.prune_stats_minutes().await.unwrap();
    assert_eq!(stats_rows_before(&app.db, kept_from).await, 0, "pruned");
    assert!(
        stats_rows_before(&app.db, kept_from + 300).await > 0,
        "the minutes of the day are kept"
    );
    assert_throughput_exact(&app, &["alice"]).await;

    // Deleting the old task takes from a minute already pruned: prune
    // again, and the day still shows what the table holds.
    service.delete_task(old, &alice()).await.unwrap();
    service.fold_count_deltas().await.unwrap();
    service.prune_stats_minutes().await.unwrap();
    assert_eq!(stats_rows_before(&app.db, kept_from).await, 0);
    assert_throughput_exact(&app, &["alice"]).await;
}

/// Tasks that exist before the per-minute counters are counted by the
/// migration, so an upgrade shows the same numbers; the counters go with a
/// migration down and come back with it up.
#[tokio::test]
async fn an_upgrade_counts_the_tasks_already_there() {
    use migration::{Migrator, MigratorTrait};
    let test = std::sync::Arc::new(TestDb::new().await);
    let db = taskql::db::connect(&test.url, 4).await.expect("connect");
    Migrator::up(&db, Some(6)).await.expect("the first six");
    let now = chrono::Utc::now();
    for i in 0..40i64 {
        // Up to 1521 minutes ago: the last are older than the day.
        let created = now - chrono::TimeDelta::minutes(i * i);
        let started = created + chrono::TimeDelta::milliseconds(30 * i + 1);
        let done = started + chrono::TimeDelta::milliseconds(700 * i + 5);
        let status = ["pending", "completed", "failed", "cancelled", "processing"][i as usize % 5];
        let finished = matches!(status, "completed" | "failed" | "cancelled");
        db.execute_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "INSERT INTO tasks (id, user_id, type, status, metadata, attempts, created_at, updated_at, \
             version, run_at, started_at, completed_at) \
             VALUES ($1, $2, $3, $4, '{}', 1, $5, $6, 1, $7, $8, $9)",
            vec![
                uuid::Uuid::now_v7().into(),
                ["alice", "bob"][i as usize % 2].into(),
                ["image", "text", "audio"][i as usize % 3].into(),
                status.into(),
                created.into(),
                created.into(),
                created.into(),
                (status != "pending").then_some(started).into(),
                finished.then_some(done).into(),
            ],
        ))
        .await
        .expect("insert a task from before");
    }
    taskql::db::migrate(&db).await.expect("the rest");
    let tables = |db: sea_orm::DatabaseConnection| async move {
        let sql = if test_is_postgres(&db) {
            "SELECT COUNT(*) AS n FROM pg_tables WHERE tablename LIKE 'task_stats_%'"
        } else {
            "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name LIKE 'task_stats_%'"
        };
        db.query_one_raw(Statement::from_string(db.get_database_backend(), sql))
            .await
            .unwrap()
            .unwrap()
            .try_get::<i64>("", "n")
            .unwrap()
    };
    assert!(tables(db.clone()).await > 0);
    db.close().await.unwrap();

    let app = spawn_app_with(test.clone(), |_| {}).await;
    assert_throughput_exact(&app, &["alice", "bob"]).await;
    let worker_view = stats(&app, &app.worker_token()).await;
    let types: Vec<&str> = worker_view["durations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["audio", "image", "text"], "{worker_view}");
    drop(app);

    // Down past the counters, and up again: the same numbers.
    let db = taskql::db::connect(&test.url, 4).await.expect("connect");
    let after_them = Migrator::migrations().len() as u32 - 6;
    Migrator::down(&db, Some(after_them)).await.expect("down");
    assert_eq!(tables(db.clone()).await, 0, "the counters are gone");
    Migrator::up(&db, None).await.expect("up again");
    db.close().await.unwrap();
    let app = spawn_app_with(test.clone(), |_| {}).await;
    assert_throughput_exact(&app, &["alice", "bob"]).await;
}

fn test_is_postgres(db: &sea_orm::DatabaseConnection) -> bool {
    db.get_database_backend() == sea_orm::DatabaseBackend::Postgres
}
