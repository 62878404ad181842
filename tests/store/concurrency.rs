//! Concurrent creates and writers, and an idempotent create racing a delete.

use super::*;

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
