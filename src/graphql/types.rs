//! The API shape of tasks. Storage rows convert into these; they are not rows.
use std::sync::Arc;

use async_graphql::{
    ComplexObject, Context, Enum, ID, InputObject, Json, Object, Result, SimpleObject,
};
use chrono::{DateTime, Utc};
use tokio::sync::OnceCell;

use crate::service::{Place, Related, Watched};

use crate::service::live::bus::TaskEvent as BusEvent;

// The stored statuses, named the GraphQL way; the derive writes both `From`s.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
#[graphql(remote = "entity::TaskStatus")]
pub enum TaskStatus {
    Pending,
    Processing,
    Completed,
    Failed,
    Cancelled,
}

/// A background job and where it is.
#[derive(SimpleObject, Clone, Debug)]
#[graphql(complex)]
pub struct Task {
    pub id: ID,
    #[graphql(name = "type")]
    pub task_type: String,
    pub status: TaskStatus,
    /// The id of what the task produced, once COMPLETED.
    pub result_id: Option<String>,
    /// What the task produced, as its worker's completion left it (any
    /// JSON, at most TASKQL_MAX_RESULT_BYTES serialized); null until then.
    pub result: Option<Json<serde_json::Value>>,
    /// Why the task FAILED.
    pub error_message: Option<String>,
    pub metadata: Json<serde_json::Value>,
    /// 0 to 100.
    pub progress: Option<i32>,
    /// Times a worker claimed the task, ever: the fencing token for
    /// updateTaskStatus. It never goes down, not even at retryTask.
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    /// The owner (the `sub` of the token that created the task): for a user
    /// always themselves; workers see every user's tasks.
    pub user_id: String,
    /// Who holds or last held the task's lease, as its claim named it;
    /// cleared when a lease expires.
    pub worker_id: Option<String>,
    /// When the lease of a PROCESSING task runs out unless its worker
    /// sends a heartbeat.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// When the task became, or becomes, claimable: its createdAt unless
    /// created with runAt; later when a retryable failure backs off, and
    /// the time of a retryTask.
    pub run_at: DateTime<Utc>,
    /// −100 to 100; higher is claimed first.
    pub priority: i32,
    /// Attempts the task may take (since its create, or its last
    /// retryTask) before a failure or an expired lease makes it FAILED for
    /// good.
    pub max_attempts: i32,
    /// The W3C trace context (`traceparent`) of the request that created
    /// the task, when taskql traced it: a worker sends a child of it with
    /// its calls about the task, so they join the creator's trace. Null
    /// when the create was not traced, and in subscriptions' events.
    pub traceparent: Option<String>,
    /// Its concurrency key, as created: see TaskTypePolicy.concurrencyPerKey.
    pub concurrency_key: Option<String>,
    /// Its place in line, read once (when asked, unless it came with the task).
    #[graphql(skip)]
    pub place: Arc<OnceCell<Option<Place>>>,
    /// How many of its dependencies have not completed.
    #[graphql(skip)]
    pub waiting: i32,
}

#[ComplexObject]
impl Task {
    /// Where a PENDING task stands in its type's line: 1 is the next task of
    /// its type a worker would claim. Null unless the task is PENDING and
    /// its runAt has passed. In `taskUpdated`, the task is sent again when
    /// its position moves, at most once a second.
    async fn queue_position(&self, ctx: &Context<'_>) -> Result<Option<i32>> {
        Ok(self
            .place(ctx)
            .await?
            .map(|place| i32::try_from(place.position).unwrap_or(i32::MAX)))
    }

    /// When a PENDING task should start, from how fast its type's tasks
    /// were claimed lately. Null when it has no position, its type is
    /// paused, or none of its type was claimed in the last 15 minutes.
    async fn estimated_start_at(&self, ctx: &Context<'_>) -> Result<Option<DateTime<Utc>>> {
        Ok(self
            .place(ctx)
            .await?
            .and_then(|place| place.estimated_start_at))
    }

    /// The dependencies a PENDING task still waits for: it is not claimable
    /// (and has no queuePosition) until they all COMPLETED. Empty once it
    /// may run, and for a task in any other status.
    async fn waiting_on(&self, ctx: &Context<'_>) -> Result<Vec<Task>> {
        if self.status != TaskStatus::Pending || self.waiting == 0 {
            return Ok(Vec::new());
        }
        self.related(ctx, Related::WaitingOn).await
    }

    /// The tasks this one depends on (its createTask's dependsOn), by id:
    /// a worker reads their `result` here.
    async fn dependencies(&self, ctx: &Context<'_>) -> Result<Vec<Task>> {
        self.related(ctx, Related::Dependencies).await
    }

    /// The tasks that depend on this one, by id (the first 100).
    async fn dependents(&self, ctx: &Context<'_>) -> Result<Vec<Task>> {
        self.related(ctx, Related::Dependents).await
    }
}

impl Task {
    async fn related(&self, ctx: &Context<'_>, related: Related) -> Result<Vec<Task>> {
        let user = super::current_user(ctx)?;
        let id = super::task_id(&self.id)?;
        let tasks = super::service(ctx)
            .related_tasks(id, related, user)
            .await
            .map_err(super::graphql_error)?;
        Ok(tasks.into_iter().map(Task::from).collect())
    }

    async fn place(&self, ctx: &Context<'_>) -> Result<Option<Place>> {
        if self.status != TaskStatus::Pending {
            return Ok(None);
        }
        let place = self
            .place
            .get_or_try_init(|| async {
                let user = super::current_user(ctx)?;
                let id = super::task_id(&self.id)?;
                super::service(ctx)
                    .queue_place(user, id)
                    .await
                    .map_err(super::graphql_error)
            })
            .await?;
        Ok(*place)
    }
}

impl From<Watched> for Task {
    fn from(watched: Watched) -> Self {
        let task = Task::from(watched.task);
        if let Some(place) = watched.place {
            // A fresh cell: it cannot be set yet.
            let _ = task.place.set(place);
        }
        task
    }
}

impl From<entity::Task> for Task {
    fn from(task: entity::Task) -> Self {
        Self {
            id: ID(task.id.to_string()),
            task_type: task.task_type,
            status: task.status.into(),
            result_id: task.result_id,
            result: task.result.map(Json),
            error_message: task.error_message,
            metadata: Json(task.metadata),
            progress: task.progress,
            attempts: task.attempts,
            created_at: task.created_at,
            updated_at: task.updated_at,
            started_at: task.started_at,
            completed_at: task.completed_at,
            user_id: task.user_id,
            worker_id: task.worker_id,
            lease_expires_at: task.lease_expires_at,
            run_at: task.run_at,
            priority: task.priority,
            max_attempts: task.max_attempts,
            traceparent: task.traceparent,
            concurrency_key: task.concurrency_key,
            place: Arc::default(),
            waiting: task.waiting_on,
        }
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct TaskEdge {
    pub cursor: String,
    pub node: Task,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct PageInfo {
    pub has_next_page: bool,
    pub has_previous_page: bool,
    pub start_cursor: Option<String>,
    pub end_cursor: Option<String>,
}

/// A page of tasks, newest first.
#[derive(SimpleObject, Clone, Debug)]
pub struct TaskConnection {
    pub edges: Vec<TaskEdge>,
    pub nodes: Vec<Task>,
    pub page_info: PageInfo,
}

impl TaskConnection {
    pub fn new(page: crate::service::TaskPage, has_previous_page: bool) -> Self {
        let edges: Vec<TaskEdge> = page
            .edges
            .into_iter()
            .map(|(cursor, task)| TaskEdge {
                cursor,
                node: task.into(),
            })
            .collect();
        let page_info = PageInfo {
            has_next_page: page.has_next_page,
            has_previous_page,
            start_cursor: edges.first().map(|e| e.cursor.clone()),
            end_cursor: edges.last().map(|e| e.cursor.clone()),
        };
        Self {
            nodes: edges.iter().map(|e| e.node.clone()).collect(),
            edges,
            page_info,
        }
    }
}

#[derive(InputObject, Debug)]
pub struct CreateTaskInput {
    /// 1 to 64 characters of a-z, 0-9, '_', '.', '-'.
    #[graphql(name = "type")]
    pub task_type: String,
    /// A JSON object of at most 64 KiB; `{}` when absent.
    pub metadata: Option<Json<serde_json::Value>>,
    /// The same key from the same user returns the same task.
    pub idempotency_key: Option<String>,
    /// Not claimable before then; at once when absent or past.
    pub run_at: Option<DateTime<Utc>>,
    /// −100 to 100, default 0; higher is claimed first.
    pub priority: Option<i32>,
    /// 1 to 100; the type's policy (or the server's default) when absent.
    pub max_attempts: Option<i32>,
    /// Tasks this one waits for (at most 100): it stays PENDING, not
    /// claimable, until they all COMPLETED, and is CANCELLED if one ends
    /// FAILED or CANCELLED. Your own tasks (any, for a worker), by id; in
    /// createTasks also an earlier input of the call, by its index ("0").
    pub depends_on: Option<Vec<ID>>,
    /// 1 to 255 characters: tasks of the type with the same key (a
    /// customer, an account) run at most the type's concurrencyPerKey at
    /// once; other keys' tasks run meanwhile.
    pub concurrency_key: Option<String>,
}

impl CreateTaskInput {
    /// The service's create, or why an entry of `dependsOn` names no task.
    pub fn into_new(self) -> Result<crate::service::NewTask, crate::error::TaskError> {
        let depends_on = self
            .depends_on
            .unwrap_or_default()
            .iter()
            .map(dependency)
            .collect::<Result<_, _>>()?;
        Ok(crate::service::NewTask {
            task_type: self.task_type,
            metadata: self.metadata.map(|m| m.0),
            idempotency_key: self.idempotency_key,
            run_at: self.run_at,
            priority: self.priority,
            max_attempts: self.max_attempts,
            depends_on,
            concurrency_key: self.concurrency_key,
        })
    }
}

/// An entry of `dependsOn`: a task's id, or an input's index ("0").
fn dependency(id: &ID) -> Result<crate::service::Dependency, crate::error::TaskError> {
    use crate::service::Dependency;
    let text = id.as_str();
    if !text.is_empty() && text.len() <= 4 && text.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(Dependency::Input(text.parse().unwrap_or(usize::MAX)));
    }
    uuid::Uuid::parse_str(text)
        .map(Dependency::Task)
        .map_err(|_| {
            crate::error::TaskError::invalid(format!(
                "dependsOn entry '{}' is neither a task id nor an input's index",
                crate::error::echo(text)
            ))
        })
}

/// One task of `completeTasks`.
#[derive(InputObject, Debug)]
pub struct CompleteTaskInput {
    pub id: ID,
    /// Fencing: this task's report is refused (CONFLICT) unless its
    /// attempts equal this, the attempts its claim returned.
    pub expected_attempt: i32,
    /// The id of what the task produced.
    pub result_id: Option<String>,
    /// What the task produced: any JSON but null, at most
    /// TASKQL_MAX_RESULT_BYTES (256 KiB by default) serialized.
    pub result: Option<Json<serde_json::Value>>,
}

/// One task of `heartbeatTasks`.
#[derive(InputObject, Debug)]
pub struct HeartbeatTaskInput {
    pub id: ID,
    /// Fencing: this task's heartbeat is refused (CONFLICT) unless its
    /// attempts equal this, the attempts its claim returned.
    pub expected_attempt: i32,
    /// 0 to 100; the progress stays as it was when absent.
    pub progress: Option<i32>,
}

/// What became of one task of a batched report: the task as the report
/// left it, or why the report was refused for it (the others still apply).
#[derive(SimpleObject, Clone, Debug)]
pub struct TaskReport {
    /// The task the report was about.
    pub id: ID,
    /// The task after the report; null when it was refused.
    pub task: Option<Task>,
    /// Why the report was refused for this task; null when it applied.
    pub error: Option<ReportError>,
}

/// A refused report: what `extensions.code` and the message would be had
/// the task been reported on alone. CONFLICT: stop working on the task (it
/// was cancelled, finished, or claimed again); NOT_FOUND: no such task.
#[derive(SimpleObject, Clone, Debug)]
pub struct ReportError {
    pub code: String,
    pub message: String,
}

impl TaskReport {
    pub fn of(id: ID, outcome: crate::error::TaskResult<entity::Task>) -> Self {
        match outcome {
            Ok(task) => Self {
                id,
                task: Some(task.into()),
                error: None,
            },
            Err(err) => Self {
                id,
                task: None,
                error: Some(ReportError {
                    code: err.code().as_str().to_owned(),
                    message: err.to_string(),
                }),
            },
        }
    }
}

#[derive(InputObject, Debug)]
pub struct UpdateTaskStatusInput {
    pub id: ID,
    pub status: TaskStatus,
    pub result_id: Option<String>,
    /// With COMPLETED only: what the task produced, any JSON but null, at
    /// most TASKQL_MAX_RESULT_BYTES (256 KiB by default) serialized.
    pub result: Option<Json<serde_json::Value>>,
    pub error_message: Option<String>,
    pub progress: Option<i32>,
    /// Fencing: CONFLICT unless the task's attempts equal this.
    pub expected_attempt: Option<i32>,
    /// With FAILED: while the task has attempts left, it goes back to
    /// PENDING, claimable after its type's backoff, and keeps errorMessage.
    /// Without it, FAILED is final.
    pub retryable: Option<bool>,
}

#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
#[graphql(remote = "crate::service::live::bus::TaskEventKind")]
pub enum TaskEventKind {
    Created,
    Updated,
    Deleted,
}

/// A change to one of the caller's tasks (any user's, for a worker).
/// DELETED carries the last state.
#[derive(SimpleObject, Clone, Debug)]
pub struct TaskEvent {
    /// Where this event is in the change log: pass it as `taskEvents(after:)`
    /// to receive every event after it, on any instance, after a restart.
    /// Opaque; later events have later cursors.
    pub cursor: String,
    pub kind: TaskEventKind,
    pub task: Task,
}

impl From<BusEvent> for TaskEvent {
    fn from(event: BusEvent) -> Self {
        Self {
            cursor: crate::service::live::changelog::encode_cursor(event.pos),
            kind: event.kind.into(),
            task: event.task.into(),
        }
    }
}

/// How many tasks are in one status.
#[derive(SimpleObject, Clone, Debug)]
pub struct StatusCount {
    pub status: TaskStatus,
    pub count: i32,
}

/// How many tasks of one type are in each status.
#[derive(SimpleObject, Clone, Debug)]
pub struct TypeCounts {
    #[graphql(name = "type")]
    pub task_type: String,
    pub pending: i32,
    pub processing: i32,
    pub completed: i32,
    pub failed: i32,
    pub cancelled: i32,
}

/// One minute: tasks created in it, and tasks that became COMPLETED or
/// FAILED in it, of the tasks that still exist.
#[derive(SimpleObject, Clone, Debug)]
pub struct ThroughputPoint {
    /// The start of the minute.
    pub at: DateTime<Utc>,
    pub created: i32,
    pub completed: i32,
    pub failed: i32,
}

/// Percentiles, in milliseconds, over the tasks of one type COMPLETED or
/// FAILED in the current minute and the 59 before it: wait is from
/// creation to the first claim, run from the first claim to the end. A
/// worker's are read from per-minute histograms, within 9.1% (or 1 ms) of
/// the task's at that rank; a user's are exact, over the latest 20,000 at
/// most. Null when no such task has the times.
#[derive(SimpleObject, Clone, Debug)]
pub struct TypeDurations {
    #[graphql(name = "type")]
    pub task_type: String,
    pub wait_p50_ms: Option<f64>,
    pub wait_p95_ms: Option<f64>,
    pub run_p50_ms: Option<f64>,
    pub run_p95_ms: Option<f64>,
    pub run_p99_ms: Option<f64>,
}

/// A worker holding unexpired leases, as its claims named it.
#[derive(SimpleObject, Clone, Debug)]
pub struct WorkerLease {
    pub worker_id: String,
    /// PROCESSING tasks it holds.
    pub tasks: i32,
    /// The earliest of their leases to run out.
    pub next_lease_expiry: Option<DateTime<Utc>>,
}

/// A count as GraphQL's Int (32 bits): more than two billion shows as the most.
fn int(n: i64) -> i32 {
    i32::try_from(n).unwrap_or(if n < 0 { i32::MIN } else { i32::MAX })
}

/// What the caller's tasks (every user's, for a worker) are doing.
pub struct TaskStats(pub crate::service::TaskStats);

#[Object]
impl TaskStats {
    /// Every status, zeros included.
    async fn by_status(&self) -> Vec<StatusCount> {
        self.0
            .by_status
            .each()
            .map(|(status, count)| StatusCount {
                status: status.into(),
                count: int(count),
            })
            .collect()
    }

    /// Types that have tasks, by name.
    async fn by_type(&self) -> Vec<TypeCounts> {
        self.0
            .by_type
            .iter()
            .map(|t| TypeCounts {
                task_type: t.task_type.clone(),
                pending: int(t.counts.pending),
                processing: int(t.counts.processing),
                completed: int(t.counts.completed),
                failed: int(t.counts.failed),
                cancelled: int(t.counts.cancelled),
            })
            .collect()
    }

    /// One point per minute of the last `minutes` (1 to 1440), oldest
    /// first; the last is the current minute.
    async fn throughput(
        &self,
        #[graphql(default = 60)] minutes: Option<i32>,
    ) -> Vec<ThroughputPoint> {
        // The service computed the longest window asked for (and checked
        // every one): this window is its last minutes.
        let points = &self.0.throughput;
        let wanted = usize::try_from(minutes.unwrap_or(60))
            .unwrap_or(0)
            .min(points.len());
        points[points.len() - wanted..]
            .iter()
            .map(|p| ThroughputPoint {
                at: p.at,
                created: int(p.created),
                completed: int(p.completed),
                failed: int(p.failed),
            })
            .collect()
    }

    /// Wait and run times of the tasks finished in the last hour, by type.
    async fn durations(&self) -> Vec<TypeDurations> {
        self.0
            .durations
            .iter()
            .map(|d| TypeDurations {
                task_type: d.task_type.clone(),
                wait_p50_ms: d.wait_p50_ms,
                wait_p95_ms: d.wait_p95_ms,
                run_p50_ms: d.run_p50_ms,
                run_p95_ms: d.run_p95_ms,
                run_p99_ms: d.run_p99_ms,
            })
            .collect()
    }

    /// Seconds the oldest PENDING task has waited; null when none is pending.
    async fn oldest_pending_age_seconds(&self) -> Option<f64> {
        self.0.oldest_pending_age_seconds
    }

    /// Workers holding a lease now, by id. A worker's view (every user's
    /// tasks) may be a few seconds old when very many tasks are being
    /// processed: it is then read once every 2 seconds, not per request.
    async fn workers(&self) -> Vec<WorkerLease> {
        self.0
            .workers
            .iter()
            .map(|w| WorkerLease {
                worker_id: w.worker_id.clone(),
                tasks: int(w.tasks),
                next_lease_expiry: w.next_lease_expiry,
            })
            .collect()
    }
}
