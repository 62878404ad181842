//! Shared test set-up: a fresh database per test, on SQLite by default or on
//! PostgreSQL when `TASKQL_TEST_DATABASE_URL` is set.
#![allow(dead_code)]

use std::sync::Arc;

use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use taskql::auth::CurrentUser;
use taskql::events::EventBus;
use taskql::service::{SeaTaskService, TaskService};

pub const PG_ENV: &str = "TASKQL_TEST_DATABASE_URL";

pub struct TestDb {
    pub url: String,
    pub is_postgres: bool,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// A new empty database: a temp SQLite file, or a new PostgreSQL database
    /// beside the one `TASKQL_TEST_DATABASE_URL` names.
    pub async fn new() -> Self {
        match std::env::var(PG_ENV) {
            Ok(base) if !base.is_empty() => {
                let admin = taskql::db::connect(&base, 2)
                    .await
                    .unwrap_or_else(|e| panic!("{PG_ENV}={base} is unreachable: {e}"));
                let name = format!("taskql_t_{}", uuid::Uuid::new_v4().simple());
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create test database");
                admin.close().await.ok();
                let (prefix, _) = base.rsplit_once('/').expect("database url has a path");
                let prefix = prefix.to_owned();
                TestDb {
                    url: format!("{prefix}/{name}"),
                    is_postgres: true,
                    _dir: None,
                }
            }
            _ => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!(
                    "sqlite://{}?mode=rwc",
                    dir.path().join("taskql.db").display()
                );
                TestDb {
                    url,
                    is_postgres: false,
                    _dir: Some(dir),
                }
            }
        }
    }

    pub async fn connect(&self) -> DatabaseConnection {
        let db = taskql::db::connect(&self.url, 16).await.expect("connect");
        taskql::db::migrate(&db).await.expect("migrate");
        db
    }

    pub async fn service(&self) -> (Arc<SeaTaskService>, DatabaseConnection) {
        let db = self.connect().await;
        let service = Arc::new(SeaTaskService::new(db.clone(), EventBus::default()));
        (service, db)
    }
}

/// For tests that only mean something on PostgreSQL.
pub fn postgres_url_or_skip(test: &str) -> Option<String> {
    match std::env::var(PG_ENV) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("skipped {test}: set {PG_ENV} to run it on PostgreSQL");
            None
        }
    }
}

pub fn alice() -> CurrentUser {
    CurrentUser::user("alice")
}

pub fn bob() -> CurrentUser {
    CurrentUser::user("bob")
}

pub fn worker() -> CurrentUser {
    CurrentUser::service("worker-1")
}

pub async fn count_rows(db: &DatabaseConnection) -> i64 {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n FROM tasks",
        ))
        .await
        .expect("count")
        .expect("a row");
    row.try_get::<i64>("", "n").expect("n")
}

pub async fn new_task(
    service: &dyn TaskService,
    user: &CurrentUser,
    task_type: &str,
) -> entity::Task {
    service
        .create_task(
            user,
            taskql::service::NewTask {
                task_type: task_type.into(),
                metadata: Some(serde_json::json!({"prompt": "a cat"})),
                idempotency_key: None,
            },
        )
        .await
        .expect("create task")
}
