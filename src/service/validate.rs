//! Input rules, each with a message a person can act on.
use std::time::Duration;

use super::{DEFAULT_LEASE, MAX_LEASE};
use crate::error::{TaskError, TaskResult};

pub const MAX_TYPE_LEN: usize = 64;
pub const MAX_METADATA_BYTES: usize = 64 * 1024;
pub const MAX_RESULT_ID_LEN: usize = 255;
pub const MAX_ERROR_MESSAGE_LEN: usize = 1000;
pub const MAX_KEY_LEN: usize = 255;
pub const MAX_WORKER_ID_LEN: usize = 255;
/// A token's `sub`, which owns the tasks: at most 255 bytes.
pub const MAX_USER_ID_LEN: usize = 255;

pub fn task_type(value: &str) -> TaskResult<()> {
    let len = value.chars().count();
    if len == 0 || len > MAX_TYPE_LEN {
        return Err(TaskError::invalid(format!(
            "type must be 1 to {MAX_TYPE_LEN} characters long, got {len}"
        )));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
    {
        return Err(TaskError::invalid(
            "type may contain only lower-case letters, digits, '_', '.' and '-'",
        ));
    }
    Ok(())
}

/// Metadata is a JSON object (absent means `{}`) of at most 64 KiB serialized.
pub fn metadata(value: Option<serde_json::Value>) -> TaskResult<serde_json::Value> {
    let value = match value {
        None | Some(serde_json::Value::Null) => return Ok(serde_json::json!({})),
        Some(v) => v,
    };
    if !value.is_object() {
        return Err(TaskError::invalid("metadata must be a JSON object"));
    }
    if contains_nul(&value) {
        return Err(TaskError::invalid(
            "metadata must not contain the NUL character (\\u0000) in keys or strings",
        ));
    }
    let size = serde_json::to_vec(&value)
        .map_err(|_| TaskError::invalid("metadata is not serializable JSON"))?
        .len();
    if size > MAX_METADATA_BYTES {
        return Err(TaskError::invalid(format!(
            "metadata is {size} bytes serialized; the limit is {MAX_METADATA_BYTES}"
        )));
    }
    Ok(value)
}

/// Default of `TASKQL_MAX_RESULT_BYTES`: the most a task's `result` may
/// take, serialized.
pub const DEFAULT_MAX_RESULT_BYTES: usize = 256 * 1024;

/// A completion's `result`: any JSON but null, at most `max_bytes`
/// serialized, no U+0000.
pub fn result(value: &serde_json::Value, max_bytes: usize) -> TaskResult<()> {
    if value.is_null() {
        return Err(TaskError::invalid(
            "result must be a JSON value other than null; leave it out to set none",
        ));
    }
    if contains_nul(value) {
        return Err(TaskError::invalid(
            "result must not contain the NUL character (\\u0000) in keys or strings",
        ));
    }
    let size = serde_json::to_vec(value)
        .map_err(|_| TaskError::invalid("result is not serializable JSON"))?
        .len();
    if size > max_bytes {
        return Err(TaskError::invalid(format!(
            "result is {size} bytes serialized; the limit is {max_bytes} (TASKQL_MAX_RESULT_BYTES)"
        )));
    }
    Ok(())
}

/// PostgreSQL's jsonb cannot store U+0000; refused on every backend alike.
fn contains_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(contains_nul),
        serde_json::Value::Object(map) => map
            .iter()
            .any(|(key, value)| key.contains('\0') || contains_nul(value)),
        _ => false,
    }
}

/// A create's input as it is stored: every rule checked, `metadata` `{}`
/// when absent.
pub fn new_task(mut new: super::NewTask) -> TaskResult<super::NewTask> {
    task_type(&new.task_type)?;
    new.metadata = Some(metadata(new.metadata.take())?);
    if let Some(key) = &new.idempotency_key {
        label("idempotencyKey", key, MAX_KEY_LEN)?;
    }
    if let Some(key) = &new.concurrency_key {
        label("concurrencyKey", key, MAX_KEY_LEN)?;
    }
    super::queue::check_priority(new.priority.unwrap_or(0))?;
    if let Some(max) = new.max_attempts {
        super::queue::check_max_attempts(max)?;
    }
    Ok(new)
}

/// Most tasks one task may depend on.
pub const MAX_DEPENDENCIES: usize = 100;

/// A create's `dependsOn`: at most [`MAX_DEPENDENCIES`], each once; an
/// index only in a batch (`at`, the input's own index), and only of an
/// earlier input, so that no dependency can close a cycle.
pub fn dependencies(depends_on: &[super::Dependency], at: Option<usize>) -> TaskResult<()> {
    use super::Dependency;
    if depends_on.len() > MAX_DEPENDENCIES {
        return Err(TaskError::invalid(format!(
            "dependsOn may name at most {MAX_DEPENDENCIES} tasks, got {}",
            depends_on.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for dependency in depends_on {
        if !seen.insert(dependency) {
            return Err(TaskError::invalid(
                "dependsOn names the same task twice; name each once",
            ));
        }
        if let Dependency::Input(index) = *dependency {
            match at {
                None => {
                    return Err(TaskError::invalid(format!(
                        "dependsOn entry '{index}' is an input's index, which only createTasks takes; \
                         name a task by its id"
                    )));
                }
                Some(at) if index >= at => {
                    return Err(TaskError::invalid(format!(
                        "dependsOn entry '{index}' must be the index of an earlier input of this \
                         createTasks (this is input {at})"
                    )));
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// A short identifier-like text: 1..=max characters, no control characters.
pub fn label(field: &str, value: &str, max: usize) -> TaskResult<()> {
    let len = value.chars().count();
    if len == 0 || len > max {
        return Err(TaskError::invalid(format!(
            "{field} must be 1 to {max} characters long, got {len}"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(TaskError::invalid(format!(
            "{field} must not contain control characters"
        )));
    }
    Ok(())
}

pub fn result_id(value: &str) -> TaskResult<()> {
    label("resultId", value, MAX_RESULT_ID_LEN)
}

/// The lease a claim or heartbeat asks for (the default when none),
/// within 1 s and [`MAX_LEASE`].
pub fn lease(requested: Option<Duration>) -> TaskResult<Duration> {
    let lease = requested.unwrap_or(DEFAULT_LEASE);
    if lease.is_zero() || lease > MAX_LEASE {
        return Err(TaskError::invalid(format!(
            "leaseSeconds must be between 1 and {}",
            MAX_LEASE.as_secs()
        )));
    }
    Ok(lease)
}

pub fn progress(value: Option<i32>) -> TaskResult<()> {
    match value {
        Some(p) if !(0..=100).contains(&p) => Err(TaskError::invalid(format!(
            "progress must be between 0 and 100, got {p}"
        ))),
        _ => Ok(()),
    }
}

/// Control characters become spaces (newlines and tabs stay) and the text is
/// cut to 1000 characters: an error message is shown to people as it is.
pub fn clean_error_message(value: &str) -> String {
    value
        .chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                ' '
            } else {
                c
            }
        })
        .take(MAX_ERROR_MESSAGE_LEN)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_types() {
        for ok in ["a", "image.generate", "x-1_2", &"a".repeat(64)] {
            assert!(task_type(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Image", "a b", "é", "a/b", &"a".repeat(65)] {
            assert!(task_type(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn error_messages_are_cleaned_and_cut() {
        assert_eq!(clean_error_message("a\u{0}b\nc\u{1b}"), "a b\nc ");
        assert_eq!(clean_error_message(&"é".repeat(1500)).chars().count(), 1000);
    }

    #[test]
    fn metadata_rules() {
        assert_eq!(metadata(None).unwrap(), serde_json::json!({}));
        assert!(metadata(Some(serde_json::json!([1]))).is_err());
        let big = serde_json::json!({ "x": "a".repeat(MAX_METADATA_BYTES) });
        assert!(metadata(Some(big)).is_err());
        assert!(metadata(Some(serde_json::json!({ "a": ["x\u{0}y"] }))).is_err());
        assert!(metadata(Some(serde_json::json!({ "a\u{0}": 1 }))).is_err());
    }
}
