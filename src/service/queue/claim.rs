//! The claim's SQL: which types are capped, the lock on their policy rows
//! (PostgreSQL), and the one statement that takes the next runnable task.

use chrono::{DateTime, Utc};
use entity::task_types::Column as PolicyColumn;
use entity::tasks::Column;
use entity::{TaskStatus, TaskTypes, Tasks};
use sea_orm::sea_query::{
    Alias, Asterisk, Condition, Expr, ExprTrait, LockBehavior, LockType, Order, Query,
    QueryStatementBuilder, SelectStatement, UpdateStatement,
};

use crate::service::transitions::Move;

/// A type with a cap (on how many of its tasks run, overall or with one
/// concurrency key) or a rate limit, over `task_types`' columns: the claim
/// built here and `claimTasks`' statement (`batch`) say it alike.
pub(in crate::service) const CAPPED: &str =
    "(concurrency IS NOT NULL OR concurrency_per_key IS NOT NULL OR rate_count IS NOT NULL)";

/// [`CAPPED`], for a statement built with sea-query.
pub(super) fn is_capped() -> Condition {
    Condition::all().add(Expr::cust(CAPPED))
}

/// Locks the policy rows of `types` that have a cap, in name order, until
/// the transaction ends; returns the types it locked (PostgreSQL).
pub fn lock_capped(types: &[String]) -> SelectStatement {
    let mut select = Query::select();
    select
        .column(PolicyColumn::TaskType)
        .from(TaskTypes)
        .cond_where(is_capped())
        .and_where(Expr::col(PolicyColumn::TaskType).is_in(types.iter().cloned()))
        .order_by(PolicyColumn::TaskType, Order::Asc)
        .lock(LockType::Update);
    select
}

/// Which capped types a claim may take, after counting what they run.
pub enum Caps<'a> {
    /// Every capped type, counted in the statement (SQLite: one writer).
    Counted,
    /// Only these, whose policy rows the claim's transaction has locked;
    /// other capped types are skipped.
    Locked(&'a [String]),
}

impl<'a> Caps<'a> {
    /// What a claim that `locked` these types counts: on PostgreSQL those;
    /// on SQLite every capped type.
    pub fn of(postgres: bool, locked: &'a [String]) -> Self {
        if postgres {
            Self::Locked(locked)
        } else {
            Self::Counted
        }
    }
}

/// The claim: the first runnable task in claim order (of `types`, or any
/// when empty) becomes PROCESSING under `worker_id`'s lease until `until`
/// ([`Move::Claim`]).
///
/// Runnable: PENDING, waiting on no dependency, `run_at` passed, its type
/// not paused and under its cap, its key under its cap per key, and not of
/// an `empty` rate bucket. Order: priority (highest first), then turn
/// (`fair_rank`), then `run_at`, then id.
pub fn claim(
    types: &[String],
    caps: Caps<'_>,
    empty: &crate::service::rates::Empty,
    at: DateTime<Utc>,
    worker_id: &str,
    until: DateTime<Utc>,
) -> UpdateStatement {
    let running = Alias::new("running");
    let mut count = Query::select();
    count
        .expr(Expr::col(Asterisk).count())
        .from_as(Tasks, running.clone())
        .and_where(
            Expr::col((running.clone(), Column::TaskType))
                .equals((TaskTypes, PolicyColumn::TaskType)),
        )
        .and_where(Expr::col((running, Column::Status)).eq(TaskStatus::Processing.as_str()));
    let at_cap = Expr::col(PolicyColumn::Concurrency).lte(Expr::SubQuery(
        None,
        Box::new(count.into_sub_query_statement()),
    ));
    let full = Expr::col(PolicyColumn::Concurrency)
        .is_not_null()
        .and(at_cap);
    let mut blocked_if = Condition::any()
        .add(Expr::col(PolicyColumn::Paused).eq(true))
        .add(full);
    if let Caps::Locked(locked) = caps {
        // A capped type this claim did not lock is skipped, never over-claimed.
        blocked_if = blocked_if.add(
            Condition::all()
                .add(is_capped())
                .add(Expr::col(PolicyColumn::TaskType).is_not_in(locked.iter().cloned())),
        );
    }
    let mut blocked = Query::select();
    blocked
        .column(PolicyColumn::TaskType)
        .from(TaskTypes)
        .cond_where(blocked_if);

    // On PostgreSQL, SKIP LOCKED lets concurrent claimers pass each other
    // instead of queueing on one row.
    let mut first = Query::select();
    first
        .column(Column::Id)
        .from(Tasks)
        .and_where(Expr::col(Column::Status).eq(TaskStatus::Pending.as_str()))
        .and_where(Expr::col(Column::WaitingOn).eq(0))
        .and_where(Expr::col(Column::RunAt).lte(at))
        .and_where(Expr::col(Column::TaskType).not_in_subquery(blocked))
        .and_where(key_has_room())
        .cond_where(crate::service::rates::not_empty(empty).unwrap_or_else(Condition::all))
        .limit(1)
        .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
    crate::db::dialect::order_by_claim(&mut first);
    if !types.is_empty() {
        first.and_where(Expr::col(Column::TaskType).is_in(types.iter().cloned()));
    }
    // `id = (subquery)`, not `id IN (subquery)`: PostgreSQL runs a scalar
    // subquery once, but may rescan an IN subquery per row, and each rescan
    // skips the rows this statement already locked and takes the next one:
    // one claim would take every pending task.
    let mut stmt = Move::Claim.update(at);
    stmt.and_where(Expr::col(Column::Id).eq(first))
        .value(Column::Attempts, Expr::col(Column::Attempts).add(1))
        .value(Column::WorkerId, worker_id)
        .value(Column::LeaseExpiresAt, until)
        .value(Column::StartedAt, Expr::col(Column::StartedAt).if_null(at));
    stmt
}

/// A task's concurrency key has room: it has none, or its type has no cap
/// per key, or fewer than that cap of the type's tasks with the key run
/// (counted in `tasks_key_running_idx`). Read from the claim's candidate
/// row, `tasks`.
///
/// The status is written into the text (a constant, not input): sea-query
/// renumbers no placeholder of a custom expression for SQLite, so a bound
/// value here would take another's place.
pub(in crate::service) fn key_has_room() -> Expr {
    Expr::cust(format!(
        "NOT EXISTS (SELECT 1 FROM task_types k WHERE k.task_type = tasks.type \
         AND k.concurrency_per_key IS NOT NULL AND tasks.concurrency_key IS NOT NULL \
         AND k.concurrency_per_key <= (SELECT COUNT(*) FROM tasks r WHERE r.type = tasks.type \
         AND r.concurrency_key = tasks.concurrency_key AND r.status = '{}'))",
        TaskStatus::Processing.as_str()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::sea_query::{PostgresQueryBuilder, SqliteQueryBuilder};

    /// Every value the claim binds has its placeholder, in both dialects.
    #[test]
    fn the_claim_binds_every_value_it_names() {
        let at = Utc::now();
        let empty = crate::service::rates::Empty {
            types: vec!["paid".into()],
            keys: vec![("api".into(), "customer-1".into())],
        };
        let locked = ["api".to_owned()];
        let stmt = claim(&["api".into()], Caps::Locked(&locked), &empty, at, "w", at);
        let (sql, values) = stmt.build(SqliteQueryBuilder);
        assert_eq!(sql.matches('?').count(), values.0.len(), "{sql}");
        assert!(!sql.contains('$'), "{sql}");
        let (sql, values) = stmt.build(PostgresQueryBuilder);
        let n = values.0.len();
        assert!(sql.contains(&format!("${n}")), "{sql}");
        assert!(!sql.contains(&format!("${}", n + 1)), "{sql}");
        assert!(!sql.contains('?'), "{sql}");
    }
}
