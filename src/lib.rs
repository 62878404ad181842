//! taskql: a GraphQL server that tracks users' background tasks.
//!
//! `App::build` wires a configuration into the router the binary serves and
//! the tests drive; `serve` runs it until a shutdown signal.
pub mod auth;
pub mod config;
pub mod db;
pub mod error;
pub mod graphql;
pub mod http;
pub mod metrics;
pub mod service;
pub mod telemetry;
pub mod ui;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::db::Db;
use crate::graphql::LiveSubscriptions;
use crate::http::HttpState;
use crate::metrics::Metrics;
use crate::service::watch::listener;
use crate::service::{SeaTaskService, TaskService};

/// How often each instance returns expired leases to PENDING.
pub const REAPER_INTERVAL: Duration = Duration::from_millis(500);
/// How often retention runs, when configured.
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(60);
/// How often (on PostgreSQL) task count deltas are folded into the counters.
pub const FOLD_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("DATABASE_URL: cannot open the database: {0}")]
    Database(String),
    #[error("DATABASE_URL: migrations failed: {0}")]
    Migration(String),
}

/// A running taskql: its router, its service and its background work.
pub struct App {
    pub router: Router,
    pub service: Arc<SeaTaskService>,
    pub db: Db,
    limits: http::serve::ServeLimits,
    /// Permits of the websockets the server may hold, and how many.
    websockets: (Arc<tokio::sync::Semaphore>, usize),
    shutdown: watch::Sender<bool>,
    background: Vec<JoinHandle<()>>,
}

impl App {
    /// Connects, migrates, and starts the reaper, retention, the change
    /// log's pruning and (on PostgreSQL) the listener that wakes the log's
    /// reader when another instance wrote.
    pub async fn build(config: &Config, key: &crate::auth::JwtKey) -> Result<Self, StartError> {
        // Settings that cannot be used stop the start before the database is touched.
        let auth = auth::Authenticator::from_config(&config.auth, key)?;
        let trusted_documents = http::persisted::TrustedDocuments::configured(&config.http)?;
        let database = db::DbSettings::new(config.database.url.as_str())
            .map_err(|e| StartError::Database(e.to_string()))?;
        // Migrations run on a SeaORM connection of their own, closed after.
        let admin = database
            .connect_migrator(1)
            .await
            .map_err(|e| StartError::Database(e.to_string()))?;
        db::migrate(&admin)
            .await
            .map_err(|e| StartError::Migration(e.to_string()))?;
        admin
            .close()
            .await
            .map_err(|e| StartError::Database(e.to_string()))?;
        let db = Db::connect(&database, db::PoolSettings::from(&config.database))
            .await
            .map_err(|e| StartError::Database(e.to_string()))?;
        let metrics = Arc::new(Metrics::new());
        let service = Arc::new(
            SeaTaskService::with_max_attempts(
                db.clone(),
                metrics.clone(),
                config.tasks.max_attempts,
            )
            .with_max_result_bytes(config.tasks.max_result_bytes),
        );
        let (shutdown, shutdown_rx) = watch::channel(false);

        let mut background = Vec::new();
        background.push(tokio::spawn(reap_forever(service.clone())));
        background.push(tokio::spawn(count_tasks_forever(
            service.clone(),
            metrics.clone(),
        )));
        if let Some(retention) = config.tasks.retention() {
            let service = service.clone();
            background.push(tokio::spawn(prune_forever("task retention", move || {
                let service = service.clone();
                async move { service.prune_finished(retention).await.map(|n| n as u64) }
            })));
        }
        let events = service.clone();
        let event_retention = config.tasks.event_retention;
        background.push(tokio::spawn(prune_forever("change log", move || {
            let events = events.clone();
            async move { events.prune_events(event_retention).await }
        })));
        let minutes = service.clone();
        background.push(tokio::spawn(prune_forever(
            "taskStats minutes",
            move || {
                let minutes = minutes.clone();
                async move { minutes.prune_stats_minutes().await }
            },
        )));
        if config.backend() == db::Backend::Postgres {
            background.push(tokio::spawn(fold_counts_forever(service.clone())));
        }
        if let Some(listener) = database.listener_options(listener::APPLICATION_NAME) {
            background.push(tokio::spawn(listener::run(
                listener,
                db.clone(),
                service.changelog().notice_handle(),
                metrics.clone(),
            )));
        }

        let (max_connections, max_websockets) = connection_caps(config);
        let websocket_slots = Arc::new(tokio::sync::Semaphore::new(max_websockets));
        let live_subscriptions = LiveSubscriptions::default();
        let schema_service: Arc<dyn TaskService> = service.clone();
        let schema = graphql::build_schema(
            schema_service,
            shutdown_rx.clone(),
            live_subscriptions.clone(),
        );
        let state = Arc::new(HttpState {
            schema,
            auth,
            db: db.clone(),
            documents: Default::default(),
            live_subscriptions,
            max_subscriptions_per_connection: config.http.max_subscriptions_per_connection,
            websocket_slots: websocket_slots.clone(),
            keepalive_interval: config.http.keepalive_interval,
            persisted: http::persisted::PersistedDocuments::new(trusted_documents),
            body_timeout: config.http.body_timeout,
            shutdown: shutdown_rx,
            metrics,
        });
        Ok(Self {
            router: http::router(state),
            service,
            db,
            limits: http::serve::ServeLimits {
                header_timeout: config.http.header_timeout,
                max_connections,
                shutdown_timeout: config.http.shutdown_timeout,
            },
            websockets: (websocket_slots, max_websockets),
            shutdown,
            background,
        })
    }

    /// Serves until `signal` resolves, then shuts down within the
    /// configured deadline (see `http::serve`).
    pub async fn serve(
        self,
        listener: TcpListener,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let result = http::serve::run(
            listener,
            self.router.clone(),
            self.limits,
            self.shutdown.clone(),
            self.websockets.clone(),
            signal,
        )
        .await;
        drop(self);
        result
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for task in &self.background {
            task.abort();
        }
    }
}

/// Caps on HTTP connections and websockets: as set, else sized from the
/// open-file limit (less the database's connections).
fn connection_caps(config: &Config) -> (usize, usize) {
    let (connections, websockets) = http::serve::default_caps(
        http::serve::open_file_limit(),
        config.database.max_connections as usize,
    );
    (
        config.http.max_connections.unwrap_or(connections),
        config.http.max_websockets.unwrap_or(websockets),
    )
}

async fn reap_forever(service: Arc<SeaTaskService>) {
    let mut ticker = tokio::time::interval(REAPER_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if let Err(err) = service.reap_expired_leases().await {
            tracing::warn!(error = %err, "lease reaper pass failed; retrying");
        }
    }
}

async fn fold_counts_forever(service: Arc<SeaTaskService>) {
    let mut ticker = tokio::time::interval(FOLD_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if let Err(err) = service.fold_count_deltas().await {
            tracing::warn!(error = %err, "folding task count deltas failed; retrying");
        }
    }
}

/// Keeps the tasks-by-status gauge current, from the counters the
/// database keeps (never a count of the table).
async fn count_tasks_forever(service: Arc<SeaTaskService>, metrics: Arc<Metrics>) {
    let everyone = auth::CurrentUser::service("metrics");
    let request = service::StatsRequest {
        counts: true,
        ..Default::default()
    };
    let mut ticker = tokio::time::interval(metrics::TASK_COUNTS_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match service.task_stats(&everyone, request.clone()).await {
            Ok(stats) => {
                let counts: Vec<(&str, i64)> = stats
                    .by_status
                    .each()
                    .map(|(status, count)| (status.as_str(), count))
                    .collect();
                metrics.set_task_counts(&counts);
            }
            Err(err) => tracing::debug!(error = %err, "cannot count tasks for /metrics"),
        }
    }
}

/// Runs a retention pass every [`RETENTION_INTERVAL`] (the first at once),
/// logging what it deleted: `what` names it in the logs.
async fn prune_forever<F, P>(what: &'static str, pass: F)
where
    F: Fn() -> P,
    P: Future<Output = error::TaskResult<u64>>,
{
    let mut ticker = tokio::time::interval(RETENTION_INTERVAL);
    loop {
        ticker.tick().await;
        match pass().await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "{what}: pruned"),
            Err(err) => tracing::warn!(error = %err, "{what}: pruning failed; retrying"),
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed when this is
/// called, not when it is first awaited, so a signal that arrives while the
/// server is still starting is not lost (nor does it kill the process).
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            match (interrupt, terminate) {
                (Ok(mut interrupt), Ok(mut terminate)) => {
                    tokio::select! {
                        _ = interrupt.recv() => {}
                        _ = terminate.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
