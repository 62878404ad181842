//! Workers racing with `claimTasks` and `completeTasks`: each task handed to
//! exactly one of them, all completed, a type's cap never exceeded; on one
//! instance, and on two sharing a PostgreSQL database.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use entity::{TaskStatus, Tasks};
use sea_orm::EntityTrait;
use tokio::sync::Barrier;

use super::*;

const WORKERS: usize = 8;
const CAPPED: &str = "render";
const CAP: usize = 3;

/// What the workers of one round saw.
#[derive(Default)]
struct Round {
    /// Every claim, as (task id, worker, instance, of `CAPPED`).
    claims: Mutex<Vec<(String, usize, usize, bool)>>,
    /// Tasks of `CAPPED` that workers hold now: counted in right after
    /// their claim and out right before their completion, so never more
    /// than are PROCESSING.
    holding: AtomicUsize,
    /// The most `holding` ever was.
    most: AtomicUsize,
    /// Tasks completed.
    finished: AtomicUsize,
}

/// Worker `w` on `app` (instance `on`): claims up to 7 tasks at once and
/// completes them all in one call, until the round's `total` are finished.
async fn work(app: Arc<TestApp>, w: usize, on: usize, round: Arc<Round>, total: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while round.finished.load(Ordering::SeqCst) < total {
        assert!(
            std::time::Instant::now() < deadline,
            "worker {w}: tasks are left unfinished"
        );
        let claimed = claim_tasks_as(&app, json!(null), 7, 60, &format!("w{w}")).await;
        if claimed.is_empty() {
            tokio::time::sleep(Duration::from_millis(3)).await;
            continue;
        }
        let capped = claimed.iter().filter(|t| t["type"] == CAPPED).count();
        let now = round.holding.fetch_add(capped, Ordering::SeqCst) + capped;
        round.most.fetch_max(now, Ordering::SeqCst);
        round.claims.lock().unwrap().extend(
            claimed
                .iter()
                .map(|t| (id_of(t), w, on, t["type"] == CAPPED))
                .collect::<Vec<_>>(),
        );
        for task in &claimed {
            assert_eq!(
                (&task["status"], &task["attempts"], &task["workerId"]),
                (&json!("PROCESSING"), &json!(1), &json!(format!("w{w}"))),
                "worker {w}"
            );
        }
        if capped > 0 {
            tokio::time::sleep(Duration::from_millis(5 + (w as u64 % 4))).await;
        }
        round.holding.fetch_sub(capped, Ordering::SeqCst);

        let input: Vec<Value> = claimed.iter().map(completion).collect();
        let reports = complete_tasks(&app, &input).await;
        assert_eq!(reports.len(), claimed.len());
        for (report, task) in reports.iter().zip(&claimed) {
            assert_eq!(report["id"], task["id"]);
            assert!(report["error"].is_null(), "worker {w}: {report}");
            assert_eq!(report["task"]["status"], "COMPLETED", "worker {w}");
            assert_eq!(
                report["task"]["resultId"],
                json!(format!("r-{}", id_of(task)))
            );
        }
        round.finished.fetch_add(claimed.len(), Ordering::SeqCst);
    }
}

/// Three rounds of `WORKERS` racing over 400 tasks (100 of a type capped
/// at `CAP`) on `apps`, worker w on app w % apps.
async fn race(apps: &[Arc<TestApp>]) {
    let one = &apps[0];
    let (alice, bob) = (one.user_token("alice"), one.user_token("bob"));
    set_policy(one, CAPPED, json!({ "concurrency": CAP })).await;
    if apps.len() > 1 {
        // Another instance learns which types are capped within a second
        // and skips the type until then: wait, so every instance races.
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    let mut most_ever = 0;
    for r in 0..3 {
        let mut created = create_tasks(one, &alice, &inputs("email", &format!("{r}a"), 200)).await;
        created.extend(create_tasks(one, &bob, &inputs("email", &format!("{r}b"), 100)).await);
        created.extend(create_tasks(one, &bob, &inputs(CAPPED, &format!("{r}c"), 100)).await);
        let total = created.len();
        assert_eq!(total, 400);

        let round = Arc::new(Round::default());
        let start = Arc::new(Barrier::new(WORKERS));
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let on = w % apps.len();
                let (app, round, start) = (apps[on].clone(), round.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    work(app, w, on, round, total).await;
                })
            })
            .collect();
        for worker in workers {
            worker.await.expect("worker");
        }

        let claims = std::mem::take(&mut *round.claims.lock().unwrap());
        let claimed: HashSet<String> = claims.iter().map(|(id, ..)| id.clone()).collect();
        assert_eq!(
            claims.len(),
            total,
            "round {r}: claims made (a task claimed twice?)"
        );
        assert_eq!(
            claimed,
            ids(&created).into_iter().collect::<HashSet<_>>(),
            "round {r}: every task claimed once"
        );
        let workers_used: HashSet<usize> = claims.iter().map(|(_, w, ..)| *w).collect();
        assert!(
            workers_used.len() > 1,
            "round {r}: one worker took everything"
        );
        for app in 0..apps.len() {
            assert!(
                claims
                    .iter()
                    .any(|(_, _, on, capped)| *capped && *on == app),
                "round {r}: instance {app} never took a capped task"
            );
        }
        let most = round.most.load(Ordering::SeqCst);
        assert!(
            most <= CAP,
            "round {r}: {most} tasks capped at {CAP} ran at once"
        );
        most_ever = most_ever.max(most);
    }
    assert!(
        most_ever >= 2,
        "never two capped tasks at once: no race was tested"
    );

    // Everything finished, once: COMPLETED on its first attempt.
    let tasks = Tasks::find().all(&one.db).await.expect("read tasks");
    assert_eq!(tasks.len(), 1200);
    for task in tasks {
        assert_eq!(
            (task.status, task.attempts),
            (TaskStatus::Completed, 1),
            "{task:?}"
        );
        assert!(task.lease_expires_at.is_none(), "{task:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_batch_workers_take_each_task_once_within_the_cap() {
    race(&[Arc::new(spawn_app().await)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_batch_workers_on_two_instances_take_each_task_once_within_the_cap() {
    let Some((one, two)) = two_apps_on_postgres_or_skip(
        "eight_batch_workers_on_two_instances_take_each_task_once_within_the_cap",
    )
    .await
    else {
        return;
    };
    race(&[Arc::new(one), Arc::new(two)]).await;
}
