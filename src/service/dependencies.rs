//! Dependencies between tasks: creating a task that waits for others, and
//! reading a task's dependencies and dependents.
//!
//! A create that names dependencies is one transaction: it locks the tasks
//! it depends on (`FOR SHARE` on PostgreSQL; SQLite's write lock is taken
//! at `BEGIN IMMEDIATE`), counts those not yet COMPLETED into the new
//! task's `waiting_on`, and inserts the task with its edges. A dependency's
//! completion, failure or cancel must update the row to change, which
//! waits for that lock: either it committed before the create read it (the
//! create sees the new status), or it runs after the create committed (its
//! trigger sees the new edge). So no completion is missed and none counted
//! twice. Everything after the create is the triggers' (see the
//! dependencies migration), in the statement that changes a dependency.
use std::collections::{BTreeSet, HashMap};

use entity::tasks::Column;
use entity::{Task, TaskStatus, Tasks};
use sea_orm::sea_query::{Alias, Expr, ExprTrait, LockType, Query, SelectStatement};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, QueryTrait, TryIntoModel,
};
use uuid::Uuid;

use super::batch::firsts;
use super::clock::now;
use super::pages::visible_to;
use super::rows::{NewRow, ids_of, insert_rows, rows_of};
use super::store::same_create;
use super::{Dependency, NewTask, TaskStore};
use crate::auth::CurrentUser;
use crate::db::Backend;
use crate::error::{TaskError, TaskResult};

/// Most tasks `Task.dependents` lists.
pub const MAX_DEPENDENTS_LISTED: u64 = 100;
/// Edges one statement inserts, at most (two parameters each).
const EDGES_PER_INSERT: usize = 5000;

/// Which tasks related to a task to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Related {
    /// The tasks it depends on.
    Dependencies,
    /// Those of them not COMPLETED yet (while it waits).
    WaitingOn,
    /// The tasks that depend on it.
    Dependents,
}

/// `task_dependencies`, the edges.
fn edges() -> Alias {
    Alias::new("task_dependencies")
}

impl TaskStore {
    /// One try of creating `news` (validated; `repeat_of` says which input
    /// repeats an earlier one's key) when some depend on other tasks: the
    /// tasks in input order, or `None` when a racing create took one of
    /// their keys meanwhile (nothing was written; try again).
    pub(super) async fn insert_linked(
        &self,
        user: &CurrentUser,
        news: &[NewTask],
        repeat_of: &[Option<usize>],
        traceparent: Option<String>,
    ) -> TaskResult<Option<Vec<Task>>> {
        let share = self.db().backend() == Backend::Postgres;
        let txn = self.db().begin_write().await?;
        // The tasks that already hold the inputs' keys (those inputs are
        // them) and the dependencies outside the batch, locked until the
        // commit, in one statement and in id order, so that two creates
        // lock what they share in the same order.
        let keys: Vec<&str> = firsts(news, repeat_of)
            .filter_map(|new| new.idempotency_key.as_deref())
            .collect();
        let outside: BTreeSet<Uuid> = firsts(news, repeat_of)
            .flat_map(|new| &new.depends_on)
            .filter_map(|dependency| match dependency {
                Dependency::Task(id) => Some(*id),
                Dependency::Input(_) => None,
            })
            .collect();
        let mut held: HashMap<String, Task> = HashMap::new();
        let mut found: HashMap<Uuid, Task> = HashMap::new();
        if !keys.is_empty() || !outside.is_empty() {
            let mut wanted =
                sea_orm::Condition::any().add(Column::Id.is_in(outside.iter().copied()));
            if !keys.is_empty() {
                wanted = wanted.add(
                    sea_orm::Condition::all()
                        .add(Column::UserId.eq(&user.id))
                        .add(Column::IdempotencyKey.is_in(keys.iter().copied())),
                );
            }
            let mut select = Tasks::find()
                .filter(wanted)
                .order_by_asc(Column::Id)
                .into_query();
            locked(&mut select, share);
            for task in rows_of(&txn, self.db().get_database_backend().build(&select)).await? {
                if task.user_id == user.id
                    && let Some(key) = task.idempotency_key.as_deref()
                    && keys.contains(&key)
                {
                    held.insert(key.to_owned(), task.clone());
                }
                if outside.contains(&task.id) {
                    found.insert(task.id, task);
                }
            }
        }

        let at = now();
        // Each input's task id and status, as the inputs after it see them.
        let mut stand: Vec<(Uuid, TaskStatus)> = Vec::with_capacity(news.len());
        let mut existing: HashMap<usize, Task> = HashMap::new();
        let mut rows: Vec<NewRow> = Vec::new();
        let mut links: Vec<(Uuid, Uuid)> = Vec::new();
        for (i, new) in news.iter().enumerate() {
            if let Some(first) = repeat_of[i] {
                stand.push(stand[first]);
                continue;
            }
            if let Some(task) = new
                .idempotency_key
                .as_deref()
                .and_then(|key| held.remove(key))
            {
                let task = same_create(task, new).map_err(|e| e.at_input(i))?;
                stand.push((task.id, task.status));
                existing.insert(i, task);
                continue;
            }
            let mut row = NewRow::of(&user.id, new, traceparent.clone(), at);
            let id = *row.model.id.as_ref();
            // Each dependency once: an input's index and the id of the
            // task it turned out to be are one dependency.
            let mut on_tasks: Vec<(Uuid, TaskStatus)> = Vec::with_capacity(new.depends_on.len());
            for dependency in &new.depends_on {
                let on = match *dependency {
                    Dependency::Task(on) => found
                        .get(&on)
                        .filter(|task| user.is_service || task.user_id == user.id)
                        .map(|task| (task.id, task.status))
                        .ok_or_else(|| TaskError::NotFound.at_input(i))?,
                    Dependency::Input(j) => stand[j],
                };
                if !on_tasks.iter().any(|(id, _)| *id == on.0) {
                    on_tasks.push(on);
                }
            }
            let mut waiting = 0;
            let mut blocked_by = None;
            for (on, status) in on_tasks {
                if status != TaskStatus::Completed {
                    waiting += 1;
                }
                if matches!(status, TaskStatus::Failed | TaskStatus::Cancelled) {
                    blocked_by.get_or_insert(on);
                }
                links.push((id, on));
            }
            row.model.waiting_on = Set(waiting);
            if let Some(on) = blocked_by {
                // Its dependency will never complete: cancelled at once, as
                // it would have been had it existed when that one ended.
                row.model.status = Set(TaskStatus::Cancelled);
                row.model.cancelled_by = Set(Some(on));
                row.model.error_message =
                    Set(Some(format!("dependency {on} failed or was cancelled")));
                row.model.completed_at = Set(Some(at));
            }
            stand.push((id, *row.model.status.as_ref()));
            rows.push(row);
        }

        let mut made: Vec<Task> = Vec::with_capacity(rows.len());
        if !rows.is_empty() {
            self.queue
                .assign_on(&txn, rows.iter_mut(), &HashMap::new())
                .await?;
            made = rows
                .iter()
                .map(|row| row.model.clone().try_into_model())
                .collect::<Result<_, _>>()?;
            let keyed = made.iter().any(|task| task.idempotency_key.is_some());
            let insert = insert_rows(rows, keyed, self.db().backend())?;
            let inserted = ids_of(txn.query_all_raw(insert).await?)?;
            if inserted.len() != made.len() {
                // A key was taken since it was read: roll back, try again.
                return Ok(None);
            }
            for chunk in links.chunks(EDGES_PER_INSERT) {
                let mut insert = Query::insert();
                insert
                    .into_table(edges())
                    .columns([Alias::new("task_id"), Alias::new("depends_on")]);
                for (task, on) in chunk {
                    insert.values_panic([(*task).into(), (*on).into()]);
                }
                txn.execute_raw(self.writer.statement(&insert)).await?;
            }
        }
        txn.commit().await?;
        self.writer.wrote();

        let mut made = made.into_iter();
        let mut tasks: Vec<Task> = Vec::with_capacity(news.len());
        for (i, repeat) in repeat_of.iter().enumerate() {
            let task = match (repeat, existing.remove(&i)) {
                (Some(first), _) => tasks[*first].clone(),
                (None, Some(task)) => task,
                (None, None) => made.next().ok_or_else(|| {
                    TaskError::Internal("a batch answered fewer tasks than it made".into())
                })?,
            };
            tasks.push(task);
        }
        Ok(Some(tasks))
    }

    /// The tasks related to `task_id` as `related` says, that `user` may
    /// see, by id (at most [`MAX_DEPENDENTS_LISTED`] dependents).
    pub(super) async fn related(
        &self,
        task_id: Uuid,
        related: Related,
        user: &CurrentUser,
    ) -> TaskResult<Vec<Task>> {
        let (key, other) = match related {
            Related::Dependencies | Related::WaitingOn => ("task_id", "depends_on"),
            Related::Dependents => ("depends_on", "task_id"),
        };
        let mut linked = Query::select();
        linked
            .column(Alias::new(other))
            .from(edges())
            .and_where(Expr::col(Alias::new(key)).eq(task_id));
        let mut select = Tasks::find()
            .filter(Column::Id.in_subquery(linked))
            .filter(visible_to(user))
            .order_by_asc(Column::Id);
        if related == Related::WaitingOn {
            select = select.filter(Column::Status.ne(TaskStatus::Completed.as_str()));
        }
        if related == Related::Dependents {
            select = select.limit(MAX_DEPENDENTS_LISTED);
        }
        let statement = self.db().get_database_backend().build(&select.into_query());
        rows_of(&self.db().reads(), statement).await
    }
}

/// `select` locked `FOR SHARE` when `share` (PostgreSQL).
fn locked(select: &mut SelectStatement, share: bool) {
    if share {
        select.lock(LockType::Share);
    }
}
