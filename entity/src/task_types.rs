use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// The policy of one task type: retries, backoff, how many may run at
/// once, and whether claims skip it. A type without a row has the defaults.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "task_types")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub task_type: String,
    /// Attempts a new task of the type gets; the server's default when null.
    pub max_attempts: Option<i32>,
    pub backoff_initial_seconds: f64,
    pub backoff_factor: f64,
    pub backoff_max_seconds: f64,
    pub backoff_jitter: bool,
    /// Most tasks of the type PROCESSING at once; no cap when null.
    pub concurrency: Option<i32>,
    pub paused: bool,
    pub updated_at: DateTimeUtc,
    /// Most tasks of the type PROCESSING at once with one concurrency key;
    /// no limit when null.
    pub concurrency_per_key: Option<i32>,
    /// Claims allowed per `rate_period_seconds`; no rate limit when null.
    pub rate_count: Option<i32>,
    pub rate_period_seconds: Option<i32>,
    /// The rate limit holds for each concurrency key, not the type as a whole.
    pub rate_per_key: bool,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
