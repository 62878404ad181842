//! The API shape of tasks. Storage rows convert into these; they are not rows.
use async_graphql::{Enum, ID, InputObject, Json, SimpleObject};
use chrono::{DateTime, Utc};
use entity::TaskStatus as StoredStatus;

use crate::events::{TaskEvent as BusEvent, TaskEventKind as BusKind};

#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum TaskStatus {
    Pending,
    Processing,
    Completed,
    Failed,
    Cancelled,
}

impl From<StoredStatus> for TaskStatus {
    fn from(status: StoredStatus) -> Self {
        match status {
            StoredStatus::Pending => Self::Pending,
            StoredStatus::Processing => Self::Processing,
            StoredStatus::Completed => Self::Completed,
            StoredStatus::Failed => Self::Failed,
            StoredStatus::Cancelled => Self::Cancelled,
        }
    }
}

impl From<TaskStatus> for StoredStatus {
    fn from(status: TaskStatus) -> Self {
        match status {
            TaskStatus::Pending => Self::Pending,
            TaskStatus::Processing => Self::Processing,
            TaskStatus::Completed => Self::Completed,
            TaskStatus::Failed => Self::Failed,
            TaskStatus::Cancelled => Self::Cancelled,
        }
    }
}

/// A background job and where it is.
#[derive(SimpleObject, Clone, Debug)]
pub struct Task {
    pub id: ID,
    #[graphql(name = "type")]
    pub task_type: String,
    pub status: TaskStatus,
    /// The id of what the task produced, once COMPLETED.
    pub result_id: Option<String>,
    /// Why the task FAILED.
    pub error_message: Option<String>,
    pub metadata: Json<serde_json::Value>,
    /// 0 to 100.
    pub progress: Option<i32>,
    /// Times a worker claimed the task; the fencing token for updateTaskStatus.
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
}

impl From<entity::Task> for Task {
    fn from(task: entity::Task) -> Self {
        Self {
            id: ID(task.id.to_string()),
            task_type: task.task_type,
            status: task.status.into(),
            result_id: task.result_id,
            error_message: task.error_message,
            metadata: Json(task.metadata),
            progress: task.progress,
            attempts: task.attempts,
            created_at: task.created_at,
            updated_at: task.updated_at,
            started_at: task.started_at,
            completed_at: task.completed_at,
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
}

#[derive(InputObject, Debug)]
pub struct UpdateTaskStatusInput {
    pub id: ID,
    pub status: TaskStatus,
    pub result_id: Option<String>,
    pub error_message: Option<String>,
    pub progress: Option<i32>,
    /// Fencing: CONFLICT unless the task's attempts equal this.
    pub expected_attempt: Option<i32>,
}

#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum TaskEventKind {
    Created,
    Updated,
    Deleted,
}

/// A change to one of the caller's tasks. DELETED carries the last state.
#[derive(SimpleObject, Clone, Debug)]
pub struct TaskEvent {
    pub kind: TaskEventKind,
    pub task: Task,
}

impl From<&BusEvent> for TaskEvent {
    fn from(event: &BusEvent) -> Self {
        Self {
            kind: match event.kind {
                BusKind::Created => TaskEventKind::Created,
                BusKind::Updated => TaskEventKind::Updated,
                BusKind::Deleted => TaskEventKind::Deleted,
            },
            task: event.task.clone().into(),
        }
    }
}
