//! The status machine: every pair, exact terminal repeats, racing conflicting updates, processing outside a claim.

use super::*;

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
