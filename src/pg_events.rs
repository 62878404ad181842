//! The notices that carry task changes between instances over PostgreSQL
//! LISTEN/NOTIFY, encoded (in SQL, by the statement that makes the change)
//! and decoded (by `pg_listener`) in this one module, so the two cannot drift.
//!
//! A notice is a JSON object: `i` the instance that made the change, `k` its
//! kind, `id` and `v` the task and its version, and `t` the task right after
//! the change (as `to_jsonb` writes a `tasks` row). `m` says whether `t` holds
//! the metadata: NOTIFY payloads must stay under 8000 bytes, so a task whose
//! JSON is too long travels without its metadata, and in the extreme case
//! without `t` at all; the listener then reads the row.
use entity::Task;
use serde::Deserialize;
use uuid::Uuid;

use crate::events::TaskEventKind;

/// The channel every instance LISTENs on.
pub const CHANNEL: &str = "taskql_events";
/// Largest serialized task a notice carries; the whole payload must stay
/// under PostgreSQL's 8000 bytes.
const MAX_TASK_IN_NOTICE: usize = 7000;
/// What a ping's payload starts with.
const PING_PREFIX: &str = "{\"ping\":";

/// Wraps a data-changing statement ending in `RETURNING *` so that the same
/// statement also NOTIFYs each row it wrote: the change and its notice commit
/// together, in one round trip. The result rows are the statement's own.
pub fn notifying(statement: &str, instance: Uuid, kind: TaskEventKind) -> String {
    format!(
        "WITH changed AS ({statement}) SELECT changed.* FROM changed \
         CROSS JOIN LATERAL (SELECT pg_notify('{CHANNEL}', {})) AS notice",
        payload_sql(instance, kind),
    )
}

/// The SQL expression of the notice of a row `changed`.
fn payload_sql(instance: Uuid, kind: TaskEventKind) -> String {
    // Both values are ours (a UUID and a fixed word), never user input.
    format!(
        "(jsonb_build_object('i', '{instance}', 'k', '{kind}', 'id', changed.id, 'v', changed.version) || \
         CASE WHEN octet_length(to_jsonb(changed)::text) < {limit} \
              THEN jsonb_build_object('t', to_jsonb(changed), 'm', true) \
              WHEN octet_length((to_jsonb(changed) - 'metadata')::text) < {limit} \
              THEN jsonb_build_object('t', to_jsonb(changed) - 'metadata') \
              ELSE {last_resort} END)::text",
        kind = kind.as_str(),
        limit = MAX_TASK_IN_NOTICE,
        last_resort = if kind == TaskEventKind::Deleted {
            // The row is gone, so there is nothing to re-read: send the state
            // without its long texts (user_id and type are short) rather than
            // nothing, so other instances still end their watchers.
            "jsonb_build_object('t', to_jsonb(changed) - 'metadata' - 'error_message' \
             - 'result_id' - 'idempotency_key' - 'worker_id')"
        } else {
            // The listener reads the row.
            "'{}'::jsonb"
        },
    )
}

/// The payload of an instance's keep-alive ping.
pub fn ping(instance: Uuid) -> String {
    format!("{PING_PREFIX}\"{instance}\"}}")
}

pub fn is_ping(payload: &str) -> bool {
    payload.starts_with(PING_PREFIX)
}

/// A decoded change notice.
#[derive(Debug, Deserialize)]
pub struct Notice {
    /// The instance that made the change.
    #[serde(rename = "i")]
    pub instance: Uuid,
    #[serde(rename = "k", deserialize_with = "kind")]
    pub kind: TaskEventKind,
    pub id: Uuid,
    #[serde(rename = "v")]
    pub version: i64,
    /// The task right after the change, so every state reaches other
    /// instances even when changes follow each other faster than a re-read.
    #[serde(rename = "t", default)]
    pub task: Option<Task>,
    /// Whether `task` carries the metadata.
    #[serde(rename = "m", default)]
    pub with_metadata: bool,
}

fn kind<'de, D: serde::Deserializer<'de>>(de: D) -> Result<TaskEventKind, D::Error> {
    let word = String::deserialize(de)?;
    TaskEventKind::parse(&word)
        .ok_or_else(|| serde::de::Error::custom(format!("unknown change kind {word:?}")))
}

impl Notice {
    /// `None` for anything that is not a change notice of this format.
    pub fn decode(payload: &str) -> Option<Self> {
        serde_json::from_str(payload).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // As PostgreSQL builds them for a row of `tasks` (`to_jsonb(changed)`).
    const ROW: &str = r#""id": "01a216ba-bdbd-7506-a3e1-89276e73c631", "type": "image.generate", "status": "processing", "user_id": "alice", "version": 3, "attempts": 1, "progress": 40, "result_id": null, "worker_id": "w-1", "created_at": "2026-11-26T07:21:06.749533+00:00", "started_at": "2026-11-26T07:21:07.1+00:00", "updated_at": "2026-11-26T07:21:08.000001+00:00", "completed_at": null, "error_message": null, "idempotency_key": null, "lease_expires_at": "2026-11-26T07:22:07.1+00:00""#;

    fn notice(tail: &str) -> Notice {
        let payload = format!(
            r#"{{"i": "0190a0a0-0000-7000-8000-000000000001", "k": "updated", {tail}"v": 3, "id": "01a216ba-bdbd-7506-a3e1-89276e73c631"}}"#
        );
        Notice::decode(&payload).unwrap_or_else(|| panic!("does not decode: {payload}"))
    }

    #[test]
    fn decodes_a_notice_carrying_the_whole_task() {
        let notice = notice(&format!(
            r#""m": true, "t": {{{ROW}, "metadata": {{"prompt": "a cat"}}}}, "#
        ));
        assert!(notice.with_metadata);
        assert_eq!(notice.kind, TaskEventKind::Updated);
        let task = notice.task.expect("the task");
        assert_eq!(task.task_type, "image.generate");
        assert_eq!(task.status, entity::TaskStatus::Processing);
        assert_eq!((task.progress, task.version), (Some(40), 3));
        assert_eq!(task.metadata, serde_json::json!({"prompt": "a cat"}));
        assert_eq!(task.updated_at.timestamp_subsec_micros(), 1);
    }

    #[test]
    fn decodes_a_notice_without_metadata_or_without_the_task() {
        let lean = notice(&format!(r#""t": {{{ROW}}}, "#));
        assert!(!lean.with_metadata, "the listener must read the metadata");
        assert_eq!(
            lean.task.expect("the task").metadata,
            serde_json::Value::Null
        );

        let bare = notice("");
        assert!(bare.task.is_none() && !bare.with_metadata);
        assert_eq!((bare.kind, bare.version), (TaskEventKind::Updated, 3));
    }

    #[test]
    fn pings_and_strangers_are_not_notices() {
        let instance = Uuid::now_v7();
        assert!(is_ping(&ping(instance)));
        assert!(Notice::decode(&ping(instance)).is_none());
        assert!(Notice::decode(r#"{"i": "x"}"#).is_none());
        assert!(
            Notice::decode(&format!(
                r#"{{"i": "{instance}", "k": "renamed", "id": "{instance}", "v": 1}}"#
            ))
            .is_none()
        );
    }
}
