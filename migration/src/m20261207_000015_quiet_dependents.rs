use sea_orm_migration::prelude::*;

use crate::m20261204_000005_queue::run_on;
use crate::m20261206_000012_dependencies::{
    postgres_follow_function, postgres_follow_trigger, postgres_orphaned_function,
};

/// Following dependencies costs only the tasks that have dependents.
///
/// - PostgreSQL: `task_dependents_follow()` ran its `UPDATE` of the
///   dependents for every task that finished, dependents or not, and each
///   such statement inside a row trigger pays the executor's start-up over
///   every index of `tasks` and fires the statement triggers of `tasks`
///   (the change log's, the tallies') even when it changes no row: about
///   120 µs per completed task, more than the completion itself. It now
///   returns at once when no edge names the task (one probe of
///   `task_dependencies_depends_on_idx`), and the trigger no longer fires
///   for a claim (to `processing`) or a requeue, which no branch serves.
///   `task_dependents_orphaned()` (a pending or running task deleted)
///   returns as early.
/// - `tasks_cancelled_by_idx`: a retried task finds the dependents it
///   cancelled (`cancelled_by`) by index instead of reading every task.
///   Only cancelled dependents have the column set, so the index stays
///   small and a create writes nothing to it.
#[derive(DeriveMigrationName)]
pub struct Migration;

/// The changes a branch of `task_dependents_follow()` serves: a finish,
/// and a retry from a final state.
const SERVED: &str = "NEW.status IN ('completed', 'failed', 'cancelled') \
     AND OLD.status IS DISTINCT FROM NEW.status \
     OR NEW.status = 'pending' AND OLD.status IN ('failed', 'cancelled')";

/// A function's first statement: nothing to do for a task (`row`, `NEW`
/// or `OLD`) that no edge names; `answer` is what the function returns.
fn no_dependents(row: &str, answer: &str) -> String {
    format!(
        "IF NOT EXISTS (SELECT 1 FROM task_dependencies WHERE depends_on = {row}.id) \
         THEN RETURN {answer}; END IF;"
    )
}

const INDEX: &str = "CREATE INDEX tasks_cancelled_by_idx ON tasks (cancelled_by) \
     WHERE cancelled_by IS NOT NULL";

fn postgres_up() -> Vec<String> {
    vec![
        postgres_follow_function("CREATE OR REPLACE", &no_dependents("NEW", "NULL")),
        postgres_orphaned_function("CREATE OR REPLACE", &no_dependents("OLD", "OLD")),
        "DROP TRIGGER task_dependents_follow ON tasks".into(),
        postgres_follow_trigger(SERVED),
        INDEX.into(),
    ]
}

fn postgres_down() -> Vec<String> {
    vec![
        "DROP INDEX IF EXISTS tasks_cancelled_by_idx".into(),
        "DROP TRIGGER task_dependents_follow ON tasks".into(),
        postgres_follow_trigger("OLD.status IS DISTINCT FROM NEW.status"),
        postgres_follow_function("CREATE OR REPLACE", ""),
        postgres_orphaned_function("CREATE OR REPLACE", ""),
    ]
}

fn sqlite_up() -> Vec<String> {
    vec![INDEX.into()]
}

fn sqlite_down() -> Vec<String> {
    vec!["DROP INDEX IF EXISTS tasks_cancelled_by_idx".into()]
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
