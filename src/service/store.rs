//! The SeaORM implementation of `TaskService`, for SQLite and PostgreSQL.
//!
//! Every change is one conditional statement (`UPDATE … WHERE status IN
//! (allowed) RETURNING *`, built from the status machine in
//! `transitions`), so two racing changes can never both win. Statements
//! that change a task run through the `writer`; the pages and who sees what
//! are in `pages`.
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use entity::tasks::Column;
use entity::{Task, TaskStatus, Tasks};
use futures::stream::BoxStream;
use rand::Rng;
use sea_orm::sea_query::Order;
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, QueryTrait,
};
use tracing::instrument;
use uuid::Uuid;

use super::batch::{Beat, Completion, claim_terms, rows_of_names};
use super::clock::{in_micros, now};
use super::line::{Lines, Place};
use super::live::Watch;
use super::live::bus::{EventBus, TaskEvent};
use super::live::changelog::Changelog;
use super::pages::{self, visible_to};
use super::queue::{self, Caps, PolicyChange, Queue, TaskType};
use super::rates;
use super::rows::{NewRow, rows_of};
use super::transitions::{self, Move, attempt_ended_by_retry, lease_deadline};
use super::writer::{Inserters, Writer};
use super::{
    ClaimRequest, Heartbeat, NewTask, StatsRequest, StatusUpdate, TaskFilter, TaskPage,
    TaskService, TaskStats, Watched, Worker, stats, validate,
};
use crate::auth::CurrentUser;
use crate::db::{Backend, Db};
use crate::error::{TaskError, TaskResult};
use crate::metrics::Metrics;

/// How many times a create with an idempotency key tries to insert while
/// the task holding its key keeps being deleted between conflict and read.
const MAX_CREATE_ATTEMPTS: usize = 3;
pub use entity::tasks::DEFAULT_MAX_ATTEMPTS;
/// How often a retryable failure re-reads a task that changed under it.
const MAX_FAIL_ATTEMPTS: usize = 3;

pub struct TaskStore {
    pub(super) writer: Writer,
    inserters: Inserters,
    watch: Watch,
    lines: Lines,
    pub(super) queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    /// A worker's `taskStats.workers`, shared by every dashboard.
    leases: stats::LeaseBoard,
    /// The most a completion's `result` may take, serialized.
    pub(super) max_result_bytes: usize,
}

/// The task an idempotent create finds under its key: `existing` when it
/// was created with the same type and metadata, else CONFLICT.
pub(super) fn same_create(existing: Task, new: &NewTask) -> TaskResult<Task> {
    if existing.task_type != new.task_type || Some(&existing.metadata) != new.metadata.as_ref() {
        return Err(TaskError::conflict(
            "idempotencyKey was already used for a task with a different type or metadata",
        ));
    }
    Ok(existing)
}

impl TaskStore {
    /// The service on `db`, counting transitions and event lag into
    /// `metrics`; it starts its insert queue and its reader of the change
    /// log on the current tokio runtime.
    pub fn new(db: Db, metrics: Arc<Metrics>) -> Self {
        Self::with_max_attempts(db, metrics, DEFAULT_MAX_ATTEMPTS)
    }

    /// The service whose tasks get `max_attempts` attempts unless their
    /// type's policy or their create says otherwise.
    pub fn with_max_attempts(db: Db, metrics: Arc<Metrics>, max_attempts: i32) -> Self {
        // The log's reader moves and reads on connections of its own, so
        // delivery does not wait behind requests for a pooled one.
        let log = Changelog::start(db.apart(2), EventBus::new(), metrics.clone());
        let queue = Arc::new(Queue::new(db.clone(), max_attempts));
        let lines = Lines::new(db.clone(), queue.clone());
        let watch = Watch::new(db.clone(), log.clone(), lines.clone());
        let writer = Writer::new(db, log, queue.clone());
        Self {
            inserters: Inserters::start(&writer),
            writer,
            watch,
            lines,
            queue,
            metrics,
            leases: stats::LeaseBoard::default(),
            max_result_bytes: validate::DEFAULT_MAX_RESULT_BYTES,
        }
    }

    /// This service with completions' `result` bounded by `bytes`.
    pub fn with_max_result_bytes(mut self, bytes: usize) -> Self {
        self.max_result_bytes = bytes;
        self
    }

    /// The change log and this instance's reader of it.
    pub fn changelog(&self) -> &Changelog {
        self.writer.log()
    }

    pub(super) fn db(&self) -> &Db {
        self.writer.db()
    }

    /// Counts a move that happened to `task` in `/metrics`.
    pub(super) fn moved(&self, mv: Move, task: &Task) {
        if let Some(transition) = mv.counted_as() {
            self.metrics.transition(transition, &task.task_type);
        }
    }

    /// Runs `mv`'s statement; the task it moved, counted in `/metrics`.
    async fn make(
        &self,
        mv: Move,
        stmt: sea_orm::sea_query::UpdateStatement,
    ) -> TaskResult<Option<Task>> {
        let moved = self.writer.update(stmt).await?.pop();
        if let Some(task) = &moved {
            self.moved(mv, task);
        }
        Ok(moved)
    }

    /// The tasks `select` finds.
    pub(super) async fn select(&self, select: sea_orm::Select<Tasks>) -> TaskResult<Vec<Task>> {
        rows_of(
            &self.db().reads(),
            select.build(self.db().get_database_backend()),
        )
        .await
    }

    /// The first task `select` finds.
    async fn select_one(&self, select: sea_orm::Select<Tasks>) -> TaskResult<Option<Task>> {
        Ok(self.select(select.limit(1)).await?.pop())
    }

    /// The task if `user` may see it (see [`visible_to`]); any task when
    /// `user` is `None`, for a worker's call.
    async fn find(&self, task_id: Uuid, user: Option<&CurrentUser>) -> TaskResult<Option<Task>> {
        let mut select = Tasks::find_by_id(task_id);
        if let Some(user) = user {
            select = select.filter(visible_to(user));
        }
        self.select_one(select).await
    }

    /// The current row of a task a conditional change left alone, to say why.
    async fn unchanged(&self, task_id: Uuid, user: Option<&CurrentUser>) -> TaskResult<Task> {
        self.find(task_id, user).await?.ok_or(TaskError::NotFound)
    }

    async fn find_by_key(&self, user: &CurrentUser, key: &str) -> TaskResult<Option<Task>> {
        self.select_one(
            Tasks::find()
                .filter(Column::UserId.eq(&user.id))
                .filter(Column::IdempotencyKey.eq(key)),
        )
        .await
    }

    /// A claim that may take a capped type, in one transaction: on
    /// PostgreSQL the policy rows of the capped types in reach are locked
    /// first, so the claim counts every claim of them committed before (see
    /// `queue`); SQLite holds its one write lock from the start. `claim`
    /// makes the claim's statement (`RETURNING *`) for the types it locked
    /// (all in reach on SQLite), run up to `times` times while it takes
    /// tasks: claims one after the other, each counting the ones before.
    pub(super) async fn claim_locked(
        &self,
        reach: &queue::Reach,
        times: usize,
        claim: impl Fn(&[String], &rates::Empty) -> sea_orm::Statement,
    ) -> TaskResult<Vec<Task>> {
        let txn = self.db().begin_write().await?;
        let locked = match self.db().backend() {
            Backend::Postgres => {
                let lock = queue::lock_capped(&reach.capped);
                rows_of_names(&txn, self.writer.statement(&lock)).await?
            }
            Backend::Sqlite => reach.capped.clone(),
        };
        // The rate-limited types locked: their buckets, as of now.
        let rated = reach
            .rated
            .iter()
            .filter(|(task_type, _)| locked.contains(task_type))
            .map(|(task_type, limit)| (task_type.clone(), *limit))
            .collect();
        // The buckets' time is read once the lock is held: a claim that
        // waited for it must not refill what the one before it took.
        let mut buckets = rates::Buckets::read(&txn, rated, now()).await?;
        let mut claimed = Vec::new();
        for _ in 0..times {
            let taken = rows_of(&txn, claim(&locked, &buckets.empty())).await?;
            if taken.is_empty() {
                break;
            }
            buckets.take(&taken);
            claimed.extend(taken);
        }
        buckets.write(&txn).await?;
        txn.commit().await?;
        if !claimed.is_empty() {
            self.writer.wrote();
        }
        Ok(claimed)
    }

    /// A retryable failure of a task with attempts left: back to PENDING,
    /// runnable after its type's backoff, keeping its error message. `None`
    /// when it has none left, or is not PENDING or PROCESSING: then FAILED
    /// applies as without `retryable`.
    async fn back_off(
        &self,
        update: &StatusUpdate,
        error_message: Option<&str>,
    ) -> TaskResult<Option<Task>> {
        for _ in 0..MAX_FAIL_ATTEMPTS {
            let Some(task) = self.find(update.task_id, None).await? else {
                return Err(TaskError::NotFound);
            };
            let fenced = update.expected_attempt.is_some();
            if !Move::BackOff.from().contains(&task.status)
                || update.expected_attempt.is_some_and(|n| n != task.attempts)
                || (fenced && attempt_ended_by_retry(&task))
            {
                return Ok(None);
            }
            // A fenced report on a PENDING task of the same attempt: either
            // its exact repeat (the task was already backed off), or its
            // lease expired before the worker reported; then the failure
            // still counts, and backs the task off.
            if fenced
                && task.status == TaskStatus::Pending
                && task.error_message.is_some()
                && (error_message.is_none() || error_message == task.error_message.as_deref())
            {
                return Ok(Some(task));
            }
            let used = task.attempts - task.retry_base;
            if used >= task.max_attempts {
                return Ok(None);
            }
            let policy = self.queue.policy(&task.task_type).await?;
            let delay = policy
                .backoff
                .delay(Ord::max(used, 1), rand::rng().random::<f64>());
            let at = now();
            let run_at = in_micros(
                at + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::zero()),
            );
            let stmt = transitions::back_off(&task, run_at, error_message, at);
            if let Some(task) = self.make(Move::BackOff, stmt).await? {
                return Ok(Some(task));
            }
        }
        Err(TaskError::conflict(
            "the task kept changing while its failure was recorded; try again",
        ))
    }
}

#[async_trait]
impl TaskService for TaskStore {
    #[instrument(level = "debug", skip_all, fields(user = %user.id, task_type = %new.task_type))]
    async fn create_task(&self, user: &CurrentUser, new: NewTask) -> TaskResult<Task> {
        let new = validate::new_task(new)?;
        if !new.depends_on.is_empty() {
            validate::dependencies(&new.depends_on, None)?;
            let mut created = self.create_linked(user, &[new], &[None]).await?;
            return created
                .pop()
                .ok_or_else(|| TaskError::Internal("a create answered no task".into()));
        }
        let key = new.idempotency_key.as_deref().unwrap_or_default();
        // The worker that runs the task continues this span's trace.
        let traceparent = crate::telemetry::traceparent(&tracing::Span::current());
        // With a key, the unique index decides who wins (ON CONFLICT DO
        // NOTHING inserts no row); the loser reads the winner. A winner
        // deleted in between frees the key, and the insert is tried again.
        for _ in 0..MAX_CREATE_ATTEMPTS {
            let row = NewRow::of(&user.id, &new, traceparent.clone(), now());
            if let Some(task) = self.inserters.insert(row).await? {
                return Ok(task);
            }
            let Some(existing) = self.find_by_key(user, key).await? else {
                continue;
            };
            return same_create(existing, &new);
        }
        Err(TaskError::conflict(
            "idempotencyKey is being created and deleted by other requests; try again",
        ))
    }

    async fn related_tasks(
        &self,
        task_id: Uuid,
        related: super::Related,
        user: &CurrentUser,
    ) -> TaskResult<Vec<Task>> {
        self.related(task_id, related, user).await
    }

    #[instrument(level = "debug", skip_all, fields(user = %user.id, inputs = news.len()))]
    async fn create_tasks(&self, user: &CurrentUser, news: Vec<NewTask>) -> TaskResult<Vec<Task>> {
        self.create_many(user, news).await
    }

    #[instrument(level = "debug", skip_all, fields(task_id = %update.task_id, status = update.status.as_str()))]
    async fn update_task_status(&self, _worker: &Worker, update: StatusUpdate) -> TaskResult<Task> {
        let to = update.status;
        validate::progress(update.progress)?;
        if let Some(result_id) = &update.result_id {
            validate::result_id(result_id)?;
        }
        if let Some(result) = &update.result {
            if to != TaskStatus::Completed {
                return Err(TaskError::invalid(
                    "result is set only by a completion: send it with status COMPLETED",
                ));
            }
            validate::result(result, self.max_result_bytes)?;
        }
        let error_message = update
            .error_message
            .as_deref()
            .map(validate::clean_error_message);
        let Some(mv) = Move::reported(to, update.expected_attempt.is_some()) else {
            return Err(TaskError::conflict(
                "a task cannot be set back to PENDING; only an expired lease returns it there",
            ));
        };
        if update.retryable
            && mv == Move::Fail
            && let Some(task) = self.back_off(&update, error_message.as_deref()).await?
        {
            return Ok(task);
        }
        let stmt = transitions::report(mv, &update, error_message.as_deref(), now());
        if let Some(task) = self.make(mv, stmt).await? {
            return Ok(task);
        }

        // Nothing changed: say why, or accept an exact repeat of a terminal update.
        let task = self.unchanged(update.task_id, None).await?;
        transitions::refused_report(&update, error_message.as_deref(), task)
    }

    #[instrument(level = "debug", skip_all, fields(%task_id, user = %user.id))]
    async fn get_task(&self, task_id: Uuid, user: &CurrentUser) -> TaskResult<Task> {
        self.unchanged(task_id, Some(user)).await
    }

    #[instrument(level = "debug", skip_all, fields(user = %user.id, first))]
    async fn get_tasks_by_user(
        &self,
        user: &CurrentUser,
        filter: TaskFilter,
        first: u64,
        after: Option<&str>,
    ) -> TaskResult<TaskPage> {
        let select = pages::select(user, &filter, first, after)?;
        Ok(pages::page_of(self.select(select).await?, first))
    }

    #[instrument(level = "debug", skip_all, fields(user = %user.id))]
    async fn get_task_by_result_id(
        &self,
        result_id: &str,
        user: &CurrentUser,
    ) -> TaskResult<Option<Task>> {
        validate::result_id(result_id)?;
        self.select_one(
            Tasks::find()
                .filter(visible_to(user))
                .filter(Column::ResultId.eq(result_id))
                .order_by(Column::CreatedAt, Order::Desc)
                .order_by(Column::Id, Order::Desc),
        )
        .await
    }

    #[instrument(level = "debug", skip_all, fields(%task_id, user = %user.id))]
    async fn delete_task(&self, task_id: Uuid, user: &CurrentUser) -> TaskResult<bool> {
        let mut delete = Tasks::delete_many()
            .filter(Column::Id.eq(task_id))
            .filter(visible_to(user))
            .into_query();
        delete.returning_all();
        let found = !self.writer.commit(&delete).await?.is_empty();
        if found {
            Ok(true)
        } else {
            Err(TaskError::NotFound)
        }
    }

    #[instrument(level = "debug", skip_all, fields(%task_id, user = %user.id))]
    async fn cancel_task(&self, task_id: Uuid, user: &CurrentUser) -> TaskResult<Task> {
        let stmt = transitions::cancel(task_id, visible_to(user), now());
        if let Some(task) = self.make(Move::Cancel, stmt).await? {
            return Ok(task);
        }
        transitions::refused_cancel(self.unchanged(task_id, Some(user)).await?)
    }

    #[instrument(level = "debug", skip_all, fields(%task_id, user = %user.id))]
    async fn retry_task(&self, task_id: Uuid, user: &CurrentUser) -> TaskResult<Task> {
        let stmt = transitions::retry(task_id, visible_to(user), now());
        if let Some(task) = self.make(Move::Retry, stmt).await? {
            return Ok(task);
        }
        let task = self.unchanged(task_id, Some(user)).await?;
        Err(transitions::refused_retry(&task))
    }

    #[instrument(level = "debug", skip_all, fields(user = %user.id))]
    async fn task_stats(&self, user: &CurrentUser, request: StatsRequest) -> TaskResult<TaskStats> {
        stats::task_stats(self.db(), &self.leases, user, &request).await
    }

    #[instrument(level = "debug", skip_all, fields(worker = worker.id()))]
    async fn claim_task(&self, worker: &Worker, request: ClaimRequest) -> TaskResult<Option<Task>> {
        let (worker_id, at, until) = claim_terms(worker, &request)?;
        let worker_id = worker_id.as_str();
        // SQLite's one writer makes the claim's count of a capped type hold
        // (a rate-limited type's bucket needs a transaction all the same);
        // PostgreSQL locks the capped types in reach first (see `queue`).
        let reach = self.queue.capped_in_reach(&request.types).await?;
        let postgres = self.db().backend() == Backend::Postgres;
        let alone = if postgres {
            reach.capped.is_empty()
        } else {
            reach.rated.is_empty()
        };
        if alone {
            let no_buckets = rates::Empty::default();
            let stmt = queue::claim(
                &request.types,
                Caps::of(postgres, &[]),
                &no_buckets,
                at,
                worker_id,
                until,
            );
            return self.make(Move::Claim, stmt).await;
        }
        let claimed = self
            .claim_locked(&reach, 1, |locked, empty| {
                let mut stmt = queue::claim(
                    &request.types,
                    Caps::of(postgres, locked),
                    empty,
                    at,
                    worker_id,
                    until,
                );
                stmt.returning_all();
                self.writer.statement(&stmt)
            })
            .await?
            .pop();
        if let Some(task) = &claimed {
            self.moved(Move::Claim, task);
        }
        Ok(claimed)
    }

    #[instrument(level = "debug", skip_all, fields(worker = worker.id(), limit))]
    async fn claim_tasks(
        &self,
        worker: &Worker,
        request: ClaimRequest,
        limit: i32,
    ) -> TaskResult<Vec<Task>> {
        self.claim_many(worker, request, limit).await
    }

    #[instrument(level = "debug", skip_all, fields(inputs = completions.len()))]
    async fn complete_tasks(
        &self,
        _worker: &Worker,
        completions: Vec<Completion>,
    ) -> TaskResult<Vec<TaskResult<Task>>> {
        self.complete_many(completions).await
    }

    #[instrument(level = "debug", skip_all, fields(inputs = beats.len()))]
    async fn heartbeat_tasks(
        &self,
        _worker: &Worker,
        beats: Vec<Beat>,
        lease: Option<Duration>,
    ) -> TaskResult<Vec<TaskResult<Task>>> {
        self.heartbeat_many(beats, lease).await
    }

    #[instrument(level = "debug", skip_all, fields(task_id = %heartbeat.task_id))]
    async fn heartbeat_task(&self, _worker: &Worker, heartbeat: Heartbeat) -> TaskResult<Task> {
        validate::progress(heartbeat.progress)?;
        let lease = validate::lease(heartbeat.lease)?;
        let at = now();
        let stmt = transitions::heartbeat(
            heartbeat.task_id,
            lease_deadline(at, lease),
            heartbeat.progress,
            heartbeat.expected_attempt,
            at,
        );
        if let Some(task) = self.make(Move::Heartbeat, stmt).await? {
            return Ok(task);
        }
        let task = self.unchanged(heartbeat.task_id, None).await?;
        Err(transitions::refused_heartbeat(&task))
    }

    async fn watch_task(
        &self,
        user: &CurrentUser,
        task_id: Uuid,
        placed: bool,
    ) -> TaskResult<BoxStream<'static, TaskResult<Watched>>> {
        self.watch.task(user.clone(), task_id, placed).await
    }

    async fn queue_place(&self, user: &CurrentUser, task_id: Uuid) -> TaskResult<Option<Place>> {
        self.lines.place(user, task_id).await
    }

    async fn watch_events(
        &self,
        user: &CurrentUser,
        after: Option<&str>,
    ) -> TaskResult<BoxStream<'static, TaskResult<TaskEvent>>> {
        self.watch.events(user.clone(), after).await
    }

    #[instrument(level = "debug", skip_all, fields(%task_type))]
    async fn set_task_type_policy(
        &self,
        worker: &Worker,
        task_type: &str,
        change: PolicyChange,
    ) -> TaskResult<TaskType> {
        self.queue.set_policy(task_type, &change).await?;
        // The type has a policy row now, so it is among the types.
        self.task_types(worker)
            .await?
            .into_iter()
            .find(|t| t.task_type == task_type)
            .ok_or_else(|| TaskError::Internal(format!("task type {task_type} vanished")))
    }

    #[instrument(level = "debug", skip_all)]
    async fn task_types(&self, worker: &Worker) -> TaskResult<Vec<TaskType>> {
        let everyone = CurrentUser::service(worker.id());
        let (_, by_type) = stats::counts(self.db(), &everyone).await?;
        let counts = by_type
            .into_iter()
            .map(|t| (t.task_type, t.counts.pending, t.counts.processing))
            .collect();
        self.queue.task_types(counts).await
    }
}
