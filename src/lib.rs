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
pub mod maintenance;
pub mod metrics;
pub mod service;
pub mod telemetry;
pub mod ui;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::db::Db;
use crate::graphql::LiveSubscriptions;
use crate::http::HttpState;
use crate::metrics::Metrics;
use crate::service::live::listener;
use crate::service::{TaskService, TaskStore};

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
    pub service: Arc<TaskStore>,
    pub db: Db,
    limits: http::serve::ServeLimits,
    /// Permits of the websockets the server may hold, and how many.
    websockets: (Arc<tokio::sync::Semaphore>, usize),
    shutdown: watch::Sender<bool>,
    background: Vec<JoinHandle<()>>,
}

impl App {
    /// Connects, migrates, and starts the maintenance room's passes and (on
    /// PostgreSQL) the listener that wakes the change log's reader when
    /// another instance wrote.
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
            TaskStore::with_max_attempts(db.clone(), metrics.clone(), config.tasks.max_attempts)
                .with_max_result_bytes(config.tasks.max_result_bytes),
        );
        let (shutdown, shutdown_rx) = watch::channel(false);

        let mut background =
            maintenance::Room::for_service(config, &service, &metrics).start(metrics.clone());
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
