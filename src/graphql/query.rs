use async_graphql::{Context, ID, Object, Result};

use super::types::{Task, TaskConnection, TaskStatus};
use super::{caller, gql, service, task_id};
use crate::service::{MAX_PAGE_SIZE, TaskFilter};

pub struct QueryRoot;

#[Object(name = "Query")]
impl QueryRoot {
    /// One of your tasks; NOT_FOUND if it does not exist or is not yours.
    async fn task(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Task>> {
        let user = caller(ctx)?;
        let id = task_id(&id)?;
        let task = service(ctx).get_task(id, user).await.map_err(gql)?;
        Ok(Some(task.into()))
    }

    /// Your tasks, newest first.
    #[graphql(
        complexity = "(first.unwrap_or(10).clamp(1, MAX_PAGE_SIZE as i32) as usize) * child_complexity"
    )]
    async fn tasks(
        &self,
        ctx: &Context<'_>,
        status: Option<Vec<TaskStatus>>,
        #[graphql(name = "type")] task_type: Option<String>,
        #[graphql(default = 10)] first: Option<i32>,
        after: Option<String>,
    ) -> Result<TaskConnection> {
        let user = caller(ctx)?;
        let first = first.unwrap_or(10).max(0) as u64;
        let filter = TaskFilter {
            statuses: status
                .unwrap_or_default()
                .into_iter()
                .map(Into::into)
                .collect(),
            task_type,
        };
        let page = service(ctx)
            .get_tasks_by_user(user, filter, first, after.as_deref())
            .await
            .map_err(gql)?;
        Ok(TaskConnection::new(page, after.is_some()))
    }

    /// Your task that produced `resultId`, or null.
    async fn task_by_result_id(
        &self,
        ctx: &Context<'_>,
        result_id: String,
    ) -> Result<Option<Task>> {
        let user = caller(ctx)?;
        let task = service(ctx)
            .get_task_by_result_id(&result_id, user)
            .await
            .map_err(gql)?;
        Ok(task.map(Into::into))
    }
}
