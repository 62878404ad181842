//! Cross-instance events on PostgreSQL: every change sends a NOTIFY that
//! commits with it; every instance LISTENs on a dedicated connection and
//! republishes other instances' changes on its own bus.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use entity::{Task, Tasks};
use sea_orm::sqlx::postgres::PgListener;
use sea_orm::{ConnectionTrait, DatabaseBackend, EntityTrait, Statement};
use uuid::Uuid;

use crate::db::Db;
use crate::events::{EventBus, TaskEvent, TaskEventKind};
use crate::metrics::Metrics;
use crate::pg_events::{self, Notice};

/// Every instance NOTIFYs a ping this often, so a healthy listener never
/// goes long without hearing something.
const PING_EVERY: Duration = Duration::from_secs(20);
/// A listener that heard nothing, not even the pings, for this long is on a
/// dead connection (a NAT timeout, a failover) and reconnects.
const SILENCE_LIMIT: Duration = Duration::from_secs(65);
/// Keeps one LISTEN connection alive for the life of the process. Each time
/// it (re)connects it asks live streams to re-read, since NOTIFYs sent while
/// it was away are gone.
pub async fn run(url: String, db: Db, bus: EventBus, instance: Uuid, metrics: Arc<Metrics>) {
    let pinger = async {
        let mut ticker = tokio::time::interval(PING_EVERY);
        loop {
            ticker.tick().await;
            let sent = db
                .execute_raw(Statement::from_sql_and_values(
                    DatabaseBackend::Postgres,
                    "SELECT pg_notify($1, $2)",
                    [pg_events::CHANNEL.into(), pg_events::ping(instance).into()],
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
        _ = listen(url, &db, &bus, instance, &metrics) => {}
    }
}

async fn listen(url: String, db: &Db, bus: &EventBus, instance: Uuid, metrics: &Metrics) {
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
            metrics.listener_reconnects.inc();
            tracing::info!("event listener reconnected; live streams re-read their tasks");
        }
        // Also on the first connect: a stream may have started (and read its
        // task) before this instance was listening. After a reconnect the
        // database may have restarted: the pool's idle connections are
        // likely dead, so the re-reads start on fresh ones.
        if connected_before {
            db.discard_idle();
        }
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
                    if !pg_events::is_ping(notification.payload()) {
                        handle(
                            notification.payload(),
                            db,
                            bus,
                            instance,
                            &mut published,
                            metrics,
                        )
                        .await;
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
    listener.listen(pg_events::CHANNEL).await?;
    Ok(listener)
}

async fn handle(
    payload: &str,
    db: &Db,
    bus: &EventBus,
    instance: Uuid,
    published: &mut HashMap<Uuid, i64>,
    metrics: &Metrics,
) {
    let Some(notice) = Notice::decode(payload) else {
        tracing::warn!("ignoring a malformed task notice");
        return;
    };
    if notice.instance == instance {
        return; // Published locally already, right after commit.
    }
    if let Some(task) = &notice.task {
        // Clocks of instances differ a little; a negative lag counts as none.
        let lag = (chrono::Utc::now() - task.updated_at)
            .num_microseconds()
            .unwrap_or(0);
        metrics.notice_lag.observe(lag.max(0) as f64 / 1e6);
    }
    let kind = notice.kind;
    // Already republished (a re-read ran ahead of its notice).
    if kind != TaskEventKind::Deleted
        && published
            .get(&notice.id)
            .is_some_and(|&v| v >= notice.version)
    {
        return;
    }
    let task = match (notice.task, notice.with_metadata) {
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
    let kind = if task.version == notice.version {
        kind
    } else {
        TaskEventKind::Updated
    };
    bus.publish(TaskEvent { kind, task });
}

/// The current row of a notified task; `None` if it is gone (its DELETED
/// notice follows) or unreadable (live streams are asked to re-read).
async fn read(db: &Db, bus: &EventBus, id: Uuid) -> Option<Task> {
    match Tasks::find_by_id(id).one(db).await {
        Ok(task) => task,
        Err(err) => {
            tracing::warn!(error = %err, "cannot read a notified task; asking streams to re-read");
            bus.request_resync();
            None
        }
    }
}
