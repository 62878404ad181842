//! Schema migrations of taskql, run at start-up and by `taskql migrate`.
pub use sea_orm_migration::prelude::*;

mod m20261126_000001_create_tasks;
mod m20261126_000002_index_created_at;
mod m20261127_000003_task_counts;
mod m20261204_000004_task_events;
mod m20261204_000005_queue;
mod m20261204_000006_result_id_index;
mod m20261204_000007_stats_minutes;
mod m20261204_000008_traceparent;
mod m20261204_000009_type_indexes;
mod m20261206_000010_lean_writes;
mod m20261206_000011_results;
mod m20261206_000012_dependencies;
mod m20261206_000013_concurrency_keys;
mod m20261206_000014_rate_limits;
mod m20261207_000015_quiet_dependents;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261126_000001_create_tasks::Migration),
            Box::new(m20261126_000002_index_created_at::Migration),
            Box::new(m20261127_000003_task_counts::Migration),
            Box::new(m20261204_000004_task_events::Migration),
            Box::new(m20261204_000005_queue::Migration),
            Box::new(m20261204_000006_result_id_index::Migration),
            Box::new(m20261204_000007_stats_minutes::Migration),
            Box::new(m20261204_000008_traceparent::Migration),
            Box::new(m20261204_000009_type_indexes::Migration),
            Box::new(m20261206_000010_lean_writes::Migration),
            Box::new(m20261206_000011_results::Migration),
            Box::new(m20261206_000012_dependencies::Migration),
            Box::new(m20261206_000013_concurrency_keys::Migration),
            Box::new(m20261206_000014_rate_limits::Migration),
            Box::new(m20261207_000015_quiet_dependents::Migration),
        ]
    }
}
