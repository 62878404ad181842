//! Wake-ups between instances on PostgreSQL: the mover of the change log
//! NOTIFYs once per move (see `super::changelog`), and every
//! instance LISTENs on a dedicated connection and wakes its reader of the
//! log. A notice carries nothing the reader needs: the log is the truth, so
//! a notice lost while the listener is away costs only latency (the reader
//! also reads on a short tick, and once after every connect).
use std::sync::Arc;
use std::time::Duration;

use sea_orm::sqlx::postgres::{PgConnectOptions, PgListener};
use sea_orm::{ConnectionTrait, DatabaseBackend, Statement};
use tokio::sync::Notify;

use crate::db::Db;
use crate::metrics::Metrics;

/// The channel the mover NOTIFYs and every instance LISTENs on.
pub const CHANNEL: &str = "taskql_events";
/// Every instance NOTIFYs a ping this often, so a healthy listener never
/// goes long without hearing something.
const PING_EVERY: Duration = Duration::from_secs(20);
/// A listener that heard nothing, not even the pings, for this long is on a
/// dead connection (a NAT timeout, a failover) and reconnects.
const SILENCE_LIMIT: Duration = Duration::from_secs(65);
/// How the listener's connection shows in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "taskql-listener";

/// Keeps one LISTEN connection alive for the life of the process, waking
/// `reader` on every notice and after every (re)connect. `options` come
/// from [`crate::db::DbSettings::listener_options`].
pub async fn run(options: PgConnectOptions, db: Db, reader: Arc<Notify>, metrics: Arc<Metrics>) {
    let pinger = async {
        let mut ticker = tokio::time::interval(PING_EVERY);
        loop {
            ticker.tick().await;
            let sent = db
                .execute_raw(Statement::from_sql_and_values(
                    DatabaseBackend::Postgres,
                    "SELECT pg_notify($1, 'ping')",
                    [CHANNEL.into()],
                ))
                .await;
            if let Err(err) = sent {
                tracing::warn!(error = %err, "cannot send the listener ping");
            }
        }
    };
    // Both run in this task; the listener is never interrupted to ping.
    tokio::select! {
        _ = pinger => {}
        _ = listen(options, &db, &reader, &metrics) => {}
    }
}

async fn listen(options: PgConnectOptions, db: &Db, reader: &Notify, metrics: &Metrics) {
    let mut backoff = Duration::from_millis(100);
    let mut connected_before = false;
    loop {
        let mut listener = match connect(&options).await {
            Ok(listener) => listener,
            Err(err) => {
                tracing::warn!(error = %err, ?backoff, "event listener cannot connect; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        if connected_before {
            metrics.listener_reconnects.inc();
            tracing::info!("event listener reconnected");
            // The database may have restarted: the pool's idle connections
            // are likely dead, so the reader starts on fresh ones.
            db.discard_idle();
        }
        connected_before = true;
        reader.notify_one();
        loop {
            // Only a connection presumed dead is interrupted here.
            let Ok(received) = tokio::time::timeout(SILENCE_LIMIT, listener.try_recv()).await
            else {
                tracing::warn!(
                    silence = ?SILENCE_LIMIT,
                    "event listener heard nothing, not even pings; reconnecting"
                );
                break;
            };
            match received {
                Ok(Some(notification)) => {
                    if notification.payload() != "ping" {
                        reader.notify_one();
                    }
                }
                Ok(None) => {
                    tracing::warn!("event listener lost its connection");
                    break;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "event listener failed");
                    break;
                }
            }
        }
    }
}

async fn connect(options: &PgConnectOptions) -> Result<PgListener, sea_orm::sqlx::Error> {
    use sea_orm::sqlx::postgres::PgPoolOptions;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(options.clone());
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.ignore_pool_close_event(true);
    listener.listen(CHANNEL).await?;
    Ok(listener)
}
