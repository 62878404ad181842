//! The writer: every statement that changes a task goes through here, and
//! the queues of creates it inserts in batches.
//!
//! The triggers on `tasks` log each change in the same statement (see
//! `live::changelog`); the writer then wakes this instance's reader of the
//! log. Creates that arrive while one is being written are inserted together
//! by the next statement: one commit (one WAL flush) for all of them,
//! instead of one each.
use std::collections::HashMap;
use std::sync::Arc;

use entity::Task;
use sea_orm::sea_query::UpdateStatement;
use sea_orm::{ConnectionTrait, Statement, TryIntoModel};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;
use uuid::Uuid;

use super::live::changelog::Changelog;
use super::queue::Queue;
use super::rows::{NewRow, ids_of, insert_rows, rows_of};
use crate::db::deadline::{self, Deadline};
use crate::db::{Backend, Db};
use crate::error::{TaskError, TaskResult};

/// Most creates one statement inserts.
const MAX_CREATE_BATCH: usize = 64;
/// Most insert statements one inserter has in flight at once on PostgreSQL
/// (see [`insert_queued`]); fewer when the pool is small.
const STATEMENTS_IN_FLIGHT: usize = 4;
/// Inserters of batched creates on PostgreSQL:
/// one per four cores, one to four. While one commits (waits for its WAL
/// flush), the next batch executes; but every statement costs CPU of its
/// own, and on a machine of a few cores fewer, larger batches get more
/// creates through (docs/benchmarks.md, "Inserters"). Each owner's creates
/// go to one of them, so an owner's creates are written one statement
/// after the other and read each other's turns.
fn postgres_inserters() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / 4).clamp(1, 4)
}

/// Writes changes: every statement that changes a task goes through here.
/// The triggers log each change in the same statement; the writer then only
/// wakes this instance's reader of the log.
#[derive(Clone)]
pub(super) struct Writer {
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
    pub(super) fn new(db: Db, log: Changelog, queue: Arc<Queue>) -> Self {
        Self { db, log, queue }
    }

    pub(super) fn db(&self) -> &Db {
        &self.db
    }

    /// The change log and this instance's reader of it.
    pub(super) fn log(&self) -> &Changelog {
        &self.log
    }

    pub(super) fn statement<S: sea_orm::StatementBuilder>(&self, statement: &S) -> Statement {
        self.db.get_database_backend().build(statement)
    }

    /// Runs the statement on `conn` (a transaction the caller commits, then
    /// calls [`Self::wrote`]) and returns the rows it wrote.
    pub(super) async fn rows_in<C, S>(&self, conn: &C, statement: &S) -> TaskResult<Vec<Task>>
    where
        C: ConnectionTrait,
        S: sea_orm::StatementBuilder,
    {
        rows_of(conn, self.statement(statement)).await
    }

    /// Runs the statement on its own (autocommit) and returns its rows.
    pub(super) async fn commit<S>(&self, statement: &S) -> TaskResult<Vec<Task>>
    where
        S: sea_orm::StatementBuilder,
    {
        self.commit_raw(self.statement(statement)).await
    }

    /// [`Self::commit`] of a statement already built.
    pub(super) async fn commit_raw(&self, statement: Statement) -> TaskResult<Vec<Task>> {
        let _wake = WakeReader(&self.log);
        rows_of(&self.db, statement).await
    }

    /// Runs a statement already built on its own and returns its rows as
    /// they come (what it returns is not a whole task).
    pub(super) async fn commit_query(
        &self,
        statement: Statement,
    ) -> TaskResult<Vec<sea_orm::QueryResult>> {
        let _wake = WakeReader(&self.log);
        Ok(self.db.query_all_raw(statement).await?)
    }

    /// Wakes the log's reader after a transaction that wrote committed.
    pub(super) fn wrote(&self) {
        self.log.wrote();
    }

    /// One UPDATE … RETURNING *, on its own.
    pub(super) async fn update(&self, mut update: UpdateStatement) -> TaskResult<Vec<Task>> {
        update.returning_all();
        self.commit(&update).await
    }

    /// Inserts `batch` (turns and budgets assigned) in one statement and
    /// answers each create: its new row, or `None` when its idempotency key
    /// was taken.
    async fn write(&self, batch: Vec<QueuedCreate>) {
        let keyed = batch
            .iter()
            .any(|create| create.row.model.idempotency_key.as_ref().is_some());
        let rows = batch
            .iter()
            .map(|create| NewRow {
                model: create.row.model.clone(),
                max_attempts: create.row.max_attempts,
            })
            .collect();
        // Every column is set here, so an inserted task is its row as made:
        // the insert returns only the ids it wrote.
        let inserted = match insert_rows(rows, keyed, self.db.backend()) {
            Ok(insert) => self.commit_query(insert).await,
            Err(err) => Err(err),
        };
        match inserted.and_then(ids_of) {
            Ok(inserted) => {
                for create in batch {
                    let made = inserted
                        .contains(&create.id)
                        .then(|| create.row.model.try_into_model())
                        .transpose()
                        .map_err(TaskError::from);
                    let _ = create.reply.send(made);
                }
            }
            Err(err) if batch.len() > 1 && !err.is_unavailable() => {
                // One row the database refused must not fail the others.
                tracing::warn!(error = %err, rows = batch.len(), "a batched insert failed; inserting its rows one by one");
                for create in batch {
                    Box::pin(self.write(vec![create])).await;
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
struct QueuedCreate {
    row: NewRow,
    id: Uuid,
    reply: oneshot::Sender<TaskResult<Option<Task>>>,
    /// The create's span: its batch's insert is traced under the first
    /// create's, linked to the others'.
    span: tracing::Span,
    /// Its request's deadline: the batch's database calls end by the latest
    /// of its creates' (each request is answered by its own in any case).
    deadline: Option<Deadline>,
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
/// statement; there are [`postgres_inserters`] of these (one on SQLite,
/// which has one writer). Up to `in_flight` statements of one inserter run
/// at once: while one waits for its commit's WAL flush, the creates that
/// arrive meanwhile are inserted by the next, and the flushes go together,
/// so no create waits for another batch's flush while a slot is free. A
/// create that finds a slot free is inserted at once, alone; under load,
/// creates gather while every slot is busy.
///
/// Turns are assigned here, one batch after the other, counting the turns
/// that batches still in flight gave their owners ([`InFlight`]), so an
/// owner's creates never share a turn whatever commits first. It runs
/// apart from the requests, so a client that hangs up cannot stop a batch
/// that others wait on.
async fn insert_queued(
    writer: Writer,
    mut queue: mpsc::UnboundedReceiver<QueuedCreate>,
    in_flight: usize,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let turns = Arc::new(std::sync::Mutex::new(InFlight::default()));
    let mut batch = Vec::with_capacity(MAX_CREATE_BATCH);
    for seq in 0u64.. {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let received = queue.recv_many(&mut batch, MAX_CREATE_BATCH).await;
        if received == 0 {
            return;
        }
        // A create whose request's deadline passed while it waited has been
        // answered already: it is not written.
        let now = Deadline::now();
        let (late, mut batch): (Vec<_>, Vec<_>) = std::mem::take(&mut batch)
            .into_iter()
            .partition(|create| create.deadline.is_some_and(|deadline| deadline <= now));
        for create in late {
            let _ = create.reply.send(Err(TaskError::Unavailable(
                "its request's deadline passed before it was inserted".into(),
            )));
        }
        if batch.is_empty() {
            continue;
        }
        // One create near its deadline must not cut the batch for all the
        // others: its own request answers it at its deadline anyway. A
        // create without a deadline (no request) has no end either.
        let deadline = batch
            .iter()
            .map(|create| create.deadline)
            .collect::<Option<Vec<_>>>()
            .and_then(|deadlines| deadlines.into_iter().max());
        let span = batch_span(&batch);
        let ahead = turns.lock().unwrap_or_else(|e| e.into_inner()).of(&batch);
        // Each row takes its owner's next turn (an owner's later rows in
        // this batch the turns after it) and its budget of attempts.
        let assigned = deadline::scoped(
            deadline,
            writer
                .queue
                .assign(batch.iter_mut().map(|c| &mut c.row), &ahead)
                .instrument(span.clone()),
        )
        .await;
        if let Err(err) = assigned {
            for create in batch {
                let _ = create.reply.send(Err(err.clone()));
            }
            continue;
        }
        turns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .hold(&batch, seq);
        let (writer, turns) = (writer.clone(), turns.clone());
        tokio::spawn(async move {
            let owners: Vec<String> = batch
                .iter()
                .map(|c| c.row.model.user_id.as_ref().clone())
                .collect();
            deadline::scoped(deadline, writer.write(batch).instrument(span)).await;
            turns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .release(&owners, seq);
            drop(slot);
        });
    }
}

/// The last turn each owner got in a batch still being written, and that
/// batch's number: the next batch's turns for that owner come after it,
/// even before the database shows it.
#[derive(Default)]
struct InFlight(HashMap<String, (i64, u64)>);

impl InFlight {
    /// The turns in flight of the owners of `batch`.
    fn of(&self, batch: &[QueuedCreate]) -> HashMap<String, i64> {
        batch
            .iter()
            .filter_map(|c| {
                let owner = c.row.model.user_id.as_ref();
                self.0.get(owner).map(|(turn, _)| (owner.clone(), *turn))
            })
            .collect()
    }

    /// Records the turns batch `seq` gave its owners.
    fn hold(&mut self, batch: &[QueuedCreate], seq: u64) {
        for create in batch {
            let turn = *create.row.model.fair_rank.as_ref();
            let owner = create.row.model.user_id.as_ref().clone();
            let entry = self.0.entry(owner).or_insert((turn, seq));
            if turn >= entry.0 {
                *entry = (turn, seq);
            }
        }
    }

    /// Forgets what batch `seq` held, once it is written; a later batch's
    /// turns for the same owner stay.
    fn release(&mut self, owners: &[String], seq: u64) {
        for owner in owners {
            if self
                .0
                .get(owner)
                .is_some_and(|(_, held_by)| *held_by == seq)
            {
                self.0.remove(owner);
            }
        }
    }
}

/// The queues of creates waiting to be inserted, one per inserter (see
/// [`insert_queued`]); the inserters stop when this is dropped.
pub(super) struct Inserters(Vec<mpsc::UnboundedSender<QueuedCreate>>);

impl Inserters {
    /// Starts the inserters of `writer` on the current tokio runtime:
    /// [`postgres_inserters`] on PostgreSQL, one on SQLite (one writer).
    pub(super) fn start(writer: &Writer) -> Self {
        // SQLite has one writer: a second statement would only wait for it.
        // On PostgreSQL the inserts in flight hold at most half the pool,
        // so claims and reads still get connections under a burst.
        let (inserters, in_flight) = match writer.db.backend() {
            Backend::Postgres => {
                let inserters = postgres_inserters();
                let half = writer.db.settings().max_connections as usize / 2;
                (inserters, (half / inserters).clamp(1, STATEMENTS_IN_FLIGHT))
            }
            Backend::Sqlite => (1, 1),
        };
        Self(
            (0..inserters)
                .map(|_| {
                    let (creates, waiting) = mpsc::unbounded_channel();
                    tokio::spawn(insert_queued(writer.clone(), waiting, in_flight));
                    creates
                })
                .collect(),
        )
    }

    /// Inserts `model` with its owner's next turn, in the next batch of its
    /// owner's inserter; `None` when its idempotency key was taken. The
    /// insert is traced under the current span.
    pub(super) async fn insert(&self, row: NewRow) -> TaskResult<Option<Task>> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let hash =
            BuildHasherDefault::<DefaultHasher>::default().hash_one(row.model.user_id.as_ref());
        let inserter = &self.0[hash as usize % self.0.len()];
        let (reply, inserted) = oneshot::channel();
        let stopped = || TaskError::Internal("the insert queue stopped".into());
        inserter
            .send(QueuedCreate {
                id: *row.model.id.as_ref(),
                row,
                reply,
                span: tracing::Span::current(),
                deadline: deadline::current(),
            })
            .map_err(|_| stopped())?;
        inserted.await.map_err(|_| stopped())?
    }
}
