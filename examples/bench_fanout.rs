//! Subscription fan-out: memory per live `taskUpdated` subscription, and the
//! latency from a change's commit to its delivery on the websocket.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example bench_fanout                 # N = 1000 and 10000, 3 runs each
//! cargo run --release --example bench_fanout -- --subs 10000 --runs 5
//! cargo run --release --example bench_fanout -- \
//!     --postgres postgres://postgres@127.0.0.1:5432/test        # two instances
//! ```
//!
//! With `--positions`, each subscription also selects `queuePosition`: it
//! follows its task's place in line (every task is of one type), and the
//! server ranks that line once a second while anyone watches it. The idle
//! CPU (a few seconds with nothing changing, after every snapshot came)
//! shows what the rankings cost.
//!
//! With `--postgres`, two servers share a fresh database: subscriptions on
//! one, every change made through the other, so each delivery crosses
//! instances (the change log's mover, its notice, the other reader).
//!
//! Each run starts the real server (`target/release/taskql`, or `TASKQL_BIN`)
//! as its own process on a fresh SQLite file, so its resident memory can be
//! read from /proc/<pid>/status. It creates N tasks for N/100 users, opens
//! one websocket per user carrying 100 `taskUpdated` subscriptions, and
//! waits for every snapshot; VmRSS before and after gives the memory per
//! subscription. Then a worker completes every task with `updateTaskStatus`
//! (`--concurrency` mutations in flight), and each delivery of COMPLETED is
//! timed from the response of its mutation: the change is committed before
//! the server answers, so this is commit-to-delivery less the response's trip
//! back (a delivery that beats the response counts as 0). From the request's
//! start to delivery, which also counts waiting for SQLite's single writer
//! behind the other mutations in flight, is an upper bound.
mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use common::{BoxError, Server, TempPostgres, median, quantile};

#[derive(Debug, Parser)]
#[command(about = "Subscription fan-out: RSS per subscription and commit-to-delivery latency")]
struct Args {
    /// Numbers of live subscriptions to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1000, 10000])]
    subs: Vec<usize>,
    /// Subscriptions per websocket connection.
    #[arg(long, default_value_t = 100)]
    per_connection: usize,
    /// Runs per N; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Status mutations in flight during the burst.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Run on PostgreSQL instead of SQLite: a server URL whose database may
    /// create others. Two instances share a fresh database; the
    /// subscriptions are on one, the changes go through the other, so every
    /// delivery crosses instances through the change log.
    #[arg(long, env = "TASKQL_BENCH_DATABASE_URL")]
    postgres: Option<String>,
    /// The server binary.
    #[arg(long, env = "TASKQL_BIN")]
    bin: Option<PathBuf>,
    /// Subscriptions also select `queuePosition`, so each follows its
    /// task's place in line and gets the task again as it moves up.
    #[arg(long)]
    positions: bool,
}

const SECRET: &str = "bench-fanout-secret-0123456789abcdef";
const WATCH: &str =
    "subscription($id: ID!) { taskUpdated(id: $id) { id status progress resultId completedAt } }";
const WATCH_PLACE: &str = "subscription($id: ID!) { taskUpdated(id: $id) { id status progress resultId completedAt queuePosition } }";
const UPDATE: &str =
    "mutation($input: UpdateTaskStatusInput!) { updateTaskStatus(input: $input) { id status } }";
const CREATE: &str = "mutation { createTask(input: {type: \"image.generate\", metadata: {prompt: \"a cat\"}}) { id } }";

struct Run {
    rss_per_sub_kib: f64,
    rss_before_kib: u64,
    rss_after_kib: u64,
    /// Response of the mutation to delivery of its COMPLETED, in ms.
    after_response: Summary,
    /// Start of the mutation's request to delivery, in ms.
    after_request: Summary,
    /// Deliveries that arrived before their mutation's response.
    before_response: usize,
    updates_per_sec: f64,
    /// From the first subscribe to the last snapshot.
    setup: Duration,
    /// Server CPU per second of wall time while nothing changes.
    idle_cpu: f64,
    /// Moves up the line delivered during the burst (with `--positions`).
    moves: usize,
}

/// How long the idle CPU is measured.
const IDLE: Duration = Duration::from_secs(5);

struct Summary {
    p50: f64,
    p99: f64,
    max: f64,
}

fn summarize(mut ms: Vec<f64>) -> Summary {
    ms.sort_by(f64::total_cmp);
    Summary {
        p50: quantile(&ms, 0.50),
        p99: quantile(&ms, 0.99),
        max: *ms.last().unwrap_or(&0.0),
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let bin = common::release_binary(args.bin.as_deref())?;
    println!(
        "server {}; {} subscriptions per connection; {} mutations in flight; {} runs per N",
        bin.display(),
        args.per_connection,
        args.concurrency,
        args.runs
    );
    let mut table = Vec::new();
    for &n in &args.subs {
        let mut runs = Vec::new();
        for run in 1..=args.runs {
            let result = bench(&bin, n, &args).await?;
            println!(
                "N={n:>6} run {run}: RSS {} -> {} KiB ({:.1} KiB/sub); \
                 response->delivery p50 {:.2} ms p99 {:.2} ms max {:.2} ms \
                 ({} delivered before the response); request->delivery p50 {:.2} ms p99 {:.2} ms; \
                 {:.0} updates/s; all subscribed in {:.2} s; idle CPU {:.1}%; {} moves sent",
                result.rss_before_kib,
                result.rss_after_kib,
                result.rss_per_sub_kib,
                result.after_response.p50,
                result.after_response.p99,
                result.after_response.max,
                result.before_response,
                result.after_request.p50,
                result.after_request.p99,
                result.updates_per_sec,
                result.setup.as_secs_f64(),
                result.idle_cpu * 100.0,
                result.moves,
            );
            runs.push(result);
        }
        table.push((n, runs));
    }
    println!();
    println!(
        "| subscriptions | RSS per subscription | response→delivery p50 | p99 | request→delivery p50 | p99 | updates/s | subscribed in | idle CPU |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (n, runs) in &table {
        let med = |f: &dyn Fn(&Run) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        println!(
            "| {n} | {:.1} KiB | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.0} | {:.2} s | {:.1}% |",
            med(&|r| r.rss_per_sub_kib),
            med(&|r| r.after_response.p50),
            med(&|r| r.after_response.p99),
            med(&|r| r.after_request.p50),
            med(&|r| r.after_request.p99),
            med(&|r| r.updates_per_sec),
            med(&|r| r.setup.as_secs_f64()),
            med(&|r| r.idle_cpu * 100.0),
        );
    }
    println!("(medians of {} runs)", args.runs);
    Ok(())
}

fn token(user: &str, role: Option<&str>) -> Result<String, BoxError> {
    Ok(taskql::auth::issue_token(
        SECRET,
        user,
        role,
        Duration::from_secs(3600),
        None,
        None,
    )?)
}

async fn post(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    body: &Value,
) -> Result<Value, BoxError> {
    let response = http
        .post(format!("{base}/graphql"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await?;
    Ok(response.json().await?)
}

/// What the client side saw, per task index.
struct Deliveries {
    epoch: Instant,
    snapshots: AtomicUsize,
    /// Whether each subscription's first state came (later PENDING ones
    /// are moves up the line).
    snapshot_seen: Vec<AtomicBool>,
    /// Moves up the line delivered (with `--positions`).
    moves: AtomicUsize,
    /// Nanoseconds after `epoch` when COMPLETED arrived; 0 while not yet.
    completed_at: Vec<AtomicU64>,
    completed: AtomicUsize,
    progress: Notify,
}

impl Deliveries {
    fn since_epoch(&self) -> u64 {
        (self.epoch.elapsed().as_nanos() as u64).max(1)
    }
}

/// One websocket for one user, carrying a subscription per task (its id is
/// the task's index).
async fn open_connection(
    ws_url: &str,
    token: &str,
    tasks: Vec<(usize, String)>,
    deliveries: Arc<Deliveries>,
    watch: &'static str,
) -> Result<tokio::task::JoinHandle<()>, BoxError> {
    let mut request = ws_url.into_client_request()?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("graphql-transport-ws"),
    );
    let (socket, _) = tokio_tungstenite::connect_async(request).await?;
    let (mut sink, mut stream) = socket.split();
    let init =
        json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {token}")}});
    sink.send(Message::text(init.to_string())).await?;
    loop {
        match stream.next().await {
            Some(Ok(Message::Text(text))) if text.contains("connection_ack") => break,
            Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => {}
            other => return Err(format!("no connection_ack: {other:?}").into()),
        }
    }
    for (index, id) in &tasks {
        let subscribe = json!({
            "id": index.to_string(),
            "type": "subscribe",
            "payload": {"query": watch, "variables": {"id": id}},
        });
        sink.send(Message::text(subscribe.to_string())).await?;
    }
    Ok(tokio::spawn(async move {
        // Keep the sink alive (and the socket open) as long as the reader.
        let _sink = sink;
        while let Some(Ok(message)) = stream.next().await {
            let Message::Text(text) = message else {
                continue;
            };
            let now = deliveries.since_epoch();
            let Ok(message) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            if message["type"] != "next" {
                continue;
            }
            let Some(index) = message["id"].as_str().and_then(|i| i.parse::<usize>().ok()) else {
                continue;
            };
            match message["payload"]["data"]["taskUpdated"]["status"].as_str() {
                Some("PENDING")
                    if !deliveries.snapshot_seen[index].swap(true, Ordering::Relaxed) =>
                {
                    deliveries.snapshots.fetch_add(1, Ordering::Relaxed);
                    deliveries.progress.notify_one();
                }
                Some("PENDING") => {
                    deliveries.moves.fetch_add(1, Ordering::Relaxed);
                }
                Some("COMPLETED") => {
                    deliveries.completed_at[index].store(now, Ordering::Relaxed);
                    deliveries.completed.fetch_add(1, Ordering::Relaxed);
                    deliveries.progress.notify_one();
                }
                _ => {}
            }
        }
    }))
}

async fn wait_for(
    deliveries: &Deliveries,
    count: impl Fn(&Deliveries) -> usize,
    n: usize,
    what: &str,
) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while count(deliveries) < n {
        if Instant::now() > deadline {
            return Err(format!("only {} of {n} {what} within 120 s", count(deliveries)).into());
        }
        let _ =
            tokio::time::timeout(Duration::from_millis(100), deliveries.progress.notified()).await;
    }
    Ok(())
}

async fn bench(bin: &Path, n: usize, args: &Args) -> Result<Run, BoxError> {
    match &args.postgres {
        Some(base) => {
            let database = TempPostgres::create(base, "taskql_fanout").await?;
            let result = async {
                let writer = Server::start(bin, &database.url, SECRET, &[]).await?;
                let watcher = Server::start(bin, &database.url, SECRET, &[]).await?;
                bench_on(&writer, &watcher, n, args).await
            }
            .await;
            database.drop_database().await?;
            result
        }
        None => {
            // A fresh SQLite file per run, removed with `dir`.
            let dir = tempfile::tempdir()?;
            let database_url = format!(
                "sqlite://{}?mode=rwc",
                dir.path().join("bench.db").display()
            );
            let server = Server::start(bin, &database_url, SECRET, &[]).await?;
            bench_on(&server, &server, n, args).await
        }
    }
}

/// Changes through `writer`, subscriptions (and the memory measured) on `server`.
async fn bench_on(
    writer: &Server,
    server: &Server,
    n: usize,
    args: &Args,
) -> Result<Run, BoxError> {
    let http = reqwest::Client::new();
    let users = n.div_ceil(args.per_connection);
    let worker = token("bench-worker", Some("service_role"))?;

    // N tasks, per_connection of them per user, created in batches of 20.
    let mut creations = Vec::new();
    for user in 0..users {
        let token = token(&format!("user-{user}"), None)?;
        let count = args.per_connection.min(n - user * args.per_connection);
        for start in (0..count).step_by(20) {
            let batch = (start..count.min(start + 20))
                .map(|_| json!({"query": CREATE}))
                .collect::<Vec<_>>();
            creations.push((user, token.clone(), Value::Array(batch)));
        }
    }
    let created: Vec<(usize, Value)> = futures::stream::iter(creations)
        .map(|(user, token, batch)| {
            let http = http.clone();
            let base = writer.base.clone();
            async move { post(&http, &base, &token, &batch).await.map(|r| (user, r)) }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let mut ids_by_user: Vec<Vec<String>> = vec![Vec::new(); users];
    for (user, responses) in created {
        for response in responses.as_array().ok_or("a batch response")? {
            let id = response["data"]["createTask"]["id"]
                .as_str()
                .ok_or_else(|| format!("createTask failed: {response}"))?;
            ids_by_user[user].push(id.to_owned());
        }
    }
    let ids: Vec<String> = ids_by_user.iter().flatten().cloned().collect();

    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before_kib = server.rss_kib()?;

    let deliveries = Arc::new(Deliveries {
        epoch: Instant::now(),
        snapshots: AtomicUsize::new(0),
        snapshot_seen: (0..n).map(|_| AtomicBool::new(false)).collect(),
        moves: AtomicUsize::new(0),
        completed_at: (0..n).map(|_| AtomicU64::new(0)).collect(),
        completed: AtomicUsize::new(0),
        progress: Notify::new(),
    });
    let watch = if args.positions { WATCH_PLACE } else { WATCH };
    let mut readers = Vec::new();
    let mut index = 0;
    let subscribing = Instant::now();
    for (user, user_ids) in ids_by_user.iter().enumerate() {
        let tasks: Vec<(usize, String)> = user_ids
            .iter()
            .map(|id| {
                index += 1;
                (index - 1, id.clone())
            })
            .collect();
        let token = token(&format!("user-{user}"), None)?;
        readers
            .push(open_connection(&server.ws_url, &token, tasks, deliveries.clone(), watch).await?);
    }
    wait_for(
        &deliveries,
        |d| d.snapshots.load(Ordering::Relaxed),
        n,
        "snapshots",
    )
    .await?;
    let setup = subscribing.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after_kib = server.rss_kib()?;
    // What watching costs with nothing changing (the lines' rankings, with
    // `--positions`): server CPU over a few idle seconds.
    let cpu_before = server.cpu_time()?;
    tokio::time::sleep(IDLE).await;
    let idle_cpu = (server.cpu_time()? - cpu_before).as_secs_f64() / IDLE.as_secs_f64();

    // The burst: a worker completes every task.
    let started = Instant::now();
    let responses: Vec<(usize, u64, u64)> = futures::stream::iter(ids.iter().enumerate())
        .map(|(index, id)| {
            let http = http.clone();
            let base = writer.base.clone();
            let worker = worker.clone();
            let deliveries = deliveries.clone();
            let body = json!({
                "query": UPDATE,
                "variables": {"input": {"id": id, "status": "COMPLETED", "resultId": format!("concept-{index}")}},
            });
            async move {
                let sent = deliveries.since_epoch();
                let response = post(&http, &base, &worker, &body).await?;
                let answered = deliveries.since_epoch();
                if response["data"]["updateTaskStatus"]["status"] != "COMPLETED" {
                    return Err(format!("updateTaskStatus failed: {response}").into());
                }
                Ok::<_, BoxError>((index, sent, answered))
            }
        })
        .buffer_unordered(args.concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let burst = started.elapsed();
    wait_for(
        &deliveries,
        |d| d.completed.load(Ordering::Relaxed),
        n,
        "completions",
    )
    .await?;

    let mut after_response = Vec::with_capacity(n);
    let mut after_request = Vec::with_capacity(n);
    let mut before_response = 0;
    for (index, sent, answered) in responses {
        let delivered = deliveries.completed_at[index].load(Ordering::Relaxed);
        let gap = delivered as f64 - answered as f64;
        if gap < 0.0 {
            before_response += 1;
        }
        after_response.push(gap.max(0.0) / 1e6);
        after_request.push(delivered.saturating_sub(sent) as f64 / 1e6);
    }
    for reader in readers {
        reader.abort();
    }
    Ok(Run {
        rss_per_sub_kib: (rss_after_kib as f64 - rss_before_kib as f64) / n as f64,
        rss_before_kib,
        rss_after_kib,
        after_response: summarize(after_response),
        after_request: summarize(after_request),
        before_response,
        updates_per_sec: n as f64 / burst.as_secs_f64(),
        setup,
        idle_cpu,
        moves: deliveries.moves.load(Ordering::Relaxed),
    })
}
