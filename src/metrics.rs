//! What `/metrics` shows, in the OpenMetrics text format Prometheus scrapes.
//!
//! Everything counts as it happens, except what would cost a query: the
//! tasks by status are read from the counters every few seconds by a
//! background task ([`TASK_COUNTS_INTERVAL`]), never per scrape.
use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::db::PoolStats;

/// How often the tasks-by-status gauge is refreshed.
pub const TASK_COUNTS_INTERVAL: Duration = Duration::from_secs(5);
/// Task types that get a label of their own; later ones count as `(other)`,
/// so a client inventing types cannot grow the series without bound.
const MAX_TYPE_LABELS: usize = 100;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// query, mutation, subscription, or `-` when the document did not parse.
    pub operation_type: String,
    /// `ok`, or the code of the first error.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: String,
}

/// What happened to a task.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Transition {
    claimed,
    completed,
    failed,
    /// Returned to PENDING by the reaper after its lease expired.
    requeued,
    cancelled,
    retried,
    /// Failed with attempts left: back to PENDING after the backoff.
    backed_off,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    pub transition: Transition,
    pub r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PassLabels {
    /// The maintenance pass (`crate::maintenance`), e.g. `lease reaper`.
    pub pass: String,
    /// `ok` or `failed`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: String,
}

/// Every series taskql exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Histogram>,
    pub errors: Family<CodeLabels, Counter>,
    pub http_requests: Counter,
    pub transitions: Family<TransitionLabels, Counter>,
    type_labels: Mutex<HashSet<String>>,
    pub tasks: Family<StatusLabels, Gauge>,
    pub websockets: Gauge,
    pub websockets_opened: Counter,
    pub subscriptions: Gauge,
    pub listener_reconnects: Counter,
    pub event_lag: Histogram,
    pub maintenance: Family<PassLabels, Histogram>,
    pool_max: Gauge,
    pool_open: Gauge,
    pool_in_use: Gauge,
    pool_acquired: Counter,
    pool_acquire_wait: Counter<f64, AtomicU64>,
    pool_acquire_timeouts: Counter,
    last_pool: Mutex<PoolStats>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn latency_histogram() -> Histogram {
    // 0.25 ms to about 8 s.
    Histogram::new(exponential_buckets(0.00025, 2.0, 16))
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("taskql");
        let requests = Family::<RequestLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register_with_unit(
            "graphql_request_duration",
            "GraphQL operations on every transport, to their first answer, by operation type and outcome",
            Unit::Seconds,
            requests.clone(),
        );
        let errors = Family::<CodeLabels, Counter>::default();
        registry.register(
            "graphql_errors",
            "GraphQL errors sent, by extensions.code",
            errors.clone(),
        );
        let http_requests = Counter::default();
        registry.register(
            "http_graphql_requests",
            "HTTP requests to /graphql that ran operations",
            http_requests.clone(),
        );
        let transitions = Family::<TransitionLabels, Counter>::default();
        registry.register(
            "task_transitions",
            "Tasks claimed, completed, failed, requeued by the reaper, cancelled and retried, by task type",
            transitions.clone(),
        );
        let tasks = Family::<StatusLabels, Gauge>::default();
        registry.register(
            "tasks",
            "Tasks by status (every user's), refreshed every few seconds",
            tasks.clone(),
        );
        let websockets = Gauge::default();
        registry.register(
            "websocket_connections",
            "Open websockets",
            websockets.clone(),
        );
        let websockets_opened = Counter::default();
        registry.register(
            "websocket_connections_opened",
            "Websockets opened since start",
            websockets_opened.clone(),
        );
        let subscriptions = Gauge::default();
        registry.register("subscriptions", "Live subscriptions", subscriptions.clone());
        let listener_reconnects = Counter::default();
        registry.register(
            "listener_reconnects",
            "Reconnections of the PostgreSQL listener that wakes the change-log reader",
            listener_reconnects.clone(),
        );
        let event_lag = latency_histogram();
        registry.register_with_unit(
            "event_lag",
            "From a change (its updated_at, on any instance) to this instance publishing it to subscribers",
            Unit::Seconds,
            event_lag.clone(),
        );
        let maintenance = Family::<PassLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register_with_unit(
            "maintenance_pass_duration",
            "Background maintenance passes run by this instance, by pass and outcome",
            Unit::Seconds,
            maintenance.clone(),
        );
        let pool_max = Gauge::default();
        registry.register(
            "db_pool_max_connections",
            "Most database connections the pool opens",
            pool_max.clone(),
        );
        let pool_open = Gauge::default();
        registry.register(
            "db_pool_open_connections",
            "Database connections open",
            pool_open.clone(),
        );
        let pool_in_use = Gauge::default();
        registry.register(
            "db_pool_in_use_connections",
            "Database connections serving a request",
            pool_in_use.clone(),
        );
        let pool_acquired = Counter::default();
        registry.register(
            "db_pool_acquires",
            "Database connections handed out",
            pool_acquired.clone(),
        );
        let pool_acquire_wait = Counter::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "db_pool_acquire_wait",
            "Time spent waiting for database connections",
            Unit::Seconds,
            pool_acquire_wait.clone(),
        );
        let pool_acquire_timeouts = Counter::default();
        registry.register(
            "db_pool_acquire_timeouts",
            "Requests that found no database connection in time",
            pool_acquire_timeouts.clone(),
        );
        Self {
            registry,
            requests,
            errors,
            http_requests,
            transitions,
            type_labels: Mutex::default(),
            tasks,
            websockets,
            websockets_opened,
            subscriptions,
            listener_reconnects,
            event_lag,
            maintenance,
            pool_max,
            pool_open,
            pool_in_use,
            pool_acquired,
            pool_acquire_wait,
            pool_acquire_timeouts,
            last_pool: Mutex::default(),
        }
    }

    /// Counts a task moving along its status machine.
    pub fn transition(&self, transition: Transition, task_type: &str) {
        let r#type = {
            let mut known = self.type_labels.lock().unwrap_or_else(|p| p.into_inner());
            if known.contains(task_type) || known.len() < MAX_TYPE_LABELS {
                known.insert(task_type.to_owned());
                task_type.to_owned()
            } else {
                "(other)".to_owned()
            }
        };
        self.transitions
            .get_or_create(&TransitionLabels { transition, r#type })
            .inc();
    }

    /// One GraphQL operation answered.
    pub fn request(&self, operation_type: &str, outcome: &str, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                operation_type: operation_type.to_owned(),
                outcome: outcome.to_owned(),
            })
            .observe(seconds);
    }

    /// One maintenance pass run, and how long it took.
    pub fn maintenance_pass(&self, pass: &str, ok: bool, seconds: f64) {
        self.maintenance
            .get_or_create(&PassLabels {
                pass: pass.to_owned(),
                outcome: if ok { "ok" } else { "failed" }.to_owned(),
            })
            .observe(seconds);
    }

    pub fn error(&self, code: &str) {
        self.errors
            .get_or_create(&CodeLabels {
                code: code.to_owned(),
            })
            .inc();
    }

    pub fn set_task_counts(&self, counts: &[(&str, i64)]) {
        for (status, count) in counts {
            self.tasks
                .get_or_create(&StatusLabels {
                    status: (*status).to_owned(),
                })
                .set(*count);
        }
    }

    /// The text to answer a scrape with, in OpenMetrics or else the classic
    /// Prometheus text format (what `promtool check metrics` reads); `pool`
    /// is read now (it is in memory).
    pub fn render(&self, pool: PoolStats, openmetrics: bool) -> String {
        {
            let mut last = self.last_pool.lock().unwrap_or_else(|p| p.into_inner());
            self.pool_max.set(pool.max as i64);
            self.pool_open.set(pool.open as i64);
            self.pool_in_use.set(pool.in_use as i64);
            self.pool_acquired
                .inc_by(pool.acquired.saturating_sub(last.acquired));
            self.pool_acquire_wait.inc_by(
                pool.acquire_wait
                    .saturating_sub(last.acquire_wait)
                    .as_secs_f64(),
            );
            self.pool_acquire_timeouts
                .inc_by(pool.acquire_timeouts.saturating_sub(last.acquire_timeouts));
            *last = pool;
        }
        let mut text = String::with_capacity(8 * 1024);
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            tracing::error!("cannot encode the metrics");
        }
        if openmetrics {
            text
        } else {
            classic_text(&text)
        }
    }
}

/// OpenMetrics text as the classic Prometheus text format: a counter's
/// family takes its samples' `_total` name, and `# UNIT` and `# EOF` go.
fn classic_text(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let family = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(family.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}
