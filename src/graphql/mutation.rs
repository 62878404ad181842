use async_graphql::{Context, ID, Object, Result};

use super::policy::{TaskType, TaskTypePolicyInput};
use super::types::{
    CompleteTaskInput, CreateTaskInput, HeartbeatTaskInput, Task, TaskReport, UpdateTaskStatusInput,
};
use super::{current_user, graphql_error, lease, parse_task_id, service, task_id, worker};
use crate::service::{Beat, ClaimRequest, Completion, Heartbeat, StatusUpdate};

/// The task id of each report's input, or BAD_USER_INPUT naming the input.
fn report_ids<'a>(ids: impl Iterator<Item = &'a ID>) -> Result<Vec<uuid::Uuid>> {
    ids.enumerate()
        .map(|(i, id)| parse_task_id(id).map_err(|e| graphql_error(e.at_input(i))))
        .collect()
}

pub struct MutationRoot;

#[Object(name = "Mutation")]
impl MutationRoot {
    /// Starts tracking a task for you; it begins PENDING.
    async fn create_task(&self, ctx: &Context<'_>, input: CreateTaskInput) -> Result<Task> {
        let user = current_user(ctx)?;
        let new = input.into_new().map_err(graphql_error)?;
        let task = service(ctx)
            .create_task(user, new)
            .await
            .map_err(graphql_error)?;
        Ok(task.into())
    }

    /// Starts tracking up to 1000 tasks for you in one transaction: all of
    /// them or, when one input is refused, none (the error's
    /// `extensions.index` names that input). The tasks come back in input
    /// order; an input whose idempotencyKey you used before (or used by an
    /// earlier input of the call) gets that task, as createTask does.
    async fn create_tasks(
        &self,
        ctx: &Context<'_>,
        inputs: Vec<CreateTaskInput>,
    ) -> Result<Vec<Task>> {
        let user = current_user(ctx)?;
        let news = inputs
            .into_iter()
            .enumerate()
            .map(|(i, input)| input.into_new().map_err(|e| graphql_error(e.at_input(i))))
            .collect::<Result<_>>()?;
        let tasks = service(ctx)
            .create_tasks(user, news)
            .await
            .map_err(graphql_error)?;
        Ok(tasks.into_iter().map(Into::into).collect())
    }

    /// Cancels your PENDING or PROCESSING task; its worker learns at its next heartbeat.
    async fn cancel_task(&self, ctx: &Context<'_>, id: ID) -> Result<Task> {
        let user = current_user(ctx)?;
        let id = task_id(&id)?;
        let task = service(ctx)
            .cancel_task(id, user)
            .await
            .map_err(graphql_error)?;
        Ok(task.into())
    }

    /// Puts your FAILED or CANCELLED task back to PENDING, claimable now,
    /// with a fresh budget of maxAttempts and no error, result, worker or
    /// progress. Any task, for a worker. CONFLICT in any other status.
    /// attempts stays as it was, so a worker still holding an earlier
    /// attempt gets CONFLICT.
    async fn retry_task(&self, ctx: &Context<'_>, id: ID) -> Result<Task> {
        let user = current_user(ctx)?;
        let id = task_id(&id)?;
        let task = service(ctx)
            .retry_task(id, user)
            .await
            .map_err(graphql_error)?;
        Ok(task.into())
    }

    /// Deletes your task, whatever its status.
    async fn delete_task(&self, ctx: &Context<'_>, id: ID) -> Result<bool> {
        let user = current_user(ctx)?;
        let id = task_id(&id)?;
        service(ctx)
            .delete_task(id, user)
            .await
            .map_err(graphql_error)
    }

    /// Moves a task along its status machine. Workers only.
    async fn update_task_status(
        &self,
        ctx: &Context<'_>,
        input: UpdateTaskStatusInput,
    ) -> Result<Task> {
        let worker = worker(ctx)?;
        let update = StatusUpdate {
            task_id: task_id(&input.id)?,
            status: input.status.into(),
            result_id: input.result_id,
            result: input.result.map(|json| json.0),
            error_message: input.error_message,
            progress: input.progress,
            expected_attempt: input.expected_attempt,
            retryable: input.retryable.unwrap_or(false),
        };
        let task = service(ctx)
            .update_task_status(&worker, update)
            .await
            .map_err(graphql_error)?;
        Ok(task.into())
    }

    /// Takes the next runnable task (of these types) under a lease, or null
    /// when none is. Runnable: PENDING, runAt passed, its type not paused
    /// and under its concurrency cap. Next: the highest priority, then the
    /// owners' turns (an owner with fewer tasks waiting ahead goes first),
    /// then the earliest runAt. Workers only.
    async fn claim_task(
        &self,
        ctx: &Context<'_>,
        types: Option<Vec<String>>,
        lease_seconds: Option<i32>,
        worker_id: Option<String>,
    ) -> Result<Option<Task>> {
        let worker = worker(ctx)?;
        let request = ClaimRequest {
            types: types.unwrap_or_default(),
            lease: lease(lease_seconds),
            worker_id,
        };
        let task = service(ctx)
            .claim_task(&worker, request)
            .await
            .map_err(graphql_error)?;
        Ok(task.map(Into::into))
    }

    /// Takes up to `limit` (1 to 100) runnable tasks (of these types) under
    /// one lease, in one statement: exactly the tasks, in the order, that
    /// as many claimTask calls one after the other would take (priority,
    /// owners' turns, runAt; pauses and concurrency caps respected). An
    /// empty list when none is runnable. Workers only.
    async fn claim_tasks(
        &self,
        ctx: &Context<'_>,
        types: Option<Vec<String>>,
        limit: i32,
        lease_seconds: Option<i32>,
        worker_id: Option<String>,
    ) -> Result<Vec<Task>> {
        let worker = worker(ctx)?;
        let request = ClaimRequest {
            types: types.unwrap_or_default(),
            lease: lease(lease_seconds),
            worker_id,
        };
        let tasks = service(ctx)
            .claim_tasks(&worker, request, limit)
            .await
            .map_err(graphql_error)?;
        Ok(tasks.into_iter().map(Into::into).collect())
    }

    /// Completes up to 100 tasks in one transaction, each as
    /// updateTaskStatus(COMPLETED) with its expectedAttempt would. A report
    /// refused for one task (CONFLICT: it was cancelled, finished or claimed
    /// again; NOT_FOUND) leaves the others applied: the answer says, per
    /// input and in input order, the task or the error. A bad input fails
    /// the call, nothing written. Workers only.
    async fn complete_tasks(
        &self,
        ctx: &Context<'_>,
        input: Vec<CompleteTaskInput>,
    ) -> Result<Vec<TaskReport>> {
        let worker = worker(ctx)?;
        let ids = report_ids(input.iter().map(|c| &c.id))?;
        let completions = input
            .into_iter()
            .zip(&ids)
            .map(|(c, id)| Completion {
                task_id: *id,
                expected_attempt: c.expected_attempt,
                result_id: c.result_id,
                result: c.result.map(|json| json.0),
            })
            .collect();
        let outcomes = service(ctx)
            .complete_tasks(&worker, completions)
            .await
            .map_err(graphql_error)?;
        Ok(reports(&ids, outcomes))
    }

    /// Extends the leases of up to 100 PROCESSING tasks by leaseSeconds
    /// (default 60) and records their progress, in one transaction: one
    /// call for every task a worker holds. Per input, in input order, the
    /// task, or the error that means stop working on it (CONFLICT: it was
    /// cancelled, finished or claimed again). Workers only.
    async fn heartbeat_tasks(
        &self,
        ctx: &Context<'_>,
        input: Vec<HeartbeatTaskInput>,
        lease_seconds: Option<i32>,
    ) -> Result<Vec<TaskReport>> {
        let worker = worker(ctx)?;
        let ids = report_ids(input.iter().map(|b| &b.id))?;
        let beats = input
            .into_iter()
            .zip(&ids)
            .map(|(b, id)| Beat {
                task_id: *id,
                expected_attempt: b.expected_attempt,
                progress: b.progress,
            })
            .collect();
        let outcomes = service(ctx)
            .heartbeat_tasks(&worker, beats, lease(lease_seconds))
            .await
            .map_err(graphql_error)?;
        Ok(reports(&ids, outcomes))
    }

    /// Extends the lease of a PROCESSING task and records progress. CONFLICT
    /// means stop: the task was cancelled, finished, or claimed again.
    /// `expectedAttempt` (the attempts the claim returned) detects a re-claim.
    /// Workers only.
    async fn heartbeat_task(
        &self,
        ctx: &Context<'_>,
        id: ID,
        progress: Option<i32>,
        lease_seconds: Option<i32>,
        expected_attempt: Option<i32>,
    ) -> Result<Task> {
        let worker = worker(ctx)?;
        let heartbeat = Heartbeat {
            task_id: task_id(&id)?,
            progress,
            lease: lease(lease_seconds),
            expected_attempt,
        };
        let task = service(ctx)
            .heartbeat_task(&worker, heartbeat)
            .await
            .map_err(graphql_error)?;
        Ok(task.into())
    }

    /// Changes a task type's policy; absent fields stay as they were.
    /// Workers only.
    async fn set_task_type_policy(
        &self,
        ctx: &Context<'_>,
        #[graphql(name = "type")] task_type: String,
        policy: TaskTypePolicyInput,
    ) -> Result<TaskType> {
        let worker = worker(ctx)?;
        let task_type = service(ctx)
            .set_task_type_policy(&worker, &task_type, policy.into())
            .await
            .map_err(graphql_error)?;
        Ok(task_type.into())
    }
}

/// The answer of a batched report, per input.
fn reports(
    ids: &[uuid::Uuid],
    outcomes: Vec<crate::error::TaskResult<entity::Task>>,
) -> Vec<TaskReport> {
    ids.iter()
        .zip(outcomes)
        .map(|(id, outcome)| TaskReport::of(ID(id.to_string()), outcome))
        .collect()
}
