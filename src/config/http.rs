//! The HTTP settings: where to serve, how long a client may take, and how
//! many connections, websockets and subscriptions at once. `crate::http`
//! reads them.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::parse::{self, Setting};

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "HTTP")]
pub struct HttpSettings {
    /// Address to serve on.
    #[arg(
        long = "listen",
        env = "TASKQL_LISTEN",
        default_value = "127.0.0.1:8000",
        global = true,
        value_parser = Setting(parse::address)
    )]
    pub listen: SocketAddr,
    /// Subscriptions one websocket connection may run at once.
    #[arg(
        long = "max-subscriptions-per-connection",
        env = "TASKQL_MAX_SUBSCRIPTIONS_PER_CONNECTION",
        default_value = "200",
        global = true,
        value_parser = Setting(|text| parse::positive(text, 100_000).map(|n| n as usize))
    )]
    pub max_subscriptions_per_connection: usize,
    /// Longest a client may take to send a request's head; idle connections
    /// close after it too.
    #[arg(
        long = "header-timeout",
        env = "TASKQL_HEADER_TIMEOUT",
        default_value = "10s",
        global = true,
        value_parser = Setting(parse::timeout)
    )]
    pub header_timeout: Duration,
    /// Longest a client may take to send a request's body.
    #[arg(
        long = "body-timeout",
        env = "TASKQL_BODY_TIMEOUT",
        default_value = "10s",
        global = true,
        value_parser = Setting(parse::timeout)
    )]
    pub body_timeout: Duration,
    /// Most HTTP connections at once (default: from the open-file limit).
    #[arg(
        long = "max-connections",
        env = "TASKQL_MAX_CONNECTIONS",
        global = true,
        value_parser = Setting(|text| parse::positive(text, 1_000_000).map(|n| n as usize))
    )]
    pub max_connections: Option<usize>,
    /// Most websockets and event streams at once (default: from the
    /// open-file limit, at most 10000).
    #[arg(
        long = "max-websockets",
        env = "TASKQL_MAX_WEBSOCKETS",
        global = true,
        value_parser = Setting(|text| parse::positive(text, 1_000_000).map(|n| n as usize))
    )]
    pub max_websockets: Option<usize>,
    /// How often a websocket is pinged and an event stream gets a keep-alive
    /// comment.
    #[arg(
        long = "keepalive-interval",
        env = "TASKQL_KEEPALIVE_INTERVAL",
        default_value = "15s",
        global = true,
        value_parser = Setting(parse::timeout)
    )]
    pub keepalive_interval: Duration,
    /// A JSON manifest of trusted documents (hash to document); when set,
    /// users may run only these.
    #[arg(
        long = "trusted-documents",
        env = "TASKQL_TRUSTED_DOCUMENTS",
        global = true,
        value_parser = Setting(|text| parse::path(text, "unset it, or give the path of a JSON manifest"))
    )]
    pub trusted_documents: Option<PathBuf>,
    /// Longest a shutdown waits for requests in flight.
    #[arg(
        long = "shutdown-timeout",
        env = "TASKQL_SHUTDOWN_TIMEOUT",
        default_value = "10s",
        global = true,
        value_parser = Setting(parse::timeout)
    )]
    pub shutdown_timeout: Duration,
}
