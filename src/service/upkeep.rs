//! The service's upkeep, run by the maintenance room (`crate::maintenance`),
//! never by a user's request: the lease reaper, retention of finished
//! tasks, of the change log and of the per-minute counters, and (on
//! PostgreSQL) folding the count deltas into the counters.
use std::time::Duration;

use entity::tasks::Column;
use entity::{TaskStatus, Tasks};
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::{EntityTrait, QueryFilter, QueryTrait};
use tracing::instrument;

use super::clock::now;
use super::store::TaskStore;
use super::transitions::{self, Move};
use super::{ReapOutcome, stats};
use crate::error::{TaskError, TaskResult};

/// Rows a single retention pass deletes before it lets others write.
const PRUNE_BATCH: u64 = 500;
/// PostgreSQL advisory lock key ("taskql" + 1) held by the instance reaping leases.
const REAPER_LOCK: i64 = 0x7461_736b_716c_0001;

impl TaskStore {
    /// Returns expired leases to pending, or fails the tasks whose budget of
    /// attempts is spent.
    #[instrument(level = "debug", skip_all)]
    pub async fn reap_expired_leases(&self) -> TaskResult<ReapOutcome> {
        let [mut requeue, mut fail] = transitions::reap(now());
        // One instance reaps at a time: two passes updating the same expired
        // rows lock them in different orders and deadlock on PostgreSQL. If
        // another instance holds the lock, it is doing this very pass.
        let txn = self.db().begin().await?;
        if !txn.try_lock(REAPER_LOCK).await? {
            txn.rollback().await?;
            return Ok(ReapOutcome::default());
        }
        requeue.returning_all();
        fail.returning_all();
        let requeued_tasks = self.writer.rows_in(&txn, &requeue).await?;
        let failed_tasks = self.writer.rows_in(&txn, &fail).await?;
        txn.commit().await?;
        let (requeued, failed) = (requeued_tasks.len(), failed_tasks.len());
        if requeued + failed > 0 {
            self.writer.wrote();
            tracing::info!(requeued, failed, "reaped expired leases");
        }
        for task in &requeued_tasks {
            self.moved(Move::Requeue, task);
        }
        for task in &failed_tasks {
            self.moved(Move::Expire, task);
        }
        Ok(ReapOutcome { requeued, failed })
    }

    /// Deletes terminal tasks finished before `older_than` ago, in batches.
    #[instrument(level = "debug", skip_all)]
    pub async fn prune_finished(&self, older_than: Duration) -> TaskResult<usize> {
        let cutoff = chrono::Duration::from_std(older_than)
            .ok()
            .and_then(|age| now().checked_sub_signed(age))
            .ok_or_else(|| TaskError::invalid("retention is too long"))?;
        let terminal = TaskStatus::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .map(|s| s.as_str());
        let mut total = 0;
        loop {
            let mut batch = Query::select();
            batch
                .column(Column::Id)
                .from(Tasks)
                .and_where(Expr::col(Column::Status).is_in(terminal.clone()))
                .and_where(Expr::col(Column::CompletedAt).lt(cutoff))
                .limit(PRUNE_BATCH);
            let mut delete = Tasks::delete_many()
                .filter(Expr::col(Column::Id).in_subquery(batch))
                .into_query();
            delete.returning_all();
            let count = self.writer.commit(&delete).await?.len();
            total += count;
            if (count as u64) < PRUNE_BATCH {
                break;
            }
        }
        Ok(total)
    }

    /// Deletes change-log entries older than `older_than`, in batches.
    #[instrument(level = "debug", skip_all)]
    pub async fn prune_events(&self, older_than: Duration) -> TaskResult<u64> {
        self.writer.log().prune(older_than).await
    }

    /// Folds the count and per-minute deltas that PostgreSQL's triggers
    /// append into the counters (see `stats::fold_deltas`).
    pub async fn fold_count_deltas(&self) -> TaskResult<u64> {
        stats::fold_deltas(self.db()).await
    }

    /// Prunes the per-minute `taskStats` counters (see `stats::prune_minutes`).
    pub async fn prune_stats_minutes(&self) -> TaskResult<u64> {
        stats::prune_minutes(self.db(), now()).await
    }
}
