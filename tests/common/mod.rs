//! Shared test set-up: a fresh database per test, on SQLite by default or on
//! PostgreSQL when `TASKQL_TEST_DATABASE_URL` is set.
#![allow(dead_code)]

pub mod edge;
pub mod js;
pub mod sse;
pub mod ws;
use std::sync::Arc;

use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use taskql::auth::CurrentUser;
use taskql::db::{Db, DbSettings, PoolSettings};
use taskql::service::{TaskService, TaskStore, Worker};

pub const PG_ENV: &str = "TASKQL_TEST_DATABASE_URL";

/// A test's own database; it goes away with this, even when the test panics.
pub struct TestDb {
    pub url: String,
    pub is_postgres: bool,
    _dir: Option<tempfile::TempDir>,
    _database: Option<DropDatabase>,
}

/// Drops a PostgreSQL database (`WITH (FORCE)`: servers of the test may
/// still be connected) when dropped, after the test passed or while it
/// unwinds from a panic. `Drop` cannot await, and runs inside the test's
/// runtime (on its one thread, or while it shuts down), so the `DROP` runs
/// on a thread and runtime of its own, waited for.
struct DropDatabase {
    admin_url: String,
    name: String,
}

/// Longest a test waits for its database to be dropped.
const DROP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Drop for DropDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || -> Result<(), String> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                tokio::time::timeout(DROP_TIMEOUT, drop_database(&admin_url, &name))
                    .await
                    .map_err(|_| format!("no answer within {DROP_TIMEOUT:?}"))?
            })
        })
        .join();
        // Never a panic here: during a test's unwinding it would abort the
        // run and hide the test's own failure.
        let problem = match dropped {
            Ok(Ok(())) => return,
            Ok(Err(problem)) => problem,
            Err(_) => "the thread dropping it panicked".to_owned(),
        };
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "test database {} was not dropped: {problem}",
            self.name
        );
    }
}

async fn drop_database(admin_url: &str, name: &str) -> Result<(), String> {
    use sea_orm::sqlx::{self, Connection};
    let mut admin = sqlx::PgConnection::connect(admin_url)
        .await
        .map_err(|e| e.to_string())?;
    let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
    sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
        .execute(&mut admin)
        .await
        .map_err(|e| e.to_string())?;
    admin.close().await.map_err(|e| e.to_string())
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
                // From here on, it is dropped whatever happens.
                let database = DropDatabase {
                    admin_url: base.clone(),
                    name: name.clone(),
                };
                admin.close().await.ok();
                let (prefix, _) = base.rsplit_once('/').expect("database url has a path");
                TestDb {
                    url: format!("{prefix}/{name}"),
                    is_postgres: true,
                    _dir: None,
                    _database: Some(database),
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
                    _database: None,
                }
            }
        }
    }

    /// A SeaORM pool on the migrated database, for set-up and checks.
    pub async fn connect(&self) -> DatabaseConnection {
        let db = taskql::db::connect(&self.url, 16).await.expect("connect");
        taskql::db::migrate(&db).await.expect("migrate");
        db
    }

    /// The service on the migrated database, as the server runs it.
    pub async fn service(&self) -> (Arc<TaskStore>, Db) {
        self.connect().await.close().await.expect("close");
        let settings = PoolSettings {
            max_connections: 16,
            ..PoolSettings::from(&settings_for(&self.url).database)
        };
        let database = DbSettings::new(&self.url).expect("a database url");
        let db = Db::connect(&database, settings).await.expect("connect");
        let service = Arc::new(TaskStore::new(db.clone(), Default::default()));
        (service, db)
    }
}

/// For tests that only mean something on PostgreSQL.
pub fn postgres_url_or_skip(test: &str) -> Option<String> {
    match std::env::var(PG_ENV) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            say_skipped(test, &format!("set {PG_ENV} to run it on PostgreSQL"));
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

/// The worker capability of `worker()`.
pub fn as_worker() -> Worker {
    Worker::new(&worker()).expect("worker-1 has the service role")
}

pub async fn count_rows(db: &impl ConnectionTrait) -> i64 {
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
                ..Default::default()
            },
        )
        .await
        .expect("create task")
}

pub const TEST_SECRET: &str = "taskql-test-secret-0123456789abcdef";

/// A real taskql serving on a free port, on its own fresh database.
pub struct TestApp {
    pub base: String,
    pub ws_url: String,
    pub http: reqwest::Client,
    pub service: Arc<TaskStore>,
    pub db: Db,
    pub database: Arc<TestDb>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    pub server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

pub fn settings_for(url: &str) -> taskql::config::Settings {
    taskql::config::Settings::from_args([
        "taskql",
        "--database-url",
        url,
        "--jwt-secret",
        TEST_SECRET,
        "--listen",
        "127.0.0.1:0",
    ])
    .expect("test settings parse")
}

pub async fn spawn_app() -> TestApp {
    let database = Arc::new(TestDb::new().await);
    spawn_app_with(database, |_| {}).await
}

/// Serves on `database` (shared by several instances when they share it),
/// with settings adjusted by `tweak`.
pub async fn spawn_app_with(
    database: Arc<TestDb>,
    tweak: impl FnOnce(&mut taskql::config::Settings),
) -> TestApp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    serve_on(database, listener, tweak).await
}

/// Two instances serving one fresh database (each holds it: `a.database`).
pub async fn two_apps() -> (TestApp, TestApp) {
    let database = Arc::new(TestDb::new().await);
    let a = spawn_app_with(database.clone(), |_| {}).await;
    let b = spawn_app_with(database, |_| {}).await;
    (a, b)
}

/// `two_apps()`, for tests that only mean something on PostgreSQL: `None`
/// (the test skipped, as `postgres_url_or_skip` says) without it.
pub async fn two_apps_on_postgres_or_skip(test: &str) -> Option<(TestApp, TestApp)> {
    postgres_url_or_skip(test)?;
    Some(two_apps().await)
}

/// Serves on `database` at `address`: a server restarted where it was.
pub async fn spawn_app_at(database: Arc<TestDb>, address: &str) -> TestApp {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .expect("bind the same address again");
    serve_on(database, listener, |_| {}).await
}

async fn serve_on(
    database: Arc<TestDb>,
    listener: tokio::net::TcpListener,
    tweak: impl FnOnce(&mut taskql::config::Settings),
) -> TestApp {
    let mut settings = settings_for(&database.url);
    tweak(&mut settings);
    let config = taskql::config::Config::from_settings(&settings).expect("valid test config");
    let key = taskql::auth::load_key(&config.auth).expect("the test key");
    let app = taskql::App::build(&config, &key).await.expect("app builds");
    let service = app.service.clone();
    let db = app.db.clone();
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.serve(listener, async move {
        let _ = rx.await;
    }));
    TestApp {
        base: format!("http://{addr}"),
        ws_url: format!("ws://{addr}/graphql/ws"),
        http: reqwest::Client::new(),
        service,
        db,
        database,
        shutdown: Some(tx),
        server: Some(server),
    }
}

pub fn token_for(user: &str, role: Option<&str>) -> String {
    taskql::auth::issue_token(
        TEST_SECRET,
        user,
        role,
        std::time::Duration::from_secs(3600),
        None,
        None,
    )
    .expect("token")
}

/// A token of `user` that expired an hour ago (well past the leeway).
pub fn expired_token_for(user: &str) -> String {
    token_expired_seconds_ago(user, 3600)
}

/// A token of `user` that is still valid within the 30 s leeway for about
/// two more seconds: long enough to start something, not to outlive it.
pub fn expiring_token_for(user: &str) -> String {
    token_expired_seconds_ago(user, 28)
}

fn token_expired_seconds_ago(user: &str, seconds: i64) -> String {
    let exp = chrono::Utc::now().timestamp() - seconds;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({ "sub": user, "exp": exp }),
        &jsonwebtoken::EncodingKey::from_secret(TEST_SECRET.as_bytes()),
    )
    .expect("token")
}

impl TestApp {
    pub fn user_token(&self, user: &str) -> String {
        token_for(user, None)
    }

    pub fn worker_token(&self) -> String {
        token_for("worker-1", Some("service_role"))
    }

    /// POSTs a GraphQL request and returns the JSON body (any HTTP status).
    pub async fn gql(
        &self,
        token: Option<&str>,
        query: &str,
        variables: serde_json::Value,
    ) -> serde_json::Value {
        let mut request = self
            .http
            .post(format!("{}/graphql", self.base))
            .json(&serde_json::json!({ "query": query, "variables": variables }));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("request");
        response.json().await.expect("JSON body")
    }

    /// Creates a task as the owner of `token`; the `fields` asked of it.
    pub async fn create_task(
        &self,
        token: &str,
        input: serde_json::Value,
        fields: &str,
    ) -> serde_json::Value {
        let query = format!(
            "mutation($input: CreateTaskInput!) {{ createTask(input: $input) {{ {fields} }} }}"
        );
        data(
            self.gql(Some(token), &query, serde_json::json!({ "input": input }))
                .await,
        )["createTask"]
            .clone()
    }

    /// `claimTask` as a worker (`workerId` `worker_id`) of `types` (a JSON
    /// list, or null for any type), with a lease of `lease` seconds (null:
    /// the default): the claimed task's `fields`, or null when none is
    /// runnable.
    pub async fn claim_task(
        &self,
        types: serde_json::Value,
        lease: Option<i64>,
        worker_id: &str,
        fields: &str,
    ) -> serde_json::Value {
        let query = format!(
            "mutation($types: [String!], $lease: Int, $worker: String) {{
               claimTask(types: $types, leaseSeconds: $lease, workerId: $worker) {{ {fields} }}
             }}"
        );
        let variables = serde_json::json!({ "types": types, "lease": lease, "worker": worker_id });
        data(
            self.gql(Some(&self.worker_token()), &query, variables)
                .await,
        )["claimTask"]
            .clone()
    }

    /// `updateTaskStatus` as a worker; the whole answer, errors included.
    pub async fn update_status(&self, input: serde_json::Value, fields: &str) -> serde_json::Value {
        let query = format!(
            "mutation($input: UpdateTaskStatusInput!) {{ updateTaskStatus(input: $input) {{ {fields} }} }}"
        );
        self.gql(
            Some(&self.worker_token()),
            &query,
            serde_json::json!({ "input": input }),
        )
        .await
    }

    /// GETs a path of the server.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request")
    }

    /// Asks the server to stop (as on SIGTERM) and waits for it.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The program a test needs (the path in env `variable`, else `default`), or
/// `None` after printing why `test` is skipped when it is missing. With `CI`
/// set a missing program fails the test instead: CI installs it.
pub fn tool_or_skip(
    test: &str,
    variable: &str,
    default: &str,
    install: &str,
) -> Option<std::path::PathBuf> {
    let path = std::env::var(variable).unwrap_or_else(|_| default.into());
    if std::path::Path::new(&path).is_file() {
        return Some(path.into());
    }
    let reason = format!("nothing at {path} (`{install}`, or set {variable} to one)");
    if std::env::var("CI").is_ok_and(|ci| !ci.is_empty()) {
        panic!("{test}: {reason}, and CI is set");
    }
    say_skipped(test, &reason);
    None
}

/// Prints that `test` was skipped and why, straight to stderr: the test
/// harness captures `eprintln!` of a passing test, and a skip must be seen.
pub fn say_skipped(test: &str, reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped {test}: {reason}");
}

/// The `data` of a GraphQL answer that must have no errors.
pub fn data(body: serde_json::Value) -> serde_json::Value {
    assert!(body.get("errors").is_none(), "unexpected errors: {body}");
    body["data"].clone()
}

/// The `extensions.code` of the first error, if any.
pub fn error_code(body: &serde_json::Value) -> Option<&str> {
    body["errors"][0]["extensions"]["code"].as_str()
}

/// Polls `check` until it yields a value, failing after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The `id` of a task in an answer.
pub fn id_of(task: &serde_json::Value) -> String {
    task["id"].as_str().expect("an id").to_owned()
}

/// A `DateTime` field of an answer.
pub fn time(value: &serde_json::Value) -> chrono::DateTime<chrono::Utc> {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("a DateTime: {value}"));
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{text} is not RFC 3339: {e}"))
        .with_timezone(&chrono::Utc)
}
