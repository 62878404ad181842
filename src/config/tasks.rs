//! The task settings: attempts, and how long finished tasks and the change
//! log's events are kept. `crate::service` and `crate::App` read them.
use std::time::Duration;

use clap::Args;

use super::parse::{self, Setting};

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Tasks")]
pub struct TaskSettings {
    /// Attempts a task gets when neither its create nor its type's policy says.
    #[arg(
        long = "max-attempts",
        env = "TASKQL_MAX_ATTEMPTS",
        default_value_t = entity::tasks::DEFAULT_MAX_ATTEMPTS,
        global = true,
        value_parser = Setting(|text| parse::positive(text, 1000).map(|n| n as i32))
    )]
    pub max_attempts: i32,
    /// The most bytes a completion's `result` may take, serialized (at
    /// most 1 MiB, a request body's limit).
    #[arg(
        long = "max-result-bytes",
        env = "TASKQL_MAX_RESULT_BYTES",
        default_value = "262144",
        global = true,
        value_parser = Setting(|text| parse::positive(text, 1024 * 1024).map(|n| n as usize))
    )]
    pub max_result_bytes: usize,
    /// Delete finished tasks older than this (e.g. 30d); off when unset.
    #[arg(
        long = "retention",
        env = "TASKQL_RETENTION",
        global = true,
        value_parser = Setting(retention)
    )]
    pub retention: Option<Retention>,
    /// How long the change log keeps events, which is how far back a
    /// `taskEvents(after:)` cursor can resume.
    #[arg(
        long = "event-retention",
        env = "TASKQL_EVENT_RETENTION",
        default_value = "24h",
        global = true,
        value_parser = Setting(parse::parse_bounded_duration)
    )]
    pub event_retention: Duration,
}

/// `TASKQL_RETENTION`: a duration, or `off` (or empty) for none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention(pub Option<Duration>);

fn retention(text: &str) -> Result<Retention, String> {
    match text.trim() {
        "" | "off" => Ok(Retention(None)),
        text => parse::parse_bounded_duration(text).map(|after| Retention(Some(after))),
    }
}

impl TaskSettings {
    /// How old a finished task is deleted, if ever.
    pub fn retention(&self) -> Option<Duration> {
        self.retention.and_then(|retention| retention.0)
    }
}
