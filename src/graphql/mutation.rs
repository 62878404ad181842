use async_graphql::{Context, ID, Object, Result};

use super::policy::{TaskType, TaskTypePolicyInput};
use super::types::{CreateTaskInput, Task, UpdateTaskStatusInput};
use super::{current_user, graphql_error, lease, service, task_id, worker};
use crate::service::{ClaimRequest, Heartbeat, NewTask, StatusUpdate};

pub struct MutationRoot;

#[Object(name = "Mutation")]
impl MutationRoot {
    /// Starts tracking a task for you; it begins PENDING.
    async fn create_task(&self, ctx: &Context<'_>, input: CreateTaskInput) -> Result<Task> {
        let user = current_user(ctx)?;
        let new = NewTask {
            task_type: input.task_type,
            metadata: input.metadata.map(|m| m.0),
            idempotency_key: input.idempotency_key,
            run_at: input.run_at,
            priority: input.priority,
            max_attempts: input.max_attempts,
        };
        let task = service(ctx)
            .create_task(user, new)
            .await
            .map_err(graphql_error)?;
        Ok(task.into())
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
