//! A task row as the service reads and inserts it: the tasks a statement
//! returns, the ids an insert wrote, and the PENDING row a create makes.
use std::collections::HashSet;

use entity::tasks::{ActiveModel, Column};
use entity::{Task, Tasks};
use sea_orm::sea_query::OnConflict;
use sea_orm::{ConnectionTrait, EntityTrait, QueryTrait, Statement};
use uuid::Uuid;

use super::clock::in_micros;
use crate::error::{TaskError, TaskResult};

/// The tasks a statement returns (`RETURNING *`, or a select of the entity).
pub(super) async fn rows_of<C: ConnectionTrait>(
    conn: &C,
    statement: Statement,
) -> TaskResult<Vec<Task>> {
    conn.query_all_raw(statement)
        .await?
        .iter()
        .map(|row| Task::from_row(row).map_err(TaskError::from))
        .collect()
}

/// The ids an insert `RETURNING id` wrote.
pub(super) fn ids_of(rows: Vec<sea_orm::QueryResult>) -> TaskResult<HashSet<Uuid>> {
    Ok(rows
        .iter()
        .map(|row| row.try_get_by_index::<Uuid>(0))
        .collect::<Result<_, _>>()?)
}

/// The insert of `rows`; with `keyed` (some row has an idempotency key),
/// a row whose key is taken inserts nothing (`ON CONFLICT DO NOTHING`:
/// NULL keys never conflict). Without keys the plain insert is cheaper: a
/// speculative insert costs PostgreSQL about a fifth more per row. Keyed
/// rows go in (owner, key) order, so two statements in flight that share
/// keys (an inserter's, a `createTasks`) wait on each other's keys in the
/// same order instead of deadlocking.
pub(super) fn insert_rows(
    mut rows: Vec<NewRow>,
    keyed: bool,
) -> sea_orm::sea_query::InsertStatement {
    if !keyed {
        return Tasks::insert_many(rows.into_iter().map(|row| row.model)).into_query();
    }
    rows.sort_by(|a, b| {
        let key = |row: &NewRow| {
            (
                row.model.user_id.as_ref().clone(),
                row.model.idempotency_key.as_ref().clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    Tasks::insert_many(rows.into_iter().map(|row| row.model))
        .on_conflict(
            OnConflict::columns([Column::UserId, Column::IdempotencyKey])
                .do_nothing()
                .to_owned(),
        )
        .into_query()
}

/// A task to insert, before its turn and budget are assigned.
pub(super) struct NewRow {
    pub(super) model: ActiveModel,
    /// The task's own budget; its type's policy decides when absent.
    pub(super) max_attempts: Option<i32>,
}

impl NewRow {
    /// The PENDING row of `new` (checked by `validate::new_task`), owned by
    /// `user_id`, created `at`, with a fresh id.
    pub(super) fn of(
        user_id: &str,
        new: &super::NewTask,
        traceparent: Option<String>,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Self {
        use sea_orm::ActiveValue::Set;
        let mut model = ActiveModel::pending(
            user_id.to_owned(),
            new.task_type.clone(),
            new.metadata
                .clone()
                .unwrap_or_else(|| serde_json::json!({})),
            new.idempotency_key.clone(),
            at,
        );
        model.priority = Set(new.priority.unwrap_or(0));
        model.traceparent = Set(traceparent);
        model.concurrency_key = Set(new.concurrency_key.clone());
        if let Some(run_at) = new.run_at {
            model.run_at = Set(in_micros(run_at));
        }
        Self {
            model,
            max_attempts: new.max_attempts,
        }
    }
}
