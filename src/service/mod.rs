//! The `TaskService` trait: everything taskql does with tasks, typed.
//! GraphQL resolvers and workers only call this.
use std::time::Duration;

use async_trait::async_trait;
use entity::{Task, TaskStatus};
use uuid::Uuid;

use self::live::bus::TaskEvent;
use crate::auth::CurrentUser;
use crate::error::{TaskError, TaskResult};
use futures::stream::BoxStream;

mod batch;
mod claims;
mod clock;
mod dependencies;
pub mod line;
pub mod live;
mod pages;
pub mod queue;
pub mod rates;
mod reports;
mod rows;
pub mod stats;
mod store;
mod transitions;
mod upkeep;
pub mod validate;
mod writer;

pub use batch::{Beat, Completion, MAX_CLAIMS, MAX_CREATES, MAX_REPORTS};
pub use dependencies::{MAX_DEPENDENTS_LISTED, Related};
pub use line::Place;
pub use queue::{Backoff, Policy, PolicyChange, TaskType};
pub use stats::{StatsRequest, TaskStats};
pub use store::TaskStore;

/// Largest page `get_tasks_by_user` returns.
pub const MAX_PAGE_SIZE: u64 = 100;
/// Lease a claim gets when the worker does not ask for one.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);
/// Longest lease a worker may ask for.
pub const MAX_LEASE: Duration = Duration::from_secs(3600);

/// A task as `watch_task` yields it.
#[derive(Debug, Clone)]
pub struct Watched {
    pub task: Task,
    /// Its place in line: `Some(None)` when not pending and runnable;
    /// `None` when it could not be read with the task (ask `queue_place`).
    pub place: Option<Option<Place>>,
}

/// The right to claim tasks, report on them and move them along the status
/// machine. Only a caller with the service role gets one, so every way into
/// the service (GraphQL, the CLI, a test) meets the same rule.
#[derive(Debug, Clone)]
pub struct Worker {
    id: String,
}

impl Worker {
    /// The caller as a worker, or FORBIDDEN when it lacks the service role.
    pub fn new(caller: &CurrentUser) -> TaskResult<Self> {
        if caller.is_service {
            Ok(Self {
                id: caller.id.clone(),
            })
        } else {
            Err(TaskError::Forbidden(
                "only workers (a token with the service role) may do this".into(),
            ))
        }
    }

    /// The worker's name, from its token: the `workerId` of its claims unless it gives one.
    pub fn id(&self) -> &str {
        &self.id
    }
}

#[derive(Debug, Clone, Default)]
pub struct NewTask {
    pub task_type: String,
    pub metadata: Option<serde_json::Value>,
    pub idempotency_key: Option<String>,
    /// Not claimable before then; at once when absent.
    pub run_at: Option<chrono::DateTime<chrono::Utc>>,
    /// −100 to 100, higher first; 0 when absent.
    pub priority: Option<i32>,
    /// 1 to 100; the type's policy (or the default) when absent.
    pub max_attempts: Option<i32>,
    /// The tasks it waits for (at most 100): it is not claimable until
    /// they all completed.
    pub depends_on: Vec<Dependency>,
    /// Tasks of its type with this key run at most the type's
    /// `concurrency_per_key` at once.
    pub concurrency_key: Option<String>,
}

/// A task a new task depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dependency {
    /// A task that exists.
    Task(Uuid),
    /// An earlier input of the same `createTasks`, by its index.
    Input(usize),
}

#[derive(Debug, Clone)]
pub struct StatusUpdate {
    pub task_id: Uuid,
    pub status: TaskStatus,
    pub result_id: Option<String>,
    /// With COMPLETED only: what the task produced (see `validate::result`).
    pub result: Option<serde_json::Value>,
    pub error_message: Option<String>,
    pub progress: Option<i32>,
    /// Fencing token: the update only applies while `attempts` equals it.
    pub expected_attempt: Option<i32>,
    /// With FAILED: back to PENDING after the type's backoff while the task
    /// has attempts left.
    pub retryable: bool,
}

impl StatusUpdate {
    pub fn new(task_id: Uuid, status: TaskStatus) -> Self {
        Self {
            task_id,
            status,
            result_id: None,
            result: None,
            error_message: None,
            progress: None,
            expected_attempt: None,
            retryable: false,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    /// Empty means any status.
    pub statuses: Vec<TaskStatus>,
    pub task_type: Option<String>,
    /// The owner; a user's own tasks are the only ones they see anyway.
    pub user_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct TaskPage {
    /// Newest first, each with the cursor that pages after it.
    pub edges: Vec<(String, Task)>,
    pub has_next_page: bool,
}

#[derive(Debug, Clone, Default)]
pub struct ClaimRequest {
    /// Empty means any type.
    pub types: Vec<String>,
    pub lease: Option<Duration>,
    /// The name the lease is held under; the worker's own when absent.
    pub worker_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub task_id: Uuid,
    pub progress: Option<i32>,
    pub lease: Option<Duration>,
    pub expected_attempt: Option<i32>,
}

/// What one pass of the lease reaper did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReapOutcome {
    pub requeued: usize,
    pub failed: usize,
}

#[async_trait]
pub trait TaskService: Send + Sync {
    async fn create_task(&self, user: &CurrentUser, new: NewTask) -> TaskResult<Task>;

    /// Creates up to [`MAX_CREATES`] tasks in one transaction, all or none,
    /// in input order; each input's idempotency key works as in
    /// `create_task`. A bad input fails the call with its index
    /// ([`TaskError::AtInput`]).
    async fn create_tasks(&self, user: &CurrentUser, news: Vec<NewTask>) -> TaskResult<Vec<Task>>;

    /// Moves a task along the status machine.
    async fn update_task_status(&self, worker: &Worker, update: StatusUpdate) -> TaskResult<Task>;

    /// A user sees only their own tasks; a service sees every task.
    async fn get_task(&self, task_id: Uuid, user: &CurrentUser) -> TaskResult<Task>;

    /// The tasks related to a task (its dependencies, those not completed
    /// yet, or its dependents) that `user` may see, by id.
    async fn related_tasks(
        &self,
        task_id: Uuid,
        related: Related,
        user: &CurrentUser,
    ) -> TaskResult<Vec<Task>>;

    async fn get_tasks_by_user(
        &self,
        user: &CurrentUser,
        filter: TaskFilter,
        first: u64,
        after: Option<&str>,
    ) -> TaskResult<TaskPage>;

    async fn get_task_by_result_id(
        &self,
        result_id: &str,
        user: &CurrentUser,
    ) -> TaskResult<Option<Task>>;

    async fn delete_task(&self, task_id: Uuid, user: &CurrentUser) -> TaskResult<bool>;

    async fn cancel_task(&self, task_id: Uuid, user: &CurrentUser) -> TaskResult<Task>;

    /// Puts a FAILED or CANCELLED task back to PENDING with a fresh budget of
    /// attempts, runnable now, with no error, result, worker, lease, times or
    /// progress. `attempts` stays: it is the fencing number.
    async fn retry_task(&self, task_id: Uuid, user: &CurrentUser) -> TaskResult<Task>;

    /// Counts, throughput, durations, the oldest wait and the workers with
    /// leases, of the user's tasks (every user's for a worker).
    async fn task_stats(&self, user: &CurrentUser, request: StatsRequest) -> TaskResult<TaskStats>;

    /// Takes the first runnable task (of the given types) in claim order,
    /// under a lease (see `queue`).
    async fn claim_task(&self, worker: &Worker, request: ClaimRequest) -> TaskResult<Option<Task>>;

    /// Takes up to `limit` (1 to [`MAX_CLAIMS`]) runnable tasks in one
    /// statement, exactly as that many `claim_task`s one after the other
    /// would, in claim order; empty when none is runnable.
    async fn claim_tasks(
        &self,
        worker: &Worker,
        request: ClaimRequest,
        limit: i32,
    ) -> TaskResult<Vec<Task>>;

    async fn heartbeat_task(&self, worker: &Worker, heartbeat: Heartbeat) -> TaskResult<Task>;

    /// Completes up to [`MAX_REPORTS`] tasks in one statement, each fenced
    /// by its attempt: per input, in order, the task or why it was refused.
    async fn complete_tasks(
        &self,
        worker: &Worker,
        completions: Vec<Completion>,
    ) -> TaskResult<Vec<TaskResult<Task>>>;

    /// Extends the leases of up to [`MAX_REPORTS`] tasks by `lease` in one
    /// statement, each fenced by its attempt: per input, in order, the task
    /// or why it was refused (CONFLICT: stop working on it).
    async fn heartbeat_tasks(
        &self,
        worker: &Worker,
        beats: Vec<Beat>,
        lease: Option<Duration>,
    ) -> TaskResult<Vec<TaskResult<Task>>>;

    /// Changes a task type's policy (a worker's right); returns it as it
    /// applies now.
    async fn set_task_type_policy(
        &self,
        worker: &Worker,
        task_type: &str,
        change: PolicyChange,
    ) -> TaskResult<TaskType>;

    /// Every type with a policy or with tasks, by name (a worker's right).
    async fn task_types(&self, worker: &Worker) -> TaskResult<Vec<TaskType>>;

    /// The task's current state, then every change in order; ends after a
    /// terminal state or a deletion (`taskUpdated`). With `placed`, each
    /// task comes with its place in line, and while it is pending the task
    /// comes again each time its position moves.
    async fn watch_task(
        &self,
        user: &CurrentUser,
        task_id: Uuid,
        placed: bool,
    ) -> TaskResult<BoxStream<'static, TaskResult<Watched>>>;

    /// Where a task the caller may see stands in its type's line; `None`
    /// unless it is pending and runnable (see `line`).
    async fn queue_place(&self, user: &CurrentUser, task_id: Uuid) -> TaskResult<Option<Place>>;

    /// Every change of the tasks `user` sees, in the change log's order;
    /// with `after` (an event's cursor), first every such change past it
    /// (`taskEvents`).
    async fn watch_events(
        &self,
        user: &CurrentUser,
        after: Option<&str>,
    ) -> TaskResult<BoxStream<'static, TaskResult<TaskEvent>>>;
}
