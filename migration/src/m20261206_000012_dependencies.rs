use sea_orm_migration::prelude::*;

use crate::m20261204_000004_task_events::{postgres_functions, sqlite_triggers_replaced};
use crate::m20261204_000005_queue::run_on;

/// Dependencies between tasks: `task_dependencies` holds one row per edge
/// (a task, and a task it waits for), and two columns of `tasks` say where
/// a task stands with its dependencies:
///
/// - `waiting_on`: how many of its dependencies have not completed; a claim
///   takes only tasks at 0. Set by the create (in the transaction that
///   inserts the edges, with the dependencies' rows locked `FOR SHARE` on
///   PostgreSQL), then moved only by the triggers below.
/// - `cancelled_by`: the dependency whose failure or cancel cancelled it,
///   so that a retry of that dependency brings it back.
///
/// Triggers on `tasks` follow each dependency's status, in the statement
/// that changes it, so a dependent becomes runnable in the very transaction
/// that completes its last dependency, whatever made the change (a worker,
/// a batch, the reaper, raw SQL):
///
/// - completed: each pending dependent waits on one fewer;
/// - failed (for good) or cancelled: each pending dependent is cancelled,
///   naming it; a cancelled dependent cancels its own dependents in turn;
/// - back to pending from failed or cancelled (`retryTask`): the dependents
///   it cancelled wait again, unless another of their dependencies failed or
///   was cancelled too (they then name that one);
/// - deleted while pending or processing: each pending dependent is
///   cancelled, naming it.
///
/// Each change bumps the dependent's version, so it is logged and
/// subscribers see it. The change log keeps both columns.
#[derive(DeriveMigrationName)]
pub struct Migration;

/// The columns the change log copies once this migration ran.
pub(crate) fn logged() -> String {
    format!("{}, waiting_on, cancelled_by", logged_before())
}

/// The columns it copied before: the results migration's.
fn logged_before() -> String {
    crate::m20261206_000011_results::logged()
}

/// Dependents of the task `row` (`NEW` or `OLD`) still waiting.
fn pending_dependents(row: &str) -> String {
    format!(
        "id IN (SELECT task_id FROM task_dependencies WHERE depends_on = {row}.id) \
         AND status = 'pending'"
    )
}

/// A dependency of the task being updated (`tasks`) that failed or was cancelled.
const FAILED_DEPENDENCY: &str = "SELECT p.id FROM task_dependencies d JOIN tasks p ON p.id = d.depends_on \
     WHERE d.task_id = tasks.id AND p.status IN ('failed', 'cancelled')";

/// The statements each change runs, over `NEW` (or `OLD`), in both dialects.
struct Follow {
    completed: String,
    cancelled: String,
    restored: [String; 2],
    orphaned: String,
}

/// A task id as text, in a message: PostgreSQL's uuid prints as such.
fn postgres_id_text(id: &str) -> String {
    id.to_owned()
}

/// SQLite keeps a task id as its 16 bytes: spelled out as a uuid.
fn sqlite_id_text(id: &str) -> String {
    let hex = format!("lower(hex({id}))");
    [(1, 8), (9, 4), (13, 4), (17, 4), (21, 12)]
        .iter()
        .map(|(from, len)| format!("substr({hex}, {from}, {len})"))
        .collect::<Vec<_>>()
        .join(" || '-' || ")
}

/// The statements, where `now` is the time now as the dialect stores it
/// and `id_text` spells a task id in a message.
fn follow(now: &str, id_text: fn(&str) -> String) -> Follow {
    let stamp = "version = version + 1, updated_at = NEW.updated_at";
    Follow {
        completed: format!(
            "UPDATE tasks SET waiting_on = waiting_on - 1, {stamp} \
             WHERE {} AND waiting_on > 0",
            pending_dependents("NEW")
        ),
        cancelled: format!(
            "UPDATE tasks SET status = 'cancelled', cancelled_by = NEW.id, \
             error_message = 'dependency ' || {} || \
                 CASE WHEN NEW.status = 'failed' THEN ' failed' ELSE ' was cancelled' END, \
             completed_at = NEW.updated_at, {stamp} \
             WHERE {}",
            id_text("NEW.id"),
            pending_dependents("NEW")
        ),
        restored: [
            format!(
                "UPDATE tasks SET status = 'pending', cancelled_by = NULL, error_message = NULL, \
                 completed_at = NULL, waiting_on = (SELECT COUNT(*) FROM task_dependencies d \
                     JOIN tasks p ON p.id = d.depends_on \
                     WHERE d.task_id = tasks.id AND p.status <> 'completed'), {stamp} \
                 WHERE cancelled_by = NEW.id AND status = 'cancelled' \
                 AND NOT EXISTS ({FAILED_DEPENDENCY})"
            ),
            format!(
                "UPDATE tasks SET cancelled_by = ({FAILED_DEPENDENCY} ORDER BY p.id LIMIT 1), \
                 error_message = 'dependency ' || {} || ' failed or was cancelled', {stamp} \
                 WHERE cancelled_by = NEW.id AND status = 'cancelled'",
                id_text(&format!("({FAILED_DEPENDENCY} ORDER BY p.id LIMIT 1)"))
            ),
        ],
        orphaned: format!(
            "UPDATE tasks SET status = 'cancelled', \
             error_message = 'dependency ' || {} || ' was deleted', \
             completed_at = {now}, version = version + 1, updated_at = {now} \
             WHERE {}",
            id_text("OLD.id"),
            pending_dependents("OLD")
        ),
    }
}

const COMPLETED: &str = "NEW.status = 'completed'";
const CANCELLED: &str = "NEW.status IN ('failed', 'cancelled')";
const RESTORED: &str = "NEW.status = 'pending' AND OLD.status IN ('failed', 'cancelled')";
const UNFINISHED: &str = "OLD.status IN ('pending', 'processing')";

/// PostgreSQL's `task_dependents_follow()`, made with `verb` (`CREATE`,
/// `CREATE OR REPLACE`), whose body starts with `first`.
pub(crate) fn postgres_follow_function(verb: &str, first: &str) -> String {
    let f = follow("clock_timestamp()", postgres_id_text);
    format!(
        "{verb} FUNCTION task_dependents_follow() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             {first}
             IF {COMPLETED} THEN
                 {};
             ELSIF {CANCELLED} THEN
                 {};
             ELSIF {RESTORED} THEN
                 {};
                 {};
             END IF;
             RETURN NULL;
         END $$",
        f.completed, f.cancelled, f.restored[0], f.restored[1]
    )
}

/// PostgreSQL's `task_dependents_orphaned()`, made with `verb`, whose body
/// starts with `first`.
pub(crate) fn postgres_orphaned_function(verb: &str, first: &str) -> String {
    let f = follow("clock_timestamp()", postgres_id_text);
    format!(
        "{verb} FUNCTION task_dependents_orphaned() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             {first}
             {};
             RETURN OLD;
         END $$",
        f.orphaned
    )
}

/// PostgreSQL's row trigger that calls `task_dependents_follow()`, for the
/// rows `when` holds.
pub(crate) fn postgres_follow_trigger(when: &str) -> String {
    format!(
        "CREATE TRIGGER task_dependents_follow AFTER UPDATE OF status ON tasks FOR EACH ROW
         WHEN ({when})
         EXECUTE FUNCTION task_dependents_follow()"
    )
}

fn postgres_up() -> Vec<String> {
    let mut sql: Vec<String> = vec![
        "ALTER TABLE tasks ADD COLUMN waiting_on integer NOT NULL DEFAULT 0, \
         ADD COLUMN cancelled_by uuid"
            .into(),
    ];
    for table in ["task_events", "task_changes"] {
        sql.push(format!(
            "ALTER TABLE {table} ADD COLUMN waiting_on integer, ADD COLUMN cancelled_by uuid"
        ));
    }
    sql.extend(postgres_functions(&logged()));
    sql.push(
        "CREATE TABLE task_dependencies (
             task_id uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
             depends_on uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
             PRIMARY KEY (task_id, depends_on)
         )"
        .into(),
    );
    sql.push(
        "CREATE INDEX task_dependencies_depends_on_idx ON task_dependencies (depends_on)".into(),
    );
    sql.push(postgres_follow_function("CREATE", ""));
    sql.push(postgres_follow_trigger(
        "OLD.status IS DISTINCT FROM NEW.status",
    ));
    sql.push(postgres_orphaned_function("CREATE", ""));
    sql.push(format!(
        "CREATE TRIGGER task_dependents_orphaned BEFORE DELETE ON tasks FOR EACH ROW
         WHEN ({UNFINISHED})
         EXECUTE FUNCTION task_dependents_orphaned()"
    ));
    sql
}

fn sqlite_up() -> Vec<String> {
    // A timestamp as sqlx writes a `DateTime<Utc>`, to the millisecond.
    let f = follow(
        "strftime('%Y-%m-%dT%H:%M:%f000+00:00', 'now')",
        sqlite_id_text,
    );
    let mut sql: Vec<String> = vec![
        "ALTER TABLE tasks ADD COLUMN waiting_on integer NOT NULL DEFAULT 0".to_owned(),
        "ALTER TABLE tasks ADD COLUMN cancelled_by uuid_text".into(),
        "ALTER TABLE task_events ADD COLUMN waiting_on integer".into(),
        "ALTER TABLE task_events ADD COLUMN cancelled_by uuid_text".into(),
    ];
    sql.extend(sqlite_triggers_replaced(&logged()));
    sql.push(
        "CREATE TABLE task_dependencies (
             task_id uuid_text NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
             depends_on uuid_text NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
             PRIMARY KEY (task_id, depends_on)
         )"
        .into(),
    );
    sql.push(
        "CREATE INDEX task_dependencies_depends_on_idx ON task_dependencies (depends_on)".into(),
    );
    // Cancels and restores run through dependents of dependents: SQLite
    // fires a trigger from its own statements only with recursive triggers
    // on, which every connection of the service turns on.
    let when_changed = "OLD.status IS NOT NEW.status";
    sql.push(format!(
        "CREATE TRIGGER task_dependents_completed AFTER UPDATE OF status ON tasks
         WHEN {when_changed} AND {COMPLETED} BEGIN {}; END",
        f.completed
    ));
    sql.push(format!(
        "CREATE TRIGGER task_dependents_cancelled AFTER UPDATE OF status ON tasks
         WHEN {when_changed} AND {CANCELLED} BEGIN {}; END",
        f.cancelled
    ));
    sql.push(format!(
        "CREATE TRIGGER task_dependents_restored AFTER UPDATE OF status ON tasks
         WHEN {RESTORED} BEGIN {}; {}; END",
        f.restored[0], f.restored[1]
    ));
    sql.push(format!(
        "CREATE TRIGGER task_dependents_orphaned BEFORE DELETE ON tasks
         WHEN {UNFINISHED} BEGIN {}; END",
        f.orphaned
    ));
    sql
}

fn postgres_down() -> Vec<String> {
    let mut sql = vec![
        "DROP TRIGGER IF EXISTS task_dependents_follow ON tasks".to_owned(),
        "DROP TRIGGER IF EXISTS task_dependents_orphaned ON tasks".into(),
        "DROP FUNCTION IF EXISTS task_dependents_follow()".into(),
        "DROP FUNCTION IF EXISTS task_dependents_orphaned()".into(),
        "DROP TABLE IF EXISTS task_dependencies".into(),
    ];
    sql.extend(postgres_functions(&logged_before()));
    for table in ["tasks", "task_events", "task_changes"] {
        sql.push(format!(
            "ALTER TABLE {table} DROP COLUMN waiting_on, DROP COLUMN cancelled_by"
        ));
    }
    sql
}

fn sqlite_down() -> Vec<String> {
    let mut sql: Vec<String> = [
        "task_dependents_completed",
        "task_dependents_cancelled",
        "task_dependents_restored",
        "task_dependents_orphaned",
    ]
    .iter()
    .map(|trigger| format!("DROP TRIGGER IF EXISTS {trigger}"))
    .collect();
    sql.push("DROP TABLE IF EXISTS task_dependencies".into());
    sql.extend(sqlite_triggers_replaced(&logged_before()));
    for table in ["tasks", "task_events"] {
        for column in ["waiting_on", "cancelled_by"] {
            sql.push(format!("ALTER TABLE {table} DROP COLUMN {column}"));
        }
    }
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
