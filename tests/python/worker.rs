//! The Python worker end to end: each task completed exactly once across a
//! kill -9 of the server, cancelled handlers stopped, nothing reported for
//! an attempt the worker lost; failures and retries; a graceful SIGTERM;
//! the trace context it sends; and `mypy --strict` on the package.

use std::collections::{BTreeMap, HashMap, HashSet};

use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

use super::*;
use crate::common::sse::{EventStream, Message, post_to};
use crate::common::{TestDb, token_for};

/// What a test starts from: the venv's python, a fresh database, a
/// `taskql serve` on it, and tokens of a user (the tasks' owner) and of the
/// worker.
struct Stage {
    python: std::path::PathBuf,
    db: TestDb,
    server: Server,
    owner: String,
    worker: String,
}

impl Stage {
    /// The stage, or `None` when `test` is skipped (no python3).
    async fn set(test: &str) -> Option<Self> {
        let python = venv::python_or_skip(test)?;
        let db = TestDb::new().await;
        let server = Server::start(&db.url, &[]).await;
        Some(Self {
            python,
            db,
            server,
            owner: token_for("alice", None),
            worker: token_for("py-worker", Some("service_role")),
        })
    }
}

const CANCEL: &str = "mutation($id: ID!) { cancelTask(id: $id) { status } }";
const EVENTS: &str = "subscription($after: String) { taskEvents(after: $after) { cursor kind task { id status attempts } } }";

/// How many tasks have `status` (lower case, as stored), read from the
/// database itself, so it answers while the server is down.
async fn count(db: &DatabaseConnection, status: &str) -> i64 {
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            // `$1` on both databases: sqlx reads the number on SQLite too.
            "SELECT COUNT(*) AS n FROM tasks WHERE status = $1",
            [status.into()],
        ))
        .await
        .expect("count tasks")
        .expect("a row");
    row.try_get::<i64>("", "n").expect("n")
}

/// The cursor of the event of a task created now, to read every later
/// event back with `taskEvents(after:)`.
async fn a_first_cursor(server: &Server, worker: &str, owner: &str) -> String {
    let http = reqwest::Client::new();
    let body = json!({ "query": EVENTS, "variables": { "after": null } });
    let mut events = EventStream::new(post_to(&http, &server.base, Some(worker), &body).await);
    // The subscription is live once the server answers its first request
    // after it; a marker task makes the first event.
    tokio::time::sleep(Duration::from_millis(200)).await;
    create_tasks(server, owner, vec![json!({ "type": "py.marker" })]).await;
    events.next_data().await["taskEvents"]["cursor"]
        .as_str()
        .expect("a cursor")
        .to_owned()
}

/// Every event after `cursor`, in order, read until none comes for 2 s.
async fn events_after(server: &Server, worker: &str, cursor: &str) -> Vec<Value> {
    let http = reqwest::Client::new();
    let body = json!({ "query": EVENTS, "variables": { "after": cursor } });
    let mut stream = EventStream::new(post_to(&http, &server.base, Some(worker), &body).await);
    let mut events = Vec::new();
    while let Some(message) = stream.next_within(Duration::from_secs(2)).await {
        match message {
            Message::Next(payload) => {
                assert!(payload.get("errors").is_none(), "{payload}");
                events.push(payload["data"]["taskEvents"].clone());
            }
            Message::Comment(_) => {}
            other => panic!("the event stream ended: {other:?}"),
        }
    }
    events
}

/// The worker's events (`[kind, task id, attempt, detail]`, in order).
fn worker_events(report: &Value) -> Vec<(String, String, i64, String)> {
    report["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e[0].as_str().unwrap_or_default().to_owned(),
                e[1].as_str().unwrap_or_default().to_owned(),
                e[2].as_i64().unwrap_or(-1),
                e[3].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn runs_of(report: &Value, id: &str) -> i64 {
    report["runs"][id].as_i64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_python_worker_completes_each_task_once_across_a_server_kill() {
    const TEST: &str = "the_python_worker_completes_each_task_once_across_a_server_kill";
    let Some(Stage {
        python,
        db,
        server,
        owner,
        worker,
    }) = Stage::set(TEST).await
    else {
        return;
    };
    let pool = db.connect().await;
    let address = server.addr.to_string();
    let cursor = a_first_cursor(&server, &worker, &owner).await;

    // Four tasks whose handlers run until cancelled (two async, two sync),
    // first in line; then 200 that take 100 ms each (half of them sync).
    let holds = create_tasks(
        &server,
        &owner,
        ["py.hold", "py.hold", "py.hold.sync", "py.hold.sync"]
            .iter()
            .map(|t| json!({ "type": t, "priority": 10 }))
            .collect(),
    )
    .await;
    let inputs = (0..200)
        .map(|n| {
            let task_type = if n % 2 == 0 {
                "py.work"
            } else {
                "py.work.sync"
            };
            json!({ "type": task_type, "metadata": { "n": n, "ms": 100 } })
        })
        .collect();
    let work = create_tasks(&server, &owner, inputs).await;

    let mut py = PyWorker::start(
        &python,
        &server,
        &worker,
        "py.work,py.work.sync,py.hold,py.hold.sync",
        &[("CONCURRENCY", "8"), ("LEASE_SECONDS", "10")],
    );
    py.ready().await;

    // Cancel the holding tasks while their handlers run.
    {
        let (server, owner, holds) = (&server, &owner, &holds);
        wait_for(
            "the four holding handlers to report progress",
            Duration::from_secs(30),
            || async move {
                for id in holds {
                    if task(server, owner, id).await["progress"] != 10 {
                        return false;
                    }
                }
                true
            },
        )
        .await;
    }
    for id in &holds {
        let cancelled = gql(&server, &owner, CANCEL, json!({ "id": id })).await;
        assert_eq!(cancelled["cancelTask"]["status"], "CANCELLED");
    }

    // kill -9 in the middle of the run, then the server again on the same
    // database and port.
    {
        let pool = &pool;
        wait_for(
            "60 tasks completed",
            Duration::from_secs(60),
            || async move { count(pool, "completed").await >= 60 },
        )
        .await;
    }
    let mut server = server;
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &server.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    assert!(
        server.exit_within(Duration::from_secs(10)).await.is_some(),
        "the server dies on SIGKILL"
    );
    let at_kill = count(&pool, "completed").await;
    assert!(at_kill < 200, "the kill came before the end ({at_kill})");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let server = Server::start(&db.url, &[("TASKQL_LISTEN", &address)]).await;
    {
        let pool = &pool;
        wait_for(
            "all 200 tasks completed",
            Duration::from_secs(120),
            || async move { count(pool, "completed").await == 200 },
        )
        .await;
    }
    py.terminate();
    let outcome = py.finish(Duration::from_secs(30)).await;
    assert!(
        outcome.status.success(),
        "the worker stops cleanly on SIGTERM: {}\n{}",
        outcome.status,
        outcome.stderr
    );
    let report = &outcome.report;
    let events = worker_events(report);
    eprintln!(
        "{TEST}: {at_kill} of 200 completed at the kill; summary {}; {} s",
        report["summary"], report["seconds"]
    );

    // What the owner sees: each task done with its handler's result.
    for (n, id) in work.iter().enumerate() {
        let task = task(&server, &owner, id).await;
        assert_eq!(task["status"], "COMPLETED", "{task}");
        assert_eq!(task["resultId"], format!("done-{id}"));
        assert_eq!(task["result"]["n"], n, "{task}");
        assert_eq!(
            task["result"]["attempt"], task["attempts"],
            "completed by the attempt that held it: {task}"
        );
        assert_eq!(runs_of(report, id), 1, "the handler of {id} ran once");
    }
    for id in &holds {
        let task = task(&server, &owner, id).await;
        assert_eq!(task["status"], "CANCELLED", "{task}");
        assert!(task["resultId"].is_null(), "{task}");
        assert_eq!(runs_of(report, id), 1);
    }

    // The change log: exactly one move to COMPLETED per task, none for the
    // cancelled ones.
    let mut completions: HashMap<String, usize> = HashMap::new();
    for event in events_after(&server, &worker, &cursor).await {
        if event["task"]["status"] == "COMPLETED" {
            *completions
                .entry(event["task"]["id"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    for id in &work {
        assert_eq!(
            completions.get(id),
            Some(&1),
            "{id} moved to COMPLETED once"
        );
    }
    for id in &holds {
        assert_eq!(completions.get(id), None, "{id} was never completed");
    }

    // The cancelled handlers were stopped: the async ones cancelled with the
    // flag set, the sync ones saw the flag.
    for id in &holds {
        let seen = report["cancel_seen"][id].as_str().unwrap_or_default();
        assert!(
            seen.contains("flag True") || seen.contains("saw the flag"),
            "the handler of {id} saw its cancellation: {:?}",
            report["cancel_seen"]
        );
        assert!(seen.contains("CONFLICT"), "{seen}");
    }

    // Nothing reported late: no report for a task after a heartbeat said it
    // was lost, none refused, no completion accepted twice; the cancelled
    // tasks were never reported at all.
    let mut lost_at: HashMap<(String, i64), usize> = HashMap::new();
    let mut accepted: BTreeMap<String, usize> = BTreeMap::new();
    for (index, (kind, id, attempt, detail)) in events.iter().enumerate() {
        match kind.as_str() {
            "lost" => {
                lost_at.insert((id.clone(), *attempt), index);
            }
            "report" | "completed" | "failed" | "retried" => {
                assert!(
                    !lost_at.contains_key(&(id.clone(), *attempt)),
                    "{kind} {detail} of {id} (attempt {attempt}) after the worker lost it"
                );
                if kind == "completed" {
                    *accepted.entry(id.clone()).or_default() += 1;
                }
            }
            "refused" => panic!("a report was refused: {id} attempt {attempt}: {detail}"),
            _ => {}
        }
    }
    assert!(accepted.values().all(|&n| n == 1), "{accepted:?}");
    let holds_set: HashSet<&String> = holds.iter().collect();
    for (kind, id, _, _) in &events {
        if holds_set.contains(id) {
            assert!(
                kind == "claimed" || kind == "lost",
                "{kind} for the cancelled task {id}"
            );
        }
    }
    // The cancelled tasks, and only they, were lost: a work task's lease
    // outlives the outage, and a task whose report is on its way is never
    // taken for lost (the report's answer decides).
    let lost: HashSet<&String> = lost_at.keys().map(|(id, _)| id).collect();
    assert_eq!(lost, holds_set, "lost tasks");
    assert!(
        events.iter().any(|(kind, ..)| kind == "unreachable"),
        "the worker saw the server go away"
    );
    // Each claim (one task each at batch 1) is a request of its own; reports
    // and heartbeats are more.
    let claims = events.iter().filter(|(kind, ..)| kind == "claimed").count() as u64;
    assert!(
        report["token_calls"].as_u64().unwrap_or(0) > claims,
        "the token callable is asked before every request: {} calls, {claims} claims",
        report["token_calls"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_python_handler_fails_its_task_and_a_retryable_one_comes_back() {
    const TEST: &str = "a_failing_python_handler_fails_its_task_and_a_retryable_one_comes_back";
    let Some(stage) = Stage::set(TEST).await else {
        return;
    };
    let Stage {
        python,
        server,
        owner,
        worker,
        ..
    } = &stage;
    gql(
        server,
        worker,
        "mutation { setTaskTypePolicy(type: \"py.flaky\", policy: {backoff: {initialSeconds: 0.2, factor: 1, maxSeconds: 0.2, jitter: false}}) { type } }",
        json!({}),
    )
    .await;
    let ids = create_tasks(
        server,
        owner,
        vec![
            json!({ "type": "py.fail", "metadata": { "reason": "the model said no" } }),
            json!({ "type": "py.flaky" }),
        ],
    )
    .await;
    let (failing, flaky) = (&ids[0], &ids[1]);
    let mut py = PyWorker::start(
        python,
        server,
        worker,
        "py.fail,py.flaky",
        &[("CONCURRENCY", "2")],
    );
    py.ready().await;
    {
        let (server, owner) = (&server, &owner);
        wait_for(
            "one task failed, the other completed",
            Duration::from_secs(30),
            || async move {
                task(server, owner, failing).await["status"] == "FAILED"
                    && task(server, owner, flaky).await["status"] == "COMPLETED"
            },
        )
        .await;
    }
    py.terminate();
    let outcome = py.finish(Duration::from_secs(30)).await;
    assert!(outcome.status.success(), "{}", outcome.stderr);
    let report = &outcome.report;

    let failed = task(server, owner, failing).await;
    assert_eq!(failed["errorMessage"], "the model said no", "{failed}");
    assert_eq!(failed["attempts"], 1, "not retried: {failed}");
    assert!(failed["resultId"].is_null());
    assert_eq!(runs_of(report, failing), 1);

    let retried = task(server, owner, flaky).await;
    assert_eq!(retried["attempts"], 2, "came back once: {retried}");
    assert_eq!(retried["resultId"], "flaky-2", "{retried}");
    assert!(retried["errorMessage"].is_null(), "{retried}");
    assert_eq!(runs_of(report, flaky), 2);
    let kinds: Vec<(String, i64)> = worker_events(report)
        .into_iter()
        .filter(|(kind, id, ..)| id == flaky && kind != "report")
        .map(|(kind, _, attempt, _)| (kind, attempt))
        .collect();
    assert_eq!(
        kinds,
        [
            ("claimed".to_owned(), 1),
            ("retried".to_owned(), 1),
            ("claimed".to_owned(), 2),
            ("completed".to_owned(), 2)
        ]
    );
    assert_eq!(
        report["summary"],
        json!({ "completed": 1, "failed": 1, "retried": 1, "refused": 0, "lost": 0, "released": 0 })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_the_running_python_handler_finish_and_claims_nothing_more() {
    const TEST: &str = "sigterm_lets_the_running_python_handler_finish_and_claims_nothing_more";
    let Some(stage) = Stage::set(TEST).await else {
        return;
    };
    let Stage {
        python,
        server,
        owner,
        worker,
        ..
    } = &stage;
    let slow = create_tasks(
        server,
        owner,
        vec![json!({ "type": "py.slow", "metadata": { "seconds": 1.5 } })],
    )
    .await
    .remove(0);
    let mut py = PyWorker::start(python, server, worker, "py.slow", &[("CONCURRENCY", "2")]);
    py.ready().await;
    {
        let (server, owner, slow) = (&server, &owner, &slow);
        wait_for(
            "the slow handler to start",
            Duration::from_secs(30),
            || async move { task(server, owner, slow).await["progress"] == 5 },
        )
        .await;
    }
    py.terminate();
    // Created after the signal: the stopping worker must leave it alone.
    let later = create_tasks(
        server,
        owner,
        vec![json!({ "type": "py.slow", "metadata": { "seconds": 0 } })],
    )
    .await
    .remove(0);
    let outcome = py.finish(Duration::from_secs(20)).await;
    assert!(outcome.status.success(), "{}", outcome.stderr);
    let finished = task(server, owner, &slow).await;
    assert_eq!(finished["status"], "COMPLETED", "{finished}");
    assert_eq!(finished["resultId"], "slow-done");
    let untouched = task(server, owner, &later).await;
    assert_eq!(untouched["status"], "PENDING", "{untouched}");
    assert_eq!(untouched["attempts"], 0);
}

#[test]
fn the_python_package_passes_mypy_strict() {
    const TEST: &str = "the_python_package_passes_mypy_strict";
    let Some(python) = venv::python_or_skip(TEST) else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = std::process::Command::new(&python)
        .args(["-m", "mypy", "--strict", "--no-incremental"])
        .arg(root.join("clients/python/src/taskql_worker"))
        .arg(root.join("clients/python/bench/bench.py"))
        .arg(script("worker.py"))
        .arg(script("trace.py"))
        .current_dir(root.join("clients/python"))
        .output()
        .expect("mypy runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "mypy --strict:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.starts_with("Success:"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_python_worker_sends_the_current_spans_traceparent_and_nothing_without_one() {
    const TEST: &str =
        "the_python_worker_sends_the_current_spans_traceparent_and_nothing_without_one";
    let Some(python) = venv::python_or_skip(TEST) else {
        return;
    };
    let db = TestDb::new().await;
    let server = Server::start(&db.url, &[]).await;
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(&python)
            .arg(script("trace.py"))
            .env("TASKQL_URL", format!("{}/graphql", server.base))
            .env("TASKQL_TOKEN", token_for("py-worker", Some("service_role")))
            .env("TASKQL_OWNER_TOKEN", token_for("alice", None))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("trace.py finishes within 60 s")
    .expect("trace.py runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("a JSON report");
    let operations = |run: &Value| -> Vec<(String, Option<String>)> {
        run["requests"]
            .as_array()
            .expect("requests")
            .iter()
            .map(|r| {
                (
                    r[0].as_str().unwrap().to_owned(),
                    r[1].as_str().map(str::to_owned),
                )
            })
            .collect()
    };

    // No recording span: no request carries a traceparent.
    let plain = operations(&report["plain"]);
    assert!(
        plain.iter().any(|(op, _)| op == "TaskqlClaim")
            && plain.iter().any(|(op, _)| op == "TaskqlComplete"),
        "{plain:?}"
    );
    assert!(plain.iter().all(|(_, tp)| tp.is_none()), "{plain:?}");

    // Inside a span: the claims carry it, and the handler's own span (a
    // child in the same trace) carries the report of its result.
    let traced = &report["traced"];
    let outer = &traced["outer"];
    let (trace_id, outer_span) = (
        outer["trace_id"].as_str().unwrap(),
        outer["span_id"].as_str().unwrap(),
    );
    let handler_span = traced["handler"]["span_id"].as_str().unwrap();
    assert_eq!(traced["handler"]["trace_id"], trace_id);
    assert_ne!(handler_span, outer_span);
    // The flags may also carry the random-trace-id bit: the ids are the point.
    let ids = |traceparent: &Option<String>| -> Option<String> {
        traceparent
            .as_deref()
            .map(|t| t.rsplit_once('-').map_or(t, |(ids, _)| ids).to_owned())
    };
    let requests = operations(traced);
    let claims: Vec<_> = requests
        .iter()
        .filter(|(op, _)| op == "TaskqlClaim")
        .collect();
    assert!(!claims.is_empty(), "{requests:?}");
    for (_, traceparent) in &claims {
        assert_eq!(
            ids(traceparent),
            Some(format!("00-{trace_id}-{outer_span}"))
        );
    }
    let reports: Vec<_> = requests
        .iter()
        .filter(|(op, _)| op == "TaskqlReport" || op == "TaskqlComplete")
        .map(|(op, traceparent)| (op.as_str(), ids(traceparent)))
        .collect();
    assert_eq!(
        reports,
        [(
            "TaskqlReport",
            Some(format!("00-{trace_id}-{handler_span}"))
        )],
        "the completion goes alone, in the handler's span"
    );
}
