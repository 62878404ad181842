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
use entity::{Task, Tasks};
use futures::stream::BoxStream;
use sea_orm::sea_query::Order;
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, QueryTrait,
};
use tracing::instrument;
use uuid::Uuid;

use super::batch::{Beat, Completion};
use super::clock::now;
use super::line::{Lines, Place};
use super::live::Watch;
use super::live::bus::{EventBus, TaskEvent};
use super::live::changelog::Changelog;
use super::pages::{self, visible_to};
use super::queue::{PolicyChange, Queue, TaskType};
use super::rows::{NewRow, rows_of};
use super::transitions::{self, Move, lease_deadline};
use super::writer::{Inserters, Writer};
use super::{
    ClaimRequest, Heartbeat, NewTask, StatsRequest, StatusUpdate, TaskFilter, TaskPage,
    TaskService, TaskStats, Watched, Worker, stats, validate,
};
use crate::auth::CurrentUser;
use crate::db::Db;
use crate::error::{TaskError, TaskResult};
use crate::metrics::Metrics;

/// How many times a create with an idempotency key tries to insert while
/// the task holding its key keeps being deleted between conflict and read.
const MAX_CREATE_ATTEMPTS: usize = 3;
pub use entity::tasks::DEFAULT_MAX_ATTEMPTS;

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
    pub(super) async fn make(
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
    pub(super) async fn find(
        &self,
        task_id: Uuid,
        user: Option<&CurrentUser>,
    ) -> TaskResult<Option<Task>> {
        let mut select = Tasks::find_by_id(task_id);
        if let Some(user) = user {
            select = select.filter(visible_to(user));
        }
        self.select_one(select).await
    }

    /// The current row of a task a conditional change left alone, to say why.
    pub(super) async fn unchanged(
        &self,
        task_id: Uuid,
        user: Option<&CurrentUser>,
    ) -> TaskResult<Task> {
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
        self.report(update).await
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
        self.claim_one(worker, request).await
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
