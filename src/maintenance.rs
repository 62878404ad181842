//! The maintenance room: the work an instance does on a timer, whoever is
//! calling. Each job is a [`Pass`] (a name, an interval, an async step that
//! says how many rows it handled); one runner starts them all, times each
//! run in `/metrics` (`taskql_maintenance_pass_duration_seconds`), and logs
//! a failure once (and its recovery). The passes run until the `App` that
//! started them is dropped, after the server drained its requests: leases
//! are reaped while it shuts down.
//!
//! What runs here is in [`Room::for_service`]: the lease reaper, the tasks
//! gauge, retention of finished tasks, of the change log and of the
//! per-minute counters, and, on PostgreSQL, folding the count deltas.
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::task::JoinHandle;

use crate::auth::CurrentUser;
use crate::config::Config;
use crate::db::Backend;
use crate::error::TaskResult;
use crate::metrics::{self, Metrics};
use crate::service::{StatsRequest, TaskService, TaskStore};

/// How often each instance returns expired leases to PENDING.
pub const REAPER_INTERVAL: Duration = Duration::from_millis(500);
/// How often retention runs, when configured.
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(60);
/// How often (on PostgreSQL) task count deltas are folded into the counters.
pub const FOLD_INTERVAL: Duration = Duration::from_secs(1);

type Step = Box<dyn Fn() -> BoxFuture<'static, TaskResult<u64>> + Send + Sync>;

/// One job of the room, run every `every` (the first run at once).
pub struct Pass {
    name: &'static str,
    every: Duration,
    /// What the step's count means, logged when it is not 0 (`pruned`).
    logged_as: Option<&'static str>,
    step: Step,
}

impl Pass {
    pub fn new<F, Fut>(name: &'static str, every: Duration, step: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = TaskResult<u64>> + Send + 'static,
    {
        Self {
            name,
            every,
            logged_as: None,
            step: Box::new(move || Box::pin(step())),
        }
    }

    /// Logs each run's count as `what` (at info) when it is not 0.
    pub fn logged_as(mut self, what: &'static str) -> Self {
        self.logged_as = Some(what);
        self
    }
}

/// The passes one instance runs.
pub struct Room {
    passes: Vec<Pass>,
}

impl Room {
    /// The passes `config` asks of `service`.
    pub fn for_service(config: &Config, service: &Arc<TaskStore>, metrics: &Arc<Metrics>) -> Self {
        let mut passes = vec![
            Pass::new(
                "lease reaper",
                REAPER_INTERVAL,
                on(service, |service| async move {
                    let reaped = service.reap_expired_leases().await?;
                    Ok((reaped.requeued + reaped.failed) as u64)
                }),
            ),
            Pass::new("tasks gauge", metrics::TASK_COUNTS_INTERVAL, {
                let metrics = metrics.clone();
                on(service, move |service| {
                    count_tasks(service, metrics.clone())
                })
            }),
        ];
        if let Some(retention) = config.tasks.retention() {
            passes.push(
                Pass::new(
                    "task retention",
                    RETENTION_INTERVAL,
                    on(service, move |service| async move {
                        Ok(service.prune_finished(retention).await? as u64)
                    }),
                )
                .logged_as("pruned"),
            );
        }
        let event_retention = config.tasks.event_retention;
        passes.push(
            Pass::new(
                "change log retention",
                RETENTION_INTERVAL,
                on(service, move |service| async move {
                    service.prune_events(event_retention).await
                }),
            )
            .logged_as("pruned"),
        );
        passes.push(
            Pass::new(
                "taskStats minutes retention",
                RETENTION_INTERVAL,
                on(service, |service| async move {
                    service.prune_stats_minutes().await
                }),
            )
            .logged_as("pruned"),
        );
        if config.backend() == Backend::Postgres {
            passes.push(Pass::new(
                "count folding",
                FOLD_INTERVAL,
                on(service, |service| async move {
                    service.fold_count_deltas().await
                }),
            ));
        }
        Self { passes }
    }

    /// Runs every pass on its own interval until its handle is aborted.
    pub fn start(self, metrics: Arc<Metrics>) -> Vec<JoinHandle<()>> {
        self.passes
            .into_iter()
            .map(|pass| tokio::spawn(run(pass, metrics.clone())))
            .collect()
    }
}

async fn run(pass: Pass, metrics: Arc<Metrics>) {
    let mut ticker = tokio::time::interval(pass.every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        ticker.tick().await;
        let started = Instant::now();
        let outcome = (pass.step)().await;
        metrics.maintenance_pass(pass.name, outcome.is_ok(), started.elapsed().as_secs_f64());
        match outcome {
            Ok(count) => {
                if failing {
                    tracing::info!(pass = pass.name, "maintenance pass works again");
                    failing = false;
                }
                if let Some(what) = pass.logged_as.filter(|_| count > 0) {
                    tracing::info!(pass = pass.name, count, "{what}");
                }
            }
            // Said once per outage; each retry after it only at debug.
            Err(err) if !failing => {
                tracing::warn!(pass = pass.name, error = %err, "maintenance pass failed; retrying");
                failing = true;
            }
            Err(err) => {
                tracing::debug!(pass = pass.name, error = %err, "maintenance pass failed again")
            }
        }
    }
}

/// A pass's step that runs `step` on its own handle of `service`.
fn on<F, Fut>(service: &Arc<TaskStore>, step: F) -> impl Fn() -> Fut + Send + Sync + 'static
where
    F: Fn(Arc<TaskStore>) -> Fut + Send + Sync + 'static,
{
    let service = service.clone();
    move || step(service.clone())
}

/// Keeps the tasks-by-status gauge current, from the counters the
/// database keeps (never a count of the table).
async fn count_tasks(service: Arc<TaskStore>, metrics: Arc<Metrics>) -> TaskResult<u64> {
    let everyone = CurrentUser::service("metrics");
    let request = StatsRequest {
        counts: true,
        ..Default::default()
    };
    let stats = service.task_stats(&everyone, request).await?;
    let counts: Vec<(&str, i64)> = stats
        .by_status
        .each()
        .map(|(status, count)| (status.as_str(), count))
        .collect();
    metrics.set_task_counts(&counts);
    Ok(0)
}
