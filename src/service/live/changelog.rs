//! The change log: every committed change of a task at an ordered position
//! (`task_events`, written by triggers in the changing statement; see the
//! migration), and the one reader per instance that publishes it on the
//! in-process bus.
//!
//! Nothing on the write path takes a database-wide lock for events. A write
//! only wakes this instance's reader. On PostgreSQL the reader first moves
//! committed changes into the log (`task_events_take_changes()`, one mover
//! at a time, which gives them their positions in commit order and NOTIFYs
//! once per move, so other instances wake and read). Every instance also
//! reads on a short tick, which picks up changes whose writer died before
//! its own reader ran, and notices lost while the listener was away.
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use entity::Task;
use sea_orm::{ConnectionTrait, DbErr, QueryResult, Statement, Value};
use tokio::sync::Notify;

use crate::db::{Backend, Db};
use crate::error::{TaskError, TaskResult};
use crate::metrics::Metrics;
use crate::service::live::bus::{EventBus, TaskEvent, TaskEventKind};

/// How often the reader looks at the log without being woken.
const TICK: Duration = Duration::from_millis(250);
/// How long the reader waits after a local write before it moves and reads,
/// so that the writes committing meanwhile share one move (one commit).
const GATHER: Duration = Duration::from_millis(2);
/// Events one read of the log returns at most.
pub const PAGE: u64 = 1000;
/// Rows one retention statement deletes at most.
const PRUNE_BATCH: u64 = 1000;
/// The reader's position until its first read of the log's head.
const UNKNOWN: i64 = i64::MIN;
/// Longest a stream waits for the reader's first read of the log.
const READY_WAIT: Duration = Duration::from_secs(5);

/// What a cursor says: the position of the last event its holder received.
pub fn encode_cursor(pos: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("ev:{pos}"))
}

pub fn decode_cursor(cursor: &str) -> TaskResult<i64> {
    let bad = || TaskError::invalid("after is not a cursor returned by taskEvents");
    let raw = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let digits = text.strip_prefix("ev:").ok_or_else(bad)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    digits.parse::<i64>().map_err(|_| bad())
}

/// Where the log stands: positions up to `pruned_through` are gone; the
/// newest is `head`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Horizon {
    pub pruned_through: i64,
    pub head: i64,
}

struct Inner {
    db: Db,
    bus: EventBus,
    metrics: Arc<Metrics>,
    /// The last position published on the bus.
    published: AtomicI64,
    /// True once `published` is known (the reader read the log's head).
    ready: tokio::sync::watch::Sender<bool>,
}

/// The log and this instance's reader of it (cheap to clone).
#[derive(Clone)]
pub struct Changelog {
    inner: Arc<Inner>,
    /// A change was written here: move (PostgreSQL) and read.
    wrote: Arc<Notify>,
    /// Another instance moved changes into the log: read.
    noticed: Arc<Notify>,
}

impl Changelog {
    /// The log of `db`; its reader runs on the current tokio runtime until
    /// the last clone is dropped.
    pub fn start(db: Db, bus: EventBus, metrics: Arc<Metrics>) -> Self {
        let log = Self {
            inner: Arc::new(Inner {
                db,
                bus,
                metrics,
                published: AtomicI64::new(UNKNOWN),
                ready: tokio::sync::watch::Sender::new(false),
            }),
            wrote: Arc::default(),
            noticed: Arc::default(),
        };
        tokio::spawn(read_forever(
            Arc::downgrade(&log.inner),
            log.wrote.clone(),
            log.noticed.clone(),
        ));
        log
    }

    pub fn bus(&self) -> &EventBus {
        &self.inner.bus
    }

    /// Says a change committed here. Wakes coalesce: many writes during one
    /// read make one more read.
    pub fn wrote(&self) {
        self.wrote.notify_one();
    }

    /// A handle that wakes the reader when another instance moved changes
    /// into the log (for the PostgreSQL listener).
    pub fn notice_handle(&self) -> Arc<Notify> {
        self.noticed.clone()
    }

    /// The last position this instance published. Every event past it
    /// will be published on the bus. Waits (at most `READY_WAIT`) for the
    /// reader's first read of the log when it has not happened yet: a
    /// stream that started before it could miss the events between.
    pub async fn published(&self) -> TaskResult<i64> {
        let mut ready = self.inner.ready.subscribe();
        match tokio::time::timeout(READY_WAIT, ready.wait_for(|ready| *ready)).await {
            Ok(Ok(_)) => Ok(self.inner.published.load(Ordering::Acquire)),
            _ => Err(TaskError::Unavailable(
                "the change log's reader has not read the log yet".into(),
            )),
        }
    }

    /// Deletes the events logged before `older_than` ago, a bounded batch
    /// per transaction, and moves the horizon past them; returns how many.
    pub async fn prune(&self, older_than: Duration) -> TaskResult<u64> {
        let cutoff = chrono::Utc::now().timestamp_millis()
            - i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
        let db = &self.inner.db;
        let backend = db.get_database_backend();
        let mut total = 0;
        loop {
            let txn = db.begin().await?;
            // The oldest rows by position, of which those old enough: the
            // scan is bounded even when nothing is to go.
            let gone = txn
                .query_all_raw(Statement::from_sql_and_values(
                    backend,
                    "DELETE FROM task_events WHERE pos IN (\
                       SELECT pos FROM (SELECT pos, logged_at_ms FROM task_events ORDER BY pos LIMIT $1) oldest \
                       WHERE logged_at_ms < $2) RETURNING pos",
                    [(PRUNE_BATCH as i64).into(), cutoff.into()],
                ))
                .await?;
            let newest = gone
                .iter()
                .map(|row| row.try_get_by_index::<i64>(0))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .max();
            if let Some(newest) = newest {
                txn.execute_raw(Statement::from_sql_and_values(
                    backend,
                    "UPDATE task_event_horizon SET pruned_through = $1 WHERE pruned_through < $2",
                    [newest.into(), newest.into()],
                ))
                .await?;
            }
            txn.commit().await?;
            total += gone.len() as u64;
            if (gone.len() as u64) < PRUNE_BATCH {
                return Ok(total);
            }
        }
    }
}

/// The one row `sql` (without parameters) answers, tried again on a fresh
/// connection if its own turns out dead: every `sql` here may run twice
/// (a read, or the move of changes into the log, which moves each once).
async fn one_row(db: &Db, sql: &str) -> TaskResult<QueryResult> {
    db.reads()
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await?
        .ok_or_else(|| TaskError::Internal(format!("no row from {sql}")))
}

/// Where the log starts and ends now.
pub async fn horizon(db: &Db) -> TaskResult<Horizon> {
    let row = one_row(
        db,
        "SELECT pruned_through, (SELECT max(pos) FROM task_events) FROM task_event_horizon",
    )
    .await?;
    let pruned_through: i64 = row.try_get_by_index(0)?;
    let newest: Option<i64> = row.try_get_by_index(1)?;
    Ok(Horizon {
        pruned_through,
        head: newest.unwrap_or(0).max(pruned_through),
    })
}

/// The columns of an event: the task's, in [`Task::COLUMNS`] order (which
/// [`Task::from_row`] reads by position), then its position and kind. The
/// log does not keep a task's traceparent: events read it as NULL.
fn event_columns() -> String {
    let mut columns = Task::COLUMNS
        .map(|column| match column {
            "traceparent" => "CAST(NULL AS TEXT)",
            column => column,
        })
        .join(", ");
    columns.push_str(", pos, kind");
    columns
}

/// The events after `after`, in order, at most `limit`: every user's, or
/// only `user`'s.
pub async fn read(
    db: &Db,
    after: i64,
    user: Option<&str>,
    limit: u64,
) -> TaskResult<Vec<TaskEvent>> {
    let mut values: Vec<Value> = vec![after.into()];
    let mut sql = format!("SELECT {} FROM task_events WHERE pos > $1", event_columns());
    if let Some(user) = user {
        values.push(user.into());
        sql.push_str(" AND user_id = $2");
    }
    sql.push_str(&format!(" ORDER BY pos LIMIT {limit}"));
    db.reads()
        .query_all_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            sql,
            values,
        ))
        .await?
        .iter()
        .map(|row| event_of(row).map_err(TaskError::from))
        .collect()
}

fn event_of(row: &QueryResult) -> Result<TaskEvent, DbErr> {
    let task = Task::from_row(row)?;
    let pos: i64 = row.try_get_by_index(Task::COLUMNS.len())?;
    let kind: String = row.try_get_by_index(Task::COLUMNS.len() + 1)?;
    let kind = TaskEventKind::parse(&kind)
        .ok_or_else(|| DbErr::Type(format!("unknown event kind {kind:?} at {pos}")))?;
    Ok(TaskEvent { pos, kind, task })
}

/// On PostgreSQL, moves committed changes into the log; returns the head.
async fn take_changes(db: &Db) -> TaskResult<i64> {
    let row = one_row(db, "SELECT task_events_take_changes()").await?;
    Ok(row.try_get_by_index(0)?)
}

/// The instance's one reader: after each wake-up or tick, publishes every
/// event past the last one it published, in order.
async fn read_forever(inner: Weak<Inner>, wrote: Arc<Notify>, noticed: Arc<Notify>) {
    // The first round runs at once: streams wait for its read of the head.
    let mut backoff = Duration::ZERO;
    loop {
        // A write here or a tick moves first (a tick picks up changes whose
        // writer died before its reader ran); another instance's notice
        // means its mover already moved.
        let move_first = tokio::select! {
            _ = wrote.notified() => {
                // Let the writes that commit meanwhile share this move.
                tokio::time::sleep(GATHER).await;
                true
            }
            _ = noticed.notified() => false,
            _ = tokio::time::sleep(backoff) => true,
        };
        let Some(inner) = inner.upgrade() else {
            return;
        };
        match read_round(&inner, move_first).await {
            Ok(()) => backoff = TICK,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the change log; retrying");
                backoff = (backoff * 2).clamp(TICK, Duration::from_secs(5));
            }
        }
    }
}

async fn read_round(inner: &Inner, move_first: bool) -> TaskResult<()> {
    let moved_head = if move_first && inner.db.backend() == Backend::Postgres {
        Some(take_changes(&inner.db).await?)
    } else {
        None
    };
    let mut position = inner.published.load(Ordering::Acquire);
    if position == UNKNOWN {
        // Streams that start now begin at the head; older events are
        // read from the log by those that resume.
        position = horizon(&inner.db).await?.head;
        inner.published.store(position, Ordering::Release);
        inner.ready.send_replace(true);
        return Ok(());
    }
    // Nobody listens: move past the new events without reading them. A
    // stream that starts afterwards starts from there, so it misses none.
    if inner.bus.topic_count() == 0 {
        let head = match moved_head {
            Some(head) => head,
            None => horizon(&inner.db).await?.head,
        };
        if head <= position
            || inner
                .bus
                .if_unwatched(|| inner.published.store(head, Ordering::Release))
        {
            return Ok(());
        }
    }
    loop {
        let page = read(&inner.db, position, None, PAGE).await?;
        let full = page.len() as u64 == PAGE;
        let now = chrono::Utc::now();
        for event in page {
            if event.kind != TaskEventKind::Deleted {
                // Clocks of instances differ a little; a negative lag counts as none.
                let lag = (now - event.task.updated_at)
                    .num_microseconds()
                    .unwrap_or(0);
                inner.metrics.event_lag.observe(lag.max(0) as f64 / 1e6);
            }
            // Stored first: a stream that starts from it receives every
            // event past it on the bus.
            position = event.pos;
            inner.published.store(position, Ordering::Release);
            inner.bus.publish(event);
        }
        if !full {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        for pos in [0, 1, 42, i64::MAX] {
            assert_eq!(decode_cursor(&encode_cursor(pos)).unwrap(), pos);
        }
        for bad in [
            "".to_string(),
            "!!!".into(),
            URL_SAFE_NO_PAD.encode("ev:"),
            URL_SAFE_NO_PAD.encode("ev:-1"),
            URL_SAFE_NO_PAD.encode("ev:+1"),
            URL_SAFE_NO_PAD.encode("ev:1x"),
            URL_SAFE_NO_PAD.encode("12"),
            URL_SAFE_NO_PAD.encode("1:00000000-0000-0000-0000-000000000000"),
        ] {
            assert!(
                matches!(decode_cursor(&bad), Err(TaskError::InvalidInput(_))),
                "{bad:?}"
            );
        }
    }
}
