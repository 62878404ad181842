//! Retention: old finished tasks pruned in batches, by one instance or two at once.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prune_finished_deletes_only_old_terminal_tasks_in_batches() {
    let test = TestDb::new().await;
    let (service, db) = test.service().await;
    let ids = create_many(&service, &alice(), "image", 1200).await;
    let (old_done, rest) = ids.split_at(1100);
    let (recent_done, rest) = rest.split_at(20);
    let (processing, pending) = rest.split_at(40);

    // Finish 1120 tasks three ways, concurrently.
    let finished: Vec<Uuid> = old_done.iter().chain(recent_done).copied().collect();
    let finishers: Vec<_> = finished
        .chunks(finished.len().div_ceil(CLAIMERS))
        .map(|chunk| {
            let (service, chunk) = (service.clone(), chunk.to_vec());
            tokio::spawn(async move {
                for (i, id) in chunk.into_iter().enumerate() {
                    match i % 3 {
                        0 => {
                            service
                                .update_task_status(&as_worker(), completion(id, 0, "r"))
                                .await
                                .unwrap();
                        }
                        1 => {
                            let mut update = StatusUpdate::new(id, TaskStatus::Failed);
                            update.error_message = Some("boom".into());
                            service
                                .update_task_status(&as_worker(), update)
                                .await
                                .unwrap();
                        }
                        _ => {
                            service.cancel_task(id, &alice()).await.unwrap();
                        }
                    }
                }
            })
        })
        .collect();
    for finisher in finishers {
        finisher.await.unwrap();
    }
    for &id in processing {
        let update = StatusUpdate::new(id, TaskStatus::Processing);
        service
            .update_task_status(&as_worker(), update)
            .await
            .unwrap();
    }
    // Age everything but the recent 20 by two days: created, updated and finished.
    let two_days_ago = Utc::now() - chrono::Duration::days(2);
    let aged: Vec<Uuid> = old_done
        .iter()
        .chain(processing)
        .chain(pending)
        .copied()
        .collect();
    for chunk in aged.chunks(400) {
        Tasks::update_many()
            .col_expr(Column::CreatedAt, Expr::value(two_days_ago))
            .col_expr(Column::UpdatedAt, Expr::value(two_days_ago))
            .col_expr(Column::StartedAt, Expr::value(two_days_ago))
            .filter(Column::Id.is_in(chunk.to_vec()))
            .exec(&db)
            .await
            .unwrap();
    }
    Tasks::update_many()
        .col_expr(Column::CompletedAt, Expr::value(two_days_ago))
        .filter(Column::Id.is_in(old_done.to_vec()))
        .exec(&db)
        .await
        .unwrap();

    let deleted = service
        .prune_finished(Duration::from_secs(86_400))
        .await
        .unwrap();
    assert_eq!(
        deleted, 1100,
        "every old terminal task, over several batches"
    );

    let left: HashSet<Uuid> = all_tasks(&db).await.iter().map(|t| t.id).collect();
    let kept: HashSet<Uuid> = recent_done
        .iter()
        .chain(processing)
        .chain(pending)
        .copied()
        .collect();
    assert_eq!(left, kept);
    let counts = by_status(&all_tasks(&db).await);
    assert_eq!(counts.get("pending"), Some(&40));
    assert_eq!(counts.get("processing"), Some(&40));
    assert_eq!(
        service
            .prune_finished(Duration::from_secs(86_400))
            .await
            .unwrap(),
        0
    );
    assert_eq!(count_rows(&db).await, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_pruning_at_once_delete_each_task_once() {
    let test = TestDb::new().await;
    let (one, db) = test.service().await;
    let (two, _) = test.service().await;
    let ids = create_many(&one, &alice(), "image", 1200).await;
    let two_days_ago = Utc::now() - chrono::Duration::days(2);
    for chunk in ids.chunks(400) {
        Tasks::update_many()
            .col_expr(Column::Status, Expr::value(TaskStatus::Completed.as_str()))
            .col_expr(Column::CompletedAt, Expr::value(two_days_ago))
            .filter(Column::Id.is_in(chunk.to_vec()))
            .exec(&db)
            .await
            .unwrap();
    }
    let start = Arc::new(Barrier::new(4));
    let passes: Vec<_> = (0..4)
        .map(|i| {
            let service = if i % 2 == 0 { one.clone() } else { two.clone() };
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                service.prune_finished(Duration::from_secs(86_400)).await
            })
        })
        .collect();
    let mut deleted = 0;
    for pass in passes {
        deleted += pass.await.unwrap().expect("a retention pass never fails");
    }
    assert_eq!(deleted, 1200, "each task deleted (and reported) once");
    assert_eq!(count_rows(&db).await, 0);
}
