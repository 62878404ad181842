//! `taskStats`: what the dashboard shows, computed without reading the whole
//! `tasks` table. Counts come from counters that database triggers keep
//! (see the `task_counts` migration); so do a worker's throughput and
//! durations, per minute (see the `stats_minutes` migration), so that they
//! cost the same however many tasks the window holds. A user's are range
//! scans of their own rows; the oldest wait and the workers are index scans
//! bounded by the tasks pending or being processed now, and a worker's
//! workers, when that read turns slow, the last read shared by every
//! request (see `workers`).
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use entity::{StatusCounts, TaskStatus};
use sea_orm::{ConnectionTrait, Statement, Value};

use crate::auth::CurrentUser;
use crate::db::{Backend, Db};

mod minutes;
mod workers;

use crate::error::{TaskError, TaskResult};
pub use minutes::{
    BUCKETS_PER_DOUBLING, LAST_BUCKET, STATS_MINUTES_KEPT, bucket_range, fold_deltas,
    histogram_percentile, prune_minutes,
};
pub use workers::{LeaseBoard, WorkerLease};

/// Longest throughput window: one day of minutes.
pub const MAX_THROUGHPUT_MINUTES: i32 = 1440;
/// Durations are taken over the tasks finished in the current minute and
/// the minutes before it, this many in all…
pub const DURATION_MINUTES: i64 = 60;
/// …and, in a user's view (read from the user's rows), over at most this
/// many of them (the latest), so that one request costs the same however
/// busy the hour was.
pub const MAX_DURATION_SAMPLE: u64 = 20_000;
/// What a `taskStats` query asks for: nothing it leaves out is computed.
#[derive(Debug, Clone, Default)]
pub struct StatsRequest {
    /// `byStatus` and `byType`.
    pub counts: bool,
    /// Every throughput window asked for, in minutes (each 1 to 1440). The
    /// longest is computed; shorter ones are its last minutes.
    pub throughput_minutes: Vec<i32>,
    pub durations: bool,
    pub oldest_pending: bool,
    pub workers: bool,
}

impl StatsRequest {
    /// Everything, with one throughput window.
    pub fn all(minutes: i32) -> Self {
        Self {
            counts: true,
            throughput_minutes: vec![minutes],
            durations: true,
            oldest_pending: true,
            workers: true,
        }
    }
}

/// Counts of one task type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeCounts {
    pub task_type: String,
    pub counts: StatusCounts,
}

/// One minute: tasks created in it, and tasks that became COMPLETED or
/// FAILED in it (by `completed_at`), of the tasks that still exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThroughputPoint {
    pub at: DateTime<Utc>,
    pub created: i64,
    pub completed: i64,
    pub failed: i64,
}

/// Wait (created to started) and run (started to finished) percentiles of
/// one type, in milliseconds; `None` when no finished task had the times.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeDurations {
    pub task_type: String,
    pub wait_p50_ms: Option<f64>,
    pub wait_p95_ms: Option<f64>,
    pub run_p50_ms: Option<f64>,
    pub run_p95_ms: Option<f64>,
    pub run_p99_ms: Option<f64>,
}

/// What `task_stats` found; the parts not asked for are empty.
#[derive(Debug, Clone, Default)]
pub struct TaskStats {
    /// Over every type.
    pub by_status: StatusCounts,
    /// Types with at least one task, by name.
    pub by_type: Vec<TypeCounts>,
    /// The longest window asked for, one point per minute, oldest first;
    /// the last point is the current minute.
    pub throughput: Vec<ThroughputPoint>,
    /// Types with a task COMPLETED or FAILED in the last hour, by name.
    pub durations: Vec<TypeDurations>,
    /// Seconds the oldest PENDING task has waited.
    pub oldest_pending_age_seconds: Option<f64>,
    /// By worker id.
    pub workers: Vec<WorkerLease>,
}

/// Checks every window asked for and returns the longest.
pub fn throughput_window(minutes: &[i32]) -> TaskResult<Option<i32>> {
    for &m in minutes {
        if !(1..=MAX_THROUGHPUT_MINUTES).contains(&m) {
            return Err(TaskError::invalid(format!(
                "minutes must be between 1 and {MAX_THROUGHPUT_MINUTES}, got {m}"
            )));
        }
    }
    Ok(minutes.iter().copied().max())
}

/// The statuses of finished tasks whose times and counts the stats show.
const COMPLETED: &str = TaskStatus::Completed.as_str();
const FAILED: &str = TaskStatus::Failed.as_str();

/// A statement with `$n` placeholders (both databases accept them).
fn statement(db: &Db, sql: String, values: Vec<Value>) -> Statement {
    Statement::from_sql_and_values(db.get_database_backend(), sql, values)
}

/// `AND user_id = $n` for a user; nothing for a worker, who sees every task.
fn owner_filter(user: &CurrentUser, values: &mut Vec<Value>) -> String {
    if user.is_service {
        String::new()
    } else {
        values.push(user.id.clone().into());
        format!(" AND user_id = ${}", values.len())
    }
}

/// What `request` asks of `user`'s tasks; a worker's `workers` through
/// `board`.
pub async fn task_stats(
    db: &Db,
    board: &LeaseBoard,
    user: &CurrentUser,
    request: &StatsRequest,
) -> TaskResult<TaskStats> {
    let minutes = throughput_window(&request.throughput_minutes)?;
    let now = super::clock::now();
    let mut stats = TaskStats::default();
    if request.counts {
        (stats.by_status, stats.by_type) = counts(db, user).await?;
    }
    if let Some(minutes) = minutes {
        stats.throughput = if user.is_service {
            minutes::throughput(db, minutes, now).await?
        } else {
            throughput(db, user, minutes, now).await?
        };
    }
    if request.durations {
        stats.durations = if user.is_service {
            minutes::durations(db, now).await?
        } else {
            durations(db, user, now).await?
        };
    }
    if request.oldest_pending {
        stats.oldest_pending_age_seconds = oldest_pending(db, user)
            .await?
            .map(|created| (now - created).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6);
    }
    if request.workers {
        stats.workers = if user.is_service {
            board.workers(db).await?
        } else {
            workers::read(db, Some(&user.id), now).await?
        };
    }
    Ok(stats)
}

/// Exact counts from the trigger-kept counters (plus, on PostgreSQL, the
/// deltas not folded in yet, read in the same statement: one snapshot).
pub(crate) async fn counts(
    db: &Db,
    user: &CurrentUser,
) -> TaskResult<(StatusCounts, Vec<TypeCounts>)> {
    let mut values = Vec::new();
    let postgres = db.backend() == Backend::Postgres;
    let sql = if user.is_service {
        let deltas = if postgres {
            " UNION ALL SELECT type, status, delta FROM task_count_deltas"
        } else {
            ""
        };
        format!(
            "SELECT type, status, CAST(SUM(n) AS BIGINT) AS n FROM \
             (SELECT type, status, count AS n FROM task_type_counts{deltas}) AS c \
             GROUP BY type, status"
        )
    } else {
        values.push(user.id.clone().into());
        let deltas = if postgres {
            " UNION ALL SELECT type, status, delta FROM task_count_deltas WHERE user_id = $1"
        } else {
            ""
        };
        format!(
            "SELECT type, status, CAST(SUM(n) AS BIGINT) AS n FROM \
             (SELECT type, status, count AS n FROM task_counts WHERE user_id = $1{deltas}) AS c \
             GROUP BY type, status"
        )
    };
    let rows = db.reads().query_all_raw(statement(db, sql, values)).await?;
    let mut by_type: BTreeMap<String, StatusCounts> = BTreeMap::new();
    let mut by_status = StatusCounts::default();
    for row in rows {
        let task_type: String = row.try_get("", "type")?;
        let status: String = row.try_get("", "status")?;
        let n: i64 = row.try_get("", "n")?;
        if let Some(status) = TaskStatus::parse(&status)
            && n != 0
        {
            by_type.entry(task_type).or_default().add(status, n);
            by_status.add(status, n);
        }
    }
    let by_type = by_type
        .into_iter()
        .filter(|(_, counts)| counts.each().any(|(_, n)| n != 0))
        .map(|(task_type, counts)| TypeCounts { task_type, counts })
        .collect();
    Ok((by_status, by_type))
}

/// The minutes of a window of `minutes` ending with the current one.
fn window(minutes: i64, now: DateTime<Utc>) -> (i64, i64) {
    let last_minute = now.timestamp().div_euclid(60);
    (last_minute - minutes + 1, last_minute)
}

fn empty_points(first_minute: i64, last_minute: i64, now: DateTime<Utc>) -> Vec<ThroughputPoint> {
    (first_minute..=last_minute)
        .map(|minute| ThroughputPoint {
            at: DateTime::from_timestamp(minute * 60, 0).unwrap_or(now),
            created: 0,
            completed: 0,
            failed: 0,
        })
        .collect()
}

fn add_to_point(
    points: &mut [ThroughputPoint],
    first_minute: i64,
    minute: i64,
    kind: &str,
    n: i64,
) {
    // A clock a little ahead on another instance lands in the last minute.
    let index = (minute - first_minute).clamp(0, points.len() as i64 - 1) as usize;
    let point = &mut points[index];
    match kind {
        "created" => point.created += n,
        "completed" => point.completed += n,
        "failed" => point.failed += n,
        _ => {}
    }
}

/// A user's throughput: created, completed and failed per minute over the
/// last `minutes`, from the user's rows in the window (the
/// `(user, created_at)` and `(user, status, created_at)` indexes).
async fn throughput(
    db: &Db,
    user: &CurrentUser,
    minutes: i32,
    now: DateTime<Utc>,
) -> TaskResult<Vec<ThroughputPoint>> {
    let (first_minute, last_minute) = window(i64::from(minutes), now);
    let since = DateTime::from_timestamp(first_minute * 60, 0).unwrap_or(now);
    let mut values: Vec<Value> = vec![since.into(), COMPLETED.into(), FAILED.into()];
    let owner = owner_filter(user, &mut values);
    let backend = db.backend();
    let sql = format!(
        "SELECT 'created' AS kind, {created} AS minute, COUNT(*) AS n FROM tasks \
         WHERE created_at >= $1{owner} GROUP BY {created} \
         UNION ALL \
         SELECT status AS kind, {finished} AS minute, COUNT(*) AS n FROM tasks \
         WHERE completed_at >= $1 AND status IN ($2, $3){owner} \
         GROUP BY status, {finished}",
        created = backend.minute_of("created_at"),
        finished = backend.minute_of("completed_at"),
    );
    let mut points = empty_points(first_minute, last_minute, now);
    for row in db.reads().query_all_raw(statement(db, sql, values)).await? {
        let kind: String = row.try_get("", "kind")?;
        let minute: i64 = row.try_get("", "minute")?;
        let n: i64 = row.try_get("", "n")?;
        add_to_point(&mut points, first_minute, minute, &kind, n);
    }
    Ok(points)
}

/// A user's durations: exact percentiles of wait and run times by type,
/// over the latest (at most [`MAX_DURATION_SAMPLE`]) of the user's tasks
/// COMPLETED or FAILED in the last [`DURATION_MINUTES`].
async fn durations(
    db: &Db,
    user: &CurrentUser,
    now: DateTime<Utc>,
) -> TaskResult<Vec<TypeDurations>> {
    let (first_minute, _) = window(DURATION_MINUTES, now);
    let since = DateTime::from_timestamp(first_minute * 60, 0).unwrap_or(now);
    let mut values: Vec<Value> = vec![since.into(), COMPLETED.into(), FAILED.into()];
    let owner = owner_filter(user, &mut values);
    let backend = db.backend();
    let sql = format!(
        "SELECT type, {wait} AS wait_ms, {run} AS run_ms FROM tasks \
         WHERE completed_at >= $1 AND status IN ($2, $3){owner} \
         ORDER BY completed_at DESC LIMIT {MAX_DURATION_SAMPLE}",
        wait = backend.millis_between("created_at", "started_at"),
        run = backend.millis_between("started_at", "completed_at"),
    );
    let mut by_type: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for row in db.reads().query_all_raw(statement(db, sql, values)).await? {
        let task_type: String = row.try_get("", "type")?;
        let (waits, runs) = by_type.entry(task_type).or_default();
        if let Some(wait) = row.try_get::<Option<f64>>("", "wait_ms")? {
            waits.push(wait);
        }
        if let Some(run) = row.try_get::<Option<f64>>("", "run_ms")? {
            runs.push(run);
        }
    }
    Ok(by_type
        .into_iter()
        .map(|(task_type, (mut waits, mut runs))| {
            waits.sort_by(f64::total_cmp);
            runs.sort_by(f64::total_cmp);
            TypeDurations {
                task_type,
                wait_p50_ms: percentile(&waits, 0.50),
                wait_p95_ms: percentile(&waits, 0.95),
                run_p50_ms: percentile(&runs, 0.50),
                run_p95_ms: percentile(&runs, 0.95),
                run_p99_ms: percentile(&runs, 0.99),
            }
        })
        .collect())
}

/// The `p` percentile of sorted values, interpolated between the two
/// nearest ranks (as PostgreSQL's `percentile_cont`).
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let rank = p.clamp(0.0, 1.0) * last as f64;
    let below = rank.floor() as usize;
    let above = rank.ceil() as usize;
    let fraction = rank - below as f64;
    Some(sorted[below] + (sorted[above] - sorted[below]) * fraction)
}

/// The `created_at` of the oldest PENDING task, from the (status,
/// created_at) index, or the (user, status, created_at) one for a user.
async fn oldest_pending(db: &Db, user: &CurrentUser) -> TaskResult<Option<DateTime<Utc>>> {
    let mut values: Vec<Value> = vec![TaskStatus::Pending.as_str().into()];
    let owner = owner_filter(user, &mut values);
    let sql = format!(
        "SELECT created_at FROM tasks WHERE status = $1{owner} ORDER BY created_at LIMIT 1"
    );
    match db.reads().query_one_raw(statement(db, sql, values)).await? {
        Some(row) => Ok(Some(row.try_get("", "created_at")?)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_percentile_cont() {
        let values: Vec<f64> = (1..=100).map(|i| f64::from(i) * 10.0).collect();
        assert_eq!(percentile(&values, 0.5), Some(505.0));
        assert!((percentile(&values, 0.95).unwrap() - 950.5).abs() < 1e-9);
        assert!((percentile(&values, 0.99).unwrap() - 990.1).abs() < 1e-9);
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn throughput_windows_are_checked() {
        assert_eq!(throughput_window(&[]).unwrap(), None);
        assert_eq!(throughput_window(&[60, 1440, 1]).unwrap(), Some(1440));
        for bad in [0, -1, 1441] {
            assert!(matches!(
                throughput_window(&[60, bad]),
                Err(TaskError::InvalidInput(_))
            ));
        }
    }
}
