//! Cross-instance events on PostgreSQL: every change sends a NOTIFY in its
//! transaction; every instance LISTENs on a dedicated connection and
//! republishes other instances' changes on its own bus.
use std::collections::HashMap;
use std::time::Duration;

use entity::{Task, Tasks};
use sea_orm::sqlx::postgres::PgListener;
use sea_orm::{DatabaseConnection, EntityTrait};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::events::{EventBus, TaskEvent, TaskEventKind};
use crate::service::NOTIFY_CHANNEL;

#[derive(Serialize, Deserialize)]
struct Notice {
    /// The instance that made the change.
    i: Uuid,
    k: String,
    id: Uuid,
    v: i64,
    /// The last state of a deleted task (its metadata left out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    t: Option<Task>,
}

pub fn encode_notice(instance: Uuid, kind: TaskEventKind, task: &Task) -> String {
    let snapshot = (kind == TaskEventKind::Deleted).then(|| Task {
        metadata: serde_json::json!({}),
        ..task.clone()
    });
    let notice = Notice {
        i: instance,
        k: kind.as_str().to_owned(),
        id: task.id,
        v: task.version,
        t: snapshot,
    };
    serde_json::to_string(&notice).unwrap_or_default()
}

/// Keeps one LISTEN connection alive for the life of the process. After any
/// reconnect it asks live streams to re-read, since NOTIFYs sent while it
/// was away are gone.
pub async fn run(url: String, db: DatabaseConnection, bus: EventBus, instance: Uuid) {
    let mut backoff = Duration::from_millis(100);
    let mut connected_before = false;
    // Last version republished per task, so a re-read never goes out twice.
    let mut published: HashMap<Uuid, i64> = HashMap::new();
    loop {
        let mut listener = match connect(&url).await {
            Ok(listener) => listener,
            Err(err) => {
                tracing::warn!(error = %err, ?backoff, "event listener cannot connect; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        if connected_before {
            tracing::info!("event listener reconnected; live streams re-read their tasks");
            bus.request_resync();
        }
        connected_before = true;
        loop {
            match listener.try_recv().await {
                Ok(Some(notification)) => {
                    if published.len() > 100_000 {
                        published.clear();
                    }
                    handle(notification.payload(), &db, &bus, instance, &mut published).await;
                }
                Ok(None) => {
                    tracing::warn!("event listener lost its connection");
                    break;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "event listener failed");
                    break;
                }
            }
        }
    }
}

async fn connect(url: &str) -> Result<PgListener, sea_orm::sqlx::Error> {
    let mut listener = PgListener::connect(url).await?;
    listener.ignore_pool_close_event(true);
    listener.listen(NOTIFY_CHANNEL).await?;
    Ok(listener)
}

async fn handle(
    payload: &str,
    db: &DatabaseConnection,
    bus: &EventBus,
    instance: Uuid,
    published: &mut HashMap<Uuid, i64>,
) {
    let Ok(notice) = serde_json::from_str::<Notice>(payload) else {
        tracing::warn!("ignoring a malformed task notice");
        return;
    };
    if notice.i == instance {
        return; // Published locally already, right after commit.
    }
    let Some(kind) = TaskEventKind::parse(&notice.k) else {
        return;
    };
    if kind == TaskEventKind::Deleted {
        if let Some(task) = notice.t {
            published.remove(&task.id);
            bus.publish(TaskEvent { kind, task });
        }
        return;
    }
    let task = match Tasks::find_by_id(notice.id).one(db).await {
        Ok(Some(task)) => task,
        Ok(None) => return, // Deleted since; its DELETED notice follows.
        Err(err) => {
            tracing::warn!(error = %err, "cannot read a notified task; asking streams to re-read");
            bus.request_resync();
            return;
        }
    };
    if published.get(&task.id).is_some_and(|&v| v >= task.version) {
        return;
    }
    published.insert(task.id, task.version);
    let kind = if task.version == notice.v {
        kind
    } else {
        TaskEventKind::Updated
    };
    bus.publish(TaskEvent { kind, task });
}
