use sea_orm_migration::prelude::*;

use crate::m20261204_000004_task_events::{
    TASK_COLUMNS, postgres_functions, sqlite_triggers_replaced,
};
use crate::m20261204_000005_queue::{NEW_COLUMNS, run_on};

/// `result`: the JSON a worker's completion leaves on its task, for the
/// task's owner and for the tasks that depend on it. Appended last, after
/// `traceparent`, where `Task::COLUMNS` expects it; the change log keeps it
/// too, so an event carries a task's result like every other field.
#[derive(DeriveMigrationName)]
pub struct Migration;

/// The columns the change log copies once this migration ran.
pub(crate) fn logged() -> String {
    format!("{TASK_COLUMNS}, {NEW_COLUMNS}, result")
}

/// The columns it copied before.
fn logged_before() -> String {
    format!("{TASK_COLUMNS}, {NEW_COLUMNS}")
}

fn postgres_up() -> Vec<String> {
    let mut sql: Vec<String> = ["tasks", "task_events", "task_changes"]
        .iter()
        .map(|table| format!("ALTER TABLE {table} ADD COLUMN result jsonb"))
        .collect();
    sql.extend(postgres_functions(&logged()));
    sql
}

fn sqlite_up() -> Vec<String> {
    let mut sql: Vec<String> = ["tasks", "task_events"]
        .iter()
        .map(|table| format!("ALTER TABLE {table} ADD COLUMN result jsonb_text"))
        .collect();
    sql.extend(sqlite_triggers_replaced(&logged()));
    sql
}

fn postgres_down() -> Vec<String> {
    let mut sql = postgres_functions(&logged_before());
    sql.extend(
        ["tasks", "task_events", "task_changes"]
            .iter()
            .map(|table| format!("ALTER TABLE {table} DROP COLUMN result")),
    );
    sql
}

fn sqlite_down() -> Vec<String> {
    let mut sql = sqlite_triggers_replaced(&logged_before());
    sql.extend(
        ["tasks", "task_events"]
            .iter()
            .map(|table| format!("ALTER TABLE {table} DROP COLUMN result")),
    );
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
