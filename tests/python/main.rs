//! The Python worker library (clients/python) against the real `taskql`
//! binary: a venv with the package installed (tests/python/venv.rs), the
//! worker of tests/python/scripts/worker.py as a child process, and the
//! server as one too, so a test can kill it and start it again on the same
//! database and port. On SQLite by default, on PostgreSQL when
//! `TASKQL_TEST_DATABASE_URL` is set. Without python3 the tests say they
//! are skipped (and fail when `CI` is set).
#[path = "../common/mod.rs"]
mod common;

mod venv;
mod worker;

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use common::edge::server::Server;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};

/// Longest one GraphQL request of a test may take.
const REQUEST: Duration = Duration::from_secs(20);

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python/scripts")
        .join(name)
}

/// The `data` of a GraphQL request that must succeed.
async fn gql(server: &Server, token: &str, query: &str, variables: Value) -> Value {
    let (status, body) = server
        .graphql(token, query, variables, REQUEST)
        .await
        .unwrap_or_else(|e| panic!("{query}: {e}"));
    assert!(
        status == 200 && body.get("errors").is_none(),
        "{query}: HTTP {status}: {body}"
    );
    body["data"].clone()
}

/// Creates `inputs` with one `createTasks` as the owner of `token`; their ids.
async fn create_tasks(server: &Server, token: &str, inputs: Vec<Value>) -> Vec<String> {
    let data = gql(
        server,
        token,
        "mutation($inputs: [CreateTaskInput!]!) { createTasks(inputs: $inputs) { id } }",
        json!({ "inputs": inputs }),
    )
    .await;
    data["createTasks"]
        .as_array()
        .expect("a list of tasks")
        .iter()
        .map(|task| task["id"].as_str().expect("an id").to_owned())
        .collect()
}

const TASK: &str = "query($id: ID!) { task(id: $id) { id type status progress attempts resultId result errorMessage runAt } }";

/// The task as its owner sees it.
async fn task(server: &Server, token: &str, id: &str) -> Value {
    gql(server, token, TASK, json!({ "id": id })).await["task"].clone()
}

/// Polls `check` every 50 ms until it holds, failing after `within`.
async fn wait_for<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// tests/python/scripts/worker.py running in the venv.
struct PyWorker {
    child: tokio::process::Child,
    stderr: tokio::task::JoinHandle<String>,
    ready: tokio::sync::oneshot::Receiver<()>,
}

/// How the worker ended: its exit status, its JSON report and its stderr.
struct PyOutcome {
    status: ExitStatus,
    report: Value,
    stderr: String,
}

impl PyWorker {
    /// Starts the worker for `types` against `server`, with `env` on top.
    fn start(
        python: &Path,
        server: &Server,
        token: &str,
        types: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let mut child = tokio::process::Command::new(python)
            .arg(script("worker.py"))
            .env("TASKQL_URL", format!("{}/graphql", server.base))
            .env("TASKQL_TOKEN", token)
            .env("TYPES", types)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the venv's python runs");
        let stderr = child.stderr.take().expect("piped stderr");
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let stderr = tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            let mut ready_tx = Some(ready_tx);
            let mut text = String::new();
            while let Ok(Some(line)) = lines.next_line().await {
                if line == "ready" {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                    continue;
                }
                text.push_str(&line);
                text.push('\n');
            }
            text
        });
        Self {
            child,
            stderr,
            ready,
        }
    }

    /// Waits until the worker has registered its handlers and is about to run.
    async fn ready(&mut self) {
        tokio::time::timeout(Duration::from_secs(30), &mut self.ready)
            .await
            .expect("the Python worker starts within 30 s")
            .expect("the Python worker starts");
    }

    /// Sends SIGTERM, as `kill -TERM` does.
    fn terminate(&self) {
        let pid = self.child.id().expect("the worker is running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid} failed");
    }

    /// Waits up to `within` for the worker to exit; what it reported.
    async fn finish(mut self, within: Duration) -> PyOutcome {
        let mut stdout = self.child.stdout.take().expect("piped stdout");
        let status = match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.expect("wait for the worker"),
            Err(_) => {
                let _ = self.child.kill().await;
                let stderr = self.stderr.await.unwrap_or_default();
                panic!("the Python worker did not exit within {within:?}:\n{stderr}");
            }
        };
        let mut text = String::new();
        stdout
            .read_to_string(&mut text)
            .await
            .expect("the worker's stdout");
        let stderr = self.stderr.await.unwrap_or_default();
        let last = text.lines().last().unwrap_or_default();
        let report = serde_json::from_str(last).unwrap_or_else(|e| {
            panic!("the worker's report is not JSON ({e}), {status}:\n{text}\n{stderr}")
        });
        PyOutcome {
            status,
            report,
            stderr,
        }
    }
}
