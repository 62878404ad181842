//! A worker's throughput and durations from the per-minute counters that
//! the triggers keep (see the `stats_minutes` migration): a few rows per
//! minute of the window, however many tasks it holds. Wait and run times
//! are kept as counts per duration bucket, so minutes merge by adding.
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseBackend, Statement};
use tracing::instrument;

use super::{
    DURATION_MINUTES, ThroughputPoint, TypeDurations, add_to_point, empty_points, statement, window,
};
use crate::db::{Backend, Db};
use crate::error::TaskResult;

/// PostgreSQL advisory lock key ("taskql" + 2) held by the instance folding deltas.
const FOLD_LOCK: i64 = 0x7461_736b_716c_0002;
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
pub(super) async fn throughput(
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
pub(super) async fn durations(db: &Db, now: DateTime<Utc>) -> TaskResult<Vec<TypeDurations>> {
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

/// Folds the deltas PostgreSQL's triggers appended into the counters (task
/// counts and per-minute counters), each in one statement (readers see the
/// deltas or the counters they became, never both), and returns how many
/// it folded. Counts are exact either way: readers add the deltas not
/// folded yet. One instance folds at a time; on SQLite the triggers keep
/// the counters themselves and this does nothing.
///
/// After a fold that moved deltas, the instance vacuums the three tables
/// that writes append to and readers empty (the two of deltas, and the
/// change log's `task_changes`): each is read whole by a statement that
/// empties it, and without a vacuum a second of dead rows would make every
/// such read scan them until autovacuum comes, a minute later.
#[instrument(level = "debug", skip_all)]
pub async fn fold_deltas(db: &Db) -> TaskResult<u64> {
    if db.backend() != Backend::Postgres {
        return Ok(0);
    }
    let txn = db.begin().await?;
    if !txn.try_lock(FOLD_LOCK).await? {
        txn.rollback().await?;
        return Ok(0);
    }
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
    txn.commit().await?;
    if folded > 0
        && let Err(err) = db.execute_unprepared(VACUUM_QUEUES).await
    {
        tracing::warn!(error = %err, "vacuuming the queue tables failed");
    }
    Ok(folded)
}

/// The tables that writes append to and a reader empties; a vacuum already
/// running on one of them is left to finish. Their empty pages are kept
/// for the next second's rows (`TRUNCATE false`): giving them back would
/// take a lock that every write's trigger waits on.
const VACUUM_QUEUES: &str =
    "VACUUM (SKIP_LOCKED, TRUNCATE false) task_changes, task_count_deltas, task_stats_deltas";

/// Deletes the per-minute counters older than [`STATS_MINUTES_KEPT`]
/// minutes before `now` (a day, the longest throughput window, and an
/// hour), one index range per metric; returns how many rows went. It holds
/// the fold's lock (waiting for it, held a moment each second), so a fold
/// never upserts the rows being deleted.
#[instrument(level = "debug", skip_all)]
pub async fn prune_minutes(db: &Db, now: DateTime<Utc>) -> TaskResult<u64> {
    let txn = db.begin().await?;
    txn.lock(FOLD_LOCK).await?;
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
    txn.commit().await?;
    Ok(result.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
