//! Task type policies: what each may set and within which bounds, how a
//! change applies to the stored row, and the store of policies.
use std::time::Duration;

use entity::task_types::{ActiveModel as PolicyRow, Column as PolicyColumn};
use entity::{TaskTypePolicy, TaskTypes};
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue::Set, ConnectionTrait, EntityTrait, FromQueryResult, QueryOrder, QueryTrait,
};

use crate::error::{TaskError, TaskResult};
use crate::service::validate;

use super::Queue;

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
    pub(super) fn of(row: &TaskTypePolicy) -> Option<Self> {
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

impl Queue {
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
            updated_at: Set(crate::service::clock::now()),
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
}
