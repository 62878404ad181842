//! The notices that carry changes between instances, round-tripped through
//! PostgreSQL: what the service's statements NOTIFY (`pg_events::notifying`)
//! is what the listener decodes (`pg_events::Notice`). PostgreSQL only.
mod common;

use std::time::Duration;

use common::*;
use sea_orm::sqlx::postgres::PgListener;
use taskql::events::TaskEventKind;
use taskql::pg_events::{self, Notice};
use taskql::service::{ClaimRequest, NewTask, TaskService};

async fn next_notice(listener: &mut PgListener) -> Notice {
    loop {
        let notification = tokio::time::timeout(Duration::from_secs(10), listener.recv())
            .await
            .expect("a notice within 10 s")
            .expect("the listener works");
        if pg_events::is_ping(notification.payload()) {
            continue;
        }
        return Notice::decode(notification.payload())
            .unwrap_or_else(|| panic!("does not decode: {}", notification.payload()));
    }
}

#[tokio::test]
async fn what_a_change_notifies_decodes_to_the_task_it_wrote() {
    if postgres_url_or_skip("what_a_change_notifies_decodes_to_the_task_it_wrote").is_none() {
        return;
    }
    let test = TestDb::new().await;
    let (service, _db) = test.service().await;
    let mut listener = PgListener::connect(&test.url).await.expect("listen");
    listener.listen(pg_events::CHANNEL).await.expect("LISTEN");

    // A small task travels whole.
    let created = service
        .create_task(
            &alice(),
            NewTask {
                task_type: "notice.check".into(),
                metadata: Some(serde_json::json!({ "prompt": "a red fox", "n": [1, 2.5, null] })),
                idempotency_key: Some("k-1".into()),
            },
        )
        .await
        .unwrap();
    let notice = next_notice(&mut listener).await;
    assert_eq!(notice.instance, service.instance_id());
    assert_eq!(notice.kind, TaskEventKind::Created);
    assert_eq!((notice.id, notice.version), (created.id, 1));
    assert!(notice.with_metadata);
    assert_eq!(notice.task.as_ref(), Some(&created));

    // An update carries the state right after it.
    let claimed = service
        .claim_task(&as_worker(), ClaimRequest::default())
        .await
        .unwrap()
        .expect("claimed");
    let notice = next_notice(&mut listener).await;
    assert_eq!(notice.kind, TaskEventKind::Updated);
    assert_eq!(notice.version, 2);
    assert_eq!(notice.task.as_ref(), Some(&claimed));

    // A task too big for NOTIFY's 8000 bytes travels without its metadata.
    let big = service
        .create_task(
            &alice(),
            NewTask {
                task_type: "notice.check".into(),
                metadata: Some(serde_json::json!({ "blob": "x".repeat(20_000) })),
                idempotency_key: None,
            },
        )
        .await
        .unwrap();
    let notice = next_notice(&mut listener).await;
    assert_eq!((notice.id, notice.kind), (big.id, TaskEventKind::Created));
    assert!(!notice.with_metadata, "the listener reads the metadata");
    let lean = notice.task.expect("the task, without its metadata");
    assert_eq!(lean.metadata, serde_json::Value::Null);
    assert_eq!(
        entity::Task {
            metadata: big.metadata.clone(),
            ..lean
        },
        big
    );

    // A deletion carries the last state.
    assert!(service.delete_task(created.id, &alice()).await.unwrap());
    let notice = next_notice(&mut listener).await;
    assert_eq!(
        (notice.id, notice.kind),
        (created.id, TaskEventKind::Deleted)
    );
    assert_eq!(notice.task.map(|t| t.status), Some(claimed.status));
}
