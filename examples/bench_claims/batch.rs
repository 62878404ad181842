//! The batched side of examples/bench_claims.rs (`--batch N`): each worker
//! creates N tasks, claims N and completes what it claimed, one call (or one
//! statement) for each, through `TaskService` and as raw SQL.
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use entity::Tasks;
use entity::tasks::ActiveModel;
use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseConnection, EntityTrait, QueryTrait, Statement, Value,
};
use taskql::auth::CurrentUser;
use taskql::service::{ClaimRequest, Completion, NewTask, TaskService, TaskStore, Worker};
use uuid::Uuid;

use super::{LEASE, take_many};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn metadata(i: usize) -> serde_json::Value {
    serde_json::json!({ "prompt": "a red fox", "n": i })
}

/// What a worker does with its share, one batch at a time: create (when
/// `create`; else the tasks are there already), claim, complete. Returns
/// the tasks it completed.
pub async fn run_service(
    service: &Arc<TaskStore>,
    workers: usize,
    batch: usize,
    create: bool,
    budget: &Arc<AtomicUsize>,
) -> Result<usize, BoxError> {
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let (service, budget) = (service.clone(), budget.clone());
            tokio::spawn(async move {
                let owner = CurrentUser::user(format!("user-{w}"));
                let worker = Worker::new(&CurrentUser::service(format!("bench-{w}")))?;
                let request = ClaimRequest {
                    types: Vec::new(),
                    lease: Some(LEASE),
                    worker_id: Some(format!("bench-{w}")),
                };
                let mut cycles = 0;
                loop {
                    let n = if create { take_many(&budget, batch) } else { 0 };
                    if n > 0 {
                        let news = (0..n)
                            .map(|i| NewTask {
                                task_type: "concept.image".into(),
                                metadata: Some(metadata(i)),
                                ..NewTask::default()
                            })
                            .collect();
                        service.create_tasks(&owner, news).await?;
                    }
                    let claimed = service
                        .claim_tasks(&worker, request.clone(), batch as i32)
                        .await?;
                    if claimed.is_empty() && n == 0 {
                        return Ok::<usize, taskql::error::TaskError>(cycles);
                    }
                    let completions = claimed
                        .iter()
                        .map(|task| Completion {
                            task_id: task.id,
                            expected_attempt: task.attempts,
                            result_id: Some(format!("r-{}", task.id)),
                            result: None,
                        })
                        .collect();
                    for outcome in service.complete_tasks(&worker, completions).await? {
                        outcome?;
                        cycles += 1;
                    }
                }
            })
        })
        .collect();
    let mut total = 0;
    for handle in handles {
        total += handle.await??;
    }
    Ok(total)
}

/// The same batches as raw statements: a multi-row insert, the claim of the
/// first N in claim order, and one conditional update of the N claimed.
pub async fn run_raw(
    db: &DatabaseConnection,
    workers: usize,
    batch: usize,
    create: bool,
    budget: &Arc<AtomicUsize>,
) -> Result<usize, BoxError> {
    let backend = db.get_database_backend();
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let (db, budget) = (db.clone(), budget.clone());
            tokio::spawn(async move {
                let worker: Value = format!("bench-{w}").into();
                let mut cycles = 0;
                loop {
                    let n = if create { take_many(&budget, batch) } else { 0 };
                    let at = chrono::Utc::now();
                    if n > 0 {
                        let models: Vec<ActiveModel> = (0..n)
                            .map(|i| {
                                ActiveModel::pending(
                                    format!("user-{w}"),
                                    "concept.image".into(),
                                    metadata(i),
                                    None,
                                    at,
                                )
                            })
                            .collect();
                        let mut insert = Tasks::insert_many(models).into_query();
                        insert.returning_all();
                        db.query_all_raw(backend.build(&insert)).await?;
                    }
                    let until = at + chrono::Duration::from_std(LEASE).unwrap_or_default();
                    let claimed = db
                        .query_all_raw(Statement::from_sql_and_values(
                            backend,
                            claim_sql(backend, batch),
                            [worker.clone(), until.into(), at.into()],
                        ))
                        .await?;
                    if claimed.is_empty() && n == 0 {
                        return Ok::<usize, BoxError>(cycles);
                    }
                    let mut done = Vec::with_capacity(claimed.len());
                    for row in &claimed {
                        done.push((
                            row.try_get::<Uuid>("", "id")?,
                            row.try_get::<i32>("", "attempts")?,
                        ));
                    }
                    if done.is_empty() {
                        continue;
                    }
                    let completed = db.query_all_raw(complete(backend, &done)).await?;
                    if completed.len() != done.len() {
                        return Err("a raw completion missed a task".into());
                    }
                    cycles += completed.len();
                }
            })
        })
        .collect();
    let mut total = 0;
    for handle in handles {
        total += handle.await??;
    }
    Ok(total)
}

/// The first `n` pending tasks in claim order, claimed ($1 worker, $2 the
/// lease's end, $3 now).
fn claim_sql(backend: DatabaseBackend, n: usize) -> String {
    let (open, lock, close) = match backend {
        DatabaseBackend::Postgres => ("id = ANY(ARRAY(", " FOR UPDATE SKIP LOCKED", "))"),
        _ => ("id IN (", "", ")"),
    };
    format!(
        "UPDATE tasks SET status = 'processing', attempts = attempts + 1, worker_id = $1, \
         lease_expires_at = $2, started_at = COALESCE(started_at, $3), \
         version = version + 1, updated_at = $3 \
         WHERE {open}SELECT id FROM tasks WHERE status = 'pending' AND run_at <= $3 \
         ORDER BY priority DESC, fair_rank, run_at, id LIMIT {n}{lock}{close} \
         AND status = 'pending' RETURNING *"
    )
}

/// The completion of `done` (id, attempt) in one statement, each fenced by
/// its attempt.
fn complete(backend: DatabaseBackend, done: &[(Uuid, i32)]) -> Statement {
    let mut values: Vec<Value> = vec![chrono::Utc::now().into()];
    let mut p = |v: Value| {
        values.push(v);
        format!("${}", values.len())
    };
    let ids: Vec<String> = done.iter().map(|(id, _)| p((*id).into())).collect();
    let attempts: String = done
        .iter()
        .map(|(id, attempt)| {
            format!(
                " WHEN id = {} THEN {}",
                p((*id).into()),
                p((*attempt).into())
            )
        })
        .collect();
    let results: String = done
        .iter()
        .map(|(id, _)| {
            format!(
                " WHEN id = {} THEN {}",
                p((*id).into()),
                p(format!("r-{id}").into())
            )
        })
        .collect();
    let sql = format!(
        "UPDATE tasks SET status = 'completed', result_id = CASE{results} END, progress = 100, \
         error_message = NULL, completed_at = $1, lease_expires_at = NULL, \
         version = version + 1, updated_at = $1 \
         WHERE id IN ({}) AND status IN ('pending', 'processing') AND attempts = CASE{attempts} END \
         RETURNING *",
        ids.join(", ")
    );
    Statement::from_sql_and_values(backend, sql, values)
}
