use sea_orm_migration::prelude::*;

use crate::m20261204_000005_queue::run_on;

/// Rate limits: a type's policy may allow `rate_count` claims per
/// `rate_period_seconds`, for the type as a whole or, with
/// `rate_per_key`, for each concurrency key. `task_rate_buckets` holds one
/// token bucket per limited type (`bucket_key` '') or per type and key: its
/// tokens as of `refilled_at`. A bucket not there yet is full.
#[derive(DeriveMigrationName)]
pub struct Migration;

fn up(postgres: bool) -> Vec<String> {
    let (real, time) = if postgres {
        ("double precision", "timestamptz")
    } else {
        ("real", "timestamp_with_timezone_text")
    };
    let mut sql: Vec<String> = [
        "rate_count integer",
        "rate_period_seconds integer",
        "rate_per_key boolean NOT NULL DEFAULT false",
    ]
    .iter()
    .map(|column| format!("ALTER TABLE task_types ADD COLUMN {column}"))
    .collect();
    sql.push(format!(
        "CREATE TABLE task_rate_buckets (
             task_type varchar(64) NOT NULL,
             bucket_key text NOT NULL,
             tokens {real} NOT NULL,
             refilled_at {time} NOT NULL,
             PRIMARY KEY (task_type, bucket_key)
         )"
    ));
    sql
}

fn down() -> Vec<String> {
    let mut sql = vec!["DROP TABLE IF EXISTS task_rate_buckets".to_owned()];
    sql.extend(
        ["rate_count", "rate_period_seconds", "rate_per_key"]
            .iter()
            .map(|column| format!("ALTER TABLE task_types DROP COLUMN {column}")),
    );
    sql
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run_on(manager, || up(true), || up(false)).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run_on(manager, down, down).await
    }
}
