//! The task store through `TaskService`, on SQLite or PostgreSQL.
mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::*;
use entity::{TaskStatus, Tasks};
use sea_orm::{ConnectionTrait, EntityTrait, Statement};
use taskql::error::TaskError;
use taskql::service::{NewTask, StatusUpdate, TaskFilter, TaskService};

fn create(task_type: &str) -> NewTask {
    NewTask {
        task_type: task_type.into(),
        metadata: None,
        idempotency_key: None,
        ..Default::default()
    }
}

#[tokio::test]
async fn every_operation_on_own_tasks() {
    let test = TestDb::new().await;
    let (service, _db) = test.service().await;
    let user = alice();

    let task = service
        .create_task(
            &user,
            NewTask {
                task_type: "concept.image".into(),
                metadata: Some(serde_json::json!({"prompt": "a red fox"})),
                idempotency_key: None,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(task.status, TaskStatus::Pending);
    assert_eq!(task.user_id, "alice");
    assert_eq!(task.metadata["prompt"], "a red fox");
    assert_eq!((task.attempts, task.version), (0, 1));
    assert!(task.started_at.is_none() && task.completed_at.is_none());

    assert_eq!(service.get_task(task.id, &user).await.unwrap(), task);

    let mut update = StatusUpdate::new(task.id, TaskStatus::Processing);
    update.progress = Some(40);
    let processing = service
        .update_task_status(&as_worker(), update)
        .await
        .unwrap();
    assert_eq!(processing.status, TaskStatus::Processing);
    assert_eq!(processing.progress, Some(40));
    assert_eq!(processing.version, 2);
    let started = processing.started_at.expect("started_at set");

    let mut update = StatusUpdate::new(task.id, TaskStatus::Processing);
    update.progress = Some(70);
    let later = service
        .update_task_status(&as_worker(), update)
        .await
        .unwrap();
    assert_eq!(
        later.started_at,
        Some(started),
        "started_at is the first PROCESSING"
    );
    assert_eq!(later.version, 3);

    let mut update = StatusUpdate::new(task.id, TaskStatus::Completed);
    update.result_id = Some("concept-42".into());
    let done = service
        .update_task_status(&as_worker(), update)
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Completed);
    assert_eq!(done.result_id.as_deref(), Some("concept-42"));
    assert_eq!(done.progress, Some(100));
    assert!(done.completed_at.is_some());
    assert_eq!(done.version, 4);

    let found = service
        .get_task_by_result_id("concept-42", &user)
        .await
        .unwrap();
    assert_eq!(found.map(|t| t.id), Some(task.id));
    assert!(
        service
            .get_task_by_result_id("concept-43", &user)
            .await
            .unwrap()
            .is_none()
    );

    let page = service
        .get_tasks_by_user(&user, TaskFilter::default(), 10, None)
        .await
        .unwrap();
    assert_eq!(page.edges.len(), 1);
    assert!(!page.has_next_page);

    let other = service
        .create_task(&user, create("concept.image"))
        .await
        .unwrap();
    let cancelled = service.cancel_task(other.id, &user).await.unwrap();
    assert_eq!(cancelled.status, TaskStatus::Cancelled);
    assert!(cancelled.completed_at.is_some());
    // Cancelling twice is fine; cancelling a completed task is not.
    assert_eq!(
        service.cancel_task(other.id, &user).await.unwrap(),
        cancelled
    );
    assert!(matches!(
        service.cancel_task(task.id, &user).await,
        Err(TaskError::Conflict(_))
    ));

    assert!(service.delete_task(task.id, &user).await.unwrap());
    assert!(matches!(
        service.get_task(task.id, &user).await,
        Err(TaskError::NotFound)
    ));
    assert!(matches!(
        service.delete_task(task.id, &user).await,
        Err(TaskError::NotFound)
    ));
}

#[tokio::test]
async fn another_users_task_is_not_found_and_unchanged() {
    let test = TestDb::new().await;
    let (service, db) = test.service().await;
    let task = service
        .create_task(&alice(), create("report"))
        .await
        .unwrap();
    let mut update = StatusUpdate::new(task.id, TaskStatus::Completed);
    update.result_id = Some("r-1".into());
    let task = service
        .update_task_status(&as_worker(), update)
        .await
        .unwrap();
    let pending = service
        .create_task(&alice(), create("report"))
        .await
        .unwrap();
    let bob = bob();

    assert!(matches!(
        service.get_task(task.id, &bob).await,
        Err(TaskError::NotFound)
    ));
    assert!(matches!(
        service.delete_task(task.id, &bob).await,
        Err(TaskError::NotFound)
    ));
    assert!(matches!(
        service.cancel_task(pending.id, &bob).await,
        Err(TaskError::NotFound)
    ));
    assert!(matches!(
        service.cancel_task(task.id, &bob).await,
        Err(TaskError::NotFound)
    ));
    assert!(
        service
            .get_task_by_result_id("r-1", &bob)
            .await
            .unwrap()
            .is_none()
    );
    let page = service
        .get_tasks_by_user(&bob, TaskFilter::default(), 100, None)
        .await
        .unwrap();
    assert!(page.edges.is_empty());

    // Nothing changed.
    assert_eq!(
        Tasks::find_by_id(task.id).one(&db).await.unwrap(),
        Some(task)
    );
    assert_eq!(
        Tasks::find_by_id(pending.id).one(&db).await.unwrap(),
        Some(pending.clone())
    );
    // A worker may read any task.
    assert_eq!(
        service.get_task(pending.id, &worker()).await.unwrap(),
        pending
    );
}

const ALL: [TaskStatus; 5] = [
    TaskStatus::Pending,
    TaskStatus::Processing,
    TaskStatus::Completed,
    TaskStatus::Failed,
    TaskStatus::Cancelled,
];

/// Brings a fresh task to `status` through the service.
async fn task_in(service: &dyn TaskService, status: TaskStatus) -> entity::Task {
    let task = service.create_task(&alice(), create("walk")).await.unwrap();
    match status {
        TaskStatus::Pending => task,
        TaskStatus::Cancelled => service.cancel_task(task.id, &alice()).await.unwrap(),
        other => {
            let mut update = StatusUpdate::new(task.id, other);
            if other == TaskStatus::Completed {
                update.result_id = Some("res".into());
            }
            if other == TaskStatus::Failed {
                update.error_message = Some("boom".into());
            }
            service
                .update_task_status(&as_worker(), update)
                .await
                .unwrap()
        }
    }
}

#[tokio::test]
async fn status_machine_every_pair() {
    let test = TestDb::new().await;
    let (service, db) = test.service().await;
    for from in ALL {
        for to in ALL {
            let task = task_in(service.as_ref(), from).await;
            let allowed = matches!(from, TaskStatus::Pending | TaskStatus::Processing)
                && to != TaskStatus::Pending;
            let mut update = StatusUpdate::new(task.id, to);
            // A different result/error than the one the task has, so a terminal
            // repeat here is not an exact repeat.
            update.result_id = (to == TaskStatus::Completed).then(|| "other".into());
            update.error_message = (to == TaskStatus::Failed).then(|| "other".into());
            let outcome = service.update_task_status(&as_worker(), update).await;
            let stored = Tasks::find_by_id(task.id).one(&db).await.unwrap().unwrap();
            // CANCELLED has no result or error to differ by: repeating it is exact.
            let exact_repeat = from == to && to == TaskStatus::Cancelled;
            if exact_repeat {
                assert_eq!(outcome.unwrap(), task);
                assert_eq!(stored, task);
            } else if allowed {
                let updated = outcome.unwrap_or_else(|e| panic!("{from:?} -> {to:?}: {e:?}"));
                assert_eq!(updated.status, to, "{from:?} -> {to:?}");
                assert_eq!(updated.version, task.version + 1, "{from:?} -> {to:?}");
                assert_eq!(stored, updated, "{from:?} -> {to:?}");
                assert_eq!(updated.completed_at.is_some(), to.is_terminal());
            } else {
                assert!(
                    matches!(outcome, Err(TaskError::Conflict(_))),
                    "{from:?} -> {to:?} gave {outcome:?}"
                );
                assert_eq!(stored, task, "{from:?} -> {to:?} changed the row");
            }
        }
    }
}

#[tokio::test]
async fn exact_terminal_repeat_is_a_no_op() {
    let test = TestDb::new().await;
    let (service, _db) = test.service().await;
    for status in [
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ] {
        let task = task_in(service.as_ref(), status).await;
        let mut again = StatusUpdate::new(task.id, status);
        again.result_id = task.result_id.clone();
        again.error_message = task.error_message.clone();
        let repeated = service
            .update_task_status(&as_worker(), again)
            .await
            .unwrap();
        assert_eq!(repeated, task, "{status:?} repeat changed the task");
    }
}

#[tokio::test]
async fn conflicting_updates_race_exactly_one_wins() {
    let test = TestDb::new().await;
    let (service, db) = test.service().await;
    for round in 0..100 {
        let task = task_in(service.as_ref(), TaskStatus::Processing).await;
        let mut complete = StatusUpdate::new(task.id, TaskStatus::Completed);
        complete.result_id = Some(format!("result-{round}"));
        let mut fail = StatusUpdate::new(task.id, TaskStatus::Failed);
        fail.error_message = Some(format!("failure-{round}"));
        let (a, b) = tokio::join!(
            tokio::spawn({
                let s = service.clone();
                async move { s.update_task_status(&as_worker(), complete).await }
            }),
            tokio::spawn({
                let s = service.clone();
                async move { s.update_task_status(&as_worker(), fail).await }
            }),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        let stored = Tasks::find_by_id(task.id).one(&db).await.unwrap().unwrap();
        match (a, b) {
            (Ok(winner), Err(TaskError::Conflict(_)))
            | (Err(TaskError::Conflict(_)), Ok(winner)) => {
                assert_eq!(stored, winner, "round {round}: the row is the winner's");
                assert_eq!(stored.version, task.version + 1);
            }
            other => panic!("round {round}: expected one winner and one conflict, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn concurrent_creates_all_land() {
    let test = TestDb::new().await;
    let (service, db) = test.service().await;
    let handles: Vec<_> = (0..200)
        .map(|i| {
            let s = service.clone();
            tokio::spawn(async move {
                let user = taskql::auth::CurrentUser::user(format!("user-{}", i % 7));
                s.create_task(&user, create("bulk")).await
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for handle in handles {
        ids.insert(handle.await.unwrap().expect("no create fails").id);
    }
    assert_eq!(ids.len(), 200);
    assert_eq!(count_rows(&db).await, 200);
}

#[tokio::test]
async fn concurrent_writers_never_see_a_locked_database() {
    let test = TestDb::new().await;
    let (service, _db) = test.service().await;
    let tasks: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..32 {
            v.push(service.create_task(&alice(), create("w")).await.unwrap());
        }
        v
    };
    // 32 writers, each driving its own task through several updates at once.
    let handles: Vec<_> = tasks
        .into_iter()
        .map(|task| {
            let s = service.clone();
            tokio::spawn(async move {
                for p in [10, 50, 90] {
                    let mut u = StatusUpdate::new(task.id, TaskStatus::Processing);
                    u.progress = Some(p);
                    s.update_task_status(&as_worker(), u).await?;
                }
                s.update_task_status(
                    &as_worker(),
                    StatusUpdate::new(task.id, TaskStatus::Completed),
                )
                .await
            })
        })
        .collect();
    for handle in handles {
        let task = handle.await.unwrap().expect("every write succeeds");
        assert_eq!(task.status, TaskStatus::Completed);
        assert_eq!(task.version, 5);
    }
}

#[tokio::test]
async fn pagination_gives_each_task_once_newest_first() {
    let test = TestDb::new().await;
    let (service, db) = test.service().await;
    let user = alice();
    for i in 0..250 {
        let task_type = if i % 3 == 0 { "image" } else { "text" };
        service.create_task(&user, create(task_type)).await.unwrap();
    }
    service.create_task(&bob(), create("image")).await.unwrap();
    // Make ties: 60 tasks share one created_at, 40 another.
    let all = Tasks::find().all(&db).await.unwrap();
    let mut alice_ids: Vec<_> = all.iter().filter(|t| t.user_id == "alice").collect();
    alice_ids.sort_by_key(|t| t.id);
    let tie_a = alice_ids[10].created_at;
    let tie_b = alice_ids[200].created_at;
    for (i, task) in alice_ids.iter().enumerate() {
        let at = match i {
            0..60 => tie_a,
            100..140 => tie_b,
            _ => continue,
        };
        use sea_orm::{ActiveModelTrait, IntoActiveModel, Set};
        let mut model = (*task).clone().into_active_model();
        model.created_at = Set(at);
        model.update(&db).await.unwrap();
    }
    let mut expected: Vec<_> = Tasks::find()
        .all(&db)
        .await
        .unwrap()
        .into_iter()
        .filter(|t| t.user_id == "alice")
        .collect();
    expected.sort_by_key(|t| std::cmp::Reverse((t.created_at, t.id)));

    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = service
            .get_tasks_by_user(&user, TaskFilter::default(), 7, after.as_deref())
            .await
            .unwrap();
        assert!(page.edges.len() <= 7);
        seen.extend(page.edges.iter().map(|(_, t)| t.id));
        if !page.has_next_page {
            break;
        }
        after = page.edges.last().map(|(c, _)| c.clone());
    }
    let expected_ids: Vec<_> = expected.iter().map(|t| t.id).collect();
    assert_eq!(seen.len(), 250);
    assert_eq!(seen, expected_ids, "each task once, newest first");

    // Filters: by type, and by a list of statuses.
    let images = service
        .get_tasks_by_user(
            &user,
            TaskFilter {
                statuses: vec![],
                task_type: Some("image".into()),
                ..Default::default()
            },
            100,
            None,
        )
        .await
        .unwrap();
    assert_eq!(images.edges.len(), 84);
    assert!(images.edges.iter().all(|(_, t)| t.task_type == "image"));

    let first_two: Vec<_> = expected_ids[..3].to_vec();
    service
        .update_task_status(
            &as_worker(),
            StatusUpdate::new(first_two[0], TaskStatus::Processing),
        )
        .await
        .unwrap();
    service.cancel_task(first_two[1], &user).await.unwrap();
    let filtered = service
        .get_tasks_by_user(
            &user,
            TaskFilter {
                statuses: vec![TaskStatus::Processing, TaskStatus::Cancelled],
                ..Default::default()
            },
            100,
            None,
        )
        .await
        .unwrap();
    let got: HashSet<_> = filtered.edges.iter().map(|(_, t)| t.id).collect();
    assert_eq!(got, HashSet::from([first_two[0], first_two[1]]));
}

#[tokio::test]
async fn bad_input_is_invalid_and_writes_nothing() {
    let test = TestDb::new().await;
    let (service, db) = test.service().await;
    let user = alice();
    let bad_creates = [
        NewTask {
            task_type: "".into(),
            ..Default::default()
        },
        NewTask {
            task_type: "Image".into(),
            ..Default::default()
        },
        NewTask {
            task_type: "a".repeat(65),
            ..Default::default()
        },
        NewTask {
            task_type: "has space".into(),
            ..Default::default()
        },
        NewTask {
            task_type: "ok".into(),
            metadata: Some(serde_json::json!(["not", "an", "object"])),
            ..Default::default()
        },
        NewTask {
            task_type: "ok".into(),
            metadata: Some(serde_json::json!({"big": "x".repeat(64 * 1024)})),
            ..Default::default()
        },
        NewTask {
            task_type: "ok".into(),
            idempotency_key: Some("".into()),
            ..Default::default()
        },
    ];
    for input in bad_creates {
        let label = format!("{input:?}").chars().take(80).collect::<String>();
        assert!(
            matches!(
                service.create_task(&user, input).await,
                Err(TaskError::InvalidInput(_))
            ),
            "{label}"
        );
    }
    assert_eq!(count_rows(&db).await, 0);

    let task = service.create_task(&user, create("ok")).await.unwrap();
    let bad_updates = [
        StatusUpdate {
            progress: Some(101),
            ..StatusUpdate::new(task.id, TaskStatus::Processing)
        },
        StatusUpdate {
            progress: Some(-1),
            ..StatusUpdate::new(task.id, TaskStatus::Processing)
        },
        StatusUpdate {
            result_id: Some("".into()),
            ..StatusUpdate::new(task.id, TaskStatus::Completed)
        },
        StatusUpdate {
            result_id: Some("r".repeat(256)),
            ..StatusUpdate::new(task.id, TaskStatus::Completed)
        },
    ];
    for update in bad_updates {
        let label = format!("{:?}/{:?}", update.status, update.progress);
        assert!(
            matches!(
                service.update_task_status(&as_worker(), update).await,
                Err(TaskError::InvalidInput(_))
            ),
            "{label}"
        );
    }
    for first in [0, 101] {
        assert!(matches!(
            service
                .get_tasks_by_user(&user, TaskFilter::default(), first, None)
                .await,
            Err(TaskError::InvalidInput(_))
        ));
    }
    for cursor in ["garbage", "", "bm9wZQ"] {
        assert!(matches!(
            service
                .get_tasks_by_user(&user, TaskFilter::default(), 10, Some(cursor))
                .await,
            Err(TaskError::InvalidInput(_))
        ));
    }
    assert_eq!(
        service.get_task(task.id, &user).await.unwrap(),
        task,
        "unchanged"
    );
    assert_eq!(count_rows(&db).await, 1);

    // An error message is made printable and cut, not refused.
    let mut fail = StatusUpdate::new(task.id, TaskStatus::Failed);
    fail.error_message = Some(format!("bad\u{0}byte {}", "x".repeat(2000)));
    let failed = service
        .update_task_status(&as_worker(), fail)
        .await
        .unwrap();
    let message = failed.error_message.unwrap();
    assert_eq!(message.chars().count(), 1000);
    assert!(message.starts_with("bad byte"));
}

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

#[tokio::test]
async fn processing_outside_a_claim_takes_a_lease_and_is_never_stuck() {
    let test = TestDb::new().await;
    let (service, db) = test.service().await;
    let task = service
        .create_task(&alice(), create("legacy"))
        .await
        .unwrap();
    let started = service
        .update_task_status(
            &as_worker(),
            StatusUpdate::new(task.id, TaskStatus::Processing),
        )
        .await
        .unwrap();
    assert_eq!(started.attempts, 1, "it counts as a claim");
    assert!(started.lease_expires_at.is_some(), "it holds a lease");

    // Its worker goes quiet: the lease runs out and the reaper returns it.
    use sea_orm::{ActiveModelTrait, IntoActiveModel, Set};
    let mut expired = started.clone().into_active_model();
    expired.lease_expires_at = Set(Some(chrono::Utc::now() - chrono::Duration::seconds(5)));
    expired.update(&db).await.unwrap();
    let reaped = service.reap_expired_leases().await.unwrap();
    assert_eq!(reaped.requeued, 1);
    let requeued = service.get_task(task.id, &alice()).await.unwrap();
    assert_eq!(
        (requeued.status, requeued.attempts),
        (TaskStatus::Pending, 1)
    );

    // The quiet worker's late, fenced progress report does not take it back.
    let mut late = StatusUpdate::new(task.id, TaskStatus::Processing);
    late.expected_attempt = Some(1);
    late.progress = Some(50);
    assert!(matches!(
        service.update_task_status(&as_worker(), late).await,
        Err(TaskError::Conflict(message)) if message.contains("went back to PENDING")
    ));
    let claimed = service
        .claim_task(&as_worker(), taskql::service::ClaimRequest::default())
        .await
        .unwrap()
        .expect("the task can be claimed again");
    assert_eq!((claimed.id, claimed.attempts), (task.id, 2));
}

#[tokio::test]
async fn workers_list_every_users_tasks() {
    let test = TestDb::new().await;
    let (service, _db) = test.service().await;
    new_task(service.as_ref(), &alice(), "a").await;
    new_task(service.as_ref(), &bob(), "b").await;
    let page = service
        .get_tasks_by_user(&worker(), TaskFilter::default(), 10, None)
        .await
        .unwrap();
    assert_eq!(page.edges.len(), 2);
    let repeated = TaskFilter {
        statuses: vec![TaskStatus::Pending; 70_000],
        ..Default::default()
    };
    let page = service
        .get_tasks_by_user(&alice(), repeated, 10, None)
        .await
        .expect("a long repeated status list is fine");
    assert_eq!(page.edges.len(), 1);
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

/// Creates racing on one idempotency key while its task is deleted again and
/// again: each gets a task holding the key (or a CONFLICT to try again),
/// never an internal error, and the key never holds two tasks.
#[tokio::test]
async fn an_idempotent_create_racing_a_delete_never_fails_internally() {
    let test = TestDb::new().await;
    let (service, _db) = test.service().await;
    let user = alice();
    let keyed = || NewTask {
        task_type: "image".into(),
        metadata: Some(serde_json::json!({ "n": 1 })),
        idempotency_key: Some("k-1".into()),
        ..Default::default()
    };
    let mut created = 0;
    for _ in 0..20 {
        let creators: Vec<_> = (0..8)
            .map(|_| {
                let (service, user, new) = (service.clone(), user.clone(), keyed());
                tokio::spawn(async move { service.create_task(&user, new).await })
            })
            .collect();
        let deleter = {
            let (service, user) = (service.clone(), user.clone());
            tokio::spawn(async move {
                for _ in 0..8 {
                    let page = service
                        .get_tasks_by_user(&user, TaskFilter::default(), 10, None)
                        .await
                        .unwrap();
                    for (_, task) in page.edges {
                        service.delete_task(task.id, &user).await.unwrap();
                    }
                    tokio::task::yield_now().await;
                }
            })
        };
        for creator in creators {
            match creator.await.unwrap() {
                Ok(task) => {
                    assert_eq!(task.idempotency_key.as_deref(), Some("k-1"));
                    created += 1;
                }
                Err(TaskError::Conflict(_)) => {}
                Err(other) => panic!("a create failed with {other:?}"),
            }
        }
        deleter.await.unwrap();
        let left = service
            .get_tasks_by_user(&user, TaskFilter::default(), 10, None)
            .await
            .unwrap();
        assert!(
            left.edges.len() <= 1,
            "{} tasks hold one key",
            left.edges.len()
        );
    }
    assert!(created > 0);
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
