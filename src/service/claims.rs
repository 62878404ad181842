//! Claims of one task: alone when no capped type is in reach, else in a
//! transaction that locks the capped types first (PostgreSQL) and takes
//! from the rate-limited types' buckets.
use entity::Task;

use super::batch::{claim_terms, rows_of_names};
use super::clock::now;
use super::queue::{self, Caps};
use super::rates;
use super::rows::rows_of;
use super::store::TaskStore;
use super::transitions::Move;
use super::{ClaimRequest, Worker};
use crate::db::Backend;
use crate::error::TaskResult;

impl TaskStore {
    /// `claimTask`: the next runnable task of the request's types, or none.
    pub(super) async fn claim_one(
        &self,
        worker: &Worker,
        request: ClaimRequest,
    ) -> TaskResult<Option<Task>> {
        let (worker_id, at, until) = claim_terms(worker, &request)?;
        let worker_id = worker_id.as_str();
        // SQLite's one writer makes the claim's count of a capped type hold
        // (a rate-limited type's bucket needs a transaction all the same);
        // PostgreSQL locks the capped types in reach first (see `queue`).
        let reach = self.queue.capped_in_reach(&request.types).await?;
        let postgres = self.db().backend() == Backend::Postgres;
        let alone = if postgres {
            reach.capped.is_empty()
        } else {
            reach.rated.is_empty()
        };
        if alone {
            let no_buckets = rates::Empty::default();
            let stmt = queue::claim(
                &request.types,
                Caps::of(postgres, &[]),
                &no_buckets,
                at,
                worker_id,
                until,
            );
            return self.make(Move::Claim, stmt).await;
        }
        let claimed = self
            .claim_locked(&reach, 1, |locked, empty| {
                let mut stmt = queue::claim(
                    &request.types,
                    Caps::of(postgres, locked),
                    empty,
                    at,
                    worker_id,
                    until,
                );
                stmt.returning_all();
                self.writer.statement(&stmt)
            })
            .await?
            .pop();
        if let Some(task) = &claimed {
            self.moved(Move::Claim, task);
        }
        Ok(claimed)
    }

    /// A claim that may take a capped type, in one transaction: on
    /// PostgreSQL the policy rows of the capped types in reach are locked
    /// first, so the claim counts every claim of them committed before (see
    /// `queue`); SQLite holds its one write lock from the start. `claim`
    /// makes the claim's statement (`RETURNING *`) for the types it locked
    /// (all in reach on SQLite), run up to `times` times while it takes
    /// tasks: claims one after the other, each counting the ones before.
    pub(super) async fn claim_locked(
        &self,
        reach: &queue::Reach,
        times: usize,
        claim: impl Fn(&[String], &rates::Empty) -> sea_orm::Statement,
    ) -> TaskResult<Vec<Task>> {
        let txn = self.db().begin_write().await?;
        let locked = match self.db().backend() {
            Backend::Postgres => {
                let lock = queue::lock_capped(&reach.capped);
                rows_of_names(&txn, self.writer.statement(&lock)).await?
            }
            Backend::Sqlite => reach.capped.clone(),
        };
        // The rate-limited types locked: their buckets, as of now.
        let rated = reach
            .rated
            .iter()
            .filter(|(task_type, _)| locked.contains(task_type))
            .map(|(task_type, limit)| (task_type.clone(), *limit))
            .collect();
        // The buckets' time is read once the lock is held: a claim that
        // waited for it must not refill what the one before it took.
        let mut buckets = rates::Buckets::read(&txn, rated, now()).await?;
        let mut claimed = Vec::new();
        for _ in 0..times {
            let taken = rows_of(&txn, claim(&locked, &buckets.empty())).await?;
            if taken.is_empty() {
                break;
            }
            buckets.take(&taken);
            claimed.extend(taken);
        }
        buckets.write(&txn).await?;
        txn.commit().await?;
        if !claimed.is_empty() {
            self.writer.wrote();
        }
        Ok(claimed)
    }
}
