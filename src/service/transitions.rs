//! The status machine: every move a task can make, from which statuses to
//! which, in one table ([`Move::edge`]). Every statement that changes a
//! task's status is built here from its move, as one conditional
//! `UPDATE … SET status = to WHERE status IN (from)`, so the table is the
//! whole answer to "which transitions are allowed?". docs/design.md
//! ("Status machine") lists the same moves; a test keeps the two in step.
use chrono::{DateTime, Utc};
use entity::TaskStatus;
use entity::tasks::Column;
use sea_orm::sea_query::{ExprTrait, Query, UpdateStatement};
use sea_orm::{Condition, prelude::Expr};
use uuid::Uuid;

use super::batch::{Beat, Completion};
use super::{DEFAULT_LEASE, StatusUpdate};
use crate::error::{TaskError, TaskResult};
use crate::metrics::Transition;
use entity::{Task, Tasks};

use TaskStatus::{Cancelled, Completed, Failed, Pending, Processing};

/// A move of the status machine. Creating a task (to PENDING) and deleting
/// one (from any status) are not moves: they insert and delete rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// `claimTask`: the first runnable task in claim order.
    Claim,
    /// `updateTaskStatus(PROCESSING)` without `expectedAttempt`: a claim of
    /// a PENDING task, or a progress report on a PROCESSING one.
    Start,
    /// `updateTaskStatus(PROCESSING)` with `expectedAttempt`: a progress
    /// report on a task the worker holds.
    Report,
    /// `heartbeatTask`: the lease extended.
    Heartbeat,
    /// `updateTaskStatus(COMPLETED)`.
    Complete,
    /// `updateTaskStatus(FAILED)`, or a retryable failure with no attempts left.
    Fail,
    /// `cancelTask`, or `updateTaskStatus(CANCELLED)`.
    Cancel,
    /// `updateTaskStatus(FAILED, retryable: true)` with attempts left.
    BackOff,
    /// `retryTask`.
    Retry,
    /// The reaper: a lease expired and attempts are left.
    Requeue,
    /// The reaper: a lease expired and no attempts are left.
    Expire,
}

impl Move {
    #[cfg(test)]
    pub const ALL: [Move; 11] = [
        Move::Claim,
        Move::Start,
        Move::Report,
        Move::Heartbeat,
        Move::Complete,
        Move::Fail,
        Move::Cancel,
        Move::BackOff,
        Move::Retry,
        Move::Requeue,
        Move::Expire,
    ];

    /// The table: the statuses a move may start from, and where it goes.
    pub const fn edge(self) -> (&'static [TaskStatus], TaskStatus) {
        match self {
            Move::Claim => (&[Pending], Processing),
            Move::Start => (&[Pending, Processing], Processing),
            Move::Report => (&[Processing], Processing),
            Move::Heartbeat => (&[Processing], Processing),
            Move::Complete => (&[Pending, Processing], Completed),
            Move::Fail => (&[Pending, Processing], Failed),
            Move::Cancel => (&[Pending, Processing], Cancelled),
            Move::BackOff => (&[Pending, Processing], Pending),
            Move::Retry => (&[Failed, Cancelled], Pending),
            Move::Requeue => (&[Processing], Pending),
            Move::Expire => (&[Processing], Failed),
        }
    }

    pub const fn from(self) -> &'static [TaskStatus] {
        self.edge().0
    }

    pub const fn to(self) -> TaskStatus {
        self.edge().1
    }

    /// The move `updateTaskStatus` makes to `to`; `None` for PENDING,
    /// which no worker may set.
    pub fn reported(to: TaskStatus, fenced: bool) -> Option<Move> {
        match to {
            Pending => None,
            Processing if fenced => Some(Move::Report),
            Processing => Some(Move::Start),
            Completed => Some(Move::Complete),
            Failed => Some(Move::Fail),
            Cancelled => Some(Move::Cancel),
        }
    }

    /// How `/metrics` counts the move (`taskql_task_transitions_total`).
    pub fn counted_as(self) -> Option<Transition> {
        match self {
            Move::Claim => Some(Transition::claimed),
            Move::Complete => Some(Transition::completed),
            Move::Fail | Move::Expire => Some(Transition::failed),
            Move::Cancel => Some(Transition::cancelled),
            Move::BackOff => Some(Transition::backed_off),
            Move::Retry => Some(Transition::retried),
            Move::Requeue => Some(Transition::requeued),
            Move::Start | Move::Report | Move::Heartbeat => None,
        }
    }

    /// Where the move may start, for messages: "PENDING or PROCESSING".
    pub fn allowed_from(self) -> String {
        let names: Vec<String> = self.from().iter().map(|s| api_name(*s)).collect();
        names.join(" or ")
    }

    /// `UPDATE tasks SET status = to, version + 1, updated_at = at WHERE
    /// status IN (from)` of every task the move may apply to; the caller
    /// narrows it and sets what else the move writes.
    pub fn update(self, at: DateTime<Utc>) -> UpdateStatement {
        let mut update = Query::update();
        update
            .table(Tasks)
            .value(Column::Status, self.to().as_str())
            .and_where(Expr::col(Column::Status).is_in(self.from().iter().map(|s| s.as_str())));
        stamp_change(&mut update, at);
        update
    }

    /// [`Self::update`] of one task, if `visible` (see `visible_to`).
    pub fn update_of(
        self,
        task_id: Uuid,
        visible: Condition,
        at: DateTime<Utc>,
    ) -> UpdateStatement {
        let mut update = self.update(at);
        update
            .and_where(Expr::col(Column::Id).eq(task_id))
            .cond_where(visible);
        update
    }
}

/// A status as the API spells it, for messages.
pub fn api_name(status: TaskStatus) -> String {
    status.as_str().to_uppercase()
}

/// `version + 1`, `updated_at = at`: part of every change.
pub fn stamp_change(update: &mut UpdateStatement, at: DateTime<Utc>) {
    update
        .value(Column::Version, Expr::col(Column::Version).add(1))
        .value(Column::UpdatedAt, at);
}

/// The lease that ends `lease` after `from`.
pub fn lease_deadline(from: DateTime<Utc>, lease: std::time::Duration) -> DateTime<Utc> {
    from + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(60))
}

/// Whether the task's attempt may still be reported on: it is PROCESSING,
/// or it went back to PENDING after a claim (an expired lease, a backoff),
/// or it was never claimed (attempt 0, which no claim hands out).
/// `retryTask` ends the attempt (`retry_base` catches up with `attempts`).
fn attempt_is_open() -> Expr {
    Expr::col(Column::Status)
        .eq(Processing.as_str())
        .or(Expr::col(Column::RetryBase).lt(Expr::col(Column::Attempts)))
        .or(Expr::col(Column::Attempts).eq(0))
}

/// Whether `retryTask` ended the attempt of a task read (see [`attempt_is_open`]).
pub fn attempt_ended_by_retry(task: &Task) -> bool {
    task.status == Pending && task.attempts > 0 && task.retry_base >= task.attempts
}

/// The conditional UPDATE of `updateTaskStatus` (`mv` from
/// [`Move::reported`]), fenced by the attempt when one is expected.
pub fn report(
    mv: Move,
    update: &StatusUpdate,
    error_message: Option<&str>,
    at: DateTime<Utc>,
) -> UpdateStatement {
    let to = mv.to();
    let mut stmt = mv.update_of(update.task_id, Condition::all(), at);
    if let Some(expected) = update.expected_attempt {
        stmt.and_where(Expr::col(Column::Attempts).eq(expected))
            .and_where(attempt_is_open());
    }
    if let Some(result_id) = &update.result_id {
        stmt.value(Column::ResultId, result_id.as_str());
    }
    if let Some(result) = &update.result {
        stmt.value(Column::Result, result.clone());
    }
    match (error_message, to) {
        (Some(message), _) => {
            stmt.value(Column::ErrorMessage, message);
        }
        // The error of an earlier attempt that backed off is history
        // once the task succeeds.
        (None, Completed) => {
            stmt.value(Column::ErrorMessage, Option::<String>::None);
        }
        _ => {}
    }
    match (update.progress, to) {
        (Some(p), _) => {
            stmt.value(Column::Progress, p);
        }
        (None, Completed) => {
            stmt.value(Column::Progress, 100);
        }
        _ => {}
    }
    if to == Processing {
        // PENDING to PROCESSING outside claimTask is a claim all the same:
        // it counts an attempt and takes the default lease, so the reaper
        // returns the task if its worker goes quiet (a PROCESSING task
        // without a lease would be stuck forever).
        let was_pending = || Expr::col(Column::Status).eq(Pending.as_str());
        // A task waiting on its dependencies is not to be started yet.
        stmt.and_where(
            Expr::col(Column::Status)
                .eq(Processing.as_str())
                .or(Expr::col(Column::WaitingOn).eq(0)),
        );
        let deadline = lease_deadline(at, DEFAULT_LEASE);
        stmt.value(Column::StartedAt, Expr::col(Column::StartedAt).if_null(at))
            .value(
                Column::Attempts,
                Expr::case(was_pending(), Expr::col(Column::Attempts).add(1))
                    .finally(Expr::col(Column::Attempts)),
            )
            .value(
                Column::LeaseExpiresAt,
                Expr::case(was_pending(), deadline)
                    .finally(Expr::col(Column::LeaseExpiresAt).if_null(deadline)),
            );
    } else {
        stmt.value(Column::CompletedAt, at)
            .value(Column::LeaseExpiresAt, Option::<DateTime<Utc>>::None);
    }
    stmt
}

/// A backoff of `task` as read: back to PENDING, runnable at `run_at`,
/// only if the task is still at `version` (the same attempt, the same
/// budget).
pub fn back_off(
    task: &Task,
    run_at: DateTime<Utc>,
    error_message: Option<&str>,
    at: DateTime<Utc>,
) -> UpdateStatement {
    let mut stmt = Move::BackOff.update_of(task.id, Condition::all(), at);
    stmt.value(Column::RunAt, run_at)
        .value(Column::WorkerId, Option::<String>::None)
        .value(Column::LeaseExpiresAt, Option::<DateTime<Utc>>::None)
        .value(Column::Progress, Option::<i32>::None)
        .and_where(Expr::col(Column::Version).eq(task.version));
    if let Some(message) = error_message {
        stmt.value(Column::ErrorMessage, message);
    }
    stmt
}

/// `cancelTask` of a task `visible` to its caller.
pub fn cancel(task_id: Uuid, visible: Condition, at: DateTime<Utc>) -> UpdateStatement {
    let mut stmt = Move::Cancel.update_of(task_id, visible, at);
    stmt.value(Column::CompletedAt, at)
        .value(Column::LeaseExpiresAt, Option::<DateTime<Utc>>::None);
    stmt
}

/// `retryTask` of a task `visible` to its caller: PENDING as new, with a
/// fresh budget (`retry_base = attempts`).
pub fn retry(task_id: Uuid, visible: Condition, at: DateTime<Utc>) -> UpdateStatement {
    let mut stmt = Move::Retry.update_of(task_id, visible, at);
    // Its dependencies are counted anew (some may have completed while it
    // was finished); one that failed or was cancelled refuses the retry.
    stmt.and_where(Expr::cust(format!("NOT EXISTS ({DEAD_DEPENDENCY})")))
        .value(Column::WaitingOn, Expr::cust(UNFINISHED_DEPENDENCIES))
        .value(Column::CancelledBy, Option::<Uuid>::None)
        .value(Column::RetryBase, Expr::col(Column::Attempts))
        .value(Column::RunAt, at)
        .value(Column::Progress, Option::<i32>::None)
        .value(Column::ResultId, Option::<String>::None)
        .value(Column::Result, Option::<serde_json::Value>::None)
        .value(Column::ErrorMessage, Option::<String>::None)
        .value(Column::WorkerId, Option::<String>::None)
        .value(Column::LeaseExpiresAt, Option::<DateTime<Utc>>::None)
        .value(Column::StartedAt, Option::<DateTime<Utc>>::None)
        .value(Column::CompletedAt, Option::<DateTime<Utc>>::None);
    stmt
}

/// `heartbeatTask`: the lease until `until`, and progress when given.
pub fn heartbeat(
    task_id: Uuid,
    until: DateTime<Utc>,
    progress: Option<i32>,
    expected_attempt: Option<i32>,
    at: DateTime<Utc>,
) -> UpdateStatement {
    let mut stmt = Move::Heartbeat.update_of(task_id, Condition::all(), at);
    stmt.value(Column::LeaseExpiresAt, until);
    if let Some(progress) = progress {
        stmt.value(Column::Progress, progress);
    }
    if let Some(expected) = expected_attempt {
        stmt.and_where(Expr::col(Column::Attempts).eq(expected));
    }
    stmt
}

/// `CASE WHEN id = … THEN … ELSE otherwise END` over `arms`: one value
/// per task in a statement that changes many.
fn by_id(arms: impl IntoIterator<Item = (Uuid, Expr)>, otherwise: Expr) -> Expr {
    let mut arms = arms.into_iter();
    let Some((id, then)) = arms.next() else {
        return otherwise;
    };
    let mut case = Expr::case(Expr::col(Column::Id).eq(id), then);
    for (id, then) in arms {
        case = case.case(Expr::col(Column::Id).eq(id), then);
    }
    case.finally(otherwise).into()
}

/// [`Move::update`] of the tasks of `fences`, each only while its
/// `attempts` equals the attempt given with it.
fn fenced_each(mv: Move, fences: &[(Uuid, i32)], at: DateTime<Utc>) -> UpdateStatement {
    let mut stmt = mv.update(at);
    let expected = fences.iter().map(|(id, n)| (*id, Expr::val(*n)));
    stmt.and_where(Expr::col(Column::Id).is_in(fences.iter().map(|(id, _)| *id)))
        .and_where(Expr::col(Column::Attempts).eq(by_id(expected, Expr::val(Option::<i32>::None))));
    stmt
}

/// `completeTasks`: each task COMPLETED as `updateTaskStatus(COMPLETED)`
/// would, in one statement, each fenced by its own expected attempt.
pub fn complete_many(items: &[Completion], at: DateTime<Utc>) -> UpdateStatement {
    let fences: Vec<(Uuid, i32)> = items
        .iter()
        .map(|c| (c.task_id, c.expected_attempt))
        .collect();
    let mut stmt = fenced_each(Move::Complete, &fences, at);
    let results = items
        .iter()
        .filter_map(|c| Some((c.task_id, Expr::val(c.result_id.clone()?))));
    let values = items
        .iter()
        .filter_map(|c| Some((c.task_id, Expr::val(c.result.clone()?))));
    stmt.and_where(attempt_is_open())
        .value(
            Column::ResultId,
            by_id(results, Expr::col(Column::ResultId)),
        )
        .value(Column::Result, by_id(values, Expr::col(Column::Result)))
        .value(Column::ErrorMessage, Option::<String>::None)
        .value(Column::Progress, 100)
        .value(Column::CompletedAt, at)
        .value(Column::LeaseExpiresAt, Option::<DateTime<Utc>>::None);
    stmt
}

/// `heartbeatTasks`: each lease until `until`, with its progress when
/// given, in one statement, each fenced by its own expected attempt.
pub fn heartbeat_many(items: &[Beat], until: DateTime<Utc>, at: DateTime<Utc>) -> UpdateStatement {
    let fences: Vec<(Uuid, i32)> = items
        .iter()
        .map(|b| (b.task_id, b.expected_attempt))
        .collect();
    let mut stmt = fenced_each(Move::Heartbeat, &fences, at);
    let progress = items
        .iter()
        .filter_map(|b| Some((b.task_id, Expr::val(b.progress?))));
    stmt.value(Column::LeaseExpiresAt, until).value(
        Column::Progress,
        by_id(progress, Expr::col(Column::Progress)),
    );
    stmt
}

/// The reaper's two statements over every PROCESSING task whose lease
/// passed before `at`: the requeue of those with attempts left, and the
/// failure of the others.
pub fn reap(at: DateTime<Utc>) -> [UpdateStatement; 2] {
    let spent = || {
        Expr::col(Column::Attempts)
            .sub(Expr::col(Column::RetryBase))
            .gte(Expr::col(Column::MaxAttempts))
    };
    let expired = |mv: Move| {
        let mut stmt = mv.update(at);
        stmt.and_where(Expr::col(Column::LeaseExpiresAt).lt(at))
            .value(Column::LeaseExpiresAt, Option::<DateTime<Utc>>::None);
        stmt
    };
    let mut requeue = expired(Move::Requeue);
    requeue
        .and_where(spent().not())
        .value(Column::WorkerId, Option::<String>::None);
    let mut fail = expired(Move::Expire);
    fail.and_where(spent())
        .value(
            Column::ErrorMessage,
            Expr::cust("'lease expired after ' || attempts || ' attempt(s); the worker stopped sending heartbeats'"),
        )
        .value(Column::CompletedAt, at);
    [requeue, fail]
}

/// Why `updateTaskStatus` changed nothing, from the task's current row:
/// `Ok` for an exact repeat of the terminal update that finished it, else
/// the CONFLICT that tells the worker what happened.
pub fn refused_report(
    update: &StatusUpdate,
    error_message: Option<&str>,
    task: Task,
) -> TaskResult<Task> {
    let to = update.status;
    if let Some(expected) = update.expected_attempt {
        if task.attempts != expected {
            return Err(TaskError::conflict(format!(
                "expectedAttempt {expected} is stale: the task is on attempt {}",
                task.attempts
            )));
        }
        if attempt_ended_by_retry(&task) {
            return Err(TaskError::conflict(format!(
                "attempt {expected} ended when the task was retried; stop working on it"
            )));
        }
        if task.status == Pending && to == Processing {
            return Err(TaskError::conflict(format!(
                "the lease of attempt {expected} expired and the task went back to PENDING; \
                 stop working on it"
            )));
        }
    }
    if task.status == Pending && to == Processing && task.waiting_on > 0 {
        return Err(TaskError::conflict(format!(
            "the task waits for {} of its dependencies to complete; it cannot start before",
            task.waiting_on
        )));
    }
    let same_result = (update.result_id.is_none() || update.result_id == task.result_id)
        && (update.result.is_none() || update.result == task.result);
    let same_error = error_message.is_none() || error_message == task.error_message.as_deref();
    if task.status == to && to.is_terminal() && same_result && same_error {
        return Ok(task);
    }
    Err(TaskError::conflict(format!(
        "task is {}; it cannot change to {}",
        api_name(task.status),
        api_name(to)
    )))
}

/// Why `heartbeatTask` changed nothing, from the task's current row.
pub fn refused_heartbeat(task: &Task) -> TaskError {
    if task.status == Processing {
        return TaskError::conflict(format!(
            "the task was claimed again (attempt {}); stop working on it",
            task.attempts
        ));
    }
    TaskError::conflict(format!(
        "task is {}; stop working on it",
        api_name(task.status)
    ))
}

/// Why `cancelTask` changed nothing: `Ok` when the task was already
/// cancelled (cancelling twice is the same as once).
pub fn refused_cancel(task: Task) -> TaskResult<Task> {
    match task.status {
        Cancelled => Ok(task),
        status => Err(TaskError::conflict(format!(
            "task is already {}; only {} tasks can be cancelled",
            api_name(status),
            Move::Cancel.allowed_from()
        ))),
    }
}

/// The dependencies of the task being updated (`tasks`) that failed or
/// were cancelled.
const DEAD_DEPENDENCY: &str = "SELECT 1 FROM task_dependencies d JOIN tasks p ON p.id = d.depends_on \
     WHERE d.task_id = tasks.id AND p.status IN ('failed', 'cancelled')";

/// How many dependencies of the task being updated (`tasks`) have not completed.
const UNFINISHED_DEPENDENCIES: &str = "(SELECT COUNT(*) FROM task_dependencies d \
     JOIN tasks p ON p.id = d.depends_on WHERE d.task_id = tasks.id AND p.status <> 'completed')";

/// Why `retryTask` changed nothing.
pub fn refused_retry(task: &Task) -> TaskError {
    if Move::Retry.from().contains(&task.status) {
        // The status allowed it: a dependency did not.
        return TaskError::conflict(
            "a task this one depends on failed or was cancelled: retry that one first, \
             which brings this one back",
        );
    }
    TaskError::conflict(format!(
        "task is {}; only {} tasks can be retried",
        api_name(task.status),
        Move::Retry.allowed_from()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every edge of the table is allowed by docs/design.md's table of
    /// moves, and every edge allowed there is made by a move here.
    #[test]
    fn the_design_lists_the_same_moves() {
        let design = include_str!("../../docs/design.md");
        let section = design
            .split("## Status machine")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("docs/design.md has a Status machine section");
        let statuses = |cell: &str| -> Vec<TaskStatus> {
            TaskStatus::ALL
                .into_iter()
                .filter(|s| cell.contains(&format!("`{}`", api_name(*s))))
                .collect()
        };
        let documented: Vec<(TaskStatus, TaskStatus)> = section
            .lines()
            .filter(|line| line.starts_with("| ") && !line.starts_with("| from"))
            .flat_map(|line| {
                let cells: Vec<&str> = line.split('|').collect();
                let to = statuses(cells[2]);
                statuses(cells[1])
                    .into_iter()
                    .flat_map(move |f| to.clone().into_iter().map(move |t| (f, t)))
            })
            .collect();
        assert!(
            documented.len() >= 10,
            "the table was not found: {documented:?}"
        );
        let made: Vec<(TaskStatus, TaskStatus)> = Move::ALL
            .iter()
            .flat_map(|mv| mv.from().iter().map(|f| (*f, mv.to())))
            .collect();
        for edge in &made {
            assert!(
                documented.contains(edge),
                "{edge:?} is not in docs/design.md's table"
            );
        }
        for edge in &documented {
            assert!(
                made.contains(edge),
                "docs/design.md allows {edge:?}, which no move makes"
            );
        }
    }

    /// Terminal statuses are left only by a retry, and nothing leaves COMPLETED.
    #[test]
    fn terminal_statuses_are_left_only_by_a_retry() {
        for mv in Move::ALL {
            if mv.from().iter().any(|s| s.is_terminal()) {
                assert_eq!(mv, Move::Retry);
                assert!(!mv.from().contains(&Completed));
            }
        }
    }

    #[test]
    fn workers_may_report_every_status_but_pending() {
        for status in TaskStatus::ALL {
            for fenced in [false, true] {
                let mv = Move::reported(status, fenced);
                assert_eq!(mv.is_none(), status == Pending);
                if let Some(mv) = mv {
                    assert_eq!(mv.to(), status);
                }
            }
        }
    }
}
