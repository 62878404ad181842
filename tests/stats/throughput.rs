//! Throughput minute by minute over a day, equal to the table through every kind of change; the `minutes` argument's range; and the per-minute rows in the database (the triggers' buckets, pruning, an upgrade's count of the tasks already there).

use super::*;

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
    let made_and_ended = |made: chrono::TimeDelta, ended: chrono::TimeDelta| {
        times(&[("created_at", now - made), ("completed_at", now - ended)])
    };
    let (hours, minutes) = (chrono::TimeDelta::hours, chrono::TimeDelta::minutes);
    update_task(&app, old.id, &made_and_ended(hours(23), hours(22))).await;
    update_task(&app, failed.id, &made_and_ended(minutes(31), minutes(30))).await;

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
        let set = times(&[
            ("created_at", created),
            ("started_at", started),
            ("completed_at", done),
        ]);
        update_task(&app, task.id, &set).await;
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
    let kept_from = chrono::Utc::now().timestamp().div_euclid(60)
        - taskql::service::stats::STATS_MINUTES_KEPT
        + 1;
    let set_times = |id, minutes: i64| {
        let at = chrono::Utc::now() - chrono::TimeDelta::minutes(minutes);
        let set = times(&[("created_at", at), ("started_at", at), ("completed_at", at)]);
        let app = &app;
        async move { update_task(app, id, &set).await }
    };
    set_times(recent, 1400).await;
    // The server prunes at start and every minute: if its first pass ran
    // after the old task's minute was written, write it to another minute
    // (a change of minute is what the triggers count), with the next pass
    // a minute away.
    let mut old_minutes_there = false;
    for minutes in [1600, 1610, 1620] {
        set_times(old, minutes).await;
        service.fold_count_deltas().await.unwrap();
        if stats_rows_before(&app.db, kept_from).await > 0 {
            old_minutes_there = true;
            break;
        }
    }
    assert!(old_minutes_there, "the old minutes are there");
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
