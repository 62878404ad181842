//! An example taskql worker that talks only to the GraphQL HTTP API.
//!
//! ```text
//! TASKQL_TOKEN=$(cargo run -q -- token --user worker-1 --role service_role) \
//!   cargo run --example worker -- --types concept.image --concurrency 4
//! ```
//!
//! It claims tasks, heartbeats with progress, and completes them with a
//! `resultId`; `--exit-when-idle` and `--max-tasks` make it stop on its own.
//! `--batch N` makes each slot take up to N tasks per claim and report on
//! all of them in one call per step.
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

#[path = "worker/client.rs"]
mod client;

#[derive(Debug, Parser)]
#[command(about = "An example taskql worker speaking GraphQL over HTTP")]
struct Args {
    /// The GraphQL endpoint.
    #[arg(
        long,
        env = "TASKQL_URL",
        default_value = "http://127.0.0.1:8000/graphql"
    )]
    url: String,
    /// A token with the service role (`taskql token --user w --role service_role`).
    #[arg(long, env = "TASKQL_TOKEN", hide_env_values = true)]
    token: String,
    /// Task types to take, comma-separated; any type when absent.
    #[arg(long, env = "TASKQL_WORKER_TYPES", value_delimiter = ',')]
    types: Vec<String>,
    /// Tasks worked on at once.
    #[arg(long, env = "TASKQL_WORKER_CONCURRENCY", default_value_t = 4)]
    concurrency: usize,
    /// Names this worker in claims (each slot appends `/n`).
    #[arg(long, env = "TASKQL_WORKER_ID")]
    worker_id: Option<String>,
    /// Lease asked for at claim and at each heartbeat.
    #[arg(long, default_value_t = 30)]
    lease_seconds: i32,
    /// Heartbeats with progress per task.
    #[arg(long, default_value_t = 3)]
    steps: u32,
    /// Pretend work between heartbeats, in milliseconds.
    #[arg(long, default_value_t = 500)]
    step_ms: u64,
    /// Stop after this many tasks.
    #[arg(long)]
    max_tasks: Option<usize>,
    /// Stop when no task is pending instead of polling.
    #[arg(long)]
    exit_when_idle: bool,
    /// How long to wait before claiming again when nothing is pending.
    #[arg(long, default_value_t = 1000)]
    idle_poll_ms: u64,
    /// Tasks each slot claims, heartbeats and completes per call (1 to
    /// 100): one `claimTasks`, one `heartbeatTasks` for all it holds, one
    /// `completeTasks`. 1 works one task at a time.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=100))]
    batch: u16,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let mut config = client::WorkerConfig::new(args.url, args.token);
    config.types = args.types;
    config.concurrency = args.concurrency;
    if let Some(id) = args.worker_id {
        config.worker_id = id;
    }
    config.lease_seconds = args.lease_seconds;
    config.steps = args.steps;
    config.step_time = Duration::from_millis(args.step_ms);
    config.max_tasks = args.max_tasks;
    config.exit_when_idle = args.exit_when_idle;
    config.idle_poll = Duration::from_millis(args.idle_poll_ms);
    config.batch = usize::from(args.batch);
    config.verbose = true;
    match client::run(config).await {
        Ok(report) => {
            println!(
                "done: {} completed, {} dropped",
                report.completed, report.abandoned
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("worker stopped: {err}");
            ExitCode::FAILURE
        }
    }
}
