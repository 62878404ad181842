//! `taskStats.workers`: the workers holding unexpired leases, with how many
//! tasks each holds and when its next lease runs out.
//!
//! They are read from the `(status, lease_expires_at)` index, so the read
//! costs what the tasks being processed are: next to nothing while they are
//! about as many as the worker slots, but every one of them when a fleet
//! holds hundreds of thousands. A worker's view is the same for every
//! dashboard of an instance, so the [`LeaseBoard`] keeps its last answer:
//! while reading it is fast (under [`SLOW_READ`]) every request reads
//! afresh; once it turns slow, requests get the last answer, at most
//! [`REFRESH_EVERY`] old plus one read, and the board reads again in the
//! background. The database then reads the leases once per interval however
//! many dashboards ask, and no request waits for it.
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use entity::TaskStatus;
use sea_orm::{ConnectionTrait, Value};
use tokio::time::Instant;

use super::statement;
use crate::db::Db;
use crate::error::TaskResult;

/// A read of the leases that takes longer than this is answered from the
/// board from then on, until a read is fast again.
pub const SLOW_READ: Duration = Duration::from_millis(20);
/// How old the board's answer may get before a request starts a new read
/// (and still gets the answer it has).
pub const REFRESH_EVERY: Duration = Duration::from_secs(2);
/// An answer older than this (its background reads kept failing) is not
/// served: the request reads afresh, and waits.
pub const MAX_AGE: Duration = Duration::from_secs(30);

/// A worker holding at least one unexpired lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerLease {
    pub worker_id: String,
    pub tasks: i64,
    pub next_lease_expiry: Option<DateTime<Utc>>,
}

/// Workers holding unexpired leases at `now` (of `owner`'s tasks, or of
/// every task): the rows read are the tasks being processed now.
pub(super) async fn read(
    db: &Db,
    owner: Option<&str>,
    now: DateTime<Utc>,
) -> TaskResult<Vec<WorkerLease>> {
    let mut values: Vec<Value> = vec![now.into(), TaskStatus::Processing.as_str().into()];
    let owner = match owner {
        Some(owner) => {
            values.push(owner.into());
            " AND user_id = $3"
        }
        None => "",
    };
    let sql = format!(
        "SELECT worker_id, COUNT(*) AS tasks, MIN(lease_expires_at) AS next_expiry FROM tasks \
         WHERE status = $2 AND lease_expires_at > $1 AND worker_id IS NOT NULL{owner} \
         GROUP BY worker_id ORDER BY worker_id"
    );
    db.reads()
        .query_all_raw(statement(db, sql, values))
        .await?
        .iter()
        .map(|row| {
            Ok(WorkerLease {
                worker_id: row.try_get("", "worker_id")?,
                tasks: row.try_get("", "tasks")?,
                next_lease_expiry: row.try_get("", "next_expiry")?,
            })
        })
        .collect()
}

/// The last answer of a worker's `workers`, shared by every request of this
/// instance (see the module's doc).
#[derive(Default)]
pub struct LeaseBoard {
    state: Arc<Mutex<Board>>,
}

#[derive(Default)]
struct Board {
    last: Option<Answer>,
    refreshing: bool,
}

struct Answer {
    workers: Vec<WorkerLease>,
    /// When the read that made it started.
    read_at: Instant,
    /// Whether that read took longer than [`SLOW_READ`].
    slow: bool,
}

impl LeaseBoard {
    /// Every worker holding an unexpired lease, on any task.
    pub async fn workers(&self, db: &Db) -> TaskResult<Vec<WorkerLease>> {
        let db = db.clone();
        self.answer(move || async move { read(&db, None, super::super::clock::now()).await })
            .await
    }

    /// `load`'s answer: read now, or the board's while reads are slow.
    async fn answer<F, Fut>(&self, load: F) -> TaskResult<Vec<WorkerLease>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = TaskResult<Vec<WorkerLease>>> + Send + 'static,
    {
        {
            let mut board = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(last) = board.last.as_ref().filter(|last| last.slow) {
                let age = last.read_at.elapsed();
                if age < MAX_AGE {
                    let workers = last.workers.clone();
                    if age >= REFRESH_EVERY && !board.refreshing {
                        board.refreshing = true;
                        tokio::spawn(refresh(self.state.clone(), load));
                    }
                    return Ok(workers);
                }
            }
        }
        let read_at = Instant::now();
        let workers = load().await?;
        keep(&self.state, workers.clone(), read_at);
        Ok(workers)
    }
}

/// Reads the leases again for the board, in the background.
async fn refresh<F, Fut>(state: Arc<Mutex<Board>>, load: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = TaskResult<Vec<WorkerLease>>>,
{
    /// Lets the next request start a read again, whatever became of this one.
    struct Done(Arc<Mutex<Board>>);
    impl Drop for Done {
        fn drop(&mut self) {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).refreshing = false;
        }
    }
    let done = Done(state);
    let read_at = Instant::now();
    match load().await {
        Ok(workers) => keep(&done.0, workers, read_at),
        // The board keeps its answer; past MAX_AGE requests read themselves.
        Err(err) => tracing::debug!(error = %err, "cannot read the workers' leases"),
    }
}

fn keep(state: &Mutex<Board>, workers: Vec<WorkerLease>, read_at: Instant) {
    let mut board = state.lock().unwrap_or_else(|p| p.into_inner());
    // A slower read that started earlier does not replace a newer answer.
    if board
        .last
        .as_ref()
        .is_some_and(|last| last.read_at > read_at)
    {
        return;
    }
    board.last = Some(Answer {
        workers,
        read_at,
        slow: read_at.elapsed() > SLOW_READ,
    });
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::*;
    use crate::error::TaskError;

    /// A load that takes `takes` and answers with the number of loads so far.
    fn counting(
        loads: &Arc<AtomicI64>,
        takes: Duration,
    ) -> impl FnOnce()
        -> std::pin::Pin<Box<dyn Future<Output = TaskResult<Vec<WorkerLease>>> + Send>>
    + Send
    + 'static {
        let loads = loads.clone();
        move || {
            Box::pin(async move {
                tokio::time::sleep(takes).await;
                let n = loads.fetch_add(1, Ordering::SeqCst) + 1;
                Ok(vec![WorkerLease {
                    worker_id: "w".into(),
                    tasks: n,
                    next_lease_expiry: None,
                }])
            })
        }
    }

    async fn tasks(board: &LeaseBoard, loads: &Arc<AtomicI64>, takes: Duration) -> i64 {
        board.answer(counting(loads, takes)).await.unwrap()[0].tasks
    }

    #[tokio::test(start_paused = true)]
    async fn fast_reads_are_always_fresh() {
        let (board, loads) = (LeaseBoard::default(), Arc::new(AtomicI64::new(0)));
        for n in 1..=5 {
            assert_eq!(tasks(&board, &loads, Duration::from_millis(1)).await, n);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn slow_reads_are_served_from_the_board_and_refreshed_behind() {
        let (board, loads) = (LeaseBoard::default(), Arc::new(AtomicI64::new(0)));
        let slow = Duration::from_millis(150);
        assert_eq!(tasks(&board, &loads, slow).await, 1);
        // Within REFRESH_EVERY: the board's answer, no read.
        assert_eq!(tasks(&board, &loads, slow).await, 1);
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        // Past it: still the board's answer at once, and a read behind it.
        tokio::time::advance(REFRESH_EVERY).await;
        let asked = Instant::now();
        assert_eq!(tasks(&board, &loads, slow).await, 1);
        assert_eq!(
            asked.elapsed(),
            Duration::ZERO,
            "the request waited for a read"
        );
        assert_eq!(tasks(&board, &loads, slow).await, 1, "one read at a time");
        tokio::time::sleep(slow * 2).await;
        assert_eq!(loads.load(Ordering::SeqCst), 2);
        assert_eq!(tasks(&board, &loads, slow).await, 2);
        // Once a read is fast again, requests read afresh.
        tokio::time::advance(REFRESH_EVERY).await;
        assert_eq!(tasks(&board, &loads, Duration::ZERO).await, 2);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(tasks(&board, &loads, Duration::ZERO).await, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_too_old_is_not_served() {
        let (board, loads) = (LeaseBoard::default(), Arc::new(AtomicI64::new(0)));
        assert_eq!(tasks(&board, &loads, Duration::from_millis(150)).await, 1);
        // Every background read fails from here on.
        for _ in 0..3 {
            tokio::time::advance(MAX_AGE / 4).await;
            let answer = board
                .answer(|| async { Err(TaskError::Unavailable("down".into())) })
                .await;
            assert_eq!(answer.unwrap()[0].tasks, 1);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::advance(MAX_AGE / 4).await;
        let answer = board
            .answer(|| async { Err(TaskError::Unavailable("down".into())) })
            .await;
        assert!(matches!(answer, Err(TaskError::Unavailable(_))));
    }
}
