use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DatabaseBackend};

/// Exact task counts for `taskStats`, kept by triggers so that counting
/// never reads `tasks`: `task_counts` by (user, type, status) for a user's
/// view, `task_type_counts` by (type, status) for a worker's. A trigger runs
/// inside the statement that changes a task, so a count commits (or rolls
/// back) with its change.
///
/// SQLite has one writer at a time, so its triggers update the counters
/// directly. On PostgreSQL many writers run at once, and updating a shared
/// counter row would make them queue on its lock, or deadlock when two
/// multi-row statements (a batched create, a reaper pass) reach the same
/// counters in different orders. Its triggers append to
/// `task_count_deltas` instead, which no writer ever waits on; readers add
/// the deltas to the counters in the same statement, and the service folds
/// the deltas into the counters every second.
///
/// Also indexes `completed_at`, for the throughput and durations of the
/// last minutes: range scans bounded by the window.
#[derive(DeriveMigrationName)]
pub struct Migration;

const COUNTER_TABLES: &[&str] = &[
    "CREATE TABLE task_counts (
        user_id text NOT NULL,
        type varchar(64) NOT NULL,
        status varchar(16) NOT NULL,
        count bigint NOT NULL,
        PRIMARY KEY (user_id, type, status)
    )",
    "CREATE TABLE task_type_counts (
        type varchar(64) NOT NULL,
        status varchar(16) NOT NULL,
        count bigint NOT NULL,
        PRIMARY KEY (type, status)
    )",
];

const POSTGRES: &[&str] = &[
    // No key and no index: rows are only appended, summed and folded.
    "CREATE TABLE task_count_deltas (
        user_id text NOT NULL,
        type varchar(64) NOT NULL,
        status varchar(16) NOT NULL,
        delta bigint NOT NULL
    )",
    // One delta row per (user, type, status) per statement: a batched
    // create of 64 tasks appends one row, not 64.
    "CREATE FUNCTION task_counts_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
     BEGIN
         INSERT INTO task_count_deltas (user_id, type, status, delta)
         SELECT user_id, type, status, count(*) FROM inserted_tasks GROUP BY user_id, type, status;
         RETURN NULL;
     END $$",
    "CREATE TRIGGER task_counts_insert AFTER INSERT ON tasks
     REFERENCING NEW TABLE AS inserted_tasks
     FOR EACH STATEMENT EXECUTE FUNCTION task_counts_inserted()",
    "CREATE FUNCTION task_counts_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
     BEGIN
         INSERT INTO task_count_deltas (user_id, type, status, delta)
         SELECT user_id, type, status, -count(*) FROM deleted_tasks GROUP BY user_id, type, status;
         RETURN NULL;
     END $$",
    "CREATE TRIGGER task_counts_delete AFTER DELETE ON tasks
     REFERENCING OLD TABLE AS deleted_tasks
     FOR EACH STATEMENT EXECUTE FUNCTION task_counts_deleted()",
    // Per row, and only when the status (or owner, or type) changes:
    // heartbeats and progress reports cost nothing.
    "CREATE FUNCTION task_counts_moved() RETURNS trigger LANGUAGE plpgsql AS $$
     BEGIN
         INSERT INTO task_count_deltas (user_id, type, status, delta)
         VALUES (OLD.user_id, OLD.type, OLD.status, -1), (NEW.user_id, NEW.type, NEW.status, 1);
         RETURN NULL;
     END $$",
    "CREATE TRIGGER task_counts_update AFTER UPDATE ON tasks
     FOR EACH ROW
     WHEN (OLD.status IS DISTINCT FROM NEW.status
           OR OLD.user_id IS DISTINCT FROM NEW.user_id
           OR OLD.type IS DISTINCT FROM NEW.type)
     EXECUTE FUNCTION task_counts_moved()",
    "CREATE FUNCTION task_counts_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
     BEGIN
         DELETE FROM task_count_deltas;
         DELETE FROM task_counts;
         DELETE FROM task_type_counts;
         RETURN NULL;
     END $$",
    "CREATE TRIGGER task_counts_truncate AFTER TRUNCATE ON tasks
     FOR EACH STATEMENT EXECUTE FUNCTION task_counts_truncated()",
];

const SQLITE: &[&str] = &[
    "CREATE TRIGGER task_counts_insert AFTER INSERT ON tasks BEGIN
         INSERT INTO task_counts (user_id, type, status, count)
         VALUES (NEW.user_id, NEW.type, NEW.status, 1)
         ON CONFLICT (user_id, type, status) DO UPDATE SET count = count + 1;
         INSERT INTO task_type_counts (type, status, count)
         VALUES (NEW.type, NEW.status, 1)
         ON CONFLICT (type, status) DO UPDATE SET count = count + 1;
     END",
    "CREATE TRIGGER task_counts_delete AFTER DELETE ON tasks BEGIN
         UPDATE task_counts SET count = count - 1
         WHERE user_id = OLD.user_id AND type = OLD.type AND status = OLD.status;
         UPDATE task_type_counts SET count = count - 1
         WHERE type = OLD.type AND status = OLD.status;
     END",
    "CREATE TRIGGER task_counts_update AFTER UPDATE OF user_id, type, status ON tasks
     WHEN OLD.status IS NOT NEW.status OR OLD.user_id IS NOT NEW.user_id OR OLD.type IS NOT NEW.type
     BEGIN
         UPDATE task_counts SET count = count - 1
         WHERE user_id = OLD.user_id AND type = OLD.type AND status = OLD.status;
         UPDATE task_type_counts SET count = count - 1
         WHERE type = OLD.type AND status = OLD.status;
         INSERT INTO task_counts (user_id, type, status, count)
         VALUES (NEW.user_id, NEW.type, NEW.status, 1)
         ON CONFLICT (user_id, type, status) DO UPDATE SET count = count + 1;
         INSERT INTO task_type_counts (type, status, count)
         VALUES (NEW.type, NEW.status, 1)
         ON CONFLICT (type, status) DO UPDATE SET count = count + 1;
     END",
];

/// The tasks already there when the migration runs. On PostgreSQL the
/// migration's transaction holds the lock its CREATE TRIGGER took, so no
/// write slips in between the triggers and these counts.
const FILL: &[&str] = &[
    "INSERT INTO task_counts (user_id, type, status, count)
     SELECT user_id, type, status, count(*) FROM tasks GROUP BY user_id, type, status",
    "INSERT INTO task_type_counts (type, status, count)
     SELECT type, status, count(*) FROM tasks GROUP BY type, status",
    "CREATE INDEX tasks_completed_idx ON tasks (completed_at)",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let triggers = match manager.get_database_backend() {
            DatabaseBackend::Postgres => POSTGRES,
            _ => SQLITE,
        };
        for sql in COUNTER_TABLES.iter().chain(triggers).chain(FILL) {
            db.execute_unprepared(sql).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let postgres = manager.get_database_backend() == DatabaseBackend::Postgres;
        for trigger in [
            "task_counts_insert",
            "task_counts_delete",
            "task_counts_update",
            "task_counts_truncate",
        ] {
            let sql = if postgres {
                format!("DROP TRIGGER IF EXISTS {trigger} ON tasks")
            } else {
                format!("DROP TRIGGER IF EXISTS {trigger}")
            };
            db.execute_unprepared(&sql).await?;
        }
        if postgres {
            for function in [
                "task_counts_inserted",
                "task_counts_deleted",
                "task_counts_moved",
                "task_counts_truncated",
            ] {
                db.execute_unprepared(&format!("DROP FUNCTION IF EXISTS {function}()"))
                    .await?;
            }
        }
        for sql in [
            "DROP INDEX IF EXISTS tasks_completed_idx",
            "DROP TABLE IF EXISTS task_count_deltas",
            "DROP TABLE IF EXISTS task_type_counts",
            "DROP TABLE IF EXISTS task_counts",
        ] {
            db.execute_unprepared(sql).await?;
        }
        Ok(())
    }
}
