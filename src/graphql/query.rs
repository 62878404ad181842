use async_graphql::{Context, ID, Object, Result};

use super::policy::TaskType;
use super::types::{Task, TaskConnection, TaskStats, TaskStatus};
use super::{current_user, graphql_error, service, task_id, worker};
use crate::service::{MAX_PAGE_SIZE, StatsRequest, TaskFilter};

pub struct QueryRoot;

#[Object(name = "Query")]
impl QueryRoot {
    /// One of your tasks; NOT_FOUND if it does not exist or is not yours.
    async fn task(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Task>> {
        let user = current_user(ctx)?;
        let id = task_id(&id)?;
        let task = service(ctx)
            .get_task(id, user)
            .await
            .map_err(graphql_error)?;
        Ok(Some(task.into()))
    }

    /// Your tasks, newest first. `userId` picks one owner's tasks (for
    /// workers, who see every user's).
    #[graphql(
        complexity = "(first.unwrap_or(10).clamp(1, MAX_PAGE_SIZE as i32) as usize) * child_complexity"
    )]
    async fn tasks(
        &self,
        ctx: &Context<'_>,
        status: Option<Vec<TaskStatus>>,
        #[graphql(name = "type")] task_type: Option<String>,
        user_id: Option<String>,
        #[graphql(default = 10)] first: Option<i32>,
        after: Option<String>,
    ) -> Result<TaskConnection> {
        let user = current_user(ctx)?;
        let first = first.unwrap_or(10).max(0) as u64;
        let filter = TaskFilter {
            statuses: status
                .unwrap_or_default()
                .into_iter()
                .map(Into::into)
                .collect(),
            task_type,
            user_id,
        };
        let page = service(ctx)
            .get_tasks_by_user(user, filter, first, after.as_deref())
            .await
            .map_err(graphql_error)?;
        Ok(TaskConnection::new(page, after.is_some()))
    }

    /// Your task that produced `resultId`, or null.
    async fn task_by_result_id(
        &self,
        ctx: &Context<'_>,
        result_id: String,
    ) -> Result<Option<Task>> {
        let user = current_user(ctx)?;
        let task = service(ctx)
            .get_task_by_result_id(&result_id, user)
            .await
            .map_err(graphql_error)?;
        Ok(task.map(Into::into))
    }

    /// Counts, throughput, durations, the oldest wait and the workers with
    /// leases: of your tasks, or of every user's for a worker.
    async fn task_stats(&self, ctx: &Context<'_>) -> Result<TaskStats> {
        let user = current_user(ctx)?;
        // Only what the query selects is computed.
        let selected = ctx.look_ahead();
        let mut throughput_minutes = Vec::new();
        for field in selected.field("throughput").selection_fields() {
            let minutes = field
                .arguments()?
                .into_iter()
                .find(|(name, _)| name.as_str() == "minutes")
                .and_then(|(_, value)| match value {
                    async_graphql::Value::Number(n) => Some(n.as_i64().unwrap_or(0)),
                    // An absent variable or null: the default.
                    _ => None,
                })
                .unwrap_or(60);
            throughput_minutes.push(i32::try_from(minutes).unwrap_or(0));
        }
        let request = StatsRequest {
            counts: selected.field("byStatus").exists() || selected.field("byType").exists(),
            throughput_minutes,
            durations: selected.field("durations").exists(),
            oldest_pending: selected.field("oldestPendingAgeSeconds").exists(),
            workers: selected.field("workers").exists(),
        };
        let stats = service(ctx)
            .task_stats(user, request)
            .await
            .map_err(graphql_error)?;
        Ok(TaskStats(stats))
    }

    /// Every task type with a policy or with tasks, by name. Workers only.
    async fn task_types(&self, ctx: &Context<'_>) -> Result<Vec<TaskType>> {
        let worker = worker(ctx)?;
        let types = service(ctx)
            .task_types(&worker)
            .await
            .map_err(graphql_error)?;
        Ok(types.into_iter().map(Into::into).collect())
    }
}
