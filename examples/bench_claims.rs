//! Claim-and-complete cycles per second with concurrent workers, through
//! `TaskService` and, in the same run, as the raw statements it boils down to.
//!
//! ```text
//! cargo run --release --example bench_claims                       # SQLite
//! cargo run --release --example bench_claims -- \
//!     --postgres postgres://postgres@127.0.0.1:5432/test           # and PostgreSQL
//! ```
//!
//! One cycle is: claim the first pending task in claim order under a lease,
//! then complete it fenced by the attempt claimed. The service path adds
//! what the raw path leaves out: the type policies (pause, caps), the change
//! log, row decoding and the in-process event. Each repetition refills the
//! table with the same number of pending tasks; service and raw alternate,
//! and the medians are reported.
//!
//! `--batch N` adds four modes. Two are timed from the create: each worker creates N
//! tasks in one call, claims N in one call and completes those in one call
//! (`createTasks`, `claimTasks`, `completeTasks`), through `TaskService`
//! and as the same batched statements in raw SQL (bench_claims/batch.rs);
//! and two more that claim and complete in batches the tasks refilled
//! untimed, as the one-at-a-time modes do.
//!
//! `--backlog N` measures claims with a deep queue instead: N pending tasks
//! spread over 10 types, 1,000 owners, three priorities and, for one in ten,
//! a `run_at` a day away, written once; each repetition then claims and
//! completes `--tasks` of them. `--explain` prints PostgreSQL's plan of the
//! service's claim statement over that backlog.
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use entity::tasks::ActiveModel;
use entity::{TaskStatus, Tasks};
use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseConnection, EntityTrait, Statement, Value,
};
use taskql::auth::CurrentUser;
use taskql::service::{ClaimRequest, StatusUpdate, TaskService, TaskStore, Worker};
use uuid::Uuid;

#[path = "bench_claims/batch.rs"]
mod batch;

#[derive(Debug, Parser)]
#[command(about = "Claim-and-complete throughput: TaskService next to raw SQL")]
struct Args {
    /// Also run on PostgreSQL: a server URL whose database may create others.
    #[arg(long, env = "TASKQL_BENCH_DATABASE_URL")]
    postgres: Option<String>,
    /// Skip SQLite.
    #[arg(long)]
    no_sqlite: bool,
    /// Pending tasks per repetition.
    #[arg(long, default_value_t = 2000)]
    tasks: usize,
    /// Concurrent workers.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Repetitions of each mode.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Claim from a standing backlog of this many pending tasks instead of
    /// refilling the table each repetition.
    #[arg(long)]
    backlog: Option<usize>,
    /// PostgreSQL: print the plan (EXPLAIN ANALYZE) of the claim statement.
    #[arg(long)]
    explain: bool,
    /// Also run batched cycles of this many tasks per call (1 to 100).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=100))]
    batch: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Service,
    Raw,
    /// PostgreSQL only: the raw statements, each also sending a small NOTIFY
    /// in the same statement, as the service does. Tells what NOTIFY costs.
    RawNotify,
    /// `--batch N`: create N, claim N, complete them, through the service.
    BatchService,
    /// `--batch N`: the same batches as raw statements.
    BatchRaw,
    /// `--batch N`: claim N and complete them (the tasks are there, as for
    /// one at a time), through the service.
    ClaimBatchService,
    /// The same claims and completions as raw statements.
    ClaimBatchRaw,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Service => "TaskService ",
            Mode::Raw => "raw SQL     ",
            Mode::RawNotify => "raw + NOTIFY",
            Mode::BatchService => "create+claim+complete batched, service",
            Mode::BatchRaw => "create+claim+complete batched, raw SQL",
            Mode::ClaimBatchService => "claim+complete batched, service",
            Mode::ClaimBatchRaw => "claim+complete batched, raw SQL",
        }
    }
}

const LEASE: Duration = Duration::from_secs(60);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    println!(
        "{} tasks per repetition, {} workers, {} repetitions per mode",
        args.tasks, args.workers, args.reps
    );
    if !args.no_sqlite {
        let dir = tempfile::tempdir()?;
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("bench.db").display()
        );
        bench("sqlite", &url, &args).await?;
    }
    if let Some(base) = &args.postgres {
        let admin = taskql::db::connect(base, 2).await?;
        let name = format!("taskql_bench_{}", Uuid::new_v4().simple());
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await?;
        let (prefix, _) = base.rsplit_once('/').ok_or("the URL names no database")?;
        let result = bench("postgres", &format!("{prefix}/{name}"), &args).await;
        admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await?;
        result?;
    }
    Ok(())
}

/// The port of a PostgreSQL URL; `None` for SQLite.
fn postgres_port(url: &str) -> Option<u16> {
    let options: sea_orm::sqlx::postgres::PgConnectOptions = url.parse().ok()?;
    Some(options.get_port())
}

async fn bench(backend: &str, url: &str, args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let db = taskql::db::connect(url, 16).await?;
    taskql::db::migrate(&db).await?;
    if let Some(port) = postgres_port(url) {
        // The raw side's 16 connections, opened now, without Nagle's
        // algorithm, as the service's pool opens its own.
        let opened = (0..16).map(|_| db.execute_unprepared("SELECT pg_sleep(0.05)"));
        futures::future::try_join_all(opened).await?;
        taskql::db::no_delay_to(port);
    }
    // The server's pool settings, as its command line's defaults make them.
    let settings = taskql::config::Settings::from_args(["bench_claims", "--database-url", url])?;
    let pool = taskql::db::Db::connect(
        &taskql::db::DbSettings::new(url)?,
        taskql::db::PoolSettings {
            max_connections: 16,
            ..taskql::db::PoolSettings::from(&settings.database)
        },
    )
    .await?;
    let service = Arc::new(TaskStore::new(pool, Default::default()));
    if let Some(n) = args.backlog {
        let started = Instant::now();
        seed_backlog(&db, n).await?;
        println!(
            "{backend}: {n} pending tasks written in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        if args.explain && db.get_database_backend() == DatabaseBackend::Postgres {
            explain_claim(&db).await?;
        }
    }
    let mut rates: [Vec<f64>; 7] = Default::default();
    let mut modes = vec![Mode::Service, Mode::Raw];
    if db.get_database_backend() == DatabaseBackend::Postgres {
        modes.push(Mode::RawNotify);
    }
    let batch = args.batch.map(usize::from);
    if batch.is_some() {
        modes.extend([
            Mode::BatchService,
            Mode::BatchRaw,
            Mode::ClaimBatchService,
            Mode::ClaimBatchRaw,
        ]);
    }
    // One unmeasured round of each warms the pool and the statement caches.
    for rep in 0..=args.reps {
        for &mode in &modes {
            let creates = matches!(mode, Mode::BatchService | Mode::BatchRaw);
            if creates {
                Tasks::delete_many().exec(&db).await?;
            } else if args.backlog.is_none() {
                refill(&db, args.tasks).await?;
            }
            let before = completed(&db).await?;
            let budget = Arc::new(AtomicUsize::new(args.tasks));
            let started = Instant::now();
            let n = batch.unwrap_or(1);
            let cycles = match mode {
                Mode::Service => run_service(&service, args.workers, &budget).await?,
                Mode::Raw => run_raw(&db, args.workers, false, &budget).await?,
                Mode::RawNotify => run_raw(&db, args.workers, true, &budget).await?,
                Mode::BatchService | Mode::ClaimBatchService => {
                    batch::run_service(&service, args.workers, n, creates, &budget)
                        .await
                        .map_err(|e| format!("{mode:?}: {e}"))?
                }
                Mode::BatchRaw | Mode::ClaimBatchRaw => {
                    batch::run_raw(&db, args.workers, n, creates, &budget)
                        .await
                        .map_err(|e| format!("{mode:?}: {e}"))?
                }
            };
            let elapsed = started.elapsed();
            if cycles != args.tasks || completed(&db).await? - before != args.tasks {
                return Err(format!("{mode:?} completed {cycles} of {} tasks", args.tasks).into());
            }
            if rep > 0 {
                rates[mode as usize].push(cycles as f64 / elapsed.as_secs_f64());
            }
        }
    }
    let show = |rates: &[f64]| {
        rates
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut medians = [0.0; 7];
    for &mode in &modes {
        let median = median(&mut rates[mode as usize]);
        medians[mode as usize] = median;
        println!(
            "{backend}: {} median {median:>7.0} cycles/s  (runs: {})",
            mode.label(),
            show(&rates[mode as usize])
        );
    }
    let ratio = |a: Mode, b: Mode| medians[a as usize] / medians[b as usize];
    if modes.contains(&Mode::RawNotify) {
        println!(
            "{backend}: service / (raw + NOTIFY) = {:.2}",
            ratio(Mode::Service, Mode::RawNotify)
        );
    }
    println!(
        "{backend}: service / raw = {:.2}",
        ratio(Mode::Service, Mode::Raw)
    );
    if let Some(n) = batch {
        println!(
            "{backend}: batches of {n}, create+claim+complete: service / raw = {:.2}, / one-at-a-time service = {:.1}",
            ratio(Mode::BatchService, Mode::BatchRaw),
            ratio(Mode::BatchService, Mode::Service)
        );
        println!(
            "{backend}: batches of {n}, claim+complete: service / raw = {:.2}, / one-at-a-time service = {:.1}",
            ratio(Mode::ClaimBatchService, Mode::ClaimBatchRaw),
            ratio(Mode::ClaimBatchService, Mode::Service)
        );
    }
    db.close().await?;
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

/// Empties the table and inserts `n` pending tasks, oldest first.
async fn refill(db: &DatabaseConnection, n: usize) -> Result<(), sea_orm::DbErr> {
    Tasks::delete_many().exec(db).await?;
    let start = chrono::Utc::now() - chrono::Duration::hours(1);
    let models: Vec<ActiveModel> = (0..n)
        .map(|i| {
            let at = start + chrono::Duration::microseconds(i as i64);
            ActiveModel::pending(
                format!("user-{}", i % 50),
                "concept.image".into(),
                serde_json::json!({ "prompt": "a red fox", "n": i }),
                None,
                at,
            )
        })
        .collect();
    for chunk in models.chunks(500) {
        Tasks::insert_many(chunk.to_vec())
            .exec_without_returning(db)
            .await?;
    }
    Ok(())
}

async fn completed(db: &DatabaseConnection) -> Result<usize, sea_orm::DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n FROM tasks WHERE status = 'completed' AND attempts = 1",
        ))
        .await?
        .ok_or_else(|| sea_orm::DbErr::RecordNotFound("count".into()))?;
    Ok(row.try_get::<i64>("", "n")? as usize)
}

/// Workers that claim and complete through `TaskService` until none is left.
async fn run_service(
    service: &Arc<TaskStore>,
    workers: usize,
    budget: &Arc<AtomicUsize>,
) -> Result<usize, Box<dyn std::error::Error>> {
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let (service, budget) = (service.clone(), budget.clone());
            tokio::spawn(async move {
                let mut cycles = 0;
                let worker = Worker::new(&CurrentUser::service(format!("bench-{w}")))?;
                let request = ClaimRequest {
                    types: Vec::new(),
                    lease: Some(LEASE),
                    worker_id: Some(format!("bench-{w}")),
                };
                while take(&budget) {
                    let Some(task) = service.claim_task(&worker, request.clone()).await? else {
                        break;
                    };
                    let mut done = StatusUpdate::new(task.id, TaskStatus::Completed);
                    done.result_id = Some(format!("r-{}", task.id));
                    done.expected_attempt = Some(task.attempts);
                    service.update_task_status(&worker, done).await?;
                    cycles += 1;
                }
                Ok::<usize, taskql::error::TaskError>(cycles)
            })
        })
        .collect();
    let mut total = 0;
    for handle in handles {
        total += handle.await??;
    }
    Ok(total)
}

/// The statements the service runs, written out, each on its own (autocommit).
struct RawSql {
    claim: String,
    complete: String,
}

impl RawSql {
    fn for_backend(backend: DatabaseBackend) -> Self {
        let postgres = backend == DatabaseBackend::Postgres;
        let p = |n: usize| {
            if postgres {
                format!("${n}")
            } else {
                "?".into()
            }
        };
        let lock = if postgres {
            " FOR UPDATE SKIP LOCKED"
        } else {
            ""
        };
        Self {
            claim: format!(
                "UPDATE tasks SET status = 'processing', attempts = attempts + 1, worker_id = {}, \
                 lease_expires_at = {}, started_at = COALESCE(started_at, {}), \
                 version = version + 1, updated_at = {} \
                 WHERE id = (SELECT id FROM tasks WHERE status = 'pending' AND run_at <= {} \
                 ORDER BY priority DESC, fair_rank, run_at, id LIMIT 1{lock}) \
                 AND status = 'pending' RETURNING *",
                p(1),
                p(2),
                p(3),
                p(4),
                p(5)
            ),
            complete: format!(
                "UPDATE tasks SET status = 'completed', result_id = {}, progress = 100, \
                 completed_at = {}, lease_expires_at = NULL, version = version + 1, updated_at = {} \
                 WHERE id = {} AND status IN ('pending', 'processing') AND attempts = {} RETURNING *",
                p(1),
                p(2),
                p(3),
                p(4),
                p(5)
            ),
        }
    }
}

/// Workers that run the same claim and completion as raw SQL.
async fn run_raw(
    db: &DatabaseConnection,
    workers: usize,
    notify: bool,
    budget: &Arc<AtomicUsize>,
) -> Result<usize, Box<dyn std::error::Error>> {
    let backend = db.get_database_backend();
    let mut sql = RawSql::for_backend(backend);
    if notify {
        let with_notice = |statement: &str| {
            format!(
                "WITH changed AS ({statement}) SELECT changed.* FROM changed \
                 CROSS JOIN LATERAL (SELECT pg_notify('taskql_bench', changed.id::text)) AS notice"
            )
        };
        sql = RawSql {
            claim: with_notice(&sql.claim),
            complete: with_notice(&sql.complete),
        };
    }
    let sql = Arc::new(sql);
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let (db, sql, budget) = (db.clone(), sql.clone(), budget.clone());
            tokio::spawn(async move {
                let mut cycles = 0;
                let worker: Value = format!("bench-{w}").into();
                while take(&budget) {
                    let at = chrono::Utc::now();
                    let lease_until = at + chrono::Duration::from_std(LEASE).unwrap_or_default();
                    let claimed = db
                        .query_one_raw(Statement::from_sql_and_values(
                            backend,
                            &sql.claim,
                            [
                                worker.clone(),
                                lease_until.into(),
                                at.into(),
                                at.into(),
                                at.into(),
                            ],
                        ))
                        .await?;
                    let Some(row) = claimed else { break };
                    let id: Uuid = row.try_get("", "id")?;
                    let attempts: i32 = row.try_get("", "attempts")?;
                    let at = chrono::Utc::now();
                    let done = db
                        .query_one_raw(Statement::from_sql_and_values(
                            backend,
                            &sql.complete,
                            [
                                format!("r-{id}").into(),
                                at.into(),
                                at.into(),
                                id.into(),
                                attempts.into(),
                            ],
                        ))
                        .await?;
                    if done.is_none() {
                        return Err(sea_orm::DbErr::RecordNotUpdated);
                    }
                    cycles += 1;
                }
                Ok::<usize, sea_orm::DbErr>(cycles)
            })
        })
        .collect();
    let mut total = 0;
    for handle in handles {
        total += handle.await??;
    }
    Ok(total)
}

/// Takes one cycle from the budget; false once it is spent.
fn take(budget: &AtomicUsize) -> bool {
    take_many(budget, 1) == 1
}

/// Takes up to `n` from the budget; how many it took.
fn take_many(budget: &AtomicUsize, n: usize) -> usize {
    budget
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
            Some(left - left.min(n))
        })
        .map_or(0, |left| left.min(n))
}

/// Writes `n` pending tasks as a deep, mixed queue: 10 types, 1,000 owners
/// taking turns, priorities 10, 0 and −10 (one, three and one in five),
/// and one task in ten scheduled a day ahead.
async fn seed_backlog(db: &DatabaseConnection, n: usize) -> Result<(), sea_orm::DbErr> {
    use sea_orm::ActiveValue::Set;
    Tasks::delete_many().exec(db).await?;
    let start = chrono::Utc::now() - chrono::Duration::hours(1);
    let later = chrono::Utc::now() + chrono::Duration::days(1);
    let owners = 1000;
    for first in (0..n).step_by(500) {
        let models: Vec<ActiveModel> = (first..n.min(first + 500))
            .map(|i| {
                let at = start + chrono::Duration::microseconds(i as i64);
                let mut model = ActiveModel::pending(
                    format!("user-{}", i % owners),
                    format!("type-{}", i % 10),
                    serde_json::json!({ "prompt": "a red fox", "n": i }),
                    None,
                    at,
                );
                model.priority = Set(match i % 5 {
                    0 => 10,
                    4 => -10,
                    _ => 0,
                });
                model.fair_rank = Set((i / owners) as i64);
                if i % 10 == 7 {
                    model.run_at = Set(later);
                }
                model
            })
            .collect();
        Tasks::insert_many(models)
            .exec_without_returning(db)
            .await?;
    }
    db.execute_unprepared("ANALYZE tasks").await?;
    Ok(())
}

/// Prints the plan of the service's claim statement, run and rolled back.
async fn explain_claim(db: &DatabaseConnection) -> Result<(), sea_orm::DbErr> {
    use sea_orm::TransactionTrait;
    let at = chrono::Utc::now();
    let until = at + chrono::Duration::from_std(LEASE).unwrap_or_default();
    for types in [Vec::new(), vec!["type-3".to_string()]] {
        let statement = taskql::service::queue::claim(
            &types,
            taskql::service::queue::Caps::Counted,
            &taskql::service::rates::Empty::default(),
            at,
            "explain",
            until,
        );
        let (sql, values) = statement.build(sea_orm::sea_query::PostgresQueryBuilder);
        let txn = db.begin().await?;
        let rows = txn
            .query_all_raw(Statement::from_sql_and_values(
                DatabaseBackend::Postgres,
                format!("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {sql}"),
                values,
            ))
            .await?;
        txn.rollback().await?;
        println!("claim of {types:?}:\n{sql}");
        for row in rows {
            println!("  {}", row.try_get::<String>("", "QUERY PLAN")?);
        }
    }
    Ok(())
}
