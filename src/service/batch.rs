//! Batched calls: many tasks in one statement and one commit.
//!
//! - `createTasks`: up to [`MAX_CREATES`] tasks in one transaction, all or
//!   nothing; each input keeps its own idempotency key.
//! - `claimTasks`: up to [`MAX_CLAIMS`] tasks in one statement, in the
//!   order, caps and pauses of `claimTask`.
//! - `completeTasks`, `heartbeatTasks`: up to [`MAX_REPORTS`] reports in
//!   one statement, each fenced by its own attempt; one report's conflict
//!   leaves the others alone and is answered for that report alone.
//!
//! A bad input fails the whole call before anything is written, with its
//! index ([`TaskError::AtInput`]).
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use entity::tasks::Column;
use entity::{Task, TaskStatus, Tasks};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryTrait, Statement, TryIntoModel,
};
use uuid::Uuid;

use super::clock::now;
use super::queue::{self, CAPPED, Caps};
use super::rows::{NewRow, ids_of, insert_rows, rows_of};
use super::store::{TaskStore, same_create};
use super::transitions::{self, Move, lease_deadline};
use super::{ClaimRequest, NewTask, StatusUpdate, Worker, validate};
use crate::auth::CurrentUser;
use crate::db::Backend;
use crate::db::dialect::{self, Binds};
use crate::error::{TaskError, TaskResult};

/// Most tasks one `createTasks` creates.
pub const MAX_CREATES: usize = 1000;
/// Most tasks one `claimTasks` takes.
pub const MAX_CLAIMS: usize = 100;
/// Most reports in one `completeTasks` or `heartbeatTasks`.
pub const MAX_REPORTS: usize = 100;
/// How many times a batch of creates is tried while a task holding one of
/// its keys keeps being deleted between the conflict and the read.
const MAX_CREATE_ATTEMPTS: usize = 3;

/// One task of `completeTasks`.
#[derive(Debug, Clone)]
pub struct Completion {
    pub task_id: Uuid,
    /// Fencing: the completion applies only while `attempts` equals it.
    pub expected_attempt: i32,
    pub result_id: Option<String>,
    pub result: Option<serde_json::Value>,
}

/// One task of `heartbeatTasks`.
#[derive(Debug, Clone)]
pub struct Beat {
    pub task_id: Uuid,
    /// Fencing: the heartbeat applies only while `attempts` equals it.
    pub expected_attempt: i32,
    pub progress: Option<i32>,
}

/// The inputs of a batch of creates that are not repeats of an earlier
/// input's key (`repeat_of`, as [`TaskStore::create_many`] finds them).
pub(super) fn firsts<'a>(
    news: &'a [NewTask],
    repeat_of: &'a [Option<usize>],
) -> impl Iterator<Item = &'a NewTask> {
    news.iter()
        .zip(repeat_of)
        .filter(|(_, repeat)| repeat.is_none())
        .map(|(new, _)| new)
}

/// Why a batch of creates gave up: its keys kept changing hands.
fn key_churn() -> TaskError {
    TaskError::conflict(
        "an idempotencyKey of this batch is being created and deleted by other requests; try again",
    )
}

/// Refuses a batch of `n` inputs when `n` is over `max`.
fn check_size(field: &str, n: usize, max: usize) -> TaskResult<()> {
    if n > max {
        return Err(TaskError::invalid(format!(
            "{field} takes at most {max} items, got {n}; split it into several calls"
        )));
    }
    Ok(())
}

/// Refuses a task named twice in one batch of reports.
fn check_distinct(ids: impl Iterator<Item = Uuid>) -> TaskResult<()> {
    let mut seen = HashSet::new();
    for (index, id) in ids.enumerate() {
        if !seen.insert(id) {
            return Err(TaskError::invalid(format!(
                "task {id} is named twice; report each task once per call"
            ))
            .at_input(index));
        }
    }
    Ok(())
}

/// What a claim is made under: the lease's holder, now, and the lease's end.
pub(super) fn claim_terms(
    worker: &Worker,
    request: &ClaimRequest,
) -> TaskResult<(String, DateTime<Utc>, DateTime<Utc>)> {
    for task_type in &request.types {
        validate::task_type(task_type)?;
    }
    let worker_id = request.worker_id.as_deref().unwrap_or(worker.id());
    validate::label("workerId", worker_id, validate::MAX_WORKER_ID_LEN)?;
    let lease = validate::lease(request.lease)?;
    let at = now();
    Ok((worker_id.to_owned(), at, lease_deadline(at, lease)))
}

/// `claimTasks`' statement: up to `limit` runnable tasks (of `types`, or
/// any when empty) become PROCESSING as `queue::claim` makes one.
///
/// The candidates are the first `limit` runnable tasks of the types with no
/// cap, and, for each capped type in `capped`, its first tasks up to the
/// room under its cap (its cap less what it runs now); the statement takes
/// the first `limit` of them all in claim order. So a batch takes exactly
/// what as many claims one after the other would. Capped types not in
/// `capped` are skipped: on PostgreSQL `capped` are the types whose policy
/// rows the claim's transaction has locked (see `queue`). Candidates are
/// locked with `SKIP LOCKED` on PostgreSQL, so concurrent claims pass each
/// other.
fn claim_many(
    backend: Backend,
    types: &[String],
    capped: &[String],
    limit: usize,
    (worker_id, at, until): (&str, DateTime<Utc>, DateTime<Utc>),
) -> Statement {
    let (materialized, lock) = (backend.materialized(), backend.skip_locked());
    let order = dialect::claim_order();
    let mut p = Binds::default();
    let at_p = p.bind(at);
    let pending = p.bind(TaskStatus::Pending.as_str());
    let processing = p.bind(TaskStatus::Processing.as_str());
    let yes = p.bind(true);
    let runnable = format!(
        "SELECT id, priority, fair_rank, run_at FROM tasks WHERE status = {pending} \
         AND waiting_on = 0 AND run_at <= {at_p}"
    );
    let of_types = if types.is_empty() {
        String::new()
    } else {
        let names: Vec<String> = types.iter().map(|t| p.bind(t.as_str())).collect();
        format!(" AND type IN ({})", names.join(", "))
    };
    let mut ctes = vec![format!(
        "free AS {materialized}({runnable}{of_types} AND type NOT IN \
         (SELECT task_type FROM task_types WHERE paused = {yes} OR {CAPPED}) \
         ORDER BY {order} LIMIT {limit}{lock})"
    )];
    for (i, task_type) in capped.iter().enumerate() {
        let name = p.bind(task_type.as_str());
        let room = format!(
            "(SELECT p.concurrency - (SELECT COUNT(*) FROM tasks r \
             WHERE r.type = p.task_type AND r.status = {processing}) AS room \
             FROM task_types p WHERE p.task_type = {name} AND p.concurrency IS NOT NULL \
             AND p.paused <> {yes})"
        );
        ctes.push(format!(
            "capped{i} AS {materialized}({runnable} AND type = {name} \
             ORDER BY {order} LIMIT COALESCE((SELECT CASE WHEN room <= 0 THEN 0 \
             WHEN room < {limit} THEN room ELSE {limit} END FROM {room} s), 0){lock})"
        ));
    }
    let candidates: Vec<String> = std::iter::once("SELECT * FROM free".to_owned())
        .chain((0..capped.len()).map(|i| format!("SELECT * FROM capped{i}")))
        .collect();
    ctes.push(format!(
        "picked AS {materialized}(SELECT id FROM ({}) c ORDER BY {order} LIMIT {limit})",
        candidates.join(" UNION ALL ")
    ));
    let worker_p = p.bind(worker_id);
    let until_p = p.bind(until);
    let sql = format!(
        "WITH {} UPDATE tasks SET status = {processing}, version = version + 1, \
         updated_at = {at_p}, attempts = attempts + 1, worker_id = {worker_p}, \
         lease_expires_at = {until_p}, started_at = COALESCE(started_at, {at_p}) \
         WHERE status = {pending} AND id IN (SELECT id FROM picked) RETURNING *",
        ctes.join(", ")
    );
    p.statement(backend, sql)
}

impl TaskStore {
    /// `createTasks`: see the module's doc.
    pub(super) async fn create_many(
        &self,
        user: &CurrentUser,
        news: Vec<NewTask>,
    ) -> TaskResult<Vec<Task>> {
        check_size("inputs", news.len(), MAX_CREATES)?;
        let news = news
            .into_iter()
            .enumerate()
            .map(|(i, new)| {
                let new = validate::new_task(new).map_err(|e| e.at_input(i))?;
                validate::dependencies(&new.depends_on, Some(i)).map_err(|e| e.at_input(i))?;
                Ok(new)
            })
            .collect::<TaskResult<Vec<_>>>()?;
        if news.is_empty() {
            return Ok(Vec::new());
        }
        // An input whose key an earlier input of the batch has is that
        // input's repeat: the same task, or CONFLICT if it differs.
        let mut first_with_key: HashMap<&str, usize> = HashMap::new();
        let mut repeat_of = vec![None; news.len()];
        for (i, new) in news.iter().enumerate() {
            let Some(key) = new.idempotency_key.as_deref() else {
                continue;
            };
            match first_with_key.get(key) {
                Some(&first) => {
                    let earlier = &news[first];
                    if earlier.task_type != new.task_type || earlier.metadata != new.metadata {
                        return Err(TaskError::conflict(format!(
                            "idempotencyKey is also that of input {first}, with a different type or metadata"
                        ))
                        .at_input(i));
                    }
                    repeat_of[i] = Some(first);
                }
                None => {
                    first_with_key.insert(key, i);
                }
            }
        }
        if news.iter().any(|new| !new.depends_on.is_empty()) {
            return self.create_linked(user, &news, &repeat_of).await;
        }
        let traceparent = crate::telemetry::traceparent(&tracing::Span::current());
        for _ in 0..MAX_CREATE_ATTEMPTS {
            if let Some(tasks) = self
                .insert_batch(user, &news, &repeat_of, traceparent.clone())
                .await?
            {
                return Ok(tasks);
            }
        }
        Err(key_churn())
    }

    /// Creates `news` (validated; `repeat_of` as in [`Self::create_many`])
    /// when some depend on other tasks, trying again while racing creates
    /// take their keys.
    pub(super) async fn create_linked(
        &self,
        user: &CurrentUser,
        news: &[NewTask],
        repeat_of: &[Option<usize>],
    ) -> TaskResult<Vec<Task>> {
        let traceparent = crate::telemetry::traceparent(&tracing::Span::current());
        for _ in 0..MAX_CREATE_ATTEMPTS {
            if let Some(tasks) = self
                .insert_linked(user, news, repeat_of, traceparent.clone())
                .await?
            {
                return Ok(tasks);
            }
        }
        Err(key_churn())
    }

    /// One try of [`Self::create_many`]: the tasks in input order, or `None`
    /// when a task holding one of the keys was deleted before it was read.
    async fn insert_batch(
        &self,
        user: &CurrentUser,
        news: &[NewTask],
        repeat_of: &[Option<usize>],
        traceparent: Option<String>,
    ) -> TaskResult<Option<Vec<Task>>> {
        let at = now();
        let mut rows: Vec<NewRow> = firsts(news, repeat_of)
            .map(|new| NewRow::of(&user.id, new, traceparent.clone(), at))
            .collect();
        self.queue.assign(rows.iter_mut(), &HashMap::new()).await?;
        // Every column is set here, so the tasks are what was inserted: the
        // insert returns only the ids it wrote, and no row is decoded back.
        let made = rows
            .iter()
            .map(|row| row.model.clone().try_into_model())
            .collect::<Result<Vec<Task>, _>>()?;
        let keyed = made.iter().any(|task| task.idempotency_key.is_some());
        let insert = insert_rows(rows, keyed, self.db().backend())?;
        let answer = if !keyed {
            // No key can be taken: the one statement is all or nothing.
            let inserted = ids_of(self.writer.commit_query(insert).await?)?;
            if inserted.len() != made.len() {
                return Err(TaskError::Internal(format!(
                    "a batch of {} creates inserted {}",
                    made.len(),
                    inserted.len()
                )));
            }
            made
        } else {
            let txn = self.db().begin().await?;
            let inserted = ids_of(txn.query_all_raw(insert).await?)?;
            let Some(answer) = self
                .with_taken_keys(&txn, user, made, &inserted, firsts(news, repeat_of))
                .await?
            else {
                return Ok(None);
            };
            txn.commit().await?;
            self.writer.wrote();
            answer
        };
        // Back in input order, each repeat with its first input's task.
        let mut answer = answer.into_iter();
        let mut tasks: Vec<Task> = Vec::with_capacity(news.len());
        for repeat in repeat_of {
            let task = match repeat {
                Some(first) => tasks[*first].clone(),
                None => answer.next().ok_or_else(|| {
                    TaskError::Internal("a batch answered fewer tasks than it made".into())
                })?,
            };
            tasks.push(task);
        }
        Ok(Some(tasks))
    }

    /// The tasks of a batch (`made`, of the inputs `news` in order), with
    /// those whose key was taken before replaced by the task holding it;
    /// `None` when one of those was deleted before it was read.
    async fn with_taken_keys<'a>(
        &self,
        txn: &crate::db::DbTransaction,
        user: &CurrentUser,
        made: Vec<Task>,
        inserted: &HashSet<Uuid>,
        news: impl Iterator<Item = &'a NewTask>,
    ) -> TaskResult<Option<Vec<Task>>> {
        let taken: Vec<&str> = made
            .iter()
            .filter(|task| !inserted.contains(&task.id))
            .filter_map(|task| task.idempotency_key.as_deref())
            .collect();
        let mut existing: HashMap<String, Task> = HashMap::new();
        if !taken.is_empty() {
            let select = Tasks::find()
                .filter(Column::UserId.eq(&user.id))
                .filter(Column::IdempotencyKey.is_in(taken))
                .build(self.db().get_database_backend());
            for task in rows_of(txn, select).await? {
                if let Some(key) = task.idempotency_key.clone() {
                    existing.insert(key, task);
                }
            }
        }
        let mut answer = Vec::with_capacity(made.len());
        for ((task, new), index) in made.into_iter().zip(news).zip(0..) {
            if inserted.contains(&task.id) {
                answer.push(task);
                continue;
            }
            let key = task.idempotency_key.as_deref().unwrap_or_default();
            let Some(found) = existing.remove(key) else {
                return Ok(None);
            };
            answer.push(same_create(found, new).map_err(|e| e.at_input(index))?);
        }
        Ok(Some(answer))
    }

    /// `claimTasks`: see [`claim_many`].
    pub(super) async fn claim_many(
        &self,
        worker: &Worker,
        request: ClaimRequest,
        limit: i32,
    ) -> TaskResult<Vec<Task>> {
        let terms = claim_terms(worker, &request)?;
        let max = MAX_CLAIMS as i32;
        if !(1..=max).contains(&limit) {
            return Err(TaskError::invalid(format!(
                "limit must be between 1 and {max}, got {limit}"
            )));
        }
        let limit = limit as usize;
        let terms = (terms.0.as_str(), terms.1, terms.2);
        let backend = self.db().backend();
        let postgres = backend == Backend::Postgres;
        let reach = self.queue.capped_in_reach(&request.types).await?;
        let (worker_id, at, until) = terms;
        let claimed = if reach.one_by_one {
            // A cap per key counts the tasks of each key claimed before, a
            // rate limit the tokens they took: one claim after the other,
            // in one transaction.
            self.claim_locked(&reach, limit, |locked, empty| {
                let caps = Caps::of(postgres, locked);
                let mut stmt = queue::claim(&request.types, caps, empty, at, worker_id, until);
                stmt.returning_all();
                self.writer.statement(&stmt)
            })
            .await?
        } else if postgres && !reach.capped.is_empty() {
            self.claim_locked(&reach, 1, |locked, _| {
                claim_many(backend, &request.types, locked, limit, terms)
            })
            .await?
        } else {
            let stmt = claim_many(backend, &request.types, &reach.capped, limit, terms);
            self.writer.commit_raw(stmt).await?
        };
        for task in &claimed {
            self.moved(Move::Claim, task);
        }
        Ok(sorted_in_claim_order(claimed))
    }

    /// `completeTasks`: each report's task, or why it was refused.
    pub(super) async fn complete_many(
        &self,
        completions: Vec<Completion>,
    ) -> TaskResult<Vec<TaskResult<Task>>> {
        check_size("input", completions.len(), MAX_REPORTS)?;
        for (i, completion) in completions.iter().enumerate() {
            if let Some(result_id) = &completion.result_id {
                validate::result_id(result_id).map_err(|e| e.at_input(i))?;
            }
            if let Some(result) = &completion.result {
                validate::result(result, self.max_result_bytes).map_err(|e| e.at_input(i))?;
            }
        }
        check_distinct(completions.iter().map(|c| c.task_id))?;
        if completions.is_empty() {
            return Ok(Vec::new());
        }
        let stmt = transitions::complete_many(&completions, now());
        let moved = self.writer.update(stmt).await?;
        for task in &moved {
            self.moved(Move::Complete, task);
        }
        let ids = completions.iter().map(|c| c.task_id);
        let mut found = self.answers(ids, moved).await?;
        Ok(completions
            .into_iter()
            .map(|c| {
                let (task, changed) = found.remove(&c.task_id).ok_or(TaskError::NotFound)?;
                if changed {
                    return Ok(task);
                }
                let update = StatusUpdate {
                    result_id: c.result_id,
                    result: c.result,
                    expected_attempt: Some(c.expected_attempt),
                    ..StatusUpdate::new(c.task_id, TaskStatus::Completed)
                };
                transitions::refused_report(&update, None, task)
            })
            .collect())
    }

    /// `heartbeatTasks`: each report's task, or why it was refused.
    pub(super) async fn heartbeat_many(
        &self,
        beats: Vec<Beat>,
        lease: Option<Duration>,
    ) -> TaskResult<Vec<TaskResult<Task>>> {
        check_size("input", beats.len(), MAX_REPORTS)?;
        let lease = validate::lease(lease)?;
        for (i, beat) in beats.iter().enumerate() {
            validate::progress(beat.progress).map_err(|e| e.at_input(i))?;
        }
        check_distinct(beats.iter().map(|b| b.task_id))?;
        if beats.is_empty() {
            return Ok(Vec::new());
        }
        let at = now();
        let stmt = transitions::heartbeat_many(&beats, lease_deadline(at, lease), at);
        let moved = self.writer.update(stmt).await?;
        let mut found = self.answers(beats.iter().map(|b| b.task_id), moved).await?;
        Ok(beats
            .into_iter()
            .map(|b| match found.remove(&b.task_id) {
                None => Err(TaskError::NotFound),
                Some((task, true)) => Ok(task),
                Some((task, false)) => Err(transitions::refused_heartbeat(&task)),
            })
            .collect())
    }

    /// Each task of `ids` that exists: as `moved` changed it (`true`), or
    /// as it is now for those the change left alone (`false`).
    async fn answers(
        &self,
        ids: impl Iterator<Item = Uuid>,
        moved: Vec<Task>,
    ) -> TaskResult<HashMap<Uuid, (Task, bool)>> {
        let mut found: HashMap<Uuid, (Task, bool)> =
            moved.into_iter().map(|t| (t.id, (t, true))).collect();
        let left: Vec<Uuid> = ids.filter(|id| !found.contains_key(id)).collect();
        if !left.is_empty() {
            for task in self
                .select(Tasks::find().filter(Column::Id.is_in(left)))
                .await?
            {
                found.insert(task.id, (task, false));
            }
        }
        Ok(found)
    }
}

/// The first column of each row, as text.
pub(super) async fn rows_of_names<C: ConnectionTrait>(
    conn: &C,
    statement: Statement,
) -> TaskResult<Vec<String>> {
    Ok(conn
        .query_all_raw(statement)
        .await?
        .iter()
        .map(|row| row.try_get_by_index::<String>(0))
        .collect::<Result<_, _>>()?)
}

/// Claimed tasks in the order they were claimed: priority, turn, `run_at`, id.
fn sorted_in_claim_order(mut tasks: Vec<Task>) -> Vec<Task> {
    tasks.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.fair_rank.cmp(&b.fair_rank))
            .then(a.run_at.cmp(&b.run_at))
            .then(a.id.cmp(&b.id))
    });
    tasks
}
