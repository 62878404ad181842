//! The worker loop of `examples/worker.rs`. It speaks only GraphQL over HTTP,
//! as a worker in another language would. `tests/worker/main.rs` includes this
//! file too, so the test runs exactly the example's code.
//!
//! Each slot loops: `claimTask` → `heartbeatTask` with progress a few times →
//! `updateTaskStatus(COMPLETED)` fenced by the attempt it claimed. A CONFLICT
//! from a heartbeat or the final update means the task is no longer ours
//! (cancelled, finished, or claimed again after our lease expired): the slot
//! drops it and moves on. Any other error stops the worker; whatever it had
//! claimed returns to PENDING when its lease expires.
//!
//! With `batch` over 1, each slot works on up to that many tasks at once
//! and makes one call for them all at each step: `claimTasks(limit)` →
//! `heartbeatTasks` for every task it holds → `completeTasks`. A task whose
//! heartbeat or completion comes back with an error in its report is
//! dropped; the others go on.
//!
//! A task created in a traced request carries that trace's `traceparent`;
//! the worker sends a child of it (the same trace, a span id of its own)
//! with its heartbeats and its completion, so they join the creator's trace.
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The GraphQL endpoint, e.g. `http://127.0.0.1:8000/graphql`.
    pub url: String,
    /// A token whose `role` is the service role.
    pub token: String,
    /// Task types to take; empty takes any.
    pub types: Vec<String>,
    /// Tasks worked on at once.
    pub concurrency: usize,
    pub worker_id: String,
    pub lease_seconds: i32,
    /// Heartbeats (with progress) per task before it completes.
    pub steps: u32,
    /// Pretend work between heartbeats.
    pub step_time: Duration,
    /// Stop after this many claimed tasks (completed or dropped).
    pub max_tasks: Option<usize>,
    /// Stop a slot as soon as nothing is pending, instead of polling.
    pub exit_when_idle: bool,
    pub idle_poll: Duration,
    /// Tasks a slot claims, heartbeats and completes per call; 1 works one
    /// task at a time with `claimTask`.
    pub batch: usize,
    pub verbose: bool,
}

impl WorkerConfig {
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            token: token.into(),
            types: Vec::new(),
            concurrency: 4,
            worker_id: format!("example-worker-{}", std::process::id()),
            lease_seconds: 30,
            steps: 3,
            step_time: Duration::from_millis(500),
            max_tasks: None,
            exit_when_idle: false,
            idle_poll: Duration::from_secs(1),
            batch: 1,
            verbose: false,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    pub completed: usize,
    /// Dropped on a CONFLICT: cancelled, or no longer ours.
    pub abandoned: usize,
}

#[derive(Debug)]
pub enum WorkerError {
    Http(reqwest::Error),
    /// The server answered with a GraphQL error the worker cannot handle.
    Graphql {
        code: String,
        message: String,
    },
    Protocol(String),
}

impl std::fmt::Display for WorkerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Http(err) => write!(f, "HTTP: {err}"),
            Self::Graphql { code, message } => write!(f, "{code}: {message}"),
            Self::Protocol(message) => write!(f, "unexpected answer: {message}"),
        }
    }
}

impl std::error::Error for WorkerError {}

impl From<reqwest::Error> for WorkerError {
    fn from(err: reqwest::Error) -> Self {
        Self::Http(err)
    }
}

impl WorkerError {
    /// The task is not ours any more: stop working on it, keep working.
    fn means_drop_task(&self) -> bool {
        matches!(self, Self::Graphql { code, .. } if code == "CONFLICT" || code == "NOT_FOUND")
    }
}

/// The `resultId` the example reports for a task it completed.
pub fn result_id_for(task_id: &str) -> String {
    format!("example-result-{task_id}")
}

const CLAIM: &str = "mutation Claim($types: [String!], $lease: Int, $worker: String) {
  claimTask(types: $types, leaseSeconds: $lease, workerId: $worker) { id type attempts traceparent }
}";
const HEARTBEAT: &str = "mutation Beat($id: ID!, $progress: Int, $lease: Int, $attempt: Int) {
  heartbeatTask(id: $id, progress: $progress, leaseSeconds: $lease, expectedAttempt: $attempt) { status }
}";
const COMPLETE: &str = "mutation Complete($input: UpdateTaskStatusInput!) {
  updateTaskStatus(input: $input) { status }
}";
const CLAIM_MANY: &str = "mutation ClaimMany($types: [String!], $limit: Int!, $lease: Int, $worker: String) {
  claimTasks(types: $types, limit: $limit, leaseSeconds: $lease, workerId: $worker) { id type attempts traceparent }
}";
const HEARTBEAT_MANY: &str = "mutation BeatMany($input: [HeartbeatTaskInput!]!, $lease: Int) {
  heartbeatTasks(input: $input, leaseSeconds: $lease) { id error { code message } }
}";
const COMPLETE_MANY: &str = "mutation CompleteMany($input: [CompleteTaskInput!]!) {
  completeTasks(input: $input) { id error { code message } }
}";

struct Client {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl Client {
    /// One GraphQL request, in the trace of `traceparent` when given; its
    /// first error, if any, becomes `Graphql`.
    async fn call(
        &self,
        query: &str,
        variables: Value,
        traceparent: Option<&str>,
    ) -> Result<Value, WorkerError> {
        let mut request = self
            .http
            .post(&self.url)
            .bearer_auth(&self.token)
            .json(&json!({ "query": query, "variables": variables }));
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        let body: Value = request.send().await?.json().await?;
        if let Some(error) = body["errors"].get(0) {
            return Err(WorkerError::Graphql {
                code: error["extensions"]["code"]
                    .as_str()
                    .unwrap_or("UNKNOWN")
                    .to_owned(),
                message: error["message"].as_str().unwrap_or_default().to_owned(),
            });
        }
        Ok(body["data"].clone())
    }
}

struct Claimed {
    id: String,
    attempts: i64,
    /// Sent with every call about the task: a child of the task's trace.
    traceparent: Option<String>,
}

/// A W3C `traceparent` in the same trace as `parent`, with a span id of
/// its own (the worker's work on the task); `None` when `parent` is not
/// one (version 00: `00-<trace id>-<span id>-<flags>`, in lower-case hex).
pub fn child_traceparent(parent: &str) -> Option<String> {
    let hex = |part: &str, len: usize| {
        part.len() == len
            && part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            && part.bytes().any(|b| b != b'0')
    };
    let mut parts = parent.split('-');
    let (Some("00"), Some(trace_id), Some(span_id), Some(flags), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let flags_ok = flags.len() == 2 && flags.bytes().all(|b| b.is_ascii_hexdigit());
    if !(hex(trace_id, 32) && hex(span_id, 16) && flags_ok) {
        return None;
    }
    let span_id = rand::random::<u64>().max(1);
    Some(format!("00-{trace_id}-{span_id:016x}-{flags}"))
}

/// How many more tasks may be claimed; `None` is no limit.
struct Budget(Option<AtomicUsize>);

impl Budget {
    fn take(&self) -> bool {
        self.take_many(1) == 1
    }

    fn give_back(&self) {
        self.give_back_many(1);
    }

    /// Takes up to `n`; how many it took.
    fn take_many(&self, n: usize) -> usize {
        match &self.0 {
            None => n,
            Some(left) => left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| Some(l - l.min(n)))
                .map_or(0, |l| l.min(n)),
        }
    }

    fn give_back_many(&self, n: usize) {
        if let Some(left) = &self.0 {
            left.fetch_add(n, Ordering::SeqCst);
        }
    }
}

/// Runs `config.concurrency` slots until each stops (budget spent, idle
/// with `exit_when_idle`, or an error).
pub async fn run(config: WorkerConfig) -> Result<Report, WorkerError> {
    let client = Arc::new(Client {
        http: reqwest::Client::new(),
        url: config.url.clone(),
        token: config.token.clone(),
    });
    let budget = Arc::new(Budget(config.max_tasks.map(AtomicUsize::new)));
    let config = Arc::new(config);
    let slots: Vec<_> = (0..config.concurrency.max(1))
        .map(|slot| {
            let (client, budget, config) = (client.clone(), budget.clone(), config.clone());
            tokio::spawn(async move {
                if config.batch > 1 {
                    work_batches(slot, &client, &budget, &config).await
                } else {
                    work(slot, &client, &budget, &config).await
                }
            })
        })
        .collect();
    let mut total = Report::default();
    let mut failure = None;
    for slot in slots {
        match slot.await {
            Ok(Ok(report)) => {
                total.completed += report.completed;
                total.abandoned += report.abandoned;
            }
            Ok(Err(err)) => failure = Some(err),
            Err(join) => failure = Some(WorkerError::Protocol(format!("slot panicked: {join}"))),
        }
    }
    match failure {
        Some(err) => Err(err),
        None => Ok(total),
    }
}

async fn work(
    slot: usize,
    client: &Client,
    budget: &Budget,
    config: &WorkerConfig,
) -> Result<Report, WorkerError> {
    let worker_id = format!("{}/{slot}", config.worker_id);
    let mut report = Report::default();
    loop {
        if !budget.take() {
            return Ok(report);
        }
        let claimed = match claim(client, config, &worker_id).await {
            Ok(claimed) => claimed,
            Err(err) => {
                budget.give_back();
                return Err(err);
            }
        };
        let Some(task) = claimed else {
            budget.give_back();
            if config.exit_when_idle {
                return Ok(report);
            }
            tokio::time::sleep(config.idle_poll).await;
            continue;
        };
        match process(client, config, &task).await {
            Ok(()) => {
                report.completed += 1;
                if config.verbose {
                    println!(
                        "{worker_id}: completed {} (attempt {})",
                        task.id, task.attempts
                    );
                }
            }
            Err(err) if err.means_drop_task() => {
                report.abandoned += 1;
                if config.verbose {
                    println!("{worker_id}: dropped {}: {err}", task.id);
                }
            }
            Err(err) => return Err(err),
        }
    }
}

/// A slot of `batch` tasks: claims up to that many, heartbeats and
/// completes them with one call each step.
async fn work_batches(
    slot: usize,
    client: &Client,
    budget: &Budget,
    config: &WorkerConfig,
) -> Result<Report, WorkerError> {
    let worker_id = format!("{}/{slot}", config.worker_id);
    let mut report = Report::default();
    loop {
        let wanted = budget.take_many(config.batch);
        if wanted == 0 {
            return Ok(report);
        }
        let tasks = match claim_many(client, config, &worker_id, wanted).await {
            Ok(tasks) => tasks,
            Err(err) => {
                budget.give_back_many(wanted);
                return Err(err);
            }
        };
        budget.give_back_many(wanted - tasks.len());
        if tasks.is_empty() {
            if config.exit_when_idle {
                return Ok(report);
            }
            tokio::time::sleep(config.idle_poll).await;
            continue;
        }
        let done = process_batch(client, config, tasks).await?;
        report.completed += done.completed;
        report.abandoned += done.abandoned;
        if config.verbose {
            println!(
                "{worker_id}: batch done, {} completed, {} dropped",
                done.completed, done.abandoned
            );
        }
    }
}

async fn claim_many(
    client: &Client,
    config: &WorkerConfig,
    worker_id: &str,
    limit: usize,
) -> Result<Vec<Claimed>, WorkerError> {
    let types = (!config.types.is_empty()).then_some(&config.types);
    let data = client
        .call(
            CLAIM_MANY,
            json!({ "types": types, "limit": limit, "lease": config.lease_seconds, "worker": worker_id }),
            None,
        )
        .await?;
    let Some(tasks) = data["claimTasks"].as_array() else {
        return Err(WorkerError::Protocol(format!("claimTasks returned {data}")));
    };
    tasks
        .iter()
        .map(
            |task| match (task["id"].as_str(), task["attempts"].as_i64()) {
                (Some(id), Some(attempts)) => Ok(Claimed {
                    id: id.to_owned(),
                    attempts,
                    traceparent: task["traceparent"].as_str().and_then(child_traceparent),
                }),
                _ => Err(WorkerError::Protocol(format!("claimTasks returned {task}"))),
            },
        )
        .collect()
}

/// The tasks of a batched report whose item came back without an error;
/// those with one are dropped (no longer ours) and counted in `dropped`.
fn still_held(
    tasks: Vec<Claimed>,
    reports: &Value,
    dropped: &mut usize,
) -> Result<Vec<Claimed>, WorkerError> {
    let Some(reports) = reports.as_array().filter(|r| r.len() == tasks.len()) else {
        return Err(WorkerError::Protocol(format!(
            "a batched report returned {reports}"
        )));
    };
    let mut held = Vec::with_capacity(tasks.len());
    for (task, report) in tasks.into_iter().zip(reports) {
        if report["error"].is_null() {
            held.push(task);
        } else {
            *dropped += 1;
        }
    }
    Ok(held)
}

/// [`process`] of a batch: every step one `heartbeatTasks` for all the
/// tasks still held, then one `completeTasks`, each fenced per task.
async fn process_batch(
    client: &Client,
    config: &WorkerConfig,
    mut tasks: Vec<Claimed>,
) -> Result<Report, WorkerError> {
    let mut report = Report::default();
    for step in 1..=config.steps {
        tokio::time::sleep(config.step_time).await;
        if tasks.is_empty() {
            return Ok(report);
        }
        let progress = step * 100 / (config.steps + 1);
        let input: Vec<Value> = tasks
            .iter()
            .map(|t| json!({ "id": t.id, "expectedAttempt": t.attempts, "progress": progress }))
            .collect();
        let data = client
            .call(
                HEARTBEAT_MANY,
                json!({ "input": input, "lease": config.lease_seconds }),
                None,
            )
            .await?;
        tasks = still_held(tasks, &data["heartbeatTasks"], &mut report.abandoned)?;
    }
    tokio::time::sleep(config.step_time).await;
    if tasks.is_empty() {
        return Ok(report);
    }
    let input: Vec<Value> = tasks
        .iter()
        .map(|t| json!({ "id": t.id, "expectedAttempt": t.attempts, "resultId": result_id_for(&t.id) }))
        .collect();
    let data = client
        .call(COMPLETE_MANY, json!({ "input": input }), None)
        .await?;
    report.completed += still_held(tasks, &data["completeTasks"], &mut report.abandoned)?.len();
    Ok(report)
}

async fn claim(
    client: &Client,
    config: &WorkerConfig,
    worker_id: &str,
) -> Result<Option<Claimed>, WorkerError> {
    let types = (!config.types.is_empty()).then_some(&config.types);
    let data = client
        .call(
            CLAIM,
            json!({ "types": types, "lease": config.lease_seconds, "worker": worker_id }),
            None,
        )
        .await?;
    let task = &data["claimTask"];
    if task.is_null() {
        return Ok(None);
    }
    match (task["id"].as_str(), task["attempts"].as_i64()) {
        (Some(id), Some(attempts)) => Ok(Some(Claimed {
            id: id.to_owned(),
            attempts,
            traceparent: task["traceparent"].as_str().and_then(child_traceparent),
        })),
        _ => Err(WorkerError::Protocol(format!("claimTask returned {task}"))),
    }
}

/// Does the (pretend) work, reporting progress; completes the task, fenced
/// by the attempt we claimed so a late finish cannot overwrite a re-claim.
async fn process(
    client: &Client,
    config: &WorkerConfig,
    task: &Claimed,
) -> Result<(), WorkerError> {
    for step in 1..=config.steps {
        tokio::time::sleep(config.step_time).await;
        let progress = step * 100 / (config.steps + 1);
        client
            .call(
                HEARTBEAT,
                json!({
                    "id": task.id,
                    "progress": progress,
                    "lease": config.lease_seconds,
                    "attempt": task.attempts,
                }),
                task.traceparent.as_deref(),
            )
            .await?;
    }
    tokio::time::sleep(config.step_time).await;
    client
        .call(
            COMPLETE,
            json!({ "input": {
                "id": task.id,
                "status": "COMPLETED",
                "resultId": result_id_for(&task.id),
                "expectedAttempt": task.attempts,
            }}),
            task.traceparent.as_deref(),
        )
        .await?;
    Ok(())
}
