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

use entity::task_types::Column as PolicyColumn;
use entity::{TaskTypePolicy, TaskTypes};
use sea_orm::{ConnectionTrait, EntityTrait, FromQueryResult, QueryFilter, QueryOrder, QueryTrait};

use crate::db::Db;
use crate::error::TaskResult;

mod claim;
mod policy;
mod turns;

pub(super) use claim::CAPPED;
use claim::is_capped;
pub use claim::{Caps, claim, lock_capped};
pub use policy::{
    Backoff, CONCURRENCY, MAX_ATTEMPTS, MAX_BACKOFF_FACTOR, MAX_BACKOFF_SECONDS, PRIORITIES,
    Policy, PolicyChange, RATE_COUNT, RATE_PERIOD_SECONDS, RateLimit, TaskType, check_max_attempts,
    check_priority,
};

/// How long this instance trusts its list of capped types.
const CAPPED_FRESH_FOR: Duration = Duration::from_secs(1);

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
