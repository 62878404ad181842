//! One deadline per request. A transport (or a subscription's read) runs its
//! work under [`within`]; every database call made inside, on this task,
//! ends by that deadline whatever it waits on (a connection, a statement,
//! `BEGIN`, `COMMIT`, a read's second try), and the work as a whole is
//! dropped at it, which closes any connection it still held mid-call. Work
//! handed to another task (the inserters) carries [`current`] along.
use std::future::Future;
use std::time::Duration;

/// The moment a database call or a request is given up.
pub type Deadline = tokio::time::Instant;

tokio::task_local! {
    static DEADLINE: Deadline;
}

/// The deadline in force on this task, if any.
pub fn current() -> Option<Deadline> {
    DEADLINE.try_with(|deadline| *deadline).ok()
}

/// `deadline`, or the one already in force when it is earlier.
fn earliest(deadline: Deadline) -> Deadline {
    current().map_or(deadline, |outer| outer.min(deadline))
}

/// The work did not end by its deadline, and was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// Runs `work` to end by `deadline` (or by an earlier one already in
/// force): every database call in it is given up then, and `work` itself is
/// dropped if it still waits on something else.
pub async fn until<F: Future>(deadline: Deadline, work: F) -> Result<F::Output, Elapsed> {
    let deadline = earliest(deadline);
    tokio::time::timeout_at(deadline, DEADLINE.scope(deadline, work))
        .await
        .map_err(|_| Elapsed)
}

/// [`until`] `limit` from now.
pub async fn within<F: Future>(limit: Duration, work: F) -> Result<F::Output, Elapsed> {
    until(Deadline::now() + limit, work).await
}

/// Runs `work` with its database calls ending by `deadline` (or an earlier
/// one in force), without a cut of its own: for work that must answer
/// whatever happens, like a batch that others wait on.
pub async fn scoped<F: Future>(deadline: Option<Deadline>, work: F) -> F::Output {
    match deadline {
        Some(deadline) => DEADLINE.scope(earliest(deadline), work).await,
        None => work.await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_earliest_deadline_holds_and_work_past_it_is_dropped() {
        assert_eq!(current(), None);
        let start = Deadline::now();
        let inner = within(Duration::from_secs(10), async {
            let outer = current().expect("a deadline in force");
            assert_eq!(outer, start + Duration::from_secs(10));
            // A later deadline inside does not extend the earlier one.
            within(Duration::from_secs(60), async { current() }).await
        })
        .await;
        assert_eq!(inner, Ok(Ok(Some(start + Duration::from_secs(10)))));
        let slept = within(
            Duration::from_secs(1),
            tokio::time::sleep(Duration::from_secs(5)),
        )
        .await;
        assert_eq!(slept, Err(Elapsed));
        assert_eq!(Deadline::now(), start + Duration::from_secs(1));
        assert_eq!(current(), None);
    }
}
