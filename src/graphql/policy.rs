//! The API shape of task types and their policies.
use async_graphql::{InputObject, MaybeUndefined, SimpleObject};

use crate::service::{self, PolicyChange};

/// How long a retryable failure waits before its next attempt: after
/// attempt n, `initialSeconds × factor^(n−1)`, at most `maxSeconds`; with
/// jitter, a random point in the upper half of that.
#[derive(SimpleObject, Clone, Debug)]
pub struct Backoff {
    pub initial_seconds: f64,
    pub factor: f64,
    pub max_seconds: f64,
    pub jitter: bool,
}

/// How tasks of one type are retried and claimed.
#[derive(SimpleObject, Clone, Debug)]
pub struct TaskTypePolicy {
    /// Attempts a new task of the type gets unless its create says.
    pub max_attempts: i32,
    pub backoff: Backoff,
    /// Most tasks of the type PROCESSING at once, across every worker and
    /// instance; null for no cap.
    pub concurrency: Option<i32>,
    /// Most tasks of the type PROCESSING at once with one concurrencyKey
    /// (a customer, an account); the others of that key wait while other
    /// keys' tasks run. Null for no cap per key.
    pub concurrency_per_key: Option<i32>,
    /// At most `count` claims of the type per `periodSeconds` (of each
    /// concurrencyKey with `perKey`); null for no rate limit.
    pub rate_limit: Option<RateLimit>,
    /// Claims skip the type; cancel and delete still work.
    pub paused: bool,
}

/// A rate limit: a token bucket of `count` tokens that refills evenly over
/// `periodSeconds`; each claim takes one, and the type's tasks (of that key,
/// with `perKey`) are not runnable while it is empty. Claims of other types
/// and keys are not slowed.
#[derive(SimpleObject, InputObject, Clone, Copy, Debug)]
#[graphql(input_name = "RateLimitInput")]
pub struct RateLimit {
    /// 1 to 1000000 claims…
    pub count: i32,
    /// …per 1 to 86400 seconds.
    pub period_seconds: i32,
    /// One bucket per concurrencyKey (tasks without a key share one)
    /// instead of one for the type.
    #[graphql(default)]
    pub per_key: bool,
}

impl From<service::queue::RateLimit> for RateLimit {
    fn from(limit: service::queue::RateLimit) -> Self {
        Self {
            count: limit.count,
            period_seconds: limit.period_seconds,
            per_key: limit.per_key,
        }
    }
}

impl From<RateLimit> for service::queue::RateLimit {
    fn from(limit: RateLimit) -> Self {
        Self {
            count: limit.count,
            period_seconds: limit.period_seconds,
            per_key: limit.per_key,
        }
    }
}

/// A task type: its policy (the defaults where none was set) and its queue.
#[derive(SimpleObject, Clone, Debug)]
pub struct TaskType {
    #[graphql(name = "type")]
    pub task_type: String,
    pub policy: TaskTypePolicy,
    /// Tasks of the type PENDING now, whether runnable yet or not.
    pub pending: i32,
    /// Tasks of the type PROCESSING now.
    pub processing: i32,
}

impl From<service::TaskType> for TaskType {
    fn from(t: service::TaskType) -> Self {
        let count = |n: i64| i32::try_from(n).unwrap_or(i32::MAX);
        Self {
            task_type: t.task_type,
            policy: TaskTypePolicy {
                max_attempts: t.policy.max_attempts,
                backoff: Backoff {
                    initial_seconds: t.policy.backoff.initial_seconds,
                    factor: t.policy.backoff.factor,
                    max_seconds: t.policy.backoff.max_seconds,
                    jitter: t.policy.backoff.jitter,
                },
                concurrency: t.policy.concurrency,
                concurrency_per_key: t.policy.concurrency_per_key,
                rate_limit: t.policy.rate_limit.map(RateLimit::from),
                paused: t.policy.paused,
            },
            pending: count(t.pending),
            processing: count(t.processing),
        }
    }
}

/// Backoff fields to change; absent ones stay. Defaults: 1 s, factor 2,
/// at most 3600 s, jitter on.
#[derive(InputObject, Debug, Default)]
pub struct BackoffInput {
    /// 0 to 604800 (a week).
    pub initial_seconds: Option<f64>,
    /// 1 to 100.
    pub factor: Option<f64>,
    /// 0 to 604800, and not less than initialSeconds.
    pub max_seconds: Option<f64>,
    pub jitter: Option<bool>,
}

/// Policy fields to change; absent ones stay as they were.
#[derive(InputObject, Debug)]
pub struct TaskTypePolicyInput {
    /// 1 to 100, for tasks created from now on; null for the server's default.
    pub max_attempts: MaybeUndefined<i32>,
    pub backoff: Option<BackoffInput>,
    /// 1 to 100000; null removes the cap.
    pub concurrency: MaybeUndefined<i32>,
    /// 1 to 100000; null removes the cap per concurrency key.
    pub concurrency_per_key: MaybeUndefined<i32>,
    /// Null removes the rate limit.
    pub rate_limit: MaybeUndefined<RateLimit>,
    pub paused: Option<bool>,
}

fn change<T>(value: MaybeUndefined<T>) -> Option<Option<T>> {
    match value {
        MaybeUndefined::Undefined => None,
        MaybeUndefined::Null => Some(None),
        MaybeUndefined::Value(v) => Some(Some(v)),
    }
}

impl From<TaskTypePolicyInput> for PolicyChange {
    fn from(input: TaskTypePolicyInput) -> Self {
        let backoff = input.backoff.unwrap_or_default();
        Self {
            max_attempts: change(input.max_attempts),
            initial_seconds: backoff.initial_seconds,
            factor: backoff.factor,
            max_seconds: backoff.max_seconds,
            jitter: backoff.jitter,
            concurrency: change(input.concurrency),
            concurrency_per_key: change(input.concurrency_per_key),
            rate_limit: change(input.rate_limit).map(|limit| limit.map(Into::into)),
            paused: input.paused,
        }
    }
}
