use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DatabaseBackend};

use crate::m20261204_000004_task_events::{TASK_COLUMNS, postgres_functions, sqlite_triggers};

/// What a queue needs beyond first come, first served:
///
/// - `run_at`: not claimable before then (a create's `runAt`, or a retry's
///   backoff); a task created without one has its `created_at`.
/// - `priority`: higher is claimed first.
/// - `max_attempts`: the task's budget of attempts, fixed at its create
///   from its own `maxAttempts`, its type's policy or the default.
/// - `retry_base`: the attempts made before the last `retryTask`; the
///   budget counts from there, so `attempts` (the fencing number) never
///   goes down.
/// - `fair_rank`: the task's turn among its owner's pending tasks, so that
///   owners take turns (see the service's claim).
/// - `task_types`: a policy per task type (retries, backoff, a cap on how
///   many run at once, pause).
///
/// The change log keeps whole rows, so `task_events` (and PostgreSQL's
/// `task_changes`) get the same columns and the triggers copy them too.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum TaskTypes {
    Table,
    TaskType,
    MaxAttempts,
    BackoffInitialSeconds,
    BackoffFactor,
    BackoffMaxSeconds,
    BackoffJitter,
    Concurrency,
    Paused,
    UpdatedAt,
}

/// Appended to `tasks` in this order, after its first columns.
pub(crate) const NEW_COLUMNS: &str = "run_at, priority, max_attempts, retry_base, fair_rank";

/// The budget of the tasks that exist before this migration: the default
/// that `TASKQL_MAX_ATTEMPTS` has when unset.
const EXISTING_MAX_ATTEMPTS: i32 = 3;

fn task_types() -> TableCreateStatement {
    Table::create()
        .table(TaskTypes::Table)
        .if_not_exists()
        .col(
            ColumnDef::new(TaskTypes::TaskType)
                .string_len(64)
                .not_null()
                .primary_key(),
        )
        .col(ColumnDef::new(TaskTypes::MaxAttempts).integer().null())
        .col(
            ColumnDef::new(TaskTypes::BackoffInitialSeconds)
                .double()
                .not_null()
                .default(1.0),
        )
        .col(
            ColumnDef::new(TaskTypes::BackoffFactor)
                .double()
                .not_null()
                .default(2.0),
        )
        .col(
            ColumnDef::new(TaskTypes::BackoffMaxSeconds)
                .double()
                .not_null()
                .default(3600.0),
        )
        .col(
            ColumnDef::new(TaskTypes::BackoffJitter)
                .boolean()
                .not_null()
                .default(true),
        )
        .col(ColumnDef::new(TaskTypes::Concurrency).integer().null())
        .col(
            ColumnDef::new(TaskTypes::Paused)
                .boolean()
                .not_null()
                .default(false),
        )
        .col(
            ColumnDef::new(TaskTypes::UpdatedAt)
                .timestamp_with_time_zone()
                .not_null(),
        )
        .to_owned()
}

/// Claims read (status, priority, fair_rank, run_at) in claim order; a
/// create finds its owner's last turn by (user_id, status, fair_rank).
const INDEXES: &[&str] = &[
    "CREATE INDEX tasks_claim_idx ON tasks (status, priority DESC, fair_rank, run_at, id)",
    "CREATE INDEX tasks_owner_rank_idx ON tasks (user_id, status, fair_rank)",
];

fn postgres_sql() -> Vec<String> {
    let max = EXISTING_MAX_ATTEMPTS;
    let mut sql = vec![
        format!(
            "ALTER TABLE tasks ADD COLUMN run_at timestamptz,
             ADD COLUMN priority integer NOT NULL DEFAULT 0
                 CONSTRAINT tasks_priority_check CHECK (priority BETWEEN -100 AND 100),
             ADD COLUMN max_attempts integer NOT NULL DEFAULT {max}
                 CONSTRAINT tasks_max_attempts_check CHECK (max_attempts BETWEEN 1 AND 1000),
             ADD COLUMN retry_base integer NOT NULL DEFAULT 0,
             ADD COLUMN fair_rank bigint NOT NULL DEFAULT 0"
        ),
        // Filling run_at is not a change of the tasks: nothing is logged.
        "ALTER TABLE tasks DISABLE TRIGGER task_events_updated".into(),
        "UPDATE tasks SET run_at = created_at".into(),
        "ALTER TABLE tasks ENABLE TRIGGER task_events_updated".into(),
        "ALTER TABLE tasks ALTER COLUMN run_at SET NOT NULL".into(),
    ];
    for table in ["task_events", "task_changes"] {
        sql.push(format!(
            "ALTER TABLE {table} ADD COLUMN run_at timestamptz,
             ADD COLUMN priority integer, ADD COLUMN max_attempts integer,
             ADD COLUMN retry_base integer, ADD COLUMN fair_rank bigint"
        ));
    }
    sql.extend(postgres_functions(&format!(
        "{TASK_COLUMNS}, {NEW_COLUMNS}"
    )));
    sql
}

fn sqlite_sql() -> Vec<String> {
    let max = EXISTING_MAX_ATTEMPTS;
    // SQLite adds one column per statement, and a NOT NULL one only with a
    // constant default: run_at gets one, then every row its created_at.
    let mut sql: Vec<String> = ["created", "updated", "deleted"]
        .iter()
        .map(|kind| format!("DROP TRIGGER task_events_{kind}"))
        .collect();
    sql.extend(
        [
            "run_at TEXT NOT NULL DEFAULT ''".to_string(),
            "priority integer NOT NULL DEFAULT 0 CHECK (priority BETWEEN -100 AND 100)".into(),
            format!(
                "max_attempts integer NOT NULL DEFAULT {max} CHECK (max_attempts BETWEEN 1 AND 1000)"
            ),
            "retry_base integer NOT NULL DEFAULT 0".into(),
            "fair_rank integer NOT NULL DEFAULT 0".into(),
        ]
        .iter()
        .map(|column| format!("ALTER TABLE tasks ADD COLUMN {column}")),
    );
    sql.push("UPDATE tasks SET run_at = created_at".into());
    sql.extend(
        [
            "run_at TEXT",
            "priority integer",
            "max_attempts integer",
            "retry_base integer",
            "fair_rank integer",
        ]
        .iter()
        .map(|column| format!("ALTER TABLE task_events ADD COLUMN {column}")),
    );
    sql.extend(sqlite_triggers(&format!("{TASK_COLUMNS}, {NEW_COLUMNS}")));
    sql
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let postgres = manager.get_database_backend() == DatabaseBackend::Postgres;
        let db = manager.get_connection();
        let columns = if postgres {
            postgres_sql()
        } else {
            sqlite_sql()
        };
        for sql in columns
            .iter()
            .map(String::as_str)
            .chain(INDEXES.iter().copied())
        {
            db.execute_unprepared(sql).await?;
        }
        manager.create_table(task_types()).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let postgres = manager.get_database_backend() == DatabaseBackend::Postgres;
        let db = manager.get_connection();
        manager
            .drop_table(Table::drop().table(TaskTypes::Table).if_exists().to_owned())
            .await?;
        for index in ["tasks_claim_idx", "tasks_owner_rank_idx"] {
            db.execute_unprepared(&format!("DROP INDEX IF EXISTS {index}"))
                .await?;
        }
        let mut sql = Vec::new();
        if postgres {
            sql.extend(postgres_functions(TASK_COLUMNS));
        } else {
            sql.extend(
                ["created", "updated", "deleted"]
                    .iter()
                    .map(|kind| format!("DROP TRIGGER task_events_{kind}")),
            );
            sql.extend(sqlite_triggers(TASK_COLUMNS));
        }
        let tables: &[&str] = if postgres {
            &["tasks", "task_events", "task_changes"]
        } else {
            &["tasks", "task_events"]
        };
        for table in tables {
            for column in NEW_COLUMNS.split(", ") {
                sql.push(format!("ALTER TABLE {table} DROP COLUMN {column}"));
            }
        }
        run(manager, sql).await
    }
}

/// Runs the statements `postgres` or `sqlite` makes, as the database is.
pub(crate) async fn run_on(
    manager: &SchemaManager<'_>,
    postgres: impl FnOnce() -> Vec<String>,
    sqlite: impl FnOnce() -> Vec<String>,
) -> Result<(), DbErr> {
    let sql = match manager.get_database_backend() {
        DatabaseBackend::Postgres => postgres(),
        _ => sqlite(),
    };
    run(manager, sql).await
}

/// Runs `sql` in order. On SQLite as one batch, so on one connection: a
/// trigger dropped on one pooled connection can still be in the schema
/// another connection has cached when it creates the trigger again.
pub(crate) async fn run(manager: &SchemaManager<'_>, sql: Vec<String>) -> Result<(), DbErr> {
    let db = manager.get_connection();
    if manager.get_database_backend() == DatabaseBackend::Sqlite {
        db.execute_unprepared(&sql.join(";\n")).await?;
    } else {
        for statement in sql {
            db.execute_unprepared(&statement).await?;
        }
    }
    Ok(())
}
