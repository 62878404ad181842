//! What pipelines and fair limits cost, through `TaskService`:
//!
//! ```text
//! cargo run --release --example bench_pipelines                    # SQLite
//! cargo run --release --example bench_pipelines -- \
//!     --postgres postgres://postgres@127.0.0.1:5432/test           # and PostgreSQL
//! ```
//!
//! - **chain**: chains of 3 dependent tasks; for each link, the time from
//!   the start of the parent's completion until a claim of the child's type
//!   has the child (claimed at the first try when the completion made it
//!   runnable in its own transaction).
//! - **limits**: claim-and-complete cycles of one type ("other") while two
//!   more types wait beside it, without policies, then with 1,000
//!   concurrency keys capped at 1 each on one ("keyed") and a rate limit of
//!   10 a second on the other ("paid"); alternated, medians. Then the keyed
//!   type's own cycles, 1,000 keys at a cap of 1.
//! - `--backlog N --explain` (PostgreSQL): N pending tasks of the keyed type
//!   over 1,000 keys, half of the keys at their cap, and the plan of the
//!   service's claim statement over them (`EXPLAIN (ANALYZE, BUFFERS)`).
#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use entity::tasks::ActiveModel;
use entity::{TaskStatus, Tasks};
use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseConnection, EntityTrait, Statement};
use taskql::auth::CurrentUser;
use taskql::service::{
    ClaimRequest, Dependency, NewTask, PolicyChange, StatusUpdate, TaskService, TaskStore, Worker,
};

use common::{BoxError, TempPostgres, median, quantile};

#[derive(Debug, Parser)]
#[command(about = "Chains, concurrency keys and rate limits: what they cost")]
struct Args {
    /// Also run on PostgreSQL: a server URL whose database may create others.
    #[arg(long, env = "TASKQL_BENCH_DATABASE_URL")]
    postgres: Option<String>,
    /// Skip SQLite.
    #[arg(long)]
    no_sqlite: bool,
    /// Chains of 3 timed.
    #[arg(long, default_value_t = 200)]
    chains: usize,
    /// Tasks of each type per repetition of the limits benchmark.
    #[arg(long, default_value_t = 2000)]
    tasks: usize,
    /// Concurrent workers.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Repetitions of each limits mode.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// PostgreSQL: pending keyed tasks for `--explain`.
    #[arg(long)]
    backlog: Option<usize>,
    /// PostgreSQL: print the plan of a keyed claim over the backlog.
    #[arg(long)]
    explain: bool,
}

const KEYS: usize = 1000;
const LEASE: Duration = Duration::from_secs(60);

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    if !args.no_sqlite {
        let dir = tempfile::tempdir()?;
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("bench.db").display()
        );
        bench("sqlite", &url, &args).await?;
    }
    if let Some(base) = &args.postgres {
        let database = TempPostgres::create(base, "taskql_bench").await?;
        let result = bench("postgres", &database.url, &args).await;
        database.drop_database().await?;
        result?;
    }
    Ok(())
}

async fn bench(backend: &str, url: &str, args: &Args) -> Result<(), BoxError> {
    let db = taskql::db::connect(url, 16).await?;
    taskql::db::migrate(&db).await?;
    let settings = taskql::config::Settings::from_args(["bench_pipelines", "--database-url", url])?;
    let pool = taskql::db::Db::connect(
        &taskql::db::DbSettings::new(url)?,
        taskql::db::PoolSettings {
            max_connections: 16,
            ..taskql::db::PoolSettings::from(&settings.database)
        },
    )
    .await?;
    let service = Arc::new(TaskStore::new(pool, Default::default()));
    let worker = Worker::new(&CurrentUser::service("bench"))?;

    let links = chains(&service, &worker, args.chains).await?;
    println!(
        "{backend}: chain of 3, parent's completion to child claimed: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} links)",
        quantile(&links, 0.5),
        quantile(&links, 0.99),
        links.last().copied().unwrap_or(f64::NAN),
        links.len()
    );

    let mut free = Vec::new();
    let mut limited = Vec::new();
    let mut keyed = Vec::new();
    for rep in 0..=args.reps {
        for with_limits in [false, true] {
            set_limits(&service, &worker, with_limits).await?;
            refill(&db, args.tasks).await?;
            let rate = cycles(&service, args.workers, "other", args.tasks).await?;
            if rep > 0 {
                if with_limits { &mut limited } else { &mut free }.push(rate);
            }
        }
        set_limits(&service, &worker, true).await?;
        refill(&db, args.tasks).await?;
        let rate = cycles(&service, args.workers, "keyed", args.tasks).await?;
        if rep > 0 {
            keyed.push(rate);
        }
    }
    let (free_median, limited_median) = (median(&free), median(&limited));
    println!(
        "{backend}: another type's cycles/s, no limits: median {free_median:.0} (runs {free:.0?})"
    );
    println!(
        "{backend}: another type's cycles/s, 1,000 keys and a rate limit beside it: median {limited_median:.0} (runs {limited:.0?}); ratio {:.2}",
        limited_median / free_median
    );
    println!(
        "{backend}: the keyed type's own cycles/s, 1,000 keys at a cap of 1: median {:.0} (runs {keyed:.0?})",
        median(&keyed)
    );

    if let (Some(n), true) = (
        args.backlog,
        db.get_database_backend() == DatabaseBackend::Postgres,
    ) {
        seed_keyed_backlog(&db, n).await?;
        if args.explain {
            explain_keyed_claim(&db).await?;
        }
    }
    db.close().await?;
    Ok(())
}

/// Runs `n` chains of 3 (a, then b after a, then c after b) through the
/// service; the time, in ms, from the start of each parent's completion to
/// its child claimed, sorted.
async fn chains(service: &Arc<TaskStore>, worker: &Worker, n: usize) -> Result<Vec<f64>, BoxError> {
    let owner = CurrentUser {
        id: "chain-owner".into(),
        is_service: false,
        expires_at: None,
    };
    let mut links = Vec::with_capacity(n * 2);
    for i in 0..n {
        let news = (0..3)
            .map(|step| NewTask {
                task_type: format!("chain.step{step}"),
                depends_on: if step == 0 {
                    Vec::new()
                } else {
                    vec![Dependency::Input(step - 1)]
                },
                ..Default::default()
            })
            .collect();
        let made = service.create_tasks(&owner, news).await?;
        let mut parent = claim(service, worker, "chain.step0").await?;
        if parent.as_ref().map(|t| t.id) != Some(made[0].id) {
            return Err(format!("chain {i}: the first step was not claimed").into());
        }
        for (step, want) in made.iter().enumerate().skip(1) {
            let task = parent.take().ok_or("no parent")?;
            let started = Instant::now();
            let mut done = StatusUpdate::new(task.id, TaskStatus::Completed);
            done.expected_attempt = Some(task.attempts);
            service.update_task_status(worker, done).await?;
            let child = loop {
                if let Some(child) = claim(service, worker, &format!("chain.step{step}")).await? {
                    break child;
                }
            };
            links.push(started.elapsed().as_secs_f64() * 1000.0);
            if child.id != want.id {
                return Err(format!("chain {i}: step {step} claimed another task").into());
            }
            parent = Some(child);
        }
        if let Some(last) = parent {
            let mut done = StatusUpdate::new(last.id, TaskStatus::Completed);
            done.expected_attempt = Some(last.attempts);
            service.update_task_status(worker, done).await?;
        }
    }
    links.sort_by(f64::total_cmp);
    Ok(links)
}

async fn claim(
    service: &TaskStore,
    worker: &Worker,
    task_type: &str,
) -> Result<Option<entity::Task>, taskql::error::TaskError> {
    let request = ClaimRequest {
        types: vec![task_type.to_owned()],
        lease: Some(LEASE),
        worker_id: Some("bench".into()),
    };
    service.claim_task(worker, request).await
}

/// With `on`, a cap of 1 per key on "keyed" and 10 claims a second on
/// "paid"; without, neither.
async fn set_limits(
    service: &TaskStore,
    worker: &Worker,
    on: bool,
) -> Result<(), taskql::error::TaskError> {
    let keyed = PolicyChange {
        concurrency_per_key: Some(on.then_some(1)),
        ..Default::default()
    };
    let paid = PolicyChange {
        rate_limit: Some(on.then_some(taskql::service::queue::RateLimit {
            count: 10,
            period_seconds: 1,
            per_key: false,
        })),
        ..Default::default()
    };
    service.set_task_type_policy(worker, "keyed", keyed).await?;
    service.set_task_type_policy(worker, "paid", paid).await?;
    Ok(())
}

/// Empties the table and writes `n` pending tasks of each of "other",
/// "keyed" (over 1,000 keys) and "paid".
async fn refill(db: &DatabaseConnection, n: usize) -> Result<(), sea_orm::DbErr> {
    use sea_orm::ActiveValue::Set;
    Tasks::delete_many().exec(db).await?;
    let start = chrono::Utc::now() - chrono::Duration::hours(1);
    let mut models = Vec::with_capacity(3 * n);
    for (t, task_type) in ["other", "keyed", "paid"].iter().enumerate() {
        for i in 0..n {
            let at = start + chrono::Duration::microseconds((t * n + i) as i64);
            let mut model = ActiveModel::pending(
                format!("user-{}", i % 50),
                (*task_type).into(),
                serde_json::json!({ "n": i }),
                None,
                at,
            );
            model.fair_rank = Set((i / 50) as i64);
            if *task_type == "keyed" {
                model.concurrency_key = Set(Some(format!("customer-{}", i % KEYS)));
            }
            models.push(model);
        }
    }
    for chunk in models.chunks(500) {
        Tasks::insert_many(chunk.to_vec())
            .exec_without_returning(db)
            .await?;
    }
    Ok(())
}

/// Claim-and-complete cycles per second of `task_type`, `n` of them.
async fn cycles(
    service: &Arc<TaskStore>,
    workers: usize,
    task_type: &str,
    n: usize,
) -> Result<f64, BoxError> {
    let budget = Arc::new(AtomicUsize::new(n));
    let started = Instant::now();
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let (service, budget, task_type) =
                (service.clone(), budget.clone(), task_type.to_owned());
            tokio::spawn(async move {
                let worker = Worker::new(&CurrentUser::service(format!("bench-{w}")))?;
                let mut done = 0;
                while budget
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                        left.checked_sub(1)
                    })
                    .is_ok()
                {
                    let Some(task) = claim(&service, &worker, &task_type).await? else {
                        budget.fetch_add(1, Ordering::Relaxed);
                        tokio::task::yield_now().await;
                        continue;
                    };
                    let mut update = StatusUpdate::new(task.id, TaskStatus::Completed);
                    update.expected_attempt = Some(task.attempts);
                    service.update_task_status(&worker, update).await?;
                    done += 1;
                }
                Ok::<usize, taskql::error::TaskError>(done)
            })
        })
        .collect();
    let mut total = 0;
    for handle in handles {
        total += handle.await??;
    }
    if total != n {
        return Err(format!("{task_type}: {total} of {n} cycles").into());
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// `n` pending tasks of "keyed" over 1,000 keys, with 2 running tasks for
/// each of the first 500 keys (a cap per key of 2: those keys are full).
async fn seed_keyed_backlog(db: &DatabaseConnection, n: usize) -> Result<(), sea_orm::DbErr> {
    use sea_orm::ActiveValue::Set;
    Tasks::delete_many().exec(db).await?;
    db.execute_unprepared(
        "UPDATE task_types SET concurrency_per_key = 2, rate_count = NULL WHERE task_type = 'keyed'",
    )
    .await?;
    let started = Instant::now();
    let start = chrono::Utc::now() - chrono::Duration::hours(1);
    let rows = (0..n)
        .map(|i| (i, TaskStatus::Pending))
        .chain((0..KEYS / 2 * 2).map(|i| (i % (KEYS / 2), TaskStatus::Processing)));
    let rows: Vec<(usize, TaskStatus)> = rows.collect();
    for chunk in rows.chunks(500) {
        let models: Vec<ActiveModel> = chunk
            .iter()
            .map(|(i, status)| {
                let at = start + chrono::Duration::microseconds(*i as i64);
                let mut model = ActiveModel::pending(
                    format!("user-{}", i % 1000),
                    "keyed".into(),
                    serde_json::json!({ "n": i }),
                    None,
                    at,
                );
                model.fair_rank = Set((i / 1000) as i64);
                model.status = Set(*status);
                model.concurrency_key = Set(Some(format!("customer-{}", i % KEYS)));
                model
            })
            .collect();
        Tasks::insert_many(models)
            .exec_without_returning(db)
            .await?;
    }
    db.execute_unprepared("ANALYZE tasks").await?;
    println!(
        "postgres: {n} pending keyed tasks over {KEYS} keys ({} keys full) written in {:.1} s",
        KEYS / 2,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Prints the plan of the service's claim of "keyed" over the backlog, run
/// and rolled back.
async fn explain_keyed_claim(db: &DatabaseConnection) -> Result<(), sea_orm::DbErr> {
    use sea_orm::TransactionTrait;
    let at = chrono::Utc::now();
    let until = at + chrono::Duration::from_std(LEASE).unwrap_or_default();
    let locked = ["keyed".to_owned()];
    let statement = taskql::service::queue::claim(
        &locked,
        taskql::service::queue::Caps::Locked(&locked),
        &taskql::service::rates::Empty::default(),
        at,
        "explain",
        until,
    );
    let (sql, values) = statement.build(sea_orm::sea_query::PostgresQueryBuilder);
    // Twice: the first reads the pages from disk, the second is the plan
    // a claim gets while the queue is in use.
    for run in ["cold", "warm"] {
        let txn = db.begin().await?;
        // As on the service's own connections.
        txn.execute_unprepared("SET LOCAL jit = off").await?;
        let rows = txn
            .query_all_raw(Statement::from_sql_and_values(
                DatabaseBackend::Postgres,
                format!("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {sql}"),
                values.clone(),
            ))
            .await?;
        txn.rollback().await?;
        println!("claim of [\"keyed\"], 1,000 keys, 500 of them at their cap ({run}):");
        for row in rows {
            let line: String = row.try_get_by_index(0)?;
            if run == "warm" || line.starts_with("Execution Time") {
                println!("  {line}");
            }
        }
    }
    Ok(())
}
