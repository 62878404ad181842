//! Every operation on one's own tasks, another user's task not found, pagination, bad input, and a worker's list of every user's tasks.

use super::*;

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
