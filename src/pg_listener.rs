//! Cross-instance events on PostgreSQL: every change sends a NOTIFY that
//! commits with it; every instance LISTENs on a dedicated connection and
//! republishes other instances' changes on its own bus.
use std::collections::HashMap;
use std::time::Duration;

use entity::{Task, Tasks};
use sea_orm::sqlx::postgres::PgListener;
use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseConnection, EntityTrait, Statement};
use serde::Deserialize;
use uuid::Uuid;

use crate::events::{EventBus, TaskEvent, TaskEventKind};
use crate::service::NOTIFY_CHANNEL;

/// Every instance NOTIFYs a ping this often, so a healthy listener never
/// goes long without hearing something.
const PING_EVERY: Duration = Duration::from_secs(20);
/// A listener that heard nothing, not even the pings, for this long is on a
/// dead connection (a NAT timeout, a failover) and reconnects.
const SILENCE_LIMIT: Duration = Duration::from_secs(65);
/// What a ping's payload starts with.
const PING_PREFIX: &str = "{\"ping\":";

/// A change as `SeaTaskService` notifies it (built in SQL, see its `notice_sql`).
#[derive(Deserialize)]
struct Notice {
    /// The instance that made the change.
    i: Uuid,
    k: String,
    id: Uuid,
    v: i64,
    /// The task right after the change, so every state reaches other
    /// instances even when changes follow each other faster than a re-read.
    /// Left out only when it cannot fit; the listener then re-reads the row.
    #[serde(default)]
    t: Option<Task>,
    /// Whether `t` carries the metadata (left out when it is too big to fit).
    #[serde(default)]
    m: bool,
}

/// Keeps one LISTEN connection alive for the life of the process. Each time
/// it (re)connects it asks live streams to re-read, since NOTIFYs sent while
/// it was away are gone.
pub async fn run(url: String, db: DatabaseConnection, bus: EventBus, instance: Uuid) {
    let pinger = async {
        let mut ticker = tokio::time::interval(PING_EVERY);
        loop {
            ticker.tick().await;
            let ping = format!("{PING_PREFIX}\"{instance}\"}}");
            let sent = db
                .execute_raw(Statement::from_sql_and_values(
                    DatabaseBackend::Postgres,
                    "SELECT pg_notify($1, $2)",
                    [NOTIFY_CHANNEL.into(), ping.into()],
                ))
                .await;
            if let Err(err) = sent {
                tracing::warn!(error = %err, "cannot send the listener ping");
            }
        }
    };
    // Both run in this task; the listener is never interrupted to ping.
    tokio::select! {
        _ = pinger => {}
        _ = listen(url, &db, &bus, instance) => {}
    }
}

async fn listen(url: String, db: &DatabaseConnection, bus: &EventBus, instance: Uuid) {
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
        }
        // Also on the first connect: a stream may have started (and read its
        // task) before this instance was listening.
        bus.request_resync();
        connected_before = true;
        loop {
            // Only a connection presumed dead is interrupted here.
            let Ok(received) = tokio::time::timeout(SILENCE_LIMIT, listener.try_recv()).await
            else {
                tracing::warn!(
                    silence = ?SILENCE_LIMIT,
                    "event listener heard nothing, not even pings; reconnecting"
                );
                break;
            };
            match received {
                Ok(Some(notification)) => {
                    if published.len() > 100_000 {
                        published.clear();
                    }
                    if !notification.payload().starts_with(PING_PREFIX) {
                        handle(notification.payload(), db, bus, instance, &mut published).await;
                    }
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

/// How the listener's connection shows in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "taskql-listener";

async fn connect(url: &str) -> Result<PgListener, sea_orm::sqlx::Error> {
    use sea_orm::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
    let options: PgConnectOptions = url.parse()?;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(options.application_name(APPLICATION_NAME));
    let mut listener = PgListener::connect_with(&pool).await?;
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
    // Already republished (a re-read ran ahead of its notice).
    if kind != TaskEventKind::Deleted && published.get(&notice.id).is_some_and(|&v| v >= notice.v) {
        return;
    }
    let task = match (notice.t, notice.m) {
        (Some(task), true) => task,
        // The last state of a deleted task; its metadata may be gone with it.
        (Some(task), false) if kind == TaskEventKind::Deleted => Task {
            metadata: serde_json::json!({}),
            ..task
        },
        (None, _) if kind == TaskEventKind::Deleted => {
            tracing::warn!(task_id = %notice.id, "a deletion notice without the task; not republished");
            return;
        }
        // Metadata never changes after creation: the row has the right one.
        (Some(task), false) => match read(db, bus, notice.id).await {
            Some(row) => Task {
                metadata: row.metadata,
                ..task
            },
            None => return,
        },
        (None, _) => match read(db, bus, notice.id).await {
            Some(row) => row,
            None => return,
        },
    };
    if kind == TaskEventKind::Deleted {
        published.remove(&task.id);
    } else {
        if published.get(&task.id).is_some_and(|&v| v >= task.version) {
            return;
        }
        published.insert(task.id, task.version);
    }
    // A re-read row may be past the notified change.
    let kind = if task.version == notice.v {
        kind
    } else {
        TaskEventKind::Updated
    };
    bus.publish(TaskEvent { kind, task });
}

/// The current row of a notified task; `None` if it is gone (its DELETED
/// notice follows) or unreadable (live streams are asked to re-read).
async fn read(db: &DatabaseConnection, bus: &EventBus, id: Uuid) -> Option<Task> {
    match Tasks::find_by_id(id).one(db).await {
        Ok(task) => task,
        Err(err) => {
            tracing::warn!(error = %err, "cannot read a notified task; asking streams to re-read");
            bus.request_resync();
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // As PostgreSQL builds them for a row of `tasks` (`to_jsonb(changed)`).
    const ROW: &str = r#""id": "01a216ba-bdbd-7506-a3e1-89276e73c631", "type": "image.generate", "status": "processing", "user_id": "alice", "version": 3, "attempts": 1, "progress": 40, "result_id": null, "worker_id": "w-1", "created_at": "2026-11-26T07:21:06.749533+00:00", "started_at": "2026-11-26T07:21:07.1+00:00", "updated_at": "2026-11-26T07:21:08.000001+00:00", "completed_at": null, "error_message": null, "idempotency_key": null, "lease_expires_at": "2026-11-26T07:22:07.1+00:00""#;

    fn notice(tail: &str) -> Notice {
        let payload = format!(
            r#"{{"i": "0190a0a0-0000-7000-8000-000000000001", "k": "updated", {tail}"v": 3, "id": "01a216ba-bdbd-7506-a3e1-89276e73c631"}}"#
        );
        serde_json::from_str(&payload).unwrap_or_else(|e| panic!("{e}: {payload}"))
    }

    #[test]
    fn decodes_a_notice_carrying_the_whole_task() {
        let notice = notice(&format!(
            r#""m": true, "t": {{{ROW}, "metadata": {{"prompt": "a cat"}}}}, "#
        ));
        assert!(notice.m);
        let task = notice.t.expect("the task");
        assert_eq!(task.task_type, "image.generate");
        assert_eq!(task.status, entity::TaskStatus::Processing);
        assert_eq!((task.progress, task.version), (Some(40), 3));
        assert_eq!(task.metadata, serde_json::json!({"prompt": "a cat"}));
        assert_eq!(task.updated_at.timestamp_subsec_micros(), 1);
    }

    #[test]
    fn decodes_a_notice_without_metadata_or_without_the_task() {
        let lean = notice(&format!(r#""t": {{{ROW}}}, "#));
        assert!(!lean.m, "the listener must read the metadata");
        assert_eq!(lean.t.expect("the task").metadata, serde_json::Value::Null);

        let bare = notice("");
        assert!(bare.t.is_none() && !bare.m);
        assert_eq!((bare.k.as_str(), bare.v), ("updated", 3));
    }
}
