use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DatabaseBackend};

/// Per-minute counters for `taskStats`, kept by triggers like the task
/// counts, so that a worker's throughput and durations read a few rows per
/// minute however many tasks the minutes hold.
///
/// `task_stats_minutes` holds, by (metric, minute, type, bucket), what the
/// tasks that exist now contribute to each minute: `created` (at the
/// minute of `created_at`), `completed` and `failed` (a task in that status
/// now, at the minute of `completed_at`), and `wait` and `run` (the same
/// tasks, when they started: how many of their wait and run times fall in
/// each bucket). Buckets are log-spaced, 8 per doubling from 1 ms: bucket 0
/// is below 1 ms, bucket `b` (1 to 256) holds [2^((b-1)/8), 2^(b/8)) ms,
/// and bucket 257 everything from 2^32 ms. `task_stats_buckets` lists the
/// lower bounds; SQLite's triggers look buckets up there, PostgreSQL's use
/// `width_bucket` on the same bounds.
///
/// A change of a task subtracts what its old row contributed and adds what
/// its new row does, so the counters always equal a count of the table.
/// SQLite updates them in the trigger; PostgreSQL's triggers append to
/// `task_stats_deltas`, which readers add in and the service folds every
/// second, as with `task_count_deltas`.
///
/// Minutes older than a day and an hour are pruned by the service; the
/// migration fills the counters from the tasks of those minutes.
#[derive(DeriveMigrationName)]
pub struct Migration;

const BUCKETS_PER_DOUBLING: i32 = 8;
const DOUBLINGS: i32 = 32;
/// Minutes filled at migration: the same as the service keeps.
const KEEP_MINUTES: i64 = 1500;

/// The lower bounds of buckets 1 to 257, in milliseconds.
fn bounds() -> Vec<f64> {
    (0..=BUCKETS_PER_DOUBLING * DOUBLINGS)
        .map(|i| 2f64.powf(f64::from(i) / f64::from(BUCKETS_PER_DOUBLING)))
        .collect()
}

const TABLES: &[&str] = &[
    "CREATE TABLE task_stats_minutes (
        metric varchar(9) NOT NULL,
        minute bigint NOT NULL,
        type varchar(64) NOT NULL,
        bucket smallint NOT NULL,
        n bigint NOT NULL,
        PRIMARY KEY (metric, minute, type, bucket)
    )",
    "CREATE TABLE task_stats_buckets (
        lower_ms double precision PRIMARY KEY,
        bucket smallint NOT NULL
    )",
];

fn minute(postgres: bool, column: &str) -> String {
    if postgres {
        format!("floor(extract(epoch FROM {column}) / 60)::bigint")
    } else {
        format!("(CAST(strftime('%s', {column}) AS INTEGER) / 60)")
    }
}

fn bucket(postgres: bool, from: &str, to: &str) -> String {
    if postgres {
        format!("task_stats_bucket(extract(epoch FROM {to} - {from}) * 1000)")
    } else {
        format!(
            "COALESCE((SELECT bucket FROM task_stats_buckets \
             WHERE lower_ms <= (julianday({to}) - julianday({from})) * 86400000.0 \
             ORDER BY lower_ms DESC LIMIT 1), 0)"
        )
    }
}

/// What the rows of `from` (or the row `row`, when `from` is empty)
/// contribute, each counted `sign` times: (metric, minute, type, bucket, n).
pub(crate) fn contributions(postgres: bool, row: &str, from: &str, sign: &str) -> String {
    let c = |column: &str| format!("{row}{column}");
    let finished = format!(
        "{} IN ('completed', 'failed') AND {} IS NOT NULL",
        c("status"),
        c("completed_at")
    );
    let done = minute(postgres, &c("completed_at"));
    let ty = c("type");
    format!(
        "SELECT 'created' AS metric, {created} AS minute, {ty} AS type, 0 AS bucket, {sign} AS n{from} \
         UNION ALL SELECT {status}, {done}, {ty}, 0, {sign}{from} WHERE {finished} \
         UNION ALL SELECT 'wait', {done}, {ty}, {wait}, {sign}{from} WHERE {finished} AND {started} IS NOT NULL \
         UNION ALL SELECT 'run', {done}, {ty}, {run}, {sign}{from} WHERE {finished} AND {started} IS NOT NULL",
        created = minute(postgres, &c("created_at")),
        status = c("status"),
        started = c("started_at"),
        wait = bucket(postgres, &c("created_at"), &c("started_at")),
        run = bucket(postgres, &c("started_at"), &c("completed_at")),
    )
}

/// An update changes the counters only when it moves a task's creation, its
/// type, or a finished task's status or times: claims, heartbeats and
/// requeues fire nothing.
pub(crate) fn update_condition(distinct: &str) -> String {
    let changed = |column: &str| format!("OLD.{column} {distinct} NEW.{column}");
    format!(
        "{} OR {} OR ((OLD.status IN ('completed', 'failed') OR NEW.status IN ('completed', 'failed')) \
         AND ({} OR {} OR {}))",
        changed("created_at"),
        changed("type"),
        changed("status"),
        changed("completed_at"),
        changed("started_at"),
    )
}

pub(crate) const GROUPED: &str = "SELECT metric, minute, type, bucket, sum(n) FROM";
pub(crate) const GROUP_BY: &str = "GROUP BY metric, minute, type, bucket";
const COLUMNS: &str = "task_stats_minutes (metric, minute, type, bucket, n)";

fn postgres_sql() -> Vec<String> {
    let list: Vec<String> = bounds().iter().map(|b| format!("{b:?}")).collect();
    let delta = "INSERT INTO task_stats_deltas (metric, minute, type, bucket, n)";
    vec![
        // No key and no index: rows are only appended, summed and folded.
        "CREATE TABLE task_stats_deltas (
            metric varchar(9) NOT NULL,
            minute bigint NOT NULL,
            type varchar(64) NOT NULL,
            bucket smallint NOT NULL,
            n bigint NOT NULL
        )"
        .into(),
        format!(
            "CREATE FUNCTION task_stats_bucket(ms double precision) RETURNS integer
             LANGUAGE sql IMMUTABLE PARALLEL SAFE
             AS $$ SELECT width_bucket(ms, '{{{}}}'::double precision[]) $$",
            list.join(",")
        ),
        // Per statement: a batched create of 64 tasks appends a row per
        // (minute, type), not 64.
        format!(
            "CREATE FUNCTION task_stats_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 {delta} {GROUPED} ({}) AS c {GROUP_BY};
                 RETURN NULL;
             END $$",
            contributions(true, "r.", " FROM inserted_tasks r", "1")
        ),
        "CREATE TRIGGER task_stats_insert AFTER INSERT ON tasks
         REFERENCING NEW TABLE AS inserted_tasks
         FOR EACH STATEMENT EXECUTE FUNCTION task_stats_inserted()"
            .into(),
        format!(
            "CREATE FUNCTION task_stats_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 {delta} {GROUPED} ({}) AS c {GROUP_BY};
                 RETURN NULL;
             END $$",
            contributions(true, "r.", " FROM deleted_tasks r", "-1")
        ),
        "CREATE TRIGGER task_stats_delete AFTER DELETE ON tasks
         REFERENCING OLD TABLE AS deleted_tasks
         FOR EACH STATEMENT EXECUTE FUNCTION task_stats_deleted()"
            .into(),
        format!(
            "CREATE FUNCTION task_stats_moved() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 {delta} {GROUPED} ({} UNION ALL {}) AS c {GROUP_BY} HAVING sum(n) <> 0;
                 RETURN NULL;
             END $$",
            contributions(true, "OLD.", "", "-1"),
            contributions(true, "NEW.", "", "1"),
        ),
        format!(
            "CREATE TRIGGER task_stats_update AFTER UPDATE ON tasks
             FOR EACH ROW WHEN ({})
             EXECUTE FUNCTION task_stats_moved()",
            update_condition("IS DISTINCT FROM")
        ),
        "CREATE FUNCTION task_stats_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             DELETE FROM task_stats_deltas;
             DELETE FROM task_stats_minutes;
             RETURN NULL;
         END $$"
            .into(),
        "CREATE TRIGGER task_stats_truncate AFTER TRUNCATE ON tasks
         FOR EACH STATEMENT EXECUTE FUNCTION task_stats_truncated()"
            .into(),
    ]
}

fn sqlite_sql() -> Vec<String> {
    let upsert = "ON CONFLICT (metric, minute, type, bucket) DO UPDATE SET n = n + excluded.n";
    vec![
        format!(
            "CREATE TRIGGER task_stats_insert AFTER INSERT ON tasks BEGIN
                 INSERT INTO {COLUMNS} SELECT * FROM ({}) WHERE true {upsert};
             END",
            contributions(false, "NEW.", "", "1")
        ),
        format!(
            "CREATE TRIGGER task_stats_delete AFTER DELETE ON tasks BEGIN
                 INSERT INTO {COLUMNS} SELECT * FROM ({}) WHERE true {upsert};
             END",
            contributions(false, "OLD.", "", "-1")
        ),
        format!(
            "CREATE TRIGGER task_stats_update
             AFTER UPDATE OF created_at, type, status, started_at, completed_at ON tasks
             WHEN {} BEGIN
                 INSERT INTO {COLUMNS} {GROUPED} ({} UNION ALL {}) WHERE true {GROUP_BY}
                 HAVING sum(n) <> 0 {upsert};
             END",
            update_condition("IS NOT"),
            contributions(false, "OLD.", "", "-1"),
            contributions(false, "NEW.", "", "1"),
        ),
    ]
}

/// The tasks already there: what they contribute to the kept minutes. On
/// PostgreSQL the migration's transaction holds the lock its CREATE TRIGGER
/// took, so no write slips in between the triggers and this fill.
fn fill(postgres: bool) -> Vec<String> {
    let now = if postgres {
        "floor(extract(epoch FROM now()) / 60)::bigint"
    } else {
        "(CAST(strftime('%s', 'now') AS INTEGER) / 60)"
    };
    let values: Vec<String> = bounds()
        .iter()
        .enumerate()
        .map(|(i, b)| format!("({b:?}, {})", i + 1))
        .collect();
    vec![
        format!(
            "INSERT INTO task_stats_buckets (lower_ms, bucket) VALUES {}",
            values.join(", ")
        ),
        format!(
            "INSERT INTO {COLUMNS} {GROUPED} ({}) AS c WHERE minute >= {now} - {KEEP_MINUTES} {GROUP_BY}",
            contributions(postgres, "r.", " FROM tasks r", "1")
        ),
    ]
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let postgres = manager.get_database_backend() == DatabaseBackend::Postgres;
        let db = manager.get_connection();
        let mut sql: Vec<String> = TABLES.iter().map(|s| String::from(*s)).collect();
        // SQLite's triggers read the buckets: fill them first.
        let mut fill = fill(postgres);
        sql.push(fill.remove(0));
        sql.extend(if postgres {
            postgres_sql()
        } else {
            sqlite_sql()
        });
        sql.extend(fill);
        for statement in sql {
            db.execute_unprepared(&statement).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let postgres = manager.get_database_backend() == DatabaseBackend::Postgres;
        for trigger in ["insert", "delete", "update", "truncate"] {
            let sql = if postgres {
                format!("DROP TRIGGER IF EXISTS task_stats_{trigger} ON tasks")
            } else {
                format!("DROP TRIGGER IF EXISTS task_stats_{trigger}")
            };
            db.execute_unprepared(&sql).await?;
        }
        if postgres {
            for function in [
                "task_stats_inserted()",
                "task_stats_deleted()",
                "task_stats_moved()",
                "task_stats_truncated()",
                "task_stats_bucket(double precision)",
            ] {
                db.execute_unprepared(&format!("DROP FUNCTION IF EXISTS {function}"))
                    .await?;
            }
        }
        for table in [
            "task_stats_deltas",
            "task_stats_minutes",
            "task_stats_buckets",
        ] {
            db.execute_unprepared(&format!("DROP TABLE IF EXISTS {table}"))
                .await?;
        }
        Ok(())
    }
}
