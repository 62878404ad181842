use sea_orm_migration::prelude::*;

use crate::m20261204_000004_task_events::{postgres_functions, sqlite_triggers_replaced};
use crate::m20261204_000005_queue::run_on;

/// Concurrency keys: `tasks.concurrency_key` (a customer, an account, any
/// name the creator chooses) and `task_types.concurrency_per_key`, the most
/// tasks of the type PROCESSING at once with one key. A partial index holds
/// exactly the running tasks that have a key, which is what a claim counts.
/// The change log keeps the key like every other column.
#[derive(DeriveMigrationName)]
pub struct Migration;

/// The columns the change log copies once this migration ran.
fn logged() -> String {
    format!("{}, concurrency_key", logged_before())
}

/// The columns it copied before: the dependencies migration's.
fn logged_before() -> String {
    crate::m20261206_000012_dependencies::logged()
}

const RUNNING_BY_KEY: &str = "CREATE INDEX tasks_key_running_idx ON tasks (type, concurrency_key) \
     WHERE status = 'processing' AND concurrency_key IS NOT NULL";

fn postgres_up() -> Vec<String> {
    let mut sql: Vec<String> = ["tasks", "task_events", "task_changes"]
        .iter()
        .map(|table| format!("ALTER TABLE {table} ADD COLUMN concurrency_key text"))
        .collect();
    sql.push("ALTER TABLE task_types ADD COLUMN concurrency_per_key integer".into());
    sql.extend(postgres_functions(&logged()));
    sql.push(RUNNING_BY_KEY.into());
    sql
}

fn sqlite_up() -> Vec<String> {
    let mut sql: Vec<String> = ["tasks", "task_events"]
        .iter()
        .map(|table| format!("ALTER TABLE {table} ADD COLUMN concurrency_key text"))
        .collect();
    sql.push("ALTER TABLE task_types ADD COLUMN concurrency_per_key integer".into());
    sql.extend(sqlite_triggers_replaced(&logged()));
    sql.push(RUNNING_BY_KEY.into());
    sql
}

fn postgres_down() -> Vec<String> {
    let mut sql = vec!["DROP INDEX IF EXISTS tasks_key_running_idx".to_owned()];
    sql.extend(postgres_functions(&logged_before()));
    sql.extend(
        ["tasks", "task_events", "task_changes"]
            .iter()
            .map(|table| format!("ALTER TABLE {table} DROP COLUMN concurrency_key")),
    );
    sql.push("ALTER TABLE task_types DROP COLUMN concurrency_per_key".into());
    sql
}

fn sqlite_down() -> Vec<String> {
    let mut sql = vec!["DROP INDEX IF EXISTS tasks_key_running_idx".to_owned()];
    sql.extend(sqlite_triggers_replaced(&logged_before()));
    sql.extend(
        ["tasks", "task_events"]
            .iter()
            .map(|table| format!("ALTER TABLE {table} DROP COLUMN concurrency_key")),
    );
    sql.push("ALTER TABLE task_types DROP COLUMN concurrency_per_key".into());
    sql
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run_on(manager, postgres_up, sqlite_up).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run_on(manager, postgres_down, sqlite_down).await
    }
}
