use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DatabaseBackend};

use crate::m20261204_000007_stats_minutes::{GROUP_BY, GROUPED, contributions, update_condition};

/// Less written per change of a task.
///
/// - Five indexes hold only the rows they serve: a column that is null
///   until a task is claimed or finished (`started_at`, `lease_expires_at`,
///   `completed_at`, `result_id`) is indexed only where it is set, so a
///   create writes 9 index entries instead of 14. Every query that uses
///   them compares the column (`=`, `<`, `>`), which implies `IS NOT
///   NULL`, so both databases still choose them.
/// - PostgreSQL: the count and per-minute triggers on UPDATE become one
///   trigger that runs once per statement over its transition tables
///   instead of twice per row, so a statement that changes 50 tasks
///   (`claimTasks`, `completeTasks`, the reaper) appends its deltas with
///   two inserts, not 100.
#[derive(DeriveMigrationName)]
pub struct Migration;

/// (index, columns, the column that is null until it applies)
const PARTIAL: &[(&str, &str, &str)] = &[
    ("tasks_completed_idx", "completed_at", "completed_at"),
    ("tasks_result_idx", "result_id", "result_id"),
    ("tasks_user_result_idx", "user_id, result_id", "result_id"),
    ("tasks_type_started_idx", "type, started_at", "started_at"),
    (
        "tasks_status_lease_idx",
        "status, lease_expires_at",
        "lease_expires_at",
    ),
];

/// The rows an UPDATE changed in a way `condition` (over `OLD.` and `NEW.`)
/// cares about, as they were (`o`) and are (`n`).
fn changed(condition: &str) -> String {
    let on = condition.replace("OLD.", "o.").replace("NEW.", "n.");
    format!("old_tasks o JOIN new_tasks n ON n.id = o.id WHERE {on}")
}

const COUNTS_CHANGED: &str = "OLD.status IS DISTINCT FROM NEW.status \
     OR OLD.user_id IS DISTINCT FROM NEW.user_id OR OLD.type IS DISTINCT FROM NEW.type";

fn postgres_up() -> Vec<String> {
    let stats = changed(&update_condition("IS DISTINCT FROM"));
    let counts = changed(COUNTS_CHANGED);
    vec![
        "DROP TRIGGER IF EXISTS task_counts_update ON tasks".into(),
        "DROP TRIGGER IF EXISTS task_stats_update ON tasks".into(),
        // One trigger for both, so that an update that changes neither (a
        // heartbeat) pays for one call, not two.
        format!(
            "CREATE FUNCTION task_tallies_updated() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO task_count_deltas (user_id, type, status, delta)
                 SELECT user_id, type, status, sum(delta) FROM (
                     SELECT o.user_id, o.type, o.status, -1 AS delta FROM {counts}
                     UNION ALL
                     SELECT n.user_id, n.type, n.status, 1 FROM {counts}
                 ) AS d GROUP BY user_id, type, status HAVING sum(delta) <> 0;
                 INSERT INTO task_stats_deltas (metric, minute, type, bucket, n)
                 WITH was AS (SELECT o.* FROM {stats}), became AS (SELECT n.* FROM {stats})
                 {GROUPED} ({} UNION ALL {}) AS c {GROUP_BY} HAVING sum(n) <> 0;
                 RETURN NULL;
             END $$",
            contributions(true, "r.", " FROM was r", "-1"),
            contributions(true, "r.", " FROM became r", "1"),
        ),
        "CREATE TRIGGER task_tallies_update AFTER UPDATE ON tasks
         REFERENCING OLD TABLE AS old_tasks NEW TABLE AS new_tasks
         FOR EACH STATEMENT EXECUTE FUNCTION task_tallies_updated()"
            .into(),
    ]
}

/// The row triggers this migration replaces (their functions stay, from
/// the migrations that made them).
fn postgres_down() -> Vec<String> {
    vec![
        "DROP TRIGGER IF EXISTS task_tallies_update ON tasks".into(),
        "DROP FUNCTION IF EXISTS task_tallies_updated()".into(),
        format!(
            "CREATE TRIGGER task_counts_update AFTER UPDATE ON tasks
             FOR EACH ROW WHEN ({COUNTS_CHANGED})
             EXECUTE FUNCTION task_counts_moved()"
        ),
        format!(
            "CREATE TRIGGER task_stats_update AFTER UPDATE ON tasks
             FOR EACH ROW WHEN ({})
             EXECUTE FUNCTION task_stats_moved()",
            update_condition("IS DISTINCT FROM")
        ),
    ]
}

/// Each index dropped and made again, in one call: on SQLite another
/// pooled connection would still see the index it dropped.
fn indexes(partial: bool) -> Vec<String> {
    PARTIAL
        .iter()
        .map(|(name, columns, set)| {
            let only = if partial {
                format!(" WHERE {set} IS NOT NULL")
            } else {
                String::new()
            };
            format!("DROP INDEX IF EXISTS {name}; CREATE INDEX {name} ON tasks ({columns}){only}")
        })
        .collect()
}

async fn run(manager: &SchemaManager<'_>, statements: Vec<String>) -> Result<(), DbErr> {
    let db = manager.get_connection();
    for statement in statements {
        db.execute_unprepared(&statement).await?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let mut statements = indexes(true);
        if manager.get_database_backend() == DatabaseBackend::Postgres {
            statements.extend(postgres_up());
        }
        run(manager, statements).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let mut statements = indexes(false);
        if manager.get_database_backend() == DatabaseBackend::Postgres {
            statements.extend(postgres_down());
        }
        run(manager, statements).await
    }
}
