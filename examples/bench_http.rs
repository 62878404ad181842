//! Per-request cost over HTTP: `createTask`, `createTasks` of `--batch`
//! tasks, `tasks(status, first: 10)` and `task(id)` against the release
//! server, beside the same SQL statements sent straight through sqlx.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example bench_http                       # SQLite
//! cargo run --release --example bench_http -- \
//!     --postgres postgres://postgres@127.0.0.1:5432/test         # and PostgreSQL
//! ```
//!
//! For each database the server (`target/release/taskql`, or `TASKQL_BIN`)
//! runs as its own process on a fresh database (a temp SQLite file, or a new
//! PostgreSQL database beside the one named), seeded with `--users` users ×
//! `--per-user` tasks. Each request carries a token of a random user.
//! `--concurrency` keep-alive connections send one request after another for
//! `--secs`; a warm-up of `--warmup` seconds per workload comes first. Raw SQL
//! and taskql take turns, `--runs` times, and the medians are reported.
//!
//! Every line prints requests per second, p50 and p99 latency, the server's
//! CPU time per request (user + system, from /proc/<pid>/stat), and the ratio
//! to the raw statements. The raw side is what the server's statements cost
//! without HTTP, GraphQL, auth or JSON: `INSERT … RETURNING *` (and on
//! PostgreSQL, the same with a `pg_notify` in the statement, as taskql sends
//! it), a multi-row `INSERT … RETURNING *` of `--batch` rows for
//! `create-batch` (whose lines count requests: tasks are `--batch` times
//! as many), the list's `SELECT … ORDER BY created_at DESC, id DESC LIMIT 11`, and
//! a primary-key `SELECT`. `taskStats` (the dashboard's whole query, as a
//! user and as a worker) has no single raw counterpart and prints none.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use entity::tasks::ActiveModel;
use entity::{TaskStatus, Tasks};
use rand::{Rng, SeedableRng};
use sea_orm::{ActiveValue::Set, ConnectionTrait, EntityTrait};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;
use uuid::Uuid;

mod common;
#[path = "bench_http/raw.rs"]
mod raw;
use common::{BoxError, Server, TempPostgres, median, quantile, release_binary};
use raw::RawConn;

#[derive(Debug, Parser)]
#[command(about = "Per-request cost over HTTP, beside the same SQL through sqlx")]
struct Args {
    /// Also run on PostgreSQL: a server URL whose database may create others.
    #[arg(long, env = "TASKQL_BENCH_DATABASE_URL")]
    postgres: Option<String>,
    /// Skip SQLite.
    #[arg(long)]
    no_sqlite: bool,
    /// Measured runs of each workload; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds per measured run.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Seconds of unmeasured load per workload before the first run.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Concurrent connections (clients).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Users in the seed; every request is one of theirs.
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// Tasks per user in the seed.
    #[arg(long, default_value_t = 100)]
    per_user: usize,
    /// Workloads to run.
    #[arg(long, value_delimiter = ',', default_values_t = [Workload::Create, Workload::List, Workload::Get, Workload::Stats, Workload::WorkerStats])]
    workloads: Vec<Workload>,
    /// The server binary.
    #[arg(long, env = "TASKQL_BIN")]
    bin: Option<PathBuf>,
    /// Tasks per request of `create-batch` (1 to 1000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=1000))]
    batch: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// createTask with a small JSON metadata object.
    Create,
    /// createTasks of `--batch` such tasks, for one user.
    CreateBatch,
    /// tasks(status: [one status], first: 10), every field of the nodes.
    List,
    /// task(id) of one of the caller's tasks, every field.
    Get,
    /// The dashboard's whole taskStats, as one user (their own tasks).
    Stats,
    /// The dashboard's whole taskStats, as a worker (every user's tasks).
    WorkerStats,
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Create => "create",
            Self::CreateBatch => "create-batch",
            Self::List => "list",
            Self::Get => "get",
            Self::Stats => "stats",
            Self::WorkerStats => "worker-stats",
        })
    }
}

const SECRET: &str = "bench-http-secret-0123456789abcdef";
const CREATE: &str = "mutation CreateTask($input: CreateTaskInput!) { createTask(input: $input) { id type status metadata createdAt } }";
const CREATE_BATCH: &str = "mutation CreateTasks($inputs: [CreateTaskInput!]!) { createTasks(inputs: $inputs) { id type status metadata createdAt } }";
const LIST: &str = "query ListTasks($status: [TaskStatus!]) { tasks(status: $status, first: 10) { nodes { id type status resultId errorMessage metadata progress createdAt updatedAt } } }";
const GET: &str = "query GetTask($id: ID!) { task(id: $id) { id type status resultId errorMessage metadata progress attempts createdAt updatedAt startedAt completedAt } }";
const STATS: &str = "query Stats { taskStats { byStatus { status count } byType { type pending processing completed failed cancelled } throughput(minutes: 60) { at created completed failed } durations { type waitP50Ms waitP95Ms runP50Ms runP95Ms runP99Ms } oldestPendingAgeSeconds workers { workerId tasks nextLeaseExpiry } } }";
const TYPES: [&str; 3] = ["export", "import", "report"];
const STATUSES: [TaskStatus; 5] = TaskStatus::ALL;

/// What every client draws its requests from.
struct Fixture {
    /// Token of `user-{i + 1}` at index i.
    tokens: Vec<String>,
    /// A worker's token.
    worker_token: String,
    /// Seeded tasks with their owner's index, for `task(id)`.
    sample: Vec<(Uuid, usize)>,
    /// Tasks per `create-batch` request.
    batch: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Taskql,
    Raw,
    /// PostgreSQL's create only: the insert with a NOTIFY in the statement.
    RawNotify,
}

/// One measured run.
struct Sample {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Server CPU per request (taskql only).
    cpu_us: Option<f64>,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let bin = release_binary(args.bin.as_deref())?;
    println!(
        "{} users x {} tasks, {} connections, {} runs of {} s (after {} s of warm-up), server {}",
        args.users,
        args.per_user,
        args.concurrency,
        args.runs,
        args.secs,
        args.warmup,
        bin.display()
    );
    let mut report = Vec::new();
    if !args.no_sqlite {
        let dir = tempfile::tempdir()?;
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("bench.db").display()
        );
        report.extend(bench("sqlite", &url, &bin, &args).await?);
    }
    if let Some(base) = &args.postgres {
        let database = TempPostgres::create(base, "taskql_bench").await?;
        let result = bench("postgres", &database.url, &bin, &args).await;
        database.drop_database().await?;
        report.extend(result?);
    }
    println!();
    println!(
        "| database | workload | taskql req/s | p50 ms | p99 ms | server CPU µs/req | raw req/s | raw p50 ms | raw p99 ms | taskql / raw |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for line in report {
        println!("{line}");
    }
    Ok(())
}

async fn bench(
    backend: &str,
    url: &str,
    bin: &std::path::Path,
    args: &Args,
) -> Result<Vec<String>, BoxError> {
    let server = Server::start(bin, url, SECRET, &[]).await?;
    let sample = seed(url, args.users, args.per_user).await?;
    let tokens = (1..=args.users)
        .map(|u| {
            taskql::auth::issue_token(
                SECRET,
                &format!("user-{u}"),
                None,
                Duration::from_secs(86_400),
                None,
                None,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let worker_token = taskql::auth::issue_token(
        SECRET,
        "bench-worker",
        Some("service_role"),
        Duration::from_secs(86_400),
        None,
        None,
    )?;
    let fixture = Arc::new(Fixture {
        tokens,
        worker_token,
        sample,
        batch: usize::from(args.batch),
    });
    let is_postgres = !url.starts_with("sqlite:");
    // One request of each kind, so the idle figure includes warm caches.
    for &workload in &args.workloads {
        let mut client = HttpClient::connect(server.port).await?;
        request(&mut client, workload, &fixture, &mut rand::rng()).await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = server.rss_kib()?;
    println!(
        "{backend}: seeded {} tasks; server idle RSS {:.1} MiB",
        args.users * args.per_user,
        idle_rss as f64 / 1024.0
    );

    let sides = |workload: Workload| -> Vec<Side> {
        match (workload, is_postgres) {
            (Workload::Create, true) => vec![Side::Raw, Side::RawNotify, Side::Taskql],
            (Workload::CreateBatch, _) => vec![Side::Raw, Side::Taskql],
            // Several statements with no one raw counterpart.
            (Workload::Stats | Workload::WorkerStats, _) => vec![Side::Taskql],
            _ => vec![Side::Raw, Side::Taskql],
        }
    };
    let warmup = Duration::from_secs(args.warmup);
    for &workload in &args.workloads {
        for side in sides(workload) {
            run(side, workload, &server, url, &fixture, args, warmup).await?;
        }
    }
    let mut samples: Vec<(Workload, Side, Vec<Sample>)> = Vec::new();
    let measured = Duration::from_secs(args.secs);
    for round in 1..=args.runs {
        for &workload in &args.workloads {
            for side in sides(workload) {
                let s = run(side, workload, &server, url, &fixture, args, measured).await?;
                println!(
                    "{backend} {workload:<6} {side:<9} run {round}: {:>7.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms{}",
                    s.rps,
                    s.p50_ms,
                    s.p99_ms,
                    s.cpu_us
                        .map(|us| format!("  server CPU {us:.0} µs/req"))
                        .unwrap_or_default(),
                    side = format!("{side:?}"),
                );
                match samples
                    .iter_mut()
                    .find(|(w, s, _)| *w == workload && *s == side)
                {
                    Some((_, _, list)) => list.push(s),
                    None => samples.push((workload, side, vec![s])),
                }
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "{backend}: server RSS {:.1} MiB after the load (idle before: {:.1} MiB)",
        server.rss_kib()? as f64 / 1024.0,
        idle_rss as f64 / 1024.0
    );

    let med = |workload: Workload, side: Side, pick: fn(&Sample) -> f64| -> f64 {
        samples
            .iter()
            .find(|(w, s, _)| *w == workload && *s == side)
            .map(|(_, _, list)| median(&list.iter().map(pick).collect::<Vec<_>>()))
            .unwrap_or(f64::NAN)
    };
    let mut lines = Vec::new();
    for &workload in &args.workloads {
        let ours = |pick| med(workload, Side::Taskql, pick);
        // req/s, p50, p99 and CPU per request of taskql's side.
        let taskql = format!(
            "{:.0} | {:.2} | {:.2} | {:.0}",
            ours(|s| s.rps),
            ours(|s| s.p50_ms),
            ours(|s| s.p99_ms),
            ours(|s| s.cpu_us.unwrap_or(f64::NAN)),
        );
        if sides(workload) == [Side::Taskql] {
            lines.push(format!(
                "| {backend} | {workload} | {taskql} | – | – | – | – |"
            ));
        }
        for raw_side in sides(workload).into_iter().filter(|s| *s != Side::Taskql) {
            let theirs = |pick| med(workload, raw_side, pick);
            let label = match raw_side {
                Side::RawNotify => format!("{workload} (raw with NOTIFY)"),
                _ => workload.to_string(),
            };
            lines.push(format!(
                "| {backend} | {label} | {taskql} | {:.0} | {:.2} | {:.2} | {:.2} |",
                theirs(|s| s.rps),
                theirs(|s| s.p50_ms),
                theirs(|s| s.p99_ms),
                ours(|s| s.rps) / theirs(|s| s.rps),
            ));
        }
    }
    drop(server);
    Ok(lines)
}

/// `users × per_user` tasks, statuses spread evenly, one a second back in
/// time; returns every tenth task with its owner, for `task(id)`.
async fn seed(url: &str, users: usize, per_user: usize) -> Result<Vec<(Uuid, usize)>, BoxError> {
    let db = taskql::db::connect(url, 2).await?;
    let now = chrono::Utc::now();
    let total = users * per_user;
    let mut sample = Vec::with_capacity(total / 10 + 1);
    let mut batch = Vec::with_capacity(1000);
    for g in 0..total {
        let user = g % users;
        let status = STATUSES[(g / users) % 5];
        let at = now - chrono::Duration::seconds(g as i64);
        let mut task = ActiveModel::pending(
            format!("user-{}", user + 1),
            TYPES[g % 3].into(),
            serde_json::json!({ "seed": g }),
            None,
            at,
        );
        let id = Uuid::now_v7();
        task.id = Set(id);
        task.status = Set(status);
        if status == TaskStatus::Processing {
            task.progress = Set(Some((g % 100) as i32));
        }
        if g % 10 == 0 {
            sample.push((id, user));
        }
        batch.push(task);
        if batch.len() == 1000 || g + 1 == total {
            Tasks::insert_many(std::mem::take(&mut batch))
                .exec_without_returning(&db)
                .await?;
        }
    }
    let analyze = if url.starts_with("sqlite:") {
        "ANALYZE"
    } else {
        "VACUUM ANALYZE tasks"
    };
    db.execute_unprepared(analyze).await?;
    db.close().await?;
    Ok(sample)
}

/// Runs one side of one workload for `duration` with every connection busy.
async fn run(
    side: Side,
    workload: Workload,
    server: &Server,
    url: &str,
    fixture: &Arc<Fixture>,
    args: &Args,
    duration: Duration,
) -> Result<Sample, BoxError> {
    let mut connections = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency {
        connections.push(match side {
            Side::Taskql => (Some(HttpClient::connect(server.port).await?), None),
            _ => (None, Some(RawConn::connect(url).await?)),
        });
    }
    let cpu_before = server.cpu_time()?;
    let started = Instant::now();
    let deadline = started + duration;
    let mut clients = Vec::with_capacity(args.concurrency);
    for (mut http, mut raw) in connections {
        let fixture = fixture.clone();
        clients.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::from_os_rng();
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let t0 = Instant::now();
                match (&mut http, &mut raw) {
                    (Some(http), _) => request(http, workload, &fixture, &mut rng).await?,
                    (_, Some(raw)) => raw.statement(side, workload, &fixture, &mut rng).await?,
                    (None, None) => unreachable!("every client has a connection"),
                }
                latencies.push(t0.elapsed().as_secs_f64() * 1000.0);
            }
            Ok::<_, BoxError>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for client in clients {
        latencies.extend(client.await??);
    }
    let elapsed = started.elapsed();
    let cpu = server.cpu_time()? - cpu_before;
    latencies.sort_by(f64::total_cmp);
    let n = latencies.len() as f64;
    Ok(Sample {
        rps: n / elapsed.as_secs_f64(),
        p50_ms: quantile(&latencies, 0.50),
        p99_ms: quantile(&latencies, 0.99),
        cpu_us: (side == Side::Taskql).then(|| cpu.as_secs_f64() * 1e6 / n),
    })
}

/// One GraphQL request of `workload` for a random user; fails on any error.
async fn request(
    http: &mut HttpClient,
    workload: Workload,
    fixture: &Fixture,
    rng: &mut impl Rng,
) -> Result<(), BoxError> {
    let mut input = || {
        serde_json::json!({
            "type": TYPES[rng.random_range(0..3)],
            "metadata": { "source": "bench", "priority": rng.random_range(1..=5), "tags": ["bench"] },
        })
    };
    let (user, body) = match workload {
        Workload::Create => {
            let body = serde_json::json!({ "query": CREATE, "variables": { "input": input() } });
            (rng.random_range(0..fixture.tokens.len()), body)
        }
        Workload::CreateBatch => {
            let inputs: Vec<serde_json::Value> = (0..fixture.batch).map(|_| input()).collect();
            let body =
                serde_json::json!({ "query": CREATE_BATCH, "variables": { "inputs": inputs } });
            (rng.random_range(0..fixture.tokens.len()), body)
        }
        Workload::List => {
            let status = ["PENDING", "PROCESSING", "COMPLETED", "FAILED", "CANCELLED"]
                [rng.random_range(0..5)];
            let body = serde_json::json!({ "query": LIST, "variables": { "status": [status] } });
            (rng.random_range(0..fixture.tokens.len()), body)
        }
        Workload::Get => {
            let (id, user) = fixture.sample[rng.random_range(0..fixture.sample.len())];
            let body = serde_json::json!({ "query": GET, "variables": { "id": id.to_string() } });
            (user, body)
        }
        Workload::Stats | Workload::WorkerStats => {
            let body = serde_json::json!({ "query": STATS });
            (rng.random_range(0..fixture.tokens.len()), body)
        }
    };
    let token = match workload {
        Workload::WorkerStats => &fixture.worker_token,
        _ => &fixture.tokens[user],
    };
    let (status, response) = http.post(token, &serde_json::to_vec(&body)?).await?;
    let text = String::from_utf8_lossy(&response);
    if status != 200 || text.contains("\"errors\"") || !text.contains("\"data\"") {
        return Err(format!("{workload}: HTTP {status}: {text}").into());
    }
    Ok(())
}

/// A keep-alive HTTP/1.1 connection that sends one POST at a time: little
/// client work, so the server gets the CPU it can use.
struct HttpClient {
    stream: BufStream<TcpStream>,
    host: String,
    line: String,
    body: Vec<u8>,
}

impl HttpClient {
    async fn connect(port: u16) -> Result<Self, BoxError> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream: BufStream::new(stream),
            host: format!("127.0.0.1:{port}"),
            line: String::new(),
            body: Vec::new(),
        })
    }

    async fn post(&mut self, token: &str, body: &[u8]) -> Result<(u16, Vec<u8>), BoxError> {
        let head = format!(
            "POST /graphql HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        self.stream.write_all(head.as_bytes()).await?;
        self.stream.write_all(body).await?;
        self.stream.flush().await?;
        self.line.clear();
        self.stream.read_line(&mut self.line).await?;
        let status: u16 = self
            .line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("not an HTTP status line: {:?}", self.line))?;
        let mut length = None;
        loop {
            self.line.clear();
            if self.stream.read_line(&mut self.line).await? == 0 {
                return Err("the server closed the connection".into());
            }
            let line = self.line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse::<usize>().ok();
            }
        }
        let length = length.ok_or("a response without Content-Length")?;
        self.body.resize(length, 0);
        self.stream.read_exact(&mut self.body).await?;
        Ok((status, std::mem::take(&mut self.body)))
    }
}
