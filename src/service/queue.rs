//! What decides which task a worker gets, and when a failed one runs again:
//! the claim order (priority, the owners' turns, `run_at`), the policy of
//! each task type (attempts, backoff, a cap on how many run at once,
//! pause), and the backoff of a retryable failure.
//!
//! **Turns.** Each pending task has a `fair_rank`, its turn among its
//! owner's pending tasks: a create takes one past the owner's last pending
//! turn, or the turn now being served at its priority (the lowest pending
//! rank there), whichever is later. Claims take the
//! lowest rank first within a priority, so an owner who queues 30 tasks
//! and one who queues 1 alternate: the second owner's task is claimed first
//! or second. The rank is read when the create is written. One instance
//! assigns an owner's creates their turns one batch after the other (one
//! batch takes consecutive turns), counting the turns of its batches still
//! in flight, so they never share a turn; creates of one owner racing on
//! two instances, or a `createTasks` racing the same owner's `createTask`,
//! may take the same turn, which only orders them by `run_at` instead.
//!
//! **The cap.** A claim that may take a capped type counts that type's
//! PROCESSING tasks in the claim statement. On SQLite the statement is the
//! only writer, so the count holds. On PostgreSQL the claim first locks the
//! capped types' policy rows (`FOR UPDATE`, in name order) in its
//! transaction, so claims of one capped type take turns and each counts
//! every claim committed before it. Claims whose types have no cap take no
//! lock: they exclude capped types in the statement and run as before.
//! Which types are capped is re-read at most once a second per instance
//! (and at once after this instance sets a policy); until then a type
//! capped on another instance is skipped, never over-claimed.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use entity::task_types::{ActiveModel as PolicyRow, Column as PolicyColumn};
use entity::tasks::Column;
use entity::{TaskStatus, TaskTypePolicy, TaskTypes, Tasks};
use sea_orm::sea_query::{
    Alias, Asterisk, Condition, Expr, ExprTrait, LockBehavior, LockType, OnConflict, Order, Query,
    QueryStatementBuilder, SelectStatement, UpdateStatement,
};
use sea_orm::{
    ActiveValue::Set, ConnectionTrait, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
    QueryTrait, Statement,
};

use super::transitions::Move;
use super::validate;
use crate::db::{Backend, Db};
use crate::error::{TaskError, TaskResult};

/// Lowest and highest `priority`.
pub const PRIORITIES: std::ops::RangeInclusive<i32> = -100..=100;
/// What `maxAttempts` may be, on a task or a policy.
pub const MAX_ATTEMPTS: std::ops::RangeInclusive<i32> = 1..=100;
/// What a policy's `concurrency` may be.
pub const CONCURRENCY: std::ops::RangeInclusive<i32> = 1..=100_000;
/// Longest backoff a policy may ask for: a week.
pub const MAX_BACKOFF_SECONDS: f64 = 7.0 * 24.0 * 3600.0;
/// Largest backoff factor.
pub const MAX_BACKOFF_FACTOR: f64 = 100.0;
/// How long this instance trusts what it read about capped types.
const CAPPED_FRESH_FOR: Duration = Duration::from_secs(1);

/// How long a retryable failure waits before its next attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial_seconds: f64,
    pub factor: f64,
    pub max_seconds: f64,
    /// Each delay is drawn from its upper half, so that tasks that failed
    /// together do not all come back at once.
    pub jitter: bool,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial_seconds: 1.0,
            factor: 2.0,
            max_seconds: 3600.0,
            jitter: true,
        }
    }
}

impl Backoff {
    /// The delay after the `attempt`th attempt (1 for the first) failed:
    /// `initial × factor^(attempt−1)`, at most `max`, then jittered by
    /// `sample` (in [0, 1)) into its upper half.
    pub fn delay(&self, attempt: i32, sample: f64) -> Duration {
        let exponent = Ord::max(attempt.saturating_sub(1), 0);
        let full = (self.initial_seconds * self.factor.powi(exponent)).min(self.max_seconds);
        let seconds = if self.jitter {
            full * (0.5 + 0.5 * sample.clamp(0.0, 1.0))
        } else {
            full
        };
        Duration::try_from_secs_f64(seconds.max(0.0)).unwrap_or(Duration::ZERO)
    }
}

/// A task type's policy as it applies: the defaults where none was set.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub max_attempts: i32,
    pub backoff: Backoff,
    pub concurrency: Option<i32>,
    /// Most tasks PROCESSING at once with one concurrency key.
    pub concurrency_per_key: Option<i32>,
    pub rate_limit: Option<RateLimit>,
    pub paused: bool,
}

/// At most `count` claims per `period_seconds`, of the type as a whole or,
/// with `per_key`, of each concurrency key (a token bucket: see `rates`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub count: i32,
    pub period_seconds: i32,
    pub per_key: bool,
}

/// What a rate limit's `count` may be.
pub const RATE_COUNT: std::ops::RangeInclusive<i32> = 1..=1_000_000;
/// What a rate limit's `period_seconds` may be: up to a day.
pub const RATE_PERIOD_SECONDS: std::ops::RangeInclusive<i32> = 1..=86_400;

impl RateLimit {
    fn of(row: &TaskTypePolicy) -> Option<Self> {
        Some(Self {
            count: row.rate_count?,
            period_seconds: row.rate_period_seconds?,
            per_key: row.rate_per_key,
        })
    }
}

impl Policy {
    fn of(row: Option<&TaskTypePolicy>, default_max_attempts: i32) -> Self {
        match row {
            None => Self {
                max_attempts: default_max_attempts,
                backoff: Backoff::default(),
                concurrency: None,
                concurrency_per_key: None,
                rate_limit: None,
                paused: false,
            },
            Some(row) => Self {
                max_attempts: row.max_attempts.unwrap_or(default_max_attempts),
                backoff: Backoff {
                    initial_seconds: row.backoff_initial_seconds,
                    factor: row.backoff_factor,
                    max_seconds: row.backoff_max_seconds,
                    jitter: row.backoff_jitter,
                },
                concurrency: row.concurrency,
                concurrency_per_key: row.concurrency_per_key,
                rate_limit: RateLimit::of(row),
                paused: row.paused,
            },
        }
    }
}

/// A change to a policy: `None` leaves a field as it was; for the fields
/// that may be unset, `Some(None)` unsets it (the default attempts, no cap).
#[derive(Debug, Clone, Default)]
pub struct PolicyChange {
    pub max_attempts: Option<Option<i32>>,
    pub initial_seconds: Option<f64>,
    pub factor: Option<f64>,
    pub max_seconds: Option<f64>,
    pub jitter: Option<bool>,
    pub concurrency: Option<Option<i32>>,
    pub concurrency_per_key: Option<Option<i32>>,
    pub rate_limit: Option<Option<RateLimit>>,
    pub paused: Option<bool>,
}

/// A task type: its policy, and how many of its tasks wait and run.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskType {
    pub task_type: String,
    pub policy: Policy,
    pub pending: i64,
    pub processing: i64,
}

pub fn check_priority(priority: i32) -> TaskResult<()> {
    if !PRIORITIES.contains(&priority) {
        return Err(TaskError::invalid(format!(
            "priority must be between {} and {}, got {priority}",
            PRIORITIES.start(),
            PRIORITIES.end()
        )));
    }
    Ok(())
}

pub fn check_max_attempts(max_attempts: i32) -> TaskResult<()> {
    if !MAX_ATTEMPTS.contains(&max_attempts) {
        return Err(TaskError::invalid(format!(
            "maxAttempts must be between {} and {}, got {max_attempts}",
            MAX_ATTEMPTS.start(),
            MAX_ATTEMPTS.end()
        )));
    }
    Ok(())
}

fn check_seconds(field: &str, value: f64) -> TaskResult<()> {
    if !value.is_finite() || !(0.0..=MAX_BACKOFF_SECONDS).contains(&value) {
        return Err(TaskError::invalid(format!(
            "backoff.{field} must be between 0 and {MAX_BACKOFF_SECONDS} seconds, got {value}"
        )));
    }
    Ok(())
}

/// The policy `change` makes of `current`, or why it is refused.
fn apply(current: &Policy, stored_max: Option<i32>, change: &PolicyChange) -> TaskResult<Row> {
    let max_attempts = change.max_attempts.unwrap_or(stored_max);
    if let Some(max) = max_attempts {
        check_max_attempts(max)?;
    }
    let backoff = Backoff {
        initial_seconds: change
            .initial_seconds
            .unwrap_or(current.backoff.initial_seconds),
        factor: change.factor.unwrap_or(current.backoff.factor),
        max_seconds: change.max_seconds.unwrap_or(current.backoff.max_seconds),
        jitter: change.jitter.unwrap_or(current.backoff.jitter),
    };
    check_seconds("initialSeconds", backoff.initial_seconds)?;
    check_seconds("maxSeconds", backoff.max_seconds)?;
    if !backoff.factor.is_finite() || !(1.0..=MAX_BACKOFF_FACTOR).contains(&backoff.factor) {
        return Err(TaskError::invalid(format!(
            "backoff.factor must be between 1 and {MAX_BACKOFF_FACTOR}, got {}",
            backoff.factor
        )));
    }
    if backoff.max_seconds < backoff.initial_seconds {
        return Err(TaskError::invalid(format!(
            "backoff.maxSeconds ({}) must not be less than backoff.initialSeconds ({})",
            backoff.max_seconds, backoff.initial_seconds
        )));
    }
    let concurrency = change.concurrency.unwrap_or(current.concurrency);
    let concurrency_per_key = change
        .concurrency_per_key
        .unwrap_or(current.concurrency_per_key);
    for (field, value) in [
        ("concurrency", concurrency),
        ("concurrencyPerKey", concurrency_per_key),
    ] {
        if let Some(cap) = value
            && !CONCURRENCY.contains(&cap)
        {
            return Err(TaskError::invalid(format!(
                "{field} must be between {} and {}, or null for no cap; got {cap}",
                CONCURRENCY.start(),
                CONCURRENCY.end()
            )));
        }
    }
    let rate_limit = change.rate_limit.unwrap_or(current.rate_limit);
    if let Some(limit) = rate_limit {
        for (field, value, range) in [
            ("rateLimit.count", limit.count, RATE_COUNT),
            (
                "rateLimit.periodSeconds",
                limit.period_seconds,
                RATE_PERIOD_SECONDS,
            ),
        ] {
            if !range.contains(&value) {
                return Err(TaskError::invalid(format!(
                    "{field} must be between {} and {}, got {value}",
                    range.start(),
                    range.end()
                )));
            }
        }
    }
    Ok(Row {
        max_attempts,
        backoff,
        concurrency,
        concurrency_per_key,
        rate_limit,
        paused: change.paused.unwrap_or(current.paused),
    })
}

/// A policy as stored: `max_attempts` null means the server's default.
struct Row {
    max_attempts: Option<i32>,
    backoff: Backoff,
    concurrency: Option<i32>,
    concurrency_per_key: Option<i32>,
    rate_limit: Option<RateLimit>,
    paused: bool,
}

/// The policies of task types, and which types are capped, as this
/// instance last read them.
pub struct Queue {
    db: Db,
    default_max_attempts: i32,
    capped: std::sync::Mutex<Option<(Instant, Arc<Capped>)>>,
}

/// The types with a cap (overall or per key) or a rate limit, as one
/// instance last read them.
#[derive(Debug, Default)]
pub struct Capped {
    /// Every such type, by name.
    pub types: Vec<String>,
    /// Those with a cap per concurrency key.
    pub keyed: Vec<String>,
    /// Those with a rate limit, and their limits.
    pub rated: HashMap<String, RateLimit>,
}

/// The capped types a claim may reach.
#[derive(Debug, Default)]
pub struct Reach {
    pub capped: Vec<String>,
    /// One of them has a cap per key or a rate limit: a batch claims one
    /// task after the other.
    pub one_by_one: bool,
    /// The rate limits among them.
    pub rated: HashMap<String, RateLimit>,
}

impl Queue {
    pub fn new(db: Db, default_max_attempts: i32) -> Self {
        Self {
            db,
            default_max_attempts,
            capped: std::sync::Mutex::new(None),
        }
    }

    async fn row(&self, task_type: &str) -> TaskResult<Option<TaskTypePolicy>> {
        Ok(self
            .db
            .reads()
            .query_one_raw(
                self.db
                    .get_database_backend()
                    .build(&TaskTypes::find_by_id(task_type.to_owned()).into_query()),
            )
            .await?
            .map(|row| TaskTypePolicy::from_query_result(&row, ""))
            .transpose()?)
    }

    /// The policy `task_type` has now.
    pub async fn policy(&self, task_type: &str) -> TaskResult<Policy> {
        Ok(Policy::of(
            self.row(task_type).await?.as_ref(),
            self.default_max_attempts,
        ))
    }

    /// Sets what `change` gives of `task_type`'s policy; the rest stays.
    pub async fn set_policy(&self, task_type: &str, change: &PolicyChange) -> TaskResult<()> {
        validate::task_type(task_type)?;
        let stored = self.row(task_type).await?;
        let current = Policy::of(stored.as_ref(), self.default_max_attempts);
        let row = apply(
            &current,
            stored.as_ref().and_then(|row| row.max_attempts),
            change,
        )?;
        let model = PolicyRow {
            task_type: Set(task_type.to_owned()),
            max_attempts: Set(row.max_attempts),
            backoff_initial_seconds: Set(row.backoff.initial_seconds),
            backoff_factor: Set(row.backoff.factor),
            backoff_max_seconds: Set(row.backoff.max_seconds),
            backoff_jitter: Set(row.backoff.jitter),
            concurrency: Set(row.concurrency),
            concurrency_per_key: Set(row.concurrency_per_key),
            rate_count: Set(row.rate_limit.map(|limit| limit.count)),
            rate_period_seconds: Set(row.rate_limit.map(|limit| limit.period_seconds)),
            rate_per_key: Set(row.rate_limit.is_some_and(|limit| limit.per_key)),
            paused: Set(row.paused),
            updated_at: Set(super::clock::now()),
        };
        // Two changes racing each write their whole row: the last wins.
        let upsert = TaskTypes::insert(model)
            .on_conflict(
                OnConflict::column(PolicyColumn::TaskType)
                    .update_columns([
                        PolicyColumn::MaxAttempts,
                        PolicyColumn::BackoffInitialSeconds,
                        PolicyColumn::BackoffFactor,
                        PolicyColumn::BackoffMaxSeconds,
                        PolicyColumn::BackoffJitter,
                        PolicyColumn::Concurrency,
                        PolicyColumn::ConcurrencyPerKey,
                        PolicyColumn::RateCount,
                        PolicyColumn::RatePeriodSeconds,
                        PolicyColumn::RatePerKey,
                        PolicyColumn::Paused,
                        PolicyColumn::UpdatedAt,
                    ])
                    .to_owned(),
            )
            .into_query();
        self.db
            .execute_raw(self.db.get_database_backend().build(&upsert))
            .await?;
        *self.capped.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(())
    }

    /// Every type with a policy or with tasks, by name, with its counts.
    pub async fn task_types(&self, counts: Vec<(String, i64, i64)>) -> TaskResult<Vec<TaskType>> {
        let select = TaskTypes::find()
            .order_by_asc(PolicyColumn::TaskType)
            .into_query();
        let rows = self
            .db
            .reads()
            .query_all_raw(self.db.get_database_backend().build(&select))
            .await?
            .iter()
            .map(|row| TaskTypePolicy::from_query_result(row, ""))
            .collect::<Result<Vec<_>, _>>()?;
        let mut types: std::collections::BTreeMap<String, TaskType> = rows
            .iter()
            .map(|row| {
                let policy = Policy::of(Some(row), self.default_max_attempts);
                (
                    row.task_type.clone(),
                    TaskType {
                        task_type: row.task_type.clone(),
                        policy,
                        pending: 0,
                        processing: 0,
                    },
                )
            })
            .collect();
        for (task_type, pending, processing) in counts {
            let entry = types.entry(task_type.clone()).or_insert_with(|| TaskType {
                task_type,
                policy: Policy::of(None, self.default_max_attempts),
                pending: 0,
                processing: 0,
            });
            entry.pending = pending;
            entry.processing = processing;
        }
        Ok(types.into_values().collect())
    }

    /// The capped types a claim of `types` (any when empty) may reach, as
    /// read at most a second ago.
    pub async fn capped_in_reach(&self, types: &[String]) -> TaskResult<Reach> {
        let capped = self.capped().await?;
        let reached = |t: &String| types.is_empty() || types.contains(t);
        let rated: HashMap<String, RateLimit> = capped
            .rated
            .iter()
            .filter(|(t, _)| reached(t))
            .map(|(t, limit)| (t.clone(), *limit))
            .collect();
        Ok(Reach {
            capped: capped
                .types
                .iter()
                .filter(|t| reached(t))
                .cloned()
                .collect(),
            one_by_one: !rated.is_empty() || capped.keyed.iter().any(reached),
            rated,
        })
    }

    /// The capped types, as read at most a second ago.
    pub async fn capped(&self) -> TaskResult<Arc<Capped>> {
        if let Some((read_at, capped)) = &*self.capped.lock().unwrap_or_else(|e| e.into_inner())
            && read_at.elapsed() < CAPPED_FRESH_FOR
        {
            return Ok(capped.clone());
        }
        let select = TaskTypes::find()
            .filter(is_capped())
            .order_by_asc(PolicyColumn::TaskType)
            .into_query();
        let mut capped = Capped::default();
        for row in self
            .db
            .reads()
            .query_all_raw(self.db.get_database_backend().build(&select))
            .await?
        {
            let policy = TaskTypePolicy::from_query_result(&row, "")?;
            if policy.concurrency_per_key.is_some() {
                capped.keyed.push(policy.task_type.clone());
            }
            if let Some(limit) = RateLimit::of(&policy) {
                capped.rated.insert(policy.task_type.clone(), limit);
            }
            capped.types.push(policy.task_type);
        }
        let capped = Arc::new(capped);
        *self.capped.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), capped.clone()));
        Ok(capped)
    }
}

/// A type with a cap (on how many of its tasks run, overall or with one
/// concurrency key) or a rate limit, over `task_types`' columns: the claim
/// built here and `claimTasks`' statement (`batch`) say it alike.
pub(super) const CAPPED: &str =
    "(concurrency IS NOT NULL OR concurrency_per_key IS NOT NULL OR rate_count IS NOT NULL)";

/// [`CAPPED`], for a statement built with sea-query.
fn is_capped() -> Condition {
    Condition::all().add(Expr::cust(CAPPED))
}

/// Locks the policy rows of `types` that have a cap, in name order, until
/// the transaction ends; returns the types it locked (PostgreSQL).
pub fn lock_capped(types: &[String]) -> SelectStatement {
    let mut select = Query::select();
    select
        .column(PolicyColumn::TaskType)
        .from(TaskTypes)
        .cond_where(is_capped())
        .and_where(Expr::col(PolicyColumn::TaskType).is_in(types.iter().cloned()))
        .order_by(PolicyColumn::TaskType, Order::Asc)
        .lock(LockType::Update);
    select
}

/// Which capped types a claim may take, after counting what they run.
pub enum Caps<'a> {
    /// Every capped type, counted in the statement (SQLite: one writer).
    Counted,
    /// Only these, whose policy rows the claim's transaction has locked;
    /// other capped types are skipped.
    Locked(&'a [String]),
}

impl<'a> Caps<'a> {
    /// What a claim that `locked` these types counts: on PostgreSQL those;
    /// on SQLite every capped type.
    pub fn of(postgres: bool, locked: &'a [String]) -> Self {
        if postgres {
            Self::Locked(locked)
        } else {
            Self::Counted
        }
    }
}

/// The claim: the first runnable task in claim order (of `types`, or any
/// when empty) becomes PROCESSING under `worker_id`'s lease until `until`
/// ([`Move::Claim`]).
///
/// Runnable: PENDING, waiting on no dependency, `run_at` passed, its type
/// not paused and under its cap, its key under its cap per key, and not of
/// an `empty` rate bucket. Order: priority (highest first), then turn
/// (`fair_rank`), then `run_at`, then id.
pub fn claim(
    types: &[String],
    caps: Caps<'_>,
    empty: &super::rates::Empty,
    at: DateTime<Utc>,
    worker_id: &str,
    until: DateTime<Utc>,
) -> UpdateStatement {
    let running = Alias::new("running");
    let mut count = Query::select();
    count
        .expr(Expr::col(Asterisk).count())
        .from_as(Tasks, running.clone())
        .and_where(
            Expr::col((running.clone(), Column::TaskType))
                .equals((TaskTypes, PolicyColumn::TaskType)),
        )
        .and_where(Expr::col((running, Column::Status)).eq(TaskStatus::Processing.as_str()));
    let at_cap = Expr::col(PolicyColumn::Concurrency).lte(Expr::SubQuery(
        None,
        Box::new(count.into_sub_query_statement()),
    ));
    let full = Expr::col(PolicyColumn::Concurrency)
        .is_not_null()
        .and(at_cap);
    let mut blocked_if = Condition::any()
        .add(Expr::col(PolicyColumn::Paused).eq(true))
        .add(full);
    if let Caps::Locked(locked) = caps {
        // A capped type this claim did not lock is skipped, never over-claimed.
        blocked_if = blocked_if.add(
            Condition::all()
                .add(is_capped())
                .add(Expr::col(PolicyColumn::TaskType).is_not_in(locked.iter().cloned())),
        );
    }
    let mut blocked = Query::select();
    blocked
        .column(PolicyColumn::TaskType)
        .from(TaskTypes)
        .cond_where(blocked_if);

    // On PostgreSQL, SKIP LOCKED lets concurrent claimers pass each other
    // instead of queueing on one row.
    let mut first = Query::select();
    first
        .column(Column::Id)
        .from(Tasks)
        .and_where(Expr::col(Column::Status).eq(TaskStatus::Pending.as_str()))
        .and_where(Expr::col(Column::WaitingOn).eq(0))
        .and_where(Expr::col(Column::RunAt).lte(at))
        .and_where(Expr::col(Column::TaskType).not_in_subquery(blocked))
        .and_where(key_has_room())
        .cond_where(super::rates::not_empty(empty).unwrap_or_else(Condition::all))
        .limit(1)
        .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
    crate::db::dialect::order_by_claim(&mut first);
    if !types.is_empty() {
        first.and_where(Expr::col(Column::TaskType).is_in(types.iter().cloned()));
    }
    // `id = (subquery)`, not `id IN (subquery)`: PostgreSQL runs a scalar
    // subquery once, but may rescan an IN subquery per row, and each rescan
    // skips the rows this statement already locked and takes the next one:
    // one claim would take every pending task.
    let mut stmt = Move::Claim.update(at);
    stmt.and_where(Expr::col(Column::Id).eq(first))
        .value(Column::Attempts, Expr::col(Column::Attempts).add(1))
        .value(Column::WorkerId, worker_id)
        .value(Column::LeaseExpiresAt, until)
        .value(Column::StartedAt, Expr::col(Column::StartedAt).if_null(at));
    stmt
}

/// A task's concurrency key has room: it has none, or its type has no cap
/// per key, or fewer than that cap of the type's tasks with the key run
/// (counted in `tasks_key_running_idx`). Read from the claim's candidate
/// row, `tasks`.
///
/// The status is written into the text (a constant, not input): sea-query
/// renumbers no placeholder of a custom expression for SQLite, so a bound
/// value here would take another's place.
pub(super) fn key_has_room() -> Expr {
    Expr::cust(format!(
        "NOT EXISTS (SELECT 1 FROM task_types k WHERE k.task_type = tasks.type \
         AND k.concurrency_per_key IS NOT NULL AND tasks.concurrency_key IS NOT NULL \
         AND k.concurrency_per_key <= (SELECT COUNT(*) FROM tasks r WHERE r.type = tasks.type \
         AND r.concurrency_key = tasks.concurrency_key AND r.status = '{}'))",
        TaskStatus::Processing.as_str()
    ))
}

/// Reads, in one statement, what a batch of creates needs: each owner's
/// last pending turn, the turn being served at each priority, and each
/// type's attempts. The lists travel as JSON text: one parameter each, and
/// the statement stays the same size whatever the batch.
fn batch_facts(backend: Backend) -> String {
    let pending = TaskStatus::Pending.as_str();
    format!(
        "SELECT 'owner' AS kind, value AS name, (SELECT fair_rank FROM tasks \
             WHERE user_id = value AND status = '{pending}' ORDER BY fair_rank DESC LIMIT 1) AS n \
         FROM {owners} \
         UNION ALL \
         SELECT 'priority', CAST(value AS TEXT), (SELECT fair_rank FROM tasks \
             WHERE status = '{pending}' AND priority = CAST(value AS INTEGER) \
             ORDER BY fair_rank LIMIT 1) \
         FROM {priorities} \
         UNION ALL \
         SELECT 'type', task_type, CAST(max_attempts AS BIGINT) FROM task_types \
         WHERE task_type IN (SELECT value FROM {types})",
        owners = backend.json_texts("$1"),
        priorities = backend.json_texts("$2"),
        types = backend.json_texts("$3"),
    )
}

impl Queue {
    /// Gives each create of `batch` (in order) its turn and its budget of
    /// attempts. A turn is one past its owner's last pending turn (or the
    /// owner's previous create in the batch), or the turn being served at
    /// its priority, whichever is later. The budget is the create's own,
    /// else its type's policy, else the default.
    pub(super) async fn assign<'a>(
        &self,
        batch: impl IntoIterator<Item = &'a mut super::rows::NewRow>,
        in_flight: &std::collections::HashMap<String, i64>,
    ) -> TaskResult<()> {
        self.assign_on(&self.db.reads(), batch, in_flight).await
    }

    /// [`Self::assign`], reading on `conn`: a transaction that holds
    /// SQLite's write lock reads on its own connection, not on one it
    /// would wait for while others wait for its lock.
    pub(super) async fn assign_on<'a>(
        &self,
        conn: &impl ConnectionTrait,
        batch: impl IntoIterator<Item = &'a mut super::rows::NewRow>,
        in_flight: &std::collections::HashMap<String, i64>,
    ) -> TaskResult<()> {
        use std::collections::{BTreeSet, HashMap};
        let mut batch: Vec<&mut super::rows::NewRow> = batch.into_iter().collect();
        let owners: BTreeSet<&str> = batch
            .iter()
            .map(|c| c.model.user_id.as_ref().as_str())
            .collect();
        let priorities: BTreeSet<i32> = batch.iter().map(|c| *c.model.priority.as_ref()).collect();
        let types: BTreeSet<&str> = batch
            .iter()
            .filter(|c| c.max_attempts.is_none())
            .map(|c| c.model.task_type.as_ref().as_str())
            .collect();
        let json = |names: Vec<String>| serde_json::Value::from(names).to_string();
        let statement = Statement::from_sql_and_values(
            self.db.get_database_backend(),
            batch_facts(self.db.backend()),
            [
                json(owners.iter().map(|o| o.to_string()).collect()).into(),
                json(priorities.iter().map(|p| p.to_string()).collect()).into(),
                json(types.iter().map(|t| t.to_string()).collect()).into(),
            ],
        );
        let mut last_turn = HashMap::new();
        let mut served = HashMap::new();
        let mut budget = HashMap::new();
        for row in conn.query_all_raw(statement).await? {
            let kind: String = row.try_get_by_index(0)?;
            let name: String = row.try_get_by_index(1)?;
            let Some(n) = row.try_get_by_index::<Option<i64>>(2)? else {
                continue;
            };
            match kind.as_str() {
                "owner" => {
                    last_turn.insert(name, n);
                }
                "priority" => {
                    served.insert(name.parse::<i32>().unwrap_or_default(), n);
                }
                _ => {
                    budget.insert(name, n);
                }
            }
        }
        for create in batch.iter_mut() {
            let priority = *create.model.priority.as_ref();
            let owner = create.model.user_id.as_ref().clone();
            let now_served = served.get(&priority).copied().unwrap_or(0);
            let last = match (last_turn.get(&owner), in_flight.get(&owner)) {
                (Some(a), Some(b)) => Some(Ord::max(*a, *b)),
                (a, b) => a.or(b).copied(),
            };
            let turn = last.map_or(now_served, |last| Ord::max(last + 1, now_served));
            last_turn.insert(owner, turn);
            create.model.fair_rank = Set(turn);
            let max_attempts = create.max_attempts.unwrap_or_else(|| {
                budget
                    .get(create.model.task_type.as_ref())
                    .and_then(|n| i32::try_from(*n).ok())
                    .unwrap_or(self.default_max_attempts)
            });
            create.model.max_attempts = Set(max_attempts);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::sea_query::{PostgresQueryBuilder, SqliteQueryBuilder};

    /// Every value the claim binds has its placeholder, in both dialects.
    #[test]
    fn the_claim_binds_every_value_it_names() {
        let at = Utc::now();
        let empty = super::super::rates::Empty {
            types: vec!["paid".into()],
            keys: vec![("api".into(), "customer-1".into())],
        };
        let locked = ["api".to_owned()];
        let stmt = claim(&["api".into()], Caps::Locked(&locked), &empty, at, "w", at);
        let (sql, values) = stmt.build(SqliteQueryBuilder);
        assert_eq!(sql.matches('?').count(), values.0.len(), "{sql}");
        assert!(!sql.contains('$'), "{sql}");
        let (sql, values) = stmt.build(PostgresQueryBuilder);
        let n = values.0.len();
        assert!(sql.contains(&format!("${n}")), "{sql}");
        assert!(!sql.contains(&format!("${}", n + 1)), "{sql}");
        assert!(!sql.contains('?'), "{sql}");
    }
}
