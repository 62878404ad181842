use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DatabaseBackend};

/// The change log behind live updates: `task_events` holds every committed
/// change of a task (the row right after it; for a deletion, the row as it
/// was) at an ordered position, `pos`. Subscriptions read it by position, so
/// they can resume after any position still kept.
///
/// Triggers on `tasks` write the log inside the statement that changes a
/// task, so a change and its log entry commit (or roll back) together, and
/// raw SQL is logged too.
///
/// SQLite has one writer at a time, so positions taken at insert are
/// already in commit order, and its triggers write `task_events` directly.
///
/// PostgreSQL commits many writers at once, in any order: a position taken
/// inside a write transaction could become visible after a higher one was
/// read, and a reader would skip it. So its triggers append to
/// `task_changes`, which no writer ever waits on, and
/// `task_events_take_changes()` moves what has committed there into
/// `task_events` with the next positions, one mover at a time (an advisory
/// lock), each commit before the next mover starts: positions become
/// visible in order. The mover NOTIFYs once per move, outside every write
/// transaction, so instances listening wake and read the log.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum TaskEvents {
    Table,
    Pos,
    Kind,
    LoggedAtMs,
    Id,
    UserId,
    Type,
    Status,
    ResultId,
    ErrorMessage,
    Metadata,
    Progress,
    Attempts,
    IdempotencyKey,
    WorkerId,
    LeaseExpiresAt,
    CreatedAt,
    UpdatedAt,
    StartedAt,
    CompletedAt,
    Version,
}

/// The task's columns, in the table's order, as these triggers copy them;
/// a later migration that adds columns replaces the triggers' functions.
pub(crate) const TASK_COLUMNS: &str = "id, user_id, type, status, result_id, error_message, metadata, \
     progress, attempts, idempotency_key, worker_id, lease_expires_at, created_at, updated_at, \
     started_at, completed_at, version";

/// PostgreSQL advisory lock key ("taskql" + 3) held by the instance moving changes into the log.
const MOVE_LOCK: i64 = 0x7461_736b_716c_0003;

/// `task_events` with the columns of `tasks` (the same types, no constraints).
fn log_table(postgres: bool) -> TableCreateStatement {
    let mut pos = ColumnDef::new(TaskEvents::Pos);
    if postgres {
        pos.big_integer().not_null().primary_key();
    } else {
        // AUTOINCREMENT: a position is never reused, even once pruned.
        pos.integer().not_null().primary_key().auto_increment();
    }
    Table::create()
        .table(TaskEvents::Table)
        .col(pos)
        .col(ColumnDef::new(TaskEvents::Kind).string_len(8).not_null())
        .col(
            ColumnDef::new(TaskEvents::LoggedAtMs)
                .big_integer()
                .not_null(),
        )
        .col(ColumnDef::new(TaskEvents::Id).uuid().not_null())
        .col(ColumnDef::new(TaskEvents::UserId).text().not_null())
        .col(ColumnDef::new(TaskEvents::Type).string_len(64).not_null())
        .col(ColumnDef::new(TaskEvents::Status).string_len(16).not_null())
        .col(ColumnDef::new(TaskEvents::ResultId).string_len(255).null())
        .col(ColumnDef::new(TaskEvents::ErrorMessage).text().null())
        .col(
            ColumnDef::new(TaskEvents::Metadata)
                .json_binary()
                .not_null(),
        )
        .col(ColumnDef::new(TaskEvents::Progress).integer().null())
        .col(ColumnDef::new(TaskEvents::Attempts).integer().not_null())
        .col(ColumnDef::new(TaskEvents::IdempotencyKey).text().null())
        .col(ColumnDef::new(TaskEvents::WorkerId).text().null())
        .col(
            ColumnDef::new(TaskEvents::LeaseExpiresAt)
                .timestamp_with_time_zone()
                .null(),
        )
        .col(
            ColumnDef::new(TaskEvents::CreatedAt)
                .timestamp_with_time_zone()
                .not_null(),
        )
        .col(
            ColumnDef::new(TaskEvents::UpdatedAt)
                .timestamp_with_time_zone()
                .not_null(),
        )
        .col(
            ColumnDef::new(TaskEvents::StartedAt)
                .timestamp_with_time_zone()
                .null(),
        )
        .col(
            ColumnDef::new(TaskEvents::CompletedAt)
                .timestamp_with_time_zone()
                .null(),
        )
        .col(ColumnDef::new(TaskEvents::Version).big_integer().not_null())
        .to_owned()
}

/// Both databases: a user's replay reads (user, pos); the horizon row
/// says up to which position the log was pruned, so a cursor older than
/// that is told so instead of silently skipping what was pruned.
const COMMON: &[&str] = &[
    "CREATE INDEX task_events_user_pos_idx ON task_events (user_id, pos)",
    "CREATE TABLE task_event_horizon (
        id integer PRIMARY KEY CHECK (id = 1),
        pruned_through bigint NOT NULL
    )",
    "INSERT INTO task_event_horizon (id, pruned_through) VALUES (1, 0)",
];

/// The change kinds: the statement, and the transition table (PostgreSQL)
/// or row (SQLite) that holds the task as logged.
const KINDS: [(&str, &str, &str, &str); 3] = [
    ("created", "INSERT", "inserted_tasks", "NEW"),
    ("updated", "UPDATE", "updated_tasks", "NEW"),
    ("deleted", "DELETE", "deleted_tasks", "OLD"),
];

/// PostgreSQL's functions that log `columns` (the task's columns, in order).
pub(crate) fn postgres_functions(columns: &str) -> Vec<String> {
    let mut sql: Vec<String> = KINDS
        .iter()
        .map(|(kind, _, rows, _)| {
            format!(
                "CREATE OR REPLACE FUNCTION task_events_{kind}() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                     INSERT INTO task_changes (kind, {columns}) SELECT '{kind}', {columns} FROM {rows};
                     RETURN NULL;
                 END $$"
            )
        })
        .collect();
    // One mover at a time, each statement with a fresh snapshot taken after
    // the lock: it sees what earlier movers committed, and its positions
    // follow theirs. Returns the newest position in the log.
    sql.push(format!(
        "CREATE OR REPLACE FUNCTION task_events_take_changes() RETURNS bigint LANGUAGE plpgsql AS $$
         DECLARE
             head bigint;
             moved bigint;
         BEGIN
             PERFORM pg_advisory_xact_lock({MOVE_LOCK});
             SELECT GREATEST((SELECT max(pos) FROM task_events),
                             (SELECT pruned_through FROM task_event_horizon), 0)
               INTO head;
             WITH taken AS (DELETE FROM task_changes RETURNING *),
             logged AS (
                 INSERT INTO task_events (pos, kind, logged_at_ms, {columns})
                 SELECT head + row_number() OVER (ORDER BY seq), kind,
                        (extract(epoch FROM clock_timestamp()) * 1000)::bigint, {columns}
                 FROM taken
                 RETURNING 1
             )
             SELECT count(*) INTO moved FROM logged;
             IF moved > 0 THEN
                 PERFORM pg_notify('taskql_events', (head + moved)::text);
             END IF;
             RETURN head + moved;
         END $$"
    ));
    sql
}

fn postgres_sql() -> Vec<String> {
    // No index but the key: rows are appended, then moved whole.
    let mut sql =
        vec!["CREATE TABLE task_changes (seq bigserial PRIMARY KEY, LIKE task_events)".into()];
    // `LIKE` copied pos and logged_at_ms, which only the log fills.
    sql.push("ALTER TABLE task_changes DROP COLUMN pos, DROP COLUMN logged_at_ms".into());
    sql.extend(postgres_functions(TASK_COLUMNS));
    // Per statement, from its transition table: a batch of 64 creates runs
    // the function once.
    sql.extend(KINDS.iter().map(|(kind, op, rows, reference)| {
        format!(
            "CREATE TRIGGER task_events_{kind} AFTER {op} ON tasks
             REFERENCING {reference} TABLE AS {rows}
             FOR EACH STATEMENT EXECUTE FUNCTION task_events_{kind}()"
        )
    }));
    sql
}

/// SQLite's triggers that log `columns`, made anew: the old ones dropped,
/// then created (a migration that adds a logged column).
pub(crate) fn sqlite_triggers_replaced(columns: &str) -> Vec<String> {
    let mut sql: Vec<String> = KINDS
        .iter()
        .map(|(kind, ..)| format!("DROP TRIGGER IF EXISTS task_events_{kind}"))
        .collect();
    sql.extend(sqlite_triggers(columns));
    sql
}

/// SQLite's triggers that log `columns` (the task's columns, in order).
pub(crate) fn sqlite_triggers(columns: &str) -> Vec<String> {
    let now_ms = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)";
    let values = |row: &str| {
        columns
            .split(", ")
            .map(|column| format!("{row}.{column}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    KINDS
        .iter()
        .map(|(kind, op, _, row)| {
            format!(
                "CREATE TRIGGER task_events_{kind} AFTER {op} ON tasks BEGIN
                 INSERT INTO task_events (kind, logged_at_ms, {columns})
                 VALUES ('{kind}', {now_ms}, {});
             END",
                values(row)
            )
        })
        .collect()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let postgres = manager.get_database_backend() == DatabaseBackend::Postgres;
        manager.create_table(log_table(postgres)).await?;
        let db = manager.get_connection();
        for sql in COMMON {
            db.execute_unprepared(sql).await?;
        }
        let triggers = if postgres {
            postgres_sql()
        } else {
            sqlite_triggers(TASK_COLUMNS)
        };
        for sql in triggers {
            db.execute_unprepared(&sql).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let postgres = manager.get_database_backend() == DatabaseBackend::Postgres;
        for kind in ["created", "updated", "deleted"] {
            let sql = if postgres {
                format!("DROP TRIGGER IF EXISTS task_events_{kind} ON tasks")
            } else {
                format!("DROP TRIGGER IF EXISTS task_events_{kind}")
            };
            db.execute_unprepared(&sql).await?;
            if postgres {
                db.execute_unprepared(&format!("DROP FUNCTION IF EXISTS task_events_{kind}()"))
                    .await?;
            }
        }
        if postgres {
            db.execute_unprepared("DROP FUNCTION IF EXISTS task_events_take_changes()")
                .await?;
            db.execute_unprepared("DROP TABLE IF EXISTS task_changes")
                .await?;
        }
        for sql in [
            "DROP TABLE IF EXISTS task_event_horizon",
            "DROP TABLE IF EXISTS task_events",
        ] {
            db.execute_unprepared(sql).await?;
        }
        Ok(())
    }
}
