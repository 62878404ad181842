//! `taskStats`: what the dashboard shows, computed without reading the whole
//! `tasks` table. Counts come from counters that database triggers keep
//! (see the `task_counts` migration); so do a worker's throughput and
//! durations, per minute (see the `stats_minutes` migration), so that they
//! cost the same however many tasks the window holds. A user's are range
//! scans of their own rows; the oldest wait and the workers are index scans
//! bounded by the tasks pending or being processed now.
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use entity::TaskStatus;
use sea_orm::{ConnectionTrait, DatabaseBackend, Statement, Value};

use crate::auth::CurrentUser;
use crate::db::{Backend, Db, DbTransaction};
use crate::error::{TaskError, TaskResult};

/// Every status, in the order counts are kept and shown.
pub const STATUSES: [TaskStatus; 5] = TaskStatus::ALL;
/// Longest throughput window: one day of minutes.
pub const MAX_THROUGHPUT_MINUTES: i32 = 1440;
/// Durations are taken over the tasks finished in the current minute and
/// the minutes before it, this many in all…
pub const DURATION_MINUTES: i64 = 60;
/// …and, in a user's view (read from the user's rows), over at most this
/// many of them (the latest), so that one request costs the same however
/// busy the hour was.
pub const MAX_DURATION_SAMPLE: u64 = 20_000;
/// Per-minute counters are kept this long (a day, the longest throughput
/// window, and an hour more); older minutes are pruned.
pub const STATS_MINUTES_KEPT: i64 = 1500;
/// Duration buckets per doubling: bucket `b` (1 to 256) holds
/// [2^((b-1)/8), 2^(b/8)) ms, bucket 0 what is under 1 ms, bucket 257 what
/// is 2^32 ms or more. A percentile is interpolated in its bucket, so it is
/// within a factor 2^(1/8) (9.05%) of the value of its rank, or within 1 ms.
pub const BUCKETS_PER_DOUBLING: i32 = 8;
/// The last bucket, open-ended.
pub const LAST_BUCKET: i32 = 257;

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

/// Counts of one task type, by status in [`STATUSES`] order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeCounts {
    pub task_type: String,
    pub counts: [i64; 5],
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

/// A worker holding at least one unexpired lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerLease {
    pub worker_id: String,
    pub tasks: i64,
    pub next_lease_expiry: Option<DateTime<Utc>>,
}

/// What `task_stats` found; the parts not asked for are empty.
#[derive(Debug, Clone, Default)]
pub struct TaskStats {
    /// By status, in [`STATUSES`] order.
    pub by_status: [i64; 5],
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

/// The minute since the epoch of a timestamp column, in SQL.
fn minute_of(backend: Backend, column: &str) -> String {
    match backend {
        Backend::Postgres => format!("floor(extract(epoch FROM {column}) / 60)::bigint"),
        Backend::Sqlite => format!("(CAST(strftime('%s', {column}) AS INTEGER) / 60)"),
    }
}

/// Milliseconds from one timestamp column to another, in SQL.
fn millis_between(backend: Backend, from: &str, to: &str) -> String {
    match backend {
        Backend::Postgres => format!("(extract(epoch FROM {to} - {from}) * 1000)::float8"),
        Backend::Sqlite => format!("((julianday({to}) - julianday({from})) * 86400000.0)"),
    }
}

pub async fn task_stats(
    db: &Db,
    user: &CurrentUser,
    request: &StatsRequest,
) -> TaskResult<TaskStats> {
    let minutes = throughput_window(&request.throughput_minutes)?;
    let now = super::sea::now();
    let mut stats = TaskStats::default();
    if request.counts {
        (stats.by_status, stats.by_type) = counts(db, user).await?;
    }
    if let Some(minutes) = minutes {
        stats.throughput = if user.is_service {
            throughput_from_minutes(db, minutes, now).await?
        } else {
            throughput(db, user, minutes, now).await?
        };
    }
    if request.durations {
        stats.durations = if user.is_service {
            durations_from_minutes(db, now).await?
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
        stats.workers = workers(db, user, now).await?;
    }
    Ok(stats)
}

/// Where `status` (as stored) is in [`STATUSES`], and in every count array.
pub(crate) fn status_index(status: &str) -> Option<usize> {
    STATUSES.iter().position(|s| s.as_str() == status)
}

/// Exact counts from the trigger-kept counters (plus, on PostgreSQL, the
/// deltas not folded in yet, read in the same statement: one snapshot).
pub(crate) async fn counts(db: &Db, user: &CurrentUser) -> TaskResult<([i64; 5], Vec<TypeCounts>)> {
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
    let mut by_type: BTreeMap<String, [i64; 5]> = BTreeMap::new();
    for row in rows {
        let task_type: String = row.try_get("", "type")?;
        let status: String = row.try_get("", "status")?;
        let n: i64 = row.try_get("", "n")?;
        if let Some(i) = status_index(&status)
            && n != 0
        {
            by_type.entry(task_type).or_default()[i] += n;
        }
    }
    let mut by_status = [0; 5];
    for counts in by_type.values() {
        for (total, n) in by_status.iter_mut().zip(counts) {
            *total += n;
        }
    }
    let by_type = by_type
        .into_iter()
        .filter(|(_, counts)| counts.iter().any(|&n| n != 0))
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

/// The rows of `task_stats_minutes` of `metrics` from `first_minute` on,
/// with, on PostgreSQL, the deltas not folded in yet (one snapshot), summed
/// by `group` (columns of both).
fn minutes_sql(db: &Db, metrics: &str, select: &str, group: &str) -> String {
    let deltas = if db.backend() == Backend::Postgres {
        format!(
            " UNION ALL SELECT metric, minute, type, bucket, n FROM task_stats_deltas \
             WHERE metric IN ({metrics}) AND minute >= $1"
        )
    } else {
        String::new()
    };
    format!(
        "SELECT {select}, CAST(SUM(n) AS BIGINT) AS n FROM \
         (SELECT metric, minute, type, bucket, n FROM task_stats_minutes \
          WHERE metric IN ({metrics}) AND minute >= $1{deltas}) AS m GROUP BY {group}"
    )
}

/// A worker's throughput: created, completed and failed per minute from
/// the per-minute counters, a few rows per minute of the window.
async fn throughput_from_minutes(
    db: &Db,
    minutes: i32,
    now: DateTime<Utc>,
) -> TaskResult<Vec<ThroughputPoint>> {
    let (first_minute, last_minute) = window(i64::from(minutes), now);
    let sql = minutes_sql(
        db,
        "'created', 'completed', 'failed'",
        "metric, minute",
        "metric, minute",
    );
    let mut points = empty_points(first_minute, last_minute, now);
    for row in db
        .reads()
        .query_all_raw(statement(db, sql, vec![first_minute.into()]))
        .await?
    {
        let metric: String = row.try_get("", "metric")?;
        let minute: i64 = row.try_get("", "minute")?;
        let n: i64 = row.try_get("", "n")?;
        add_to_point(&mut points, first_minute, minute, &metric, n);
    }
    Ok(points)
}

/// The wait and run times of one type, as bucket counts.
#[derive(Default)]
struct Histograms {
    finished: i64,
    wait: BTreeMap<i32, i64>,
    run: BTreeMap<i32, i64>,
}

/// A worker's durations: percentiles from the per-minute histograms of the
/// last [`DURATION_MINUTES`], merged across minutes.
async fn durations_from_minutes(db: &Db, now: DateTime<Utc>) -> TaskResult<Vec<TypeDurations>> {
    let (first_minute, _) = window(DURATION_MINUTES, now);
    let sql = minutes_sql(
        db,
        "'completed', 'failed', 'wait', 'run'",
        "type, metric, CAST(bucket AS INTEGER) AS bucket",
        "type, metric, bucket",
    );
    let mut by_type: BTreeMap<String, Histograms> = BTreeMap::new();
    for row in db
        .reads()
        .query_all_raw(statement(db, sql, vec![first_minute.into()]))
        .await?
    {
        let task_type: String = row.try_get("", "type")?;
        let metric: String = row.try_get("", "metric")?;
        let bucket: i32 = row.try_get("", "bucket")?;
        let n: i64 = row.try_get("", "n")?;
        if n == 0 {
            continue;
        }
        let histograms = by_type.entry(task_type).or_default();
        match metric.as_str() {
            "wait" => *histograms.wait.entry(bucket).or_default() += n,
            "run" => *histograms.run.entry(bucket).or_default() += n,
            _ => histograms.finished += n,
        }
    }
    Ok(by_type
        .into_iter()
        .filter(|(_, h)| h.finished > 0)
        .map(|(task_type, h)| TypeDurations {
            task_type,
            wait_p50_ms: histogram_percentile(&h.wait, 0.50),
            wait_p95_ms: histogram_percentile(&h.wait, 0.95),
            run_p50_ms: histogram_percentile(&h.run, 0.50),
            run_p95_ms: histogram_percentile(&h.run, 0.95),
            run_p99_ms: histogram_percentile(&h.run, 0.99),
        })
        .collect())
}

/// The milliseconds bucket `bucket` holds: [low, high); the last bucket
/// has no end, and gives its lower bound.
pub fn bucket_range(bucket: i32) -> (f64, f64) {
    let bound = |b: i32| 2f64.powf(f64::from(b - 1) / f64::from(BUCKETS_PER_DOUBLING));
    match bucket {
        b if b <= 0 => (0.0, 1.0),
        b if b >= LAST_BUCKET => (bound(LAST_BUCKET), bound(LAST_BUCKET)),
        b => (bound(b), bound(b + 1)),
    }
}

/// The `p` percentile of values counted by bucket, at the same rank as
/// [`percentile`] (between the nearest ranks), placed in its bucket as if
/// the bucket's values were spread evenly across it.
pub fn histogram_percentile(buckets: &BTreeMap<i32, i64>, p: f64) -> Option<f64> {
    let total: i64 = buckets.values().filter(|&&n| n > 0).sum();
    let last = total.checked_sub(1).filter(|&last| last >= 0)?;
    let rank = p.clamp(0.0, 1.0) * last as f64;
    let target = rank.floor() as i64;
    let mut before = 0;
    for (&bucket, &n) in buckets.iter().filter(|(_, n)| **n > 0) {
        if target < before + n {
            let (low, high) = bucket_range(bucket);
            let within = ((rank - before as f64 + 0.5) / n as f64).min(1.0);
            return Some(low + (high - low) * within);
        }
        before += n;
    }
    None
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
    let mut values: Vec<Value> = vec![since.into()];
    let owner = owner_filter(user, &mut values);
    let backend = db.backend();
    let sql = format!(
        "SELECT 'created' AS kind, {created} AS minute, COUNT(*) AS n FROM tasks \
         WHERE created_at >= $1{owner} GROUP BY {created} \
         UNION ALL \
         SELECT status AS kind, {finished} AS minute, COUNT(*) AS n FROM tasks \
         WHERE completed_at >= $1 AND status IN ('completed', 'failed'){owner} \
         GROUP BY status, {finished}",
        created = minute_of(backend, "created_at"),
        finished = minute_of(backend, "completed_at"),
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
    let mut values: Vec<Value> = vec![since.into()];
    let owner = owner_filter(user, &mut values);
    let backend = db.backend();
    let sql = format!(
        "SELECT type, {wait} AS wait_ms, {run} AS run_ms FROM tasks \
         WHERE completed_at >= $1 AND status IN ('completed', 'failed'){owner} \
         ORDER BY completed_at DESC LIMIT {MAX_DURATION_SAMPLE}",
        wait = millis_between(backend, "created_at", "started_at"),
        run = millis_between(backend, "started_at", "completed_at"),
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
    let mut values = Vec::new();
    let owner = owner_filter(user, &mut values);
    let sql = format!(
        "SELECT created_at FROM tasks WHERE status = 'pending'{owner} ORDER BY created_at LIMIT 1"
    );
    match db.reads().query_one_raw(statement(db, sql, values)).await? {
        Some(row) => Ok(Some(row.try_get("", "created_at")?)),
        None => Ok(None),
    }
}

/// Workers holding unexpired leases, from the (status, lease) index: the
/// rows read are the tasks being processed now.
async fn workers(db: &Db, user: &CurrentUser, now: DateTime<Utc>) -> TaskResult<Vec<WorkerLease>> {
    let mut values: Vec<Value> = vec![now.into()];
    let owner = owner_filter(user, &mut values);
    let sql = format!(
        "SELECT worker_id, COUNT(*) AS tasks, MIN(lease_expires_at) AS next_expiry FROM tasks \
         WHERE status = 'processing' AND lease_expires_at > $1 AND worker_id IS NOT NULL{owner} \
         GROUP BY worker_id ORDER BY worker_id"
    );
    db.reads()
        .query_all_raw(statement(db, sql, values))
        .await?
        .iter()
        .map(|row| {
            Ok(WorkerLease {
                worker_id: row.try_get("", "worker_id")?,
                tasks: row.try_get("", "tasks")?,
                next_lease_expiry: row.try_get("", "next_expiry")?,
            })
        })
        .collect()
}

/// Folds the deltas PostgreSQL's triggers appended into the counters (task
/// counts and per-minute counters), each in one statement (readers see the
/// deltas or the counters they became, never both), and returns how many
/// it folded. Only one instance folds at a time: the caller holds an
/// advisory lock in `txn`.
pub async fn fold_count_deltas(txn: &DbTransaction) -> TaskResult<u64> {
    let counts = "WITH moved AS (DELETE FROM task_count_deltas RETURNING user_id, type, status, delta), \
         by_user AS (INSERT INTO task_counts AS c (user_id, type, status, count) \
             SELECT user_id, type, status, SUM(delta) FROM moved GROUP BY user_id, type, status \
             ON CONFLICT (user_id, type, status) DO UPDATE SET count = c.count + excluded.count), \
         by_type AS (INSERT INTO task_type_counts AS c (type, status, count) \
             SELECT type, status, SUM(delta) FROM moved GROUP BY type, status \
             ON CONFLICT (type, status) DO UPDATE SET count = c.count + excluded.count) \
         SELECT COUNT(*) AS n FROM moved";
    let minutes = "WITH moved AS (DELETE FROM task_stats_deltas RETURNING metric, minute, type, bucket, n), \
         folded AS (INSERT INTO task_stats_minutes AS m (metric, minute, type, bucket, n) \
             SELECT metric, minute, type, bucket, SUM(n) FROM moved GROUP BY metric, minute, type, bucket \
             ON CONFLICT (metric, minute, type, bucket) DO UPDATE SET n = m.n + excluded.n) \
         SELECT COUNT(*) AS n FROM moved";
    let mut folded = 0;
    for sql in [counts, minutes] {
        let row = txn
            .query_one_raw(Statement::from_string(DatabaseBackend::Postgres, sql))
            .await?;
        if let Some(row) = row {
            folded += row.try_get::<i64>("", "n")?.max(0) as u64;
        }
    }
    Ok(folded)
}

/// Deletes the per-minute counters older than [`STATS_MINUTES_KEPT`]
/// minutes before `now`, one index range per metric; returns how many rows
/// went. On PostgreSQL the caller holds the fold's advisory lock in `txn`,
/// so a fold never upserts the rows being deleted.
pub async fn prune_minutes(txn: &DbTransaction, now: DateTime<Utc>) -> TaskResult<u64> {
    let oldest_kept = now.timestamp().div_euclid(60) - STATS_MINUTES_KEPT + 1;
    let sql = "DELETE FROM task_stats_minutes \
         WHERE metric IN ('created', 'completed', 'failed', 'wait', 'run') AND minute < $1";
    let result = txn
        .execute_raw(Statement::from_sql_and_values(
            txn.get_database_backend(),
            sql,
            [oldest_kept.into()],
        ))
        .await?;
    Ok(result.rows_affected())
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
    fn buckets_are_log_spaced_and_percentiles_stay_in_their_bucket() {
        let ratio = 2f64.powf(1.0 / 8.0);
        assert_eq!(bucket_range(0), (0.0, 1.0));
        let (low, high) = bucket_range(1);
        assert_eq!(low, 1.0);
        assert!((high - ratio).abs() < 1e-12);
        assert_eq!(bucket_range(9).0, 2.0);
        assert_eq!(bucket_range(LAST_BUCKET), (4294967296.0, 4294967296.0));
        assert_eq!(histogram_percentile(&BTreeMap::new(), 0.5), None);
        assert_eq!(histogram_percentile(&BTreeMap::from([(3, 0)]), 0.5), None);
        // One value in bucket 9 ([2, 2.18) ms): its middle.
        let one = histogram_percentile(&BTreeMap::from([(9, 1)]), 0.99).unwrap();
        assert!((one - (2.0 + ratio * 2.0) / 2.0).abs() < 1e-9);
        // 90 values under 1 ms and 10 in bucket 80: p50 is under 1 ms, p95
        // in bucket 80, p99 near its top.
        let buckets = BTreeMap::from([(0, 90), (80, 10)]);
        assert!(histogram_percentile(&buckets, 0.5).unwrap() < 1.0);
        let (low, high) = bucket_range(80);
        for p in [0.95, 0.99, 1.0] {
            let got = histogram_percentile(&buckets, p).unwrap();
            assert!((low..=high).contains(&got), "{p}: {got}");
        }
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
