//! The task store through `TaskService`, on SQLite or PostgreSQL.
#[path = "../common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::*;
use entity::{TaskStatus, Tasks};
use sea_orm::{ConnectionTrait, EntityTrait, Statement};
use taskql::error::TaskError;
use taskql::service::{NewTask, StatusUpdate, TaskFilter, TaskService};

mod concurrency;
mod database;
mod operations;
mod statuses;

fn create(task_type: &str) -> NewTask {
    NewTask {
        task_type: task_type.into(),
        metadata: None,
        idempotency_key: None,
        ..Default::default()
    }
}
