//! The SeaORM implementation of `TaskService`, for SQLite and PostgreSQL.
//!
//! Every change is one conditional statement (`UPDATE … WHERE status IN
//! (allowed) RETURNING *`), so two racing changes can never both win. The
//! triggers on `tasks` log each change in the same statement (see
//! `changelog`); the writer then wakes this instance's reader of the log.
//!
//! Creates that arrive while one is being written are inserted together by
//! the next statement: one commit (one WAL flush) for all of them, instead
//! of one each.
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use entity::tasks::{ActiveModel, Column};
use entity::{Task, TaskStatus, Tasks};
use rand::Rng;
use sea_orm::sea_query::{ExprTrait, OnConflict, Order, Query};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DatabaseBackend, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, QueryTrait, Statement, prelude::Expr, sea_query::UpdateStatement,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument as _, instrument};
use uuid::Uuid;

use super::changelog::Changelog;
use super::line::{Lines, Place};
use super::queue::{self, Caps, PolicyChange, Queue, TaskType};
use super::watch::Watch;
use super::{
    ClaimRequest, DEFAULT_LEASE, Heartbeat, MAX_LEASE, MAX_PAGE_SIZE, NewTask, ReapOutcome,
    StatsRequest, StatusUpdate, TaskFilter, TaskPage, TaskService, TaskStats, Watched, Worker,
    stats, validate,
};
use crate::auth::CurrentUser;
use crate::db::{Backend, Db, DbTransaction};
use crate::error::{TaskError, TaskResult};
use crate::events::{EventBus, TaskEvent};
use crate::metrics::{Metrics, Transition};
use futures::stream::BoxStream;

/// Rows a single retention pass deletes before it lets others write.
const PRUNE_BATCH: u64 = 500;
/// PostgreSQL advisory lock key ("taskql" + 1) held by the instance reaping leases.
const REAPER_LOCK: i64 = 0x7461_736b_716c_0001;
/// Most creates one statement inserts.
const MAX_CREATE_BATCH: usize = 64;
/// Insert statements of batched creates in flight at once on PostgreSQL:
/// while one commits (waits for its WAL flush), the next batch executes.
/// Each owner's creates go to one of them, so an owner's creates are
/// written one statement after the other and read each other's turns.
const POSTGRES_INSERTERS: usize = 4;
/// How many times a create with an idempotency key tries to insert while
/// the task holding its key keeps being deleted between conflict and read.
const MAX_CREATE_ATTEMPTS: usize = 3;
/// Attempts a task gets when neither its create nor its type says.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 3;
/// How often a retryable failure re-reads a task that changed under it.
const MAX_FAIL_ATTEMPTS: usize = 3;
/// PostgreSQL advisory lock key ("taskql" + 2) held by the instance folding count deltas.
const FOLD_LOCK: i64 = 0x7461_736b_716c_0002;

pub struct SeaTaskService {
    writer: Writer,
    watch: Watch,
    lines: Lines,
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    /// Creates waiting to be inserted, one queue per inserter (see
    /// [`insert_queued`]).
    creates: Vec<mpsc::UnboundedSender<QueuedCreate>>,
}

/// Now, at the microsecond precision both databases store.
pub(crate) fn now() -> DateTime<Utc> {
    in_micros(Utc::now())
}

/// `at` at the microsecond precision both databases store, so that the
/// time returned is the time stored.
fn in_micros(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap_or(at)
}

fn statuses(list: &[TaskStatus]) -> Vec<&'static str> {
    list.iter().map(|s| s.as_str()).collect()
}

/// A status as the API spells it, for messages.
fn api_name(status: TaskStatus) -> String {
    status.as_str().to_uppercase()
}

fn encode_cursor(task: &Task) -> String {
    URL_SAFE_NO_PAD.encode(format!(
        "{}:{}",
        task.created_at.timestamp_micros(),
        task.id
    ))
}

fn decode_cursor(cursor: &str) -> TaskResult<(DateTime<Utc>, Uuid)> {
    let bad = || TaskError::invalid("after is not a cursor returned by tasks");
    let raw = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (micros, id) = text.split_once(':').ok_or_else(bad)?;
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    let created_at = DateTime::from_timestamp_micros(micros).ok_or_else(bad)?;
    let id = Uuid::parse_str(id).map_err(|_| bad())?;
    Ok((created_at, id))
}

fn lease_of(requested: Option<Duration>) -> TaskResult<Duration> {
    let lease = requested.unwrap_or(DEFAULT_LEASE);
    if lease.is_zero() || lease > MAX_LEASE {
        return Err(TaskError::invalid(format!(
            "leaseSeconds must be between 1 and {}",
            MAX_LEASE.as_secs()
        )));
    }
    Ok(lease)
}

fn lease_deadline(from: DateTime<Utc>, lease: Duration) -> DateTime<Utc> {
    from + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(60))
}

/// `version + 1`, `updated_at = at`: part of every change.
fn stamp_change(update: &mut UpdateStatement, at: DateTime<Utc>) {
    update
        .value(Column::Version, Expr::col(Column::Version).add(1))
        .value(Column::UpdatedAt, at);
}

/// Whether the task's attempt may still be reported on: it is PROCESSING,
/// or it went back to PENDING after a claim (an expired lease, a backoff),
/// or it was never claimed (attempt 0, which no claim hands out).
/// `retryTask` ends the attempt (`retry_base` catches up with `attempts`).
fn attempt_is_open() -> Expr {
    Expr::col(Column::Status)
        .eq(TaskStatus::Processing.as_str())
        .or(Expr::col(Column::RetryBase).lt(Expr::col(Column::Attempts)))
        .or(Expr::col(Column::Attempts).eq(0))
}

/// Whether `retryTask` ended the attempt of a task read (see [`attempt_is_open`]).
fn attempt_ended_by_retry(task: &Task) -> bool {
    task.status == TaskStatus::Pending && task.attempts > 0 && task.retry_base >= task.attempts
}

/// `update` with its change stamped (see [`stamp_change`]).
fn stamped(mut update: UpdateStatement, at: DateTime<Utc>) -> UpdateStatement {
    stamp_change(&mut update, at);
    update
}

/// The tasks a statement returns (`RETURNING *`, or a select of the entity).
async fn rows_of<C: ConnectionTrait>(conn: &C, statement: Statement) -> TaskResult<Vec<Task>> {
    conn.query_all_raw(statement)
        .await?
        .iter()
        .map(|row| Task::from_row(row).map_err(TaskError::from))
        .collect()
}

/// Writes changes: every statement that changes a task goes through here.
/// The triggers log each change in the same statement; the writer then only
/// wakes this instance's reader of the log.
#[derive(Clone)]
struct Writer {
    db: Db,
    log: Changelog,
    queue: Arc<Queue>,
}

/// Wakes the log's reader when dropped: after the statement returned, or
/// when the request was dropped midway (its change may have committed).
struct WakeReader<'a>(&'a Changelog);

impl Drop for WakeReader<'_> {
    fn drop(&mut self) {
        self.0.wrote();
    }
}

impl Writer {
    fn statement<S: sea_orm::StatementBuilder>(&self, statement: &S) -> Statement {
        self.db.get_database_backend().build(statement)
    }

    /// Runs the statement on `conn` (a transaction the caller commits, then
    /// calls [`Self::wrote`]) and returns the rows it wrote.
    async fn rows_in<C, S>(&self, conn: &C, statement: &S) -> TaskResult<Vec<Task>>
    where
        C: ConnectionTrait,
        S: sea_orm::StatementBuilder,
    {
        rows_of(conn, self.statement(statement)).await
    }

    /// Runs the statement on its own (autocommit) and returns its rows.
    async fn commit<S>(&self, statement: &S) -> TaskResult<Vec<Task>>
    where
        S: sea_orm::StatementBuilder,
    {
        let _wake = WakeReader(&self.log);
        rows_of(&self.db, self.statement(statement)).await
    }

    fn wrote(&self) {
        self.log.wrote();
    }

    /// Inserts `batch` in one statement and answers each create: its new
    /// row, or `None` when its idempotency key was taken.
    async fn insert(&self, mut batch: Vec<QueuedCreate>) {
        // Each row takes its owner's next turn (an owner's later rows in
        // this batch the turns after it) and its budget of attempts.
        if let Err(err) = self.queue.assign(&mut batch).await {
            for create in batch {
                let _ = create.reply.send(Err(err.clone()));
            }
            return;
        }
        let models = batch.iter().map(|create| create.model.clone());
        let mut insert = Tasks::insert_many(models)
            .on_conflict(
                // NULL keys never conflict; a taken key inserts nothing.
                OnConflict::columns([Column::UserId, Column::IdempotencyKey])
                    .do_nothing()
                    .to_owned(),
            )
            .into_query();
        insert.returning_all();
        match self.commit(&insert).await {
            Ok(rows) => {
                for create in batch {
                    let row = rows.iter().find(|task| task.id == create.id).cloned();
                    let _ = create.reply.send(Ok(row));
                }
            }
            Err(err) if batch.len() > 1 && !matches!(err, TaskError::Unavailable(_)) => {
                // One row the database refused must not fail the others.
                tracing::warn!(error = %err, rows = batch.len(), "a batched insert failed; inserting its rows one by one");
                for create in batch {
                    Box::pin(self.insert(vec![create])).await;
                }
            }
            Err(err) => {
                for create in batch {
                    let _ = create.reply.send(Err(err.clone()));
                }
            }
        }
    }
}

/// A create waiting for its insert.
pub(super) struct QueuedCreate {
    pub(super) model: ActiveModel,
    /// The task's own budget; its type's policy decides when absent.
    pub(super) max_attempts: Option<i32>,
    id: Uuid,
    reply: oneshot::Sender<TaskResult<Option<Task>>>,
    /// The create's span: its batch's insert is traced under the first
    /// create's, linked to the others'.
    span: tracing::Span,
}

/// The span of a batch's insert, inside the trace of its first create.
fn batch_span(batch: &[QueuedCreate]) -> tracing::Span {
    let Some((first, others)) = batch.split_first() else {
        return tracing::Span::none();
    };
    let span = first
        .span
        .in_scope(|| tracing::debug_span!("insert_tasks", rows = batch.len()));
    if !span.is_disabled() {
        for create in others {
            span.follows_from(&create.span);
        }
    }
    span
}

/// Inserts queued creates, all that are waiting (up to a batch) in one
/// statement, one statement at a time; there are `POSTGRES_INSERTERS` of
/// these (one on SQLite, which has one writer). A create that finds its
/// inserter idle is inserted at once, alone; under load, creates gather
/// while the statement before them commits. It runs apart from the
/// requests, so a client that hangs up cannot stop a batch that others
/// wait on.
async fn insert_queued(writer: Writer, mut queue: mpsc::UnboundedReceiver<QueuedCreate>) {
    let mut batch = Vec::with_capacity(MAX_CREATE_BATCH);
    loop {
        let received = queue.recv_many(&mut batch, MAX_CREATE_BATCH).await;
        if received == 0 {
            return;
        }
        let span = batch_span(&batch);
        writer
            .insert(std::mem::take(&mut batch))
            .instrument(span)
            .await;
    }
}

impl SeaTaskService {
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
        let writer = Writer {
            db,
            log,
            queue: queue.clone(),
        };
        let inserters = match writer.db.backend() {
            Backend::Postgres => POSTGRES_INSERTERS,
            Backend::Sqlite => 1,
        };
        let creates = (0..inserters)
            .map(|_| {
                let (creates, waiting) = mpsc::unbounded_channel();
                tokio::spawn(insert_queued(writer.clone(), waiting));
                creates
            })
            .collect();
        Self {
            writer,
            watch,
            lines,
            queue,
            creates,
            metrics,
        }
    }

    /// The queue of the inserter that writes `owner`'s creates.
    fn inserter_of(&self, owner: &str) -> &mpsc::UnboundedSender<QueuedCreate> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(owner);
        &self.creates[hash as usize % self.creates.len()]
    }

    /// The change log and this instance's reader of it.
    pub fn changelog(&self) -> &Changelog {
        &self.writer.log
    }

    /// Folds the task count deltas that PostgreSQL's triggers append into
    /// the counters, so that `taskStats` sums a few rows; returns how many
    /// it folded. Counts are exact either way. One instance folds at a time;
    /// on SQLite the triggers keep the counters themselves and this does
    /// nothing.
    #[instrument(level = "debug", skip_all)]
    pub async fn fold_count_deltas(&self) -> TaskResult<u64> {
        if self.db().backend() != Backend::Postgres {
            return Ok(0);
        }
        let txn = self.db().begin().await?;
        if !self.try_exclusive(&txn, FOLD_LOCK).await? {
            txn.rollback().await?;
            return Ok(0);
        }
        let folded = stats::fold_count_deltas(&txn).await?;
        txn.commit().await?;
        Ok(folded)
    }

    /// Prunes the per-minute `taskStats` counters older than the longest
    /// throughput window (and an hour); returns how many rows went. On
    /// PostgreSQL it waits for the fold's lock, held a moment each second.
    #[instrument(level = "debug", skip_all)]
    pub async fn prune_stats_minutes(&self) -> TaskResult<u64> {
        let txn = self.db().begin().await?;
        if self.db().backend() == Backend::Postgres {
            txn.execute_raw(Statement::from_sql_and_values(
                DatabaseBackend::Postgres,
                "SELECT pg_advisory_xact_lock($1)",
                [FOLD_LOCK.into()],
            ))
            .await?;
        }
        let pruned = stats::prune_minutes(&txn, now()).await?;
        txn.commit().await?;
        Ok(pruned)
    }

    fn db(&self) -> &Db {
        &self.writer.db
    }

    /// One UPDATE … RETURNING *, on its own.
    async fn update_rows(&self, mut update: UpdateStatement) -> TaskResult<Vec<Task>> {
        update.returning_all();
        self.writer.commit(&update).await
    }

    /// On PostgreSQL, takes the advisory lock `key` until `txn` ends, or says
    /// another instance holds it. SQLite has one writer at a time anyway.
    async fn try_exclusive(&self, txn: &DbTransaction, key: i64) -> TaskResult<bool> {
        if self.db().backend() != Backend::Postgres {
            return Ok(true);
        }
        let row = txn
            .query_one_raw(Statement::from_sql_and_values(
                DatabaseBackend::Postgres,
                "SELECT pg_try_advisory_xact_lock($1) AS locked",
                [key.into()],
            ))
            .await?
            .ok_or_else(|| {
                TaskError::Internal("pg_try_advisory_xact_lock returned no row".into())
            })?;
        Ok(row.try_get::<bool>("", "locked")?)
    }

    /// The tasks `select` finds.
    async fn select(&self, select: sea_orm::Select<Tasks>) -> TaskResult<Vec<Task>> {
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

    async fn find(&self, task_id: Uuid) -> TaskResult<Option<Task>> {
        self.select_one(Tasks::find_by_id(task_id)).await
    }

    /// The task if `user` may see it: their own, or any for a service.
    async fn find_visible(&self, task_id: Uuid, user: &CurrentUser) -> TaskResult<Option<Task>> {
        Ok(self
            .find(task_id)
            .await?
            .filter(|task| user.is_service || task.user_id == user.id))
    }

    /// The current row of a task a conditional change left alone, to say why.
    async fn unchanged(&self, task_id: Uuid, user: Option<&CurrentUser>) -> TaskResult<Task> {
        let task = match user {
            Some(user) => self.find_visible(task_id, user).await?,
            None => self.find(task_id).await?,
        };
        task.ok_or(TaskError::NotFound)
    }

    fn update_of(&self, task_id: Uuid) -> UpdateStatement {
        let mut update = Query::update();
        update
            .table(Tasks)
            .and_where(Expr::col(Column::Id).eq(task_id));
        update
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

impl SeaTaskService {
    /// A claim that may take a capped type, on PostgreSQL: the policy rows
    /// of the capped types in reach are locked first, so the claim counts
    /// every claim of them committed before (see `queue`).
    async fn claim_capped(
        &self,
        types: &[String],
        in_reach: &[String],
        at: DateTime<Utc>,
        worker_id: &str,
        until: DateTime<Utc>,
    ) -> TaskResult<Option<Task>> {
        let txn = self.db().begin().await?;
        let locked: Vec<String> = txn
            .query_all_raw(self.writer.statement(&queue::lock_capped(in_reach)))
            .await?
            .iter()
            .map(|row| row.try_get_by_index::<String>(0))
            .collect::<Result<_, _>>()?;
        let mut stmt = stamped(
            queue::claim(types, Caps::Locked(&locked), at, worker_id, until),
            at,
        );
        stmt.returning_all();
        let claimed = self.writer.rows_in(&txn, &stmt).await?.pop();
        txn.commit().await?;
        if claimed.is_some() {
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
            let Some(task) = self.find(update.task_id).await? else {
                return Err(TaskError::NotFound);
            };
            let fenced = update.expected_attempt.is_some();
            if !matches!(task.status, TaskStatus::Pending | TaskStatus::Processing)
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
            let mut stmt = self.update_of(task.id);
            stmt.value(Column::Status, TaskStatus::Pending.as_str())
                .value(Column::RunAt, run_at)
                .value(Column::WorkerId, Option::<String>::None)
                .value(Column::LeaseExpiresAt, Option::<DateTime<Utc>>::None)
                .value(Column::Progress, Option::<i32>::None)
                .and_where(
                    Expr::col(Column::Status)
                        .is_in(statuses(&[TaskStatus::Pending, TaskStatus::Processing])),
                )
                // Unchanged since it was read: the same attempt, the same budget.
                .and_where(Expr::col(Column::Version).eq(task.version));
            if let Some(message) = error_message {
                stmt.value(Column::ErrorMessage, message);
            }
            if let Some(task) = self.update_rows(stamped(stmt, at)).await?.pop() {
                self.metrics
                    .transition(Transition::backed_off, &task.task_type);
                return Ok(Some(task));
            }
        }
        Err(TaskError::conflict(
            "the task kept changing while its failure was recorded; try again",
        ))
    }

    /// The conditional UPDATE of `updateTaskStatus`: `to` from the statuses
    /// that may move there, fenced by the attempt when one is expected.
    fn status_change(
        &self,
        update: &StatusUpdate,
        error_message: Option<&str>,
        at: DateTime<Utc>,
    ) -> UpdateStatement {
        let to = update.status;
        let mut stmt = self.update_of(update.task_id);
        stmt.value(Column::Status, to.as_str());
        // A fenced PROCESSING update is a progress report on a task the worker
        // holds: if the task went back to PENDING, its lease is gone.
        let from: &[TaskStatus] =
            if to == TaskStatus::Processing && update.expected_attempt.is_some() {
                &[TaskStatus::Processing]
            } else {
                &[TaskStatus::Pending, TaskStatus::Processing]
            };
        stmt.and_where(Expr::col(Column::Status).is_in(statuses(from)));
        if let Some(expected) = update.expected_attempt {
            stmt.and_where(Expr::col(Column::Attempts).eq(expected))
                .and_where(attempt_is_open());
        }
        if let Some(result_id) = &update.result_id {
            stmt.value(Column::ResultId, result_id.as_str());
        }
        match (error_message, to) {
            (Some(message), _) => {
                stmt.value(Column::ErrorMessage, message);
            }
            // The error of an earlier attempt that backed off is history
            // once the task succeeds.
            (None, TaskStatus::Completed) => {
                stmt.value(Column::ErrorMessage, Option::<String>::None);
            }
            _ => {}
        }
        match (update.progress, to) {
            (Some(p), _) => {
                stmt.value(Column::Progress, p);
            }
            (None, TaskStatus::Completed) => {
                stmt.value(Column::Progress, 100);
            }
            _ => {}
        }
        if to == TaskStatus::Processing {
            // PENDING to PROCESSING outside claimTask is a claim all the same:
            // it counts an attempt and takes the default lease, so the reaper
            // returns the task if its worker goes quiet (a PROCESSING task
            // without a lease would be stuck forever).
            let was_pending = || Expr::col(Column::Status).eq(TaskStatus::Pending.as_str());
            let deadline = lease_deadline(at, DEFAULT_LEASE);
            stmt.value(Column::StartedAt, Expr::col(Column::StartedAt).if_null(at))
                .value(
                    Column::Attempts,
                    Expr::case(was_pending(), Expr::col(Column::Attempts).add(1))
                        .finally(Expr::col(Column::Attempts)),
                )
                .value(
                    Column::LeaseExpiresAt,
                    Expr::case(was_pending(), deadline)
                        .finally(Expr::col(Column::LeaseExpiresAt).if_null(deadline)),
                );
        } else {
            stmt.value(Column::CompletedAt, at)
                .value(Column::LeaseExpiresAt, Option::<DateTime<Utc>>::None);
        }
        stamp_change(&mut stmt, at);
        stmt
    }
}

#[async_trait]
impl TaskService for SeaTaskService {
    #[instrument(level = "debug", skip_all, fields(user = %user.id, task_type = %new.task_type))]
    async fn create_task(&self, user: &CurrentUser, new: NewTask) -> TaskResult<Task> {
        validate::task_type(&new.task_type)?;
        let metadata = validate::metadata(new.metadata)?;
        if let Some(key) = &new.idempotency_key {
            validate::label("idempotencyKey", key, validate::MAX_KEY_LEN)?;
        }
        let priority = new.priority.unwrap_or(0);
        queue::check_priority(priority)?;
        if let Some(max) = new.max_attempts {
            queue::check_max_attempts(max)?;
        }
        let key = new.idempotency_key.as_deref().unwrap_or_default();
        // The worker that runs the task continues this span's trace.
        let traceparent = crate::telemetry::traceparent(&tracing::Span::current());
        // With a key, the unique index decides who wins (ON CONFLICT DO
        // NOTHING inserts no row); the loser reads the winner. A winner
        // deleted in between frees the key, and the insert is tried again.
        for _ in 0..MAX_CREATE_ATTEMPTS {
            let at = now();
            let mut model = ActiveModel::pending(
                user.id.clone(),
                new.task_type.clone(),
                metadata.clone(),
                new.idempotency_key.clone(),
                at,
            );
            model.priority = sea_orm::ActiveValue::Set(priority);
            model.traceparent = sea_orm::ActiveValue::Set(traceparent.clone());
            if let Some(run_at) = new.run_at {
                model.run_at = sea_orm::ActiveValue::Set(in_micros(run_at));
            }
            let id = *model.id.as_ref();
            let (reply, inserted) = oneshot::channel();
            let stopped = || TaskError::Internal("the insert queue stopped".into());
            self.inserter_of(&user.id)
                .send(QueuedCreate {
                    model,
                    max_attempts: new.max_attempts,
                    id,
                    reply,
                    span: tracing::Span::current(),
                })
                .map_err(|_| stopped())?;
            if let Some(task) = inserted.await.map_err(|_| stopped())?? {
                return Ok(task);
            }
            let Some(existing) = self.find_by_key(user, key).await? else {
                continue;
            };
            if existing.task_type != new.task_type || existing.metadata != metadata {
                return Err(TaskError::conflict(
                    "idempotencyKey was already used for a task with a different type or metadata",
                ));
            }
            return Ok(existing);
        }
        Err(TaskError::conflict(
            "idempotencyKey is being created and deleted by other requests; try again",
        ))
    }

    #[instrument(level = "debug", skip_all, fields(task_id = %update.task_id, status = update.status.as_str()))]
    async fn update_task_status(&self, _worker: &Worker, update: StatusUpdate) -> TaskResult<Task> {
        let to = update.status;
        validate::progress(update.progress)?;
        if let Some(result_id) = &update.result_id {
            validate::result_id(result_id)?;
        }
        let error_message = update
            .error_message
            .as_deref()
            .map(validate::clean_error_message);
        if to == TaskStatus::Pending {
            return Err(TaskError::conflict(
                "a task cannot be set back to PENDING; only an expired lease returns it there",
            ));
        }
        if update.retryable
            && to == TaskStatus::Failed
            && let Some(task) = self.back_off(&update, error_message.as_deref()).await?
        {
            return Ok(task);
        }
        let stmt = self.status_change(&update, error_message.as_deref(), now());
        if let Some(task) = self.update_rows(stmt).await?.pop() {
            match to {
                TaskStatus::Completed => self
                    .metrics
                    .transition(Transition::completed, &task.task_type),
                TaskStatus::Failed => self.metrics.transition(Transition::failed, &task.task_type),
                TaskStatus::Cancelled => self
                    .metrics
                    .transition(Transition::cancelled, &task.task_type),
                _ => {}
            }
            return Ok(task);
        }

        // Nothing changed: say why, or accept an exact repeat of a terminal update.
        let task = self.unchanged(update.task_id, None).await?;
        if let Some(expected) = update.expected_attempt
            && task.attempts != expected
        {
            return Err(TaskError::conflict(format!(
                "expectedAttempt {expected} is stale: the task is on attempt {}",
                task.attempts
            )));
        }
        if let Some(expected) = update.expected_attempt
            && attempt_ended_by_retry(&task)
        {
            return Err(TaskError::conflict(format!(
                "attempt {expected} ended when the task was retried; stop working on it"
            )));
        }
        if let Some(expected) = update.expected_attempt
            && task.status == TaskStatus::Pending
            && to == TaskStatus::Processing
        {
            return Err(TaskError::conflict(format!(
                "the lease of attempt {expected} expired and the task went back to PENDING; \
                 stop working on it"
            )));
        }
        let same_result = update.result_id.is_none() || update.result_id == task.result_id;
        let same_error = error_message.is_none() || error_message == task.error_message;
        if task.status == to && to.is_terminal() && same_result && same_error {
            return Ok(task);
        }
        Err(TaskError::conflict(format!(
            "task is {}; it cannot change to {}",
            api_name(task.status),
            api_name(to)
        )))
    }

    #[instrument(level = "debug", skip_all, fields(%task_id, user = %user.id))]
    async fn get_task(&self, task_id: Uuid, user: &CurrentUser) -> TaskResult<Task> {
        self.find_visible(task_id, user)
            .await?
            .ok_or(TaskError::NotFound)
    }

    #[instrument(level = "debug", skip_all, fields(user = %user.id, first))]
    async fn get_tasks_by_user(
        &self,
        user: &CurrentUser,
        filter: TaskFilter,
        first: u64,
        after: Option<&str>,
    ) -> TaskResult<TaskPage> {
        if first == 0 || first > MAX_PAGE_SIZE {
            return Err(TaskError::invalid(format!(
                "first must be between 1 and {MAX_PAGE_SIZE}"
            )));
        }
        let mut query = Tasks::find();
        if !user.is_service {
            query = query.filter(Column::UserId.eq(&user.id));
        }
        if !filter.statuses.is_empty() {
            // Five statuses at most, however often a client repeats them.
            let mut wanted = filter.statuses.clone();
            wanted.sort_by_key(|s| s.as_str());
            wanted.dedup();
            query = query.filter(Column::Status.is_in(statuses(&wanted)));
        }
        if let Some(task_type) = &filter.task_type {
            validate::task_type(task_type)?;
            query = query.filter(Column::TaskType.eq(task_type.as_str()));
        }
        if let Some(owner) = &filter.user_id {
            validate::label("userId", owner, validate::MAX_USER_ID_LEN)?;
            query = query.filter(Column::UserId.eq(owner.as_str()));
        }
        if let Some(cursor) = after {
            let (created_at, id) = decode_cursor(cursor)?;
            query = query.filter(
                Condition::any().add(Column::CreatedAt.lt(created_at)).add(
                    Condition::all()
                        .add(Column::CreatedAt.eq(created_at))
                        .add(Column::Id.lt(id)),
                ),
            );
        }
        let mut tasks = self
            .select(
                query
                    .order_by(Column::CreatedAt, Order::Desc)
                    .order_by(Column::Id, Order::Desc)
                    .limit(first + 1),
            )
            .await?;
        let has_next_page = tasks.len() as u64 > first;
        tasks.truncate(first as usize);
        let edges = tasks
            .into_iter()
            .map(|task| (encode_cursor(&task), task))
            .collect();
        Ok(TaskPage {
            edges,
            has_next_page,
        })
    }

    #[instrument(level = "debug", skip_all, fields(user = %user.id))]
    async fn get_task_by_result_id(
        &self,
        result_id: &str,
        user: &CurrentUser,
    ) -> TaskResult<Option<Task>> {
        validate::result_id(result_id)?;
        let mut query = Tasks::find();
        if !user.is_service {
            query = query.filter(Column::UserId.eq(&user.id));
        }
        self.select_one(
            query
                .filter(Column::ResultId.eq(result_id))
                .order_by(Column::CreatedAt, Order::Desc)
                .order_by(Column::Id, Order::Desc),
        )
        .await
    }

    #[instrument(level = "debug", skip_all, fields(%task_id, user = %user.id))]
    async fn delete_task(&self, task_id: Uuid, user: &CurrentUser) -> TaskResult<bool> {
        let mut delete = Tasks::delete_many().filter(Column::Id.eq(task_id));
        if !user.is_service {
            delete = delete.filter(Column::UserId.eq(&user.id));
        }
        let mut delete = delete.into_query();
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
        let at = now();
        let mut stmt = self.update_of(task_id);
        stmt.value(Column::Status, TaskStatus::Cancelled.as_str())
            .value(Column::CompletedAt, at)
            .value(Column::LeaseExpiresAt, Option::<DateTime<Utc>>::None)
            .and_where(
                Expr::col(Column::Status)
                    .is_in(statuses(&[TaskStatus::Pending, TaskStatus::Processing])),
            );
        if !user.is_service {
            stmt.and_where(Expr::col(Column::UserId).eq(user.id.as_str()));
        }
        stamp_change(&mut stmt, at);
        if let Some(task) = self.update_rows(stmt).await?.pop() {
            self.metrics
                .transition(Transition::cancelled, &task.task_type);
            return Ok(task);
        }
        let task = self.unchanged(task_id, Some(user)).await?;
        match task.status {
            // Cancelling twice is the same as once.
            TaskStatus::Cancelled => Ok(task),
            status => Err(TaskError::conflict(format!(
                "task is already {}; only PENDING or PROCESSING tasks can be cancelled",
                api_name(status)
            ))),
        }
    }

    #[instrument(level = "debug", skip_all, fields(%task_id, user = %user.id))]
    async fn retry_task(&self, task_id: Uuid, user: &CurrentUser) -> TaskResult<Task> {
        let at = now();
        let mut stmt = self.update_of(task_id);
        stmt.value(Column::Status, TaskStatus::Pending.as_str())
            .value(Column::RetryBase, Expr::col(Column::Attempts))
            .value(Column::RunAt, at)
            .value(Column::Progress, Option::<i32>::None)
            .value(Column::ResultId, Option::<String>::None)
            .value(Column::ErrorMessage, Option::<String>::None)
            .value(Column::WorkerId, Option::<String>::None)
            .value(Column::LeaseExpiresAt, Option::<DateTime<Utc>>::None)
            .value(Column::StartedAt, Option::<DateTime<Utc>>::None)
            .value(Column::CompletedAt, Option::<DateTime<Utc>>::None)
            .and_where(
                Expr::col(Column::Status)
                    .is_in(statuses(&[TaskStatus::Failed, TaskStatus::Cancelled])),
            );
        if !user.is_service {
            stmt.and_where(Expr::col(Column::UserId).eq(user.id.as_str()));
        }
        stamp_change(&mut stmt, at);
        if let Some(task) = self.update_rows(stmt).await?.pop() {
            self.metrics
                .transition(Transition::retried, &task.task_type);
            return Ok(task);
        }
        let task = self.unchanged(task_id, Some(user)).await?;
        Err(TaskError::conflict(format!(
            "task is {}; only FAILED or CANCELLED tasks can be retried",
            api_name(task.status)
        )))
    }

    #[instrument(level = "debug", skip_all, fields(user = %user.id))]
    async fn task_stats(&self, user: &CurrentUser, request: StatsRequest) -> TaskResult<TaskStats> {
        stats::task_stats(self.db(), user, &request).await
    }

    #[instrument(level = "debug", skip_all, fields(worker = worker.id()))]
    async fn claim_task(&self, worker: &Worker, request: ClaimRequest) -> TaskResult<Option<Task>> {
        for task_type in &request.types {
            validate::task_type(task_type)?;
        }
        let worker_id = request.worker_id.as_deref().unwrap_or(worker.id());
        validate::label("workerId", worker_id, validate::MAX_WORKER_ID_LEN)?;
        let lease = lease_of(request.lease)?;
        let at = now();
        let until = lease_deadline(at, lease);
        // SQLite's one writer makes the claim's count of a capped type hold;
        // PostgreSQL locks the capped types in reach first (see `queue`).
        let (caps, in_reach) = match self.db().backend() {
            Backend::Sqlite => (Caps::Counted, Vec::new()),
            Backend::Postgres => {
                let in_reach = self
                    .queue
                    .capped()
                    .await?
                    .iter()
                    .filter(|t| request.types.is_empty() || request.types.contains(t))
                    .cloned()
                    .collect();
                (Caps::Locked(&[]), in_reach)
            }
        };
        let claimed = if in_reach.is_empty() {
            let stmt = queue::claim(&request.types, caps, at, worker_id, until);
            self.update_rows(stamped(stmt, at)).await?.pop()
        } else {
            self.claim_capped(&request.types, &in_reach, at, worker_id, until)
                .await?
        };

        if let Some(task) = &claimed {
            self.metrics
                .transition(Transition::claimed, &task.task_type);
        }
        Ok(claimed)
    }

    #[instrument(level = "debug", skip_all, fields(task_id = %heartbeat.task_id))]
    async fn heartbeat_task(&self, _worker: &Worker, heartbeat: Heartbeat) -> TaskResult<Task> {
        validate::progress(heartbeat.progress)?;
        let lease = lease_of(heartbeat.lease)?;
        let at = now();
        let mut stmt = self.update_of(heartbeat.task_id);
        stmt.value(Column::LeaseExpiresAt, lease_deadline(at, lease))
            .and_where(Expr::col(Column::Status).eq(TaskStatus::Processing.as_str()));
        if let Some(progress) = heartbeat.progress {
            stmt.value(Column::Progress, progress);
        }
        if let Some(expected) = heartbeat.expected_attempt {
            stmt.and_where(Expr::col(Column::Attempts).eq(expected));
        }
        stamp_change(&mut stmt, at);
        if let Some(task) = self.update_rows(stmt).await?.pop() {
            return Ok(task);
        }
        let task = self.unchanged(heartbeat.task_id, None).await?;
        if task.status == TaskStatus::Processing {
            return Err(TaskError::conflict(format!(
                "the task was claimed again (attempt {}); stop working on it",
                task.attempts
            )));
        }
        Err(TaskError::conflict(format!(
            "task is {}; stop working on it",
            api_name(task.status)
        )))
    }

    #[instrument(level = "debug", skip_all)]
    async fn reap_expired_leases(&self) -> TaskResult<ReapOutcome> {
        let at = now();
        let expired = |stmt: &mut UpdateStatement| {
            stmt.table(Tasks)
                .and_where(Expr::col(Column::Status).eq(TaskStatus::Processing.as_str()))
                .and_where(Expr::col(Column::LeaseExpiresAt).lt(at));
        };
        let mut requeue = Query::update();
        expired(&mut requeue);
        let spent = || {
            Expr::col(Column::Attempts)
                .sub(Expr::col(Column::RetryBase))
                .gte(Expr::col(Column::MaxAttempts))
        };
        requeue
            .and_where(spent().not())
            .value(Column::Status, TaskStatus::Pending.as_str())
            .value(Column::WorkerId, Option::<String>::None)
            .value(Column::LeaseExpiresAt, Option::<DateTime<Utc>>::None);
        stamp_change(&mut requeue, at);

        let mut fail = Query::update();
        expired(&mut fail);
        fail.and_where(spent())
            .value(Column::Status, TaskStatus::Failed.as_str())
            .value(
                Column::ErrorMessage,
                Expr::cust("'lease expired after ' || attempts || ' attempt(s); the worker stopped sending heartbeats'"),
            )
            .value(Column::CompletedAt, at)
            .value(Column::LeaseExpiresAt, Option::<DateTime<Utc>>::None);
        stamp_change(&mut fail, at);

        // One instance reaps at a time: two passes updating the same expired
        // rows lock them in different orders and deadlock on PostgreSQL. If
        // another instance holds the lock, it is doing this very pass.
        let txn = self.db().begin().await?;
        if !self.try_exclusive(&txn, REAPER_LOCK).await? {
            txn.rollback().await?;
            return Ok(ReapOutcome::default());
        }
        requeue.returning_all();
        fail.returning_all();
        let requeued_tasks = self.writer.rows_in(&txn, &requeue).await?;
        let failed_tasks = self.writer.rows_in(&txn, &fail).await?;
        txn.commit().await?;
        let (requeued, failed) = (requeued_tasks.len(), failed_tasks.len());
        if requeued + failed > 0 {
            self.writer.wrote();
        }
        for task in &requeued_tasks {
            self.metrics
                .transition(Transition::requeued, &task.task_type);
        }
        for task in &failed_tasks {
            self.metrics.transition(Transition::failed, &task.task_type);
        }
        if requeued + failed > 0 {
            tracing::info!(requeued, failed, "reaped expired leases");
        }
        Ok(ReapOutcome { requeued, failed })
    }

    #[instrument(level = "debug", skip_all)]
    async fn prune_finished(&self, older_than: Duration) -> TaskResult<usize> {
        let cutoff = chrono::Duration::from_std(older_than)
            .ok()
            .and_then(|age| now().checked_sub_signed(age))
            .ok_or_else(|| TaskError::invalid("retention is too long"))?;
        let terminal = statuses(&[
            TaskStatus::Completed,
            TaskStatus::Failed,
            TaskStatus::Cancelled,
        ]);
        let mut total = 0;
        loop {
            let mut batch = Query::select();
            batch
                .column(Column::Id)
                .from(Tasks)
                .and_where(Expr::col(Column::Status).is_in(terminal.clone()))
                .and_where(Expr::col(Column::CompletedAt).lt(cutoff))
                .limit(PRUNE_BATCH);
            let mut delete = Tasks::delete_many()
                .filter(Expr::col(Column::Id).in_subquery(batch))
                .into_query();
            delete.returning_all();
            let count = self.writer.commit(&delete).await?.len();
            total += count;
            if (count as u64) < PRUNE_BATCH {
                break;
            }
        }
        Ok(total)
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

    #[instrument(level = "debug", skip_all)]
    async fn prune_events(&self, older_than: Duration) -> TaskResult<u64> {
        self.writer.log.prune(older_than).await
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
        let index = |status: TaskStatus| stats::status_index(status.as_str()).unwrap_or_default();
        let (pending, processing) = (index(TaskStatus::Pending), index(TaskStatus::Processing));
        let counts = by_type
            .into_iter()
            .map(|t| (t.task_type, t.counts[pending], t.counts[processing]))
            .collect();
        self.queue.task_types(counts).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let at = now();
        let id = Uuid::now_v7();
        let encoded = URL_SAFE_NO_PAD.encode(format!("{}:{}", at.timestamp_micros(), id));
        assert_eq!(decode_cursor(&encoded).unwrap(), (at, id));
        for bad in [
            "",
            "!!!",
            "bm90IGEgY3Vyc29y",
            &URL_SAFE_NO_PAD.encode("1:nope"),
        ] {
            assert!(matches!(
                decode_cursor(bad),
                Err(TaskError::InvalidInput(_))
            ));
        }
    }
}
