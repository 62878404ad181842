//! The service's one clock: times at the microsecond precision both
//! databases store, so that a time the service returns is the time stored.
use chrono::{DateTime, Utc};

/// Now, at the microsecond precision both databases store.
pub(crate) fn now() -> DateTime<Utc> {
    in_micros(Utc::now())
}

/// `at` at the microsecond precision both databases store, so that the
/// time returned is the time stored.
pub(crate) fn in_micros(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap_or(at)
}
