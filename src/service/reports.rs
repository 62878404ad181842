//! A worker's report on one task (`updateTaskStatus`): the move it makes,
//! or, for a retryable failure with attempts left, a backoff.

use entity::{Task, TaskStatus};
use rand::Rng;

use super::clock::{in_micros, now};
use super::store::TaskStore;
use super::transitions::{self, Move, attempt_ended_by_retry};
use super::{StatusUpdate, validate};
use crate::error::{TaskError, TaskResult};

/// How often a retryable failure re-reads a task that changed under it.
const MAX_FAIL_ATTEMPTS: usize = 3;

impl TaskStore {
    /// `updateTaskStatus`: the move `update` asks for, fenced by its attempt
    /// when it has one.
    pub(super) async fn report(&self, update: StatusUpdate) -> TaskResult<Task> {
        let to = update.status;
        validate::progress(update.progress)?;
        if let Some(result_id) = &update.result_id {
            validate::result_id(result_id)?;
        }
        if let Some(result) = &update.result {
            if to != TaskStatus::Completed {
                return Err(TaskError::invalid(
                    "result is set only by a completion: send it with status COMPLETED",
                ));
            }
            validate::result(result, self.max_result_bytes)?;
        }
        let error_message = update
            .error_message
            .as_deref()
            .map(validate::clean_error_message);
        let Some(mv) = Move::reported(to, update.expected_attempt.is_some()) else {
            return Err(TaskError::conflict(
                "a task cannot be set back to PENDING; only an expired lease returns it there",
            ));
        };
        if update.retryable
            && mv == Move::Fail
            && let Some(task) = self.back_off(&update, error_message.as_deref()).await?
        {
            return Ok(task);
        }
        let stmt = transitions::report(mv, &update, error_message.as_deref(), now());
        if let Some(task) = self.make(mv, stmt).await? {
            return Ok(task);
        }

        // Nothing changed: say why, or accept an exact repeat of a terminal update.
        let task = self.unchanged(update.task_id, None).await?;
        transitions::refused_report(&update, error_message.as_deref(), task)
    }

    /// A retryable failure of a task with attempts left: back to PENDING,
    /// runnable after its type's backoff, keeping its error message. `None`
    /// when it has none left, or is not PENDING or PROCESSING: then FAILED
    /// applies as without `retryable`.
    async fn back_off(
        &self,
        update: &StatusUpdate,
        error_message: Option<&str>,
    ) -> TaskResult<Option<Task>> {
        for _ in 0..MAX_FAIL_ATTEMPTS {
            let Some(task) = self.find(update.task_id, None).await? else {
                return Err(TaskError::NotFound);
            };
            let fenced = update.expected_attempt.is_some();
            if !Move::BackOff.from().contains(&task.status)
                || update.expected_attempt.is_some_and(|n| n != task.attempts)
                || (fenced && attempt_ended_by_retry(&task))
            {
                return Ok(None);
            }
            // A fenced report on a PENDING task of the same attempt: either
            // its exact repeat (the task was already backed off), or its
            // lease expired before the worker reported; then the failure
            // still counts, and backs the task off.
            if fenced
                && task.status == TaskStatus::Pending
                && task.error_message.is_some()
                && (error_message.is_none() || error_message == task.error_message.as_deref())
            {
                return Ok(Some(task));
            }
            let used = task.attempts - task.retry_base;
            if used >= task.max_attempts {
                return Ok(None);
            }
            let policy = self.queue.policy(&task.task_type).await?;
            let delay = policy
                .backoff
                .delay(Ord::max(used, 1), rand::rng().random::<f64>());
            let at = now();
            let run_at = in_micros(
                at + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::zero()),
            );
            let stmt = transitions::back_off(&task, run_at, error_message, at);
            if let Some(task) = self.make(Move::BackOff, stmt).await? {
                return Ok(Some(task));
            }
        }
        Err(TaskError::conflict(
            "the task kept changing while its failure was recorded; try again",
        ))
    }
}
