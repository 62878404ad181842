use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// Where a task is in its life. Stored as lower-case text with a CHECK.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::N(16))")]
pub enum TaskStatus {
    #[sea_orm(string_value = "pending")]
    Pending,
    #[sea_orm(string_value = "processing")]
    Processing,
    #[sea_orm(string_value = "completed")]
    Completed,
    #[sea_orm(string_value = "failed")]
    Failed,
    #[sea_orm(string_value = "cancelled")]
    Cancelled,
}

impl TaskStatus {
    /// Completed, failed and cancelled are final: nothing moves a task out of them.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// Every status, in the order counts are kept and shown.
    pub const ALL: [TaskStatus; 5] = [
        Self::Pending,
        Self::Processing,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Processing => "processing",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// The status stored as `text`, if it is one.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// How many tasks are in each status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusCounts {
    pub pending: i64,
    pub processing: i64,
    pub completed: i64,
    pub failed: i64,
    pub cancelled: i64,
}

impl StatusCounts {
    pub fn get(&self, status: TaskStatus) -> i64 {
        match status {
            TaskStatus::Pending => self.pending,
            TaskStatus::Processing => self.processing,
            TaskStatus::Completed => self.completed,
            TaskStatus::Failed => self.failed,
            TaskStatus::Cancelled => self.cancelled,
        }
    }

    pub fn add(&mut self, status: TaskStatus, n: i64) {
        let count = match status {
            TaskStatus::Pending => &mut self.pending,
            TaskStatus::Processing => &mut self.processing,
            TaskStatus::Completed => &mut self.completed,
            TaskStatus::Failed => &mut self.failed,
            TaskStatus::Cancelled => &mut self.cancelled,
        };
        *count += n;
    }

    /// Every status with its count, in [`TaskStatus::ALL`] order.
    pub fn each(&self) -> impl Iterator<Item = (TaskStatus, i64)> + '_ {
        TaskStatus::ALL.into_iter().map(|s| (s, self.get(s)))
    }

    pub fn total(&self) -> i64 {
        self.each().map(|(_, n)| n).sum()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "tasks")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub user_id: String,
    #[sea_orm(column_name = "type")]
    #[serde(alias = "type")]
    pub task_type: String,
    pub status: TaskStatus,
    pub result_id: Option<String>,
    pub error_message: Option<String>,
    #[sea_orm(column_type = "JsonBinary")]
    #[serde(default)]
    pub metadata: Json,
    pub progress: Option<i32>,
    pub attempts: i32,
    pub idempotency_key: Option<String>,
    pub worker_id: Option<String>,
    pub lease_expires_at: Option<DateTimeUtc>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    pub started_at: Option<DateTimeUtc>,
    pub completed_at: Option<DateTimeUtc>,
    pub version: i64,
    /// Not claimable before then.
    pub run_at: DateTimeUtc,
    /// −100 to 100; higher is claimed first.
    pub priority: i32,
    /// Attempts the task may take since it was created or last retried.
    pub max_attempts: i32,
    /// Attempts made before the last retry: the budget counts from here,
    /// so `attempts` (the fencing number) never goes down.
    pub retry_base: i32,
    /// The task's turn among its owner's pending tasks: claims take the
    /// lowest first within a priority, so owners take turns.
    pub fair_rank: i64,
    /// The W3C `traceparent` of the create (its service span), when that
    /// request was traced: a worker continues the trace from it.
    pub traceparent: Option<String>,
    /// What the worker's completion left: any JSON, bounded in size.
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub result: Option<Json>,
    /// How many of its dependencies have not completed; claimable only at 0.
    pub waiting_on: i32,
    /// The dependency whose failure or cancel cancelled this task.
    pub cancelled_by: Option<Uuid>,
    /// Tasks of a type that share a key run at most the type's
    /// `concurrency_per_key` at once.
    pub concurrency_key: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

/// Attempts a task gets when neither its create, nor its type's policy,
/// nor `TASKQL_MAX_ATTEMPTS` says otherwise.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 3;

impl ActiveModelBehavior for ActiveModel {}

impl Model {
    /// The columns in the order of the table (and of [`Column`]), which
    /// `SELECT *`, `RETURNING *` and SeaORM's selects of this entity all use.
    pub const COLUMNS: [&'static str; 27] = [
        "id",
        "user_id",
        "type",
        "status",
        "result_id",
        "error_message",
        "metadata",
        "progress",
        "attempts",
        "idempotency_key",
        "worker_id",
        "lease_expires_at",
        "created_at",
        "updated_at",
        "started_at",
        "completed_at",
        "version",
        "run_at",
        "priority",
        "max_attempts",
        "retry_base",
        "fair_rank",
        "traceparent",
        "result",
        "waiting_on",
        "cancelled_by",
        "concurrency_key",
    ];

    /// Reads a row of [`Self::COLUMNS`] by position: the derived reader
    /// finds every column by name, which costs more than the decoding.
    pub fn from_row(row: &QueryResult) -> Result<Self, DbErr> {
        Ok(Self {
            id: row.try_get_by_index(0)?,
            user_id: row.try_get_by_index(1)?,
            task_type: row.try_get_by_index(2)?,
            status: row.try_get_by_index(3)?,
            result_id: row.try_get_by_index(4)?,
            error_message: row.try_get_by_index(5)?,
            metadata: row.try_get_by_index(6)?,
            progress: row.try_get_by_index(7)?,
            attempts: row.try_get_by_index(8)?,
            idempotency_key: row.try_get_by_index(9)?,
            worker_id: row.try_get_by_index(10)?,
            lease_expires_at: row.try_get_by_index(11)?,
            created_at: row.try_get_by_index(12)?,
            updated_at: row.try_get_by_index(13)?,
            started_at: row.try_get_by_index(14)?,
            completed_at: row.try_get_by_index(15)?,
            version: row.try_get_by_index(16)?,
            run_at: row.try_get_by_index(17)?,
            priority: row.try_get_by_index(18)?,
            max_attempts: row.try_get_by_index(19)?,
            retry_base: row.try_get_by_index(20)?,
            fair_rank: row.try_get_by_index(21)?,
            traceparent: row.try_get_by_index(22)?,
            result: row.try_get_by_index(23)?,
            waiting_on: row.try_get_by_index(24)?,
            cancelled_by: row.try_get_by_index(25)?,
            concurrency_key: row.try_get_by_index(26)?,
        })
    }
}

impl ActiveModel {
    /// A new PENDING task, as every create stores it: never claimed, version
    /// 1, runnable at once, priority 0, 3 attempts, first in its owner's turn.
    pub fn pending(
        user_id: String,
        task_type: String,
        metadata: Json,
        idempotency_key: Option<String>,
        at: DateTimeUtc,
    ) -> Self {
        use sea_orm::ActiveValue::Set;
        Self {
            id: Set(Uuid::now_v7()),
            user_id: Set(user_id),
            task_type: Set(task_type),
            status: Set(TaskStatus::Pending),
            result_id: Set(None),
            error_message: Set(None),
            metadata: Set(metadata),
            progress: Set(None),
            attempts: Set(0),
            idempotency_key: Set(idempotency_key),
            worker_id: Set(None),
            lease_expires_at: Set(None),
            created_at: Set(at),
            updated_at: Set(at),
            started_at: Set(None),
            completed_at: Set(None),
            version: Set(1),
            run_at: Set(at),
            priority: Set(0),
            max_attempts: Set(DEFAULT_MAX_ATTEMPTS),
            retry_base: Set(0),
            fair_rank: Set(0),
            traceparent: Set(None),
            result: Set(None),
            waiting_on: Set(0),
            cancelled_by: Set(None),
            concurrency_key: Set(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::Iterable;

    /// What statements bind (`as_str`) is what the entity stores and reads.
    #[test]
    fn statuses_are_spelled_once() {
        for status in TaskStatus::ALL {
            assert_eq!(status.to_value(), status.as_str());
            assert_eq!(TaskStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(TaskStatus::ALL.len(), TaskStatus::iter().count());
        assert_eq!(TaskStatus::parse("PENDING"), None);
    }

    /// SeaORM selects the entity's columns in the struct's order, and
    /// `from_row` reads them by position in `COLUMNS` order: the two must
    /// be one list.
    #[test]
    fn the_entity_columns_are_the_ones_rows_are_read_by() {
        let columns: Vec<String> = Column::iter().map(|c| c.as_str().to_owned()).collect();
        assert_eq!(columns, Model::COLUMNS);
    }
}
