//! The database itself: restarts, migrations (idempotent, in place, down and up), the column order, and a test's database dropped even when it panics.

use super::*;

#[tokio::test]
async fn tasks_survive_a_restart() {
    let test = TestDb::new().await;
    let mut ids = Vec::new();
    {
        let (service, db) = test.service().await;
        for _ in 0..20 {
            ids.push(
                service
                    .create_task(&alice(), create("keep"))
                    .await
                    .unwrap()
                    .id,
            );
        }
        let mut done = StatusUpdate::new(ids[0], TaskStatus::Completed);
        done.result_id = Some("kept".into());
        service
            .update_task_status(&as_worker(), done)
            .await
            .unwrap();
        drop(service);
        db.close().await;
    }
    let (service, _db) = test.service().await;
    for id in &ids {
        service.get_task(*id, &alice()).await.expect("still there");
    }
    let first = service.get_task(ids[0], &alice()).await.unwrap();
    assert_eq!(first.status, TaskStatus::Completed);
    assert_eq!(first.result_id.as_deref(), Some("kept"));
}

#[tokio::test]
async fn migrations_are_idempotent() {
    let test = TestDb::new().await;
    let db = test.connect().await;
    taskql::db::migrate(&db)
        .await
        .expect("second run is a no-op");
    // The CHECK on status holds even against raw SQL.
    let outcome = db
        .execute_raw(Statement::from_string(
            db.get_database_backend(),
            "UPDATE tasks SET status = 'lost'",
        ))
        .await;
    assert!(outcome.is_ok(), "no rows, nothing to check");
    let (service, db) = test.service().await;
    new_task(service.as_ref(), &alice(), "x").await;
    let outcome = db
        .execute_raw(Statement::from_string(
            db.get_database_backend(),
            "UPDATE tasks SET status = 'lost'",
        ))
        .await;
    assert!(outcome.is_err(), "the CHECK refuses an unknown status");
    let _ = Arc::clone(&service);
}

/// Rows are read by position (`Task::from_row`): the table's columns, a
/// select of the entity and `RETURNING *` must all come in the entity's order.
#[tokio::test]
async fn the_table_columns_come_in_the_order_rows_are_read() {
    let test = TestDb::new().await;
    let (service, db) = test.service().await;
    let task = new_task(service.as_ref(), &alice(), "order.check").await;
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT * FROM tasks",
        ))
        .await
        .unwrap()
        .expect("a row");
    assert_eq!(row.column_names(), entity::Task::COLUMNS);
    assert_eq!(entity::Task::from_row(&row).unwrap(), task);
    let found = service.get_task(task.id, &alice()).await.unwrap();
    assert_eq!(found, task);
}

/// A database made before the queue columns existed: its tasks get them
/// (runnable since their creation, priority 0, three attempts, first
/// turn), filling them logs no change, and the tasks claim and log as
/// new ones do.
#[tokio::test]
async fn tasks_from_before_the_queue_columns_are_upgraded_in_place() {
    use migration::MigratorTrait;
    let test = TestDb::new().await;
    let db = taskql::db::connect(&test.url, 4).await.expect("connect");
    migration::Migrator::up(&db, Some(4))
        .await
        .expect("first four migrations");
    let backend = db.get_database_backend();
    let (one, two) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let created = chrono::DateTime::parse_from_rfc3339("2026-11-30T10:00:00.123456Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    for (id, status) in [(one, "pending"), (two, "failed")] {
        db.execute_raw(Statement::from_sql_and_values(
            backend,
            if test.is_postgres {
                "INSERT INTO tasks (id, user_id, type, status, metadata, attempts, created_at, updated_at, version) \
                 VALUES ($1, 'alice', 'old', $2, '{}', 1, $3, $3, 1)"
            } else {
                "INSERT INTO tasks (id, user_id, type, status, metadata, attempts, created_at, updated_at, version) \
                 VALUES (?, 'alice', 'old', ?, '{}', 1, ?, ?, 1)"
            },
            if test.is_postgres {
                vec![id.into(), status.into(), created.into()]
            } else {
                vec![id.into(), status.into(), created.into(), created.into()]
            },
        ))
        .await
        .expect("insert an old row");
    }
    let events = |db: &sea_orm::DatabaseConnection| {
        let db = db.clone();
        async move {
            if test_is_postgres(&db) {
                // Changes reach the log through task_changes.
                db.query_one_raw(Statement::from_string(
                    db.get_database_backend(),
                    "SELECT task_events_take_changes() AS head",
                ))
                .await
                .unwrap();
            }
            let row = db
                .query_one_raw(Statement::from_string(
                    db.get_database_backend(),
                    "SELECT COUNT(*) AS n FROM task_events",
                ))
                .await
                .unwrap()
                .unwrap();
            row.try_get::<i64>("", "n").unwrap()
        }
    };
    let logged_before = events(&db).await;
    taskql::db::migrate(&db).await.expect("the rest");
    assert_eq!(
        events(&db).await,
        logged_before,
        "filling the new columns is not a change of the tasks"
    );
    db.close().await.unwrap();

    let (service, _db) = test.service().await;
    let upgraded = service.get_task(one, &alice()).await.unwrap();
    assert_eq!(upgraded.run_at, created);
    assert_eq!(upgraded.priority, 0);
    assert_eq!(upgraded.max_attempts, 3);
    assert_eq!(upgraded.attempts, 1);
    let claimed = service
        .claim_task(&as_worker(), Default::default())
        .await
        .unwrap()
        .expect("the old pending task is runnable");
    assert_eq!(claimed.id, one);
    assert_eq!(claimed.attempts, 2, "attempts carry on from the old row");
    let retried = service.retry_task(two, &alice()).await.unwrap();
    assert_eq!(retried.status, TaskStatus::Pending);
    assert_eq!(retried.attempts, 1, "a retry keeps the fencing number");

    // And back down past the queue columns, then up again.
    let db = taskql::db::connect(&test.url, 4).await.expect("connect");
    migration::Migrator::down(&db, Some(undoing("m20261204_000005_queue")))
        .await
        .expect("down past the queue");
    taskql::db::migrate(&db).await.expect("up again");
    db.close().await.unwrap();
}

/// How many migrations `down` takes to undo `name` and every later one.
fn undoing(name: &str) -> u32 {
    use migration::MigratorTrait;
    let names: Vec<String> = migration::Migrator::migrations()
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    let at = names
        .iter()
        .position(|n| n == name)
        .unwrap_or_else(|| panic!("no migration {name} in {names:?}"));
    (names.len() - at) as u32
}

fn test_is_postgres(db: &sea_orm::DatabaseConnection) -> bool {
    db.get_database_backend() == sea_orm::DatabaseBackend::Postgres
}

/// Takes `migration` and those after it down, then everything up again:
/// what `find` counts (`n` when migrated) is gone after down and back after up.
async fn comes_and_goes_with(
    db: &sea_orm::DatabaseConnection,
    migration: &str,
    find: &str,
    n: i64,
) {
    use migration::{Migrator, MigratorTrait};
    let count = async || {
        db.query_one_raw(Statement::from_string(db.get_database_backend(), find))
            .await
            .unwrap()
            .unwrap()
            .try_get::<i64>("", "n")
            .unwrap()
    };
    assert_eq!(count().await, n, "migrated");
    Migrator::down(db, Some(undoing(migration)))
        .await
        .expect("down");
    assert_eq!(count().await, 0, "after down");
    Migrator::up(db, None).await.expect("up again");
    assert_eq!(count().await, n, "up again");
}

/// The index of a worker's `taskByResultId` comes and goes with its migration.
#[tokio::test]
async fn the_result_id_index_migrates_down_and_up_again() {
    let test = TestDb::new().await;
    let db = test.connect().await;
    let find = if test.is_postgres {
        "SELECT COUNT(*) AS n FROM pg_indexes WHERE indexname = 'tasks_result_idx'"
    } else {
        "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'index' AND name = 'tasks_result_idx'"
    };
    comes_and_goes_with(&db, "m20261204_000006_result_id_index", find, 1).await;
}

/// The indexes led by the type (a one-type claim, a type's line, its claim
/// rate) come and go with their migration.
#[tokio::test]
async fn the_type_indexes_migrate_down_and_up_again() {
    let test = TestDb::new().await;
    let db = test.connect().await;
    let find = if test.is_postgres {
        "SELECT COUNT(*) AS n FROM pg_indexes \
         WHERE indexname IN ('tasks_type_claim_idx', 'tasks_type_started_idx')"
    } else {
        "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'index' \
         AND name IN ('tasks_type_claim_idx', 'tasks_type_started_idx')"
    };
    comes_and_goes_with(&db, "m20261204_000009_type_indexes", find, 2).await;
}

/// `traceparent` comes and goes with its migration, and the tasks stay:
/// those from before it have none.
#[tokio::test]
async fn the_traceparent_column_migrates_down_and_up_again() {
    let test = TestDb::new().await;
    let (service, _) = test.service().await;
    let task = new_task(service.as_ref(), &alice(), "trace.check").await;
    assert_eq!(task.traceparent, None, "no trace in a test without one");
    let db = test.connect().await;
    let find = if test.is_postgres {
        "SELECT COUNT(*) AS n FROM information_schema.columns \
         WHERE table_name = 'tasks' AND column_name = 'traceparent'"
    } else {
        "SELECT COUNT(*) AS n FROM pragma_table_info('tasks') WHERE name = 'traceparent'"
    };
    comes_and_goes_with(&db, "m20261204_000008_traceparent", find, 1).await;
    assert_eq!(service.get_task(task.id, &alice()).await.unwrap(), task);
}

/// A test's database goes with it even when the test panics while a server
/// is still connected to it: on PostgreSQL the database is dropped, on
/// SQLite its file removed.
#[test]
fn a_test_database_is_dropped_even_when_its_test_panics() {
    let (sender, url) = std::sync::mpsc::channel();
    // A test of its own: a thread running a runtime, as #[tokio::test] does.
    let failing = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let app = spawn_app().await;
            app.create_task(
                &app.user_token("alice"),
                serde_json::json!({ "type": "x" }),
                "id",
            )
            .await;
            sender.send(app.database.url.clone()).unwrap();
            panic!("a test failing while its server is connected");
        })
    })
    .join();
    assert!(failing.is_err(), "the inner test was meant to panic");
    let url = url.recv().expect("the inner test made a database");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    match std::env::var(PG_ENV) {
        Ok(base) if !base.is_empty() => {
            let name = url.rsplit('/').next().unwrap().to_owned();
            let left = runtime.block_on(async {
                let admin = taskql::db::connect(&base, 1).await.unwrap();
                let row = admin
                    .query_one_raw(Statement::from_sql_and_values(
                        admin.get_database_backend(),
                        "SELECT COUNT(*) AS n FROM pg_database WHERE datname = $1",
                        [name.clone().into()],
                    ))
                    .await
                    .unwrap()
                    .unwrap();
                row.try_get::<i64>("", "n").unwrap()
            });
            assert_eq!(left, 0, "database {name} is still there");
        }
        _ => {
            let path = url
                .strip_prefix("sqlite://")
                .and_then(|rest| rest.split('?').next())
                .unwrap();
            assert!(
                !std::path::Path::new(path).exists(),
                "{path} is still there"
            );
        }
    }
}

/// The service's connections send each statement at once: with Nagle's
/// algorithm on, a statement written in more than one piece (a batch of
/// creates, over 16 KiB) waits 40 ms for the database's delayed ACK.
#[cfg(unix)]
#[tokio::test]
async fn postgres_connections_send_without_delay() {
    use std::mem::ManuallyDrop;
    use std::os::fd::{FromRawFd, RawFd};
    let test = TestDb::new().await;
    if !test.is_postgres {
        return;
    }
    let (_service, db) = test.service().await;
    let port = db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            "SELECT inet_client_port() AS port",
        ))
        .await
        .expect("the connection's port")
        .expect("a row")
        .try_get::<i32>("", "port")
        .expect("a port");
    // The socket of that connection, among this process's descriptors.
    let mut sockets = std::fs::read_dir("/proc/self/fd")
        .or_else(|_| std::fs::read_dir("/dev/fd"))
        .expect("this process's descriptors")
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<RawFd>().ok())
        .filter_map(|fd| {
            // SAFETY: never dropped, so the descriptor is never closed.
            let stream = ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
            let local = stream.local_addr().ok()?;
            (i32::from(local.port()) == port).then(|| stream.nodelay())
        });
    let nodelay = sockets.next().expect("the connection's socket");
    assert!(
        nodelay.expect("TCP_NODELAY readable"),
        "the service's connection has Nagle's algorithm on"
    );
}
