//! The worker protocol, under real concurrency: exactly-once claims, leases
//! and heartbeats, fencing, stuck-task recovery, idempotent creates,
//! retention, and the example worker end to end. On SQLite by default, on
//! PostgreSQL when `TASKQL_TEST_DATABASE_URL` is set.
mod common;

#[allow(dead_code)]
#[path = "../examples/worker/client.rs"]
mod worker_client;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::*;
use entity::tasks::Column;
use entity::{Task, TaskStatus, Tasks};
use sea_orm::prelude::Expr;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder};
use serde_json::{Value, json};
use taskql::auth::CurrentUser;
use taskql::error::TaskError;
use taskql::service::{ClaimRequest, Heartbeat, StatusUpdate, TaskService};
use tokio::sync::Barrier;
use uuid::Uuid;

const CLAIMERS: usize = 8;
const MANY: usize = 1000;

const CREATE: &str =
    "mutation($input: CreateTaskInput!) { createTask(input: $input) { id type status attempts } }";
const CLAIM: &str = "mutation($types: [String!], $lease: Int, $worker: String) {
  claimTask(types: $types, leaseSeconds: $lease, workerId: $worker) { id type status attempts }
}";
const HEARTBEAT: &str = "mutation($id: ID!, $progress: Int, $lease: Int, $attempt: Int) {
  heartbeatTask(id: $id, progress: $progress, leaseSeconds: $lease, expectedAttempt: $attempt) { id status progress attempts }
}";
const UPDATE: &str = "mutation($input: UpdateTaskStatusInput!) {
  updateTaskStatus(input: $input) { id status resultId errorMessage attempts }
}";
const CANCEL: &str = "mutation($id: ID!) { cancelTask(id: $id) { id status } }";
const TASK: &str =
    "query($id: ID!) { task(id: $id) { id status resultId errorMessage progress attempts } }";

// ---- helpers -------------------------------------------------------------

async fn fetch(db: &impl ConnectionTrait, id: Uuid) -> Task {
    Tasks::find_by_id(id)
        .one(db)
        .await
        .expect("read task")
        .expect("task exists")
}

async fn all_tasks(db: &impl ConnectionTrait) -> Vec<Task> {
    Tasks::find()
        .order_by_asc(Column::CreatedAt)
        .order_by_asc(Column::Id)
        .all(db)
        .await
        .expect("read tasks")
}

/// Puts the lease of `ids` in the past, as if their workers went silent long ago.
async fn expire_leases(db: &impl ConnectionTrait, ids: &[Uuid]) {
    let past = Utc::now() - chrono::Duration::minutes(5);
    Tasks::update_many()
        .col_expr(Column::LeaseExpiresAt, Expr::value(past))
        .filter(Column::Id.is_in(ids.to_vec()))
        .exec(db)
        .await
        .expect("expire leases");
}

fn by_status(tasks: &[Task]) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for task in tasks {
        *counts.entry(task.status.as_str()).or_default() += 1;
    }
    counts
}

/// The tasks in the table, counted by status, are exactly `want`.
async fn assert_statuses(db: &impl ConnectionTrait, want: &[(&str, usize)]) {
    assert_eq!(
        by_status(&all_tasks(db).await),
        want.iter().copied().collect::<BTreeMap<_, _>>()
    );
}

fn lease(seconds: u64) -> Option<Duration> {
    Some(Duration::from_secs(seconds))
}

fn claim_request(worker: &str, seconds: u64) -> ClaimRequest {
    ClaimRequest {
        types: Vec::new(),
        lease: lease(seconds),
        worker_id: Some(worker.into()),
    }
}

fn completion(id: Uuid, attempt: i32, result: &str) -> StatusUpdate {
    let mut update = StatusUpdate::new(id, TaskStatus::Completed);
    update.result_id = Some(result.into());
    update.expected_attempt = Some(attempt);
    update
}

/// `n` tasks of `task_type` for `user`, created by 8 concurrent callers.
async fn create_many(
    service: &Arc<impl TaskService + 'static>,
    user: &CurrentUser,
    task_type: &str,
    n: usize,
) -> Vec<Uuid> {
    let per = n.div_ceil(CLAIMERS);
    let creators: Vec<_> = (0..CLAIMERS)
        .map(|c| {
            let (service, user, task_type) = (service.clone(), user.clone(), task_type.to_owned());
            let count = per.min(n.saturating_sub(c * per));
            tokio::spawn(async move {
                let mut ids = Vec::with_capacity(count);
                for _ in 0..count {
                    ids.push(new_task(service.as_ref(), &user, &task_type).await.id);
                }
                ids
            })
        })
        .collect();
    let mut ids = Vec::with_capacity(n);
    for creator in creators {
        ids.extend(creator.await.expect("creator"));
    }
    assert_eq!(ids.len(), n);
    ids
}

fn gql_id(task: &Value) -> Uuid {
    Uuid::parse_str(task["id"].as_str().expect("id")).expect("uuid id")
}

/// A new image task of alice's, claimed by `worker_id` for `lease` seconds:
/// its id and the claim.
async fn create_and_claim(app: &TestApp, lease: u64, worker_id: &str) -> (Uuid, Value) {
    let task = create_via_api(app, &app.user_token("alice"), json!({ "type": "image" })).await;
    let claimed = data(
        app.gql(
            Some(&app.worker_token()),
            CLAIM,
            json!({ "lease": lease, "worker": worker_id }),
        )
        .await,
    );
    assert_eq!(
        claimed["claimTask"]["id"], task["id"],
        "claimed the new task"
    );
    (gql_id(&task), claimed)
}

async fn create_via_api(app: &TestApp, token: &str, input: Value) -> Value {
    app.create_task(token, input, "id type status attempts")
        .await
}

/// Every claim a claimer made, in its order.
type Claims = Vec<Vec<(Uuid, i32)>>;

/// Asserts that `claims` took each of `ids` exactly once, on its first attempt.
fn assert_exactly_once(claims: &Claims, ids: &[Uuid]) {
    let flat: Vec<(Uuid, i32)> = claims.iter().flatten().copied().collect();
    let unique: HashSet<Uuid> = flat.iter().map(|(id, _)| *id).collect();
    assert_eq!(flat.len(), ids.len(), "claims made (duplicates or losses)");
    assert_eq!(unique.len(), ids.len(), "a task was claimed twice");
    assert_eq!(unique, ids.iter().copied().collect(), "claimed other tasks");
    assert!(flat.iter().all(|(_, attempts)| *attempts == 1));
    assert!(
        claims.iter().filter(|c| !c.is_empty()).count() > 1,
        "only one claimer ever won: {:?}",
        claims.iter().map(Vec::len).collect::<Vec<_>>()
    );
}

/// Every one of `ids` is COMPLETED with the result its claimer reported.
async fn assert_all_completed(db: &impl ConnectionTrait, ids: &[Uuid]) {
    let tasks = all_tasks(db).await;
    assert_eq!(
        by_status(&tasks),
        BTreeMap::from([("completed", ids.len())])
    );
    for task in tasks {
        assert_eq!(task.result_id, Some(format!("r-{}", task.id)));
        assert_eq!((task.attempts, task.version), (1, 3), "{task:?}");
        assert!(task.lease_expires_at.is_none());
    }
}

// ---- exactly-once claims -------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_service_claimers_take_each_of_1000_tasks_exactly_once() {
    let test = TestDb::new().await;
    let (service, db) = test.service().await;
    let ids = create_many(&service, &alice(), "concept.image", MANY).await;

    let start = Arc::new(Barrier::new(CLAIMERS));
    let claimers: Vec<_> = (0..CLAIMERS)
        .map(|c| {
            let (service, start) = (service.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                let mut mine = Vec::new();
                while let Some(task) = service
                    .claim_task(&as_worker(), claim_request(&format!("w{c}"), 60))
                    .await
                    .expect("claim")
                {
                    assert_eq!(task.status, TaskStatus::Processing);
                    assert_eq!(task.worker_id.as_deref(), Some(format!("w{c}").as_str()));
                    service
                        .update_task_status(
                            &as_worker(),
                            completion(task.id, task.attempts, &format!("r-{}", task.id)),
                        )
                        .await
                        .expect("complete");
                    mine.push((task.id, task.attempts));
                }
                mine
            })
        })
        .collect();
    let mut claims = Claims::new();
    for claimer in claimers {
        claims.push(claimer.await.expect("claimer"));
    }
    assert_exactly_once(&claims, &ids);
    assert_all_completed(&db, &ids).await;
    assert!(
        service
            .claim_task(&as_worker(), claim_request("late", 60))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_graphql_claimers_take_each_of_1000_tasks_exactly_once() {
    let app = spawn_app().await;
    let ids = create_many(&app.service, &alice(), "concept.image", MANY).await;
    let app = Arc::new(app);

    let start = Arc::new(Barrier::new(CLAIMERS));
    let claimers: Vec<_> = (0..CLAIMERS)
        .map(|c| {
            let (app, start) = (app.clone(), start.clone());
            tokio::spawn(async move {
                let token = app.worker_token();
                start.wait().await;
                let mut mine = Vec::new();
                loop {
                    let claimed = data(
                        app.gql(
                            Some(&token),
                            CLAIM,
                            json!({ "lease": 60, "worker": format!("w{c}") }),
                        )
                        .await,
                    )["claimTask"]
                        .clone();
                    if claimed.is_null() {
                        return mine;
                    }
                    assert_eq!(claimed["status"], "PROCESSING");
                    let (id, attempts) = (gql_id(&claimed), claimed["attempts"].as_i64().unwrap());
                    let input = json!({
                        "id": id, "status": "COMPLETED",
                        "resultId": format!("r-{id}"), "expectedAttempt": attempts,
                    });
                    let done = data(
                        app.gql(Some(&token), UPDATE, json!({ "input": input }))
                            .await,
                    );
                    assert_eq!(done["updateTaskStatus"]["status"], "COMPLETED");
                    mine.push((id, attempts as i32));
                }
            })
        })
        .collect();
    let mut claims = Claims::new();
    for claimer in claimers {
        claims.push(claimer.await.expect("claimer"));
    }
    assert_exactly_once(&claims, &ids);
    assert_all_completed(&app.db, &ids).await;
}

#[tokio::test]
async fn a_single_claimer_takes_the_oldest_task_first() {
    let test = TestDb::new().await;
    let (service, db) = test.service().await;
    let mut created = Vec::new();
    for i in 0..30 {
        let task_type = if i % 2 == 0 { "image" } else { "report" };
        created.push(new_task(service.as_ref(), &alice(), task_type).await);
    }
    let mut by_age = created.clone();
    by_age.sort_by_key(|t| (t.created_at, t.id));
    assert_eq!(
        by_age.iter().map(|t| t.id).collect::<Vec<_>>(),
        created.iter().map(|t| t.id).collect::<Vec<_>>(),
        "tasks created one after another are ordered by created_at"
    );

    let mut claimed = Vec::new();
    while let Some(task) = service
        .claim_task(&as_worker(), claim_request("w", 60))
        .await
        .unwrap()
    {
        claimed.push(task);
    }
    assert_eq!(
        claimed.iter().map(|t| t.id).collect::<Vec<_>>(),
        created.iter().map(|t| t.id).collect::<Vec<_>>()
    );
    assert!(
        claimed
            .windows(2)
            .all(|w| w[0].created_at <= w[1].created_at)
    );
    assert_statuses(&db, &[("processing", 30)]).await;
}

// ---- claimTask through the API ---------------------------------------------

#[tokio::test]
async fn claim_task_takes_only_the_requested_types_and_is_null_when_idle() {
    let app = spawn_app().await;
    let (user, worker) = (app.user_token("alice"), app.worker_token());
    let claim = |types: Value| {
        let (app, worker) = (&app, &worker);
        async move {
            data(
                app.gql(
                    Some(worker),
                    CLAIM,
                    json!({ "types": types, "lease": 60, "worker": "w" }),
                )
                .await,
            )["claimTask"]
                .clone()
        }
    };

    assert!(claim(Value::Null).await.is_null(), "empty queue");
    let image_1 = create_via_api(&app, &user, json!({ "type": "image" })).await;
    let report = create_via_api(&app, &user, json!({ "type": "report" })).await;
    let image_2 = create_via_api(&app, &user, json!({ "type": "image" })).await;
    let email = create_via_api(&app, &user, json!({ "type": "email" })).await;

    let types = json!(["report", "email"]);
    assert_eq!(claim(types.clone()).await["id"], report["id"]);
    let second = claim(types.clone()).await;
    assert_eq!(
        (&second["id"], &second["type"]),
        (&email["id"], &json!("email"))
    );
    assert!(
        claim(types.clone()).await.is_null(),
        "images are pending, but not of the requested types"
    );
    assert!(claim(json!(["video"])).await.is_null());

    assert_eq!(claim(json!(["image"])).await["id"], image_1["id"]);
    let last = claim(Value::Null).await;
    assert_eq!(
        (&last["id"], &last["status"]),
        (&image_2["id"], &json!("PROCESSING"))
    );
    assert!(claim(Value::Null).await.is_null());
    assert_statuses(&app.db, &[("processing", 4)]).await;
}

#[tokio::test]
async fn lease_seconds_out_of_bounds_is_bad_user_input() {
    let app = spawn_app().await;
    let worker = app.worker_token();
    let task = create_via_api(&app, &app.user_token("alice"), json!({ "type": "image" })).await;

    for bad in [0, -1, 3601] {
        let body = app.gql(Some(&worker), CLAIM, json!({ "lease": bad })).await;
        assert_eq!(
            error_code(&body),
            Some("BAD_USER_INPUT"),
            "lease {bad}: {body}"
        );
    }
    let still = fetch(&app.db, gql_id(&task)).await;
    assert_eq!((still.status, still.attempts), (TaskStatus::Pending, 0));

    let claimed = data(
        app.gql(Some(&worker), CLAIM, json!({ "lease": 3600 }))
            .await,
    );
    assert_eq!(claimed["claimTask"]["id"], task["id"]);
    for bad in [0, 3601] {
        let body = app
            .gql(
                Some(&worker),
                HEARTBEAT,
                json!({ "id": task["id"], "lease": bad }),
            )
            .await;
        assert_eq!(
            error_code(&body),
            Some("BAD_USER_INPUT"),
            "lease {bad}: {body}"
        );
    }
    let body = app
        .gql(
            Some(&worker),
            HEARTBEAT,
            json!({ "id": task["id"], "lease": 1 }),
        )
        .await;
    assert_eq!(data(body)["heartbeatTask"]["status"], "PROCESSING");
}

#[tokio::test]
async fn a_user_token_cannot_claim_heartbeat_or_update() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let task = create_via_api(&app, &alice, json!({ "type": "image" })).await;
    let attempts = [
        (CLAIM, json!({})),
        (HEARTBEAT, json!({ "id": task["id"], "progress": 10 })),
        (
            UPDATE,
            json!({ "input": { "id": task["id"], "status": "COMPLETED", "resultId": "mine" } }),
        ),
    ];
    for (query, variables) in attempts {
        let body = app.gql(Some(&alice), query, variables).await;
        assert_eq!(error_code(&body), Some("FORBIDDEN"), "{query}: {body}");
    }
    let unchanged = fetch(&app.db, gql_id(&task)).await;
    assert_eq!(
        (unchanged.status, unchanged.attempts, unchanged.version),
        (TaskStatus::Pending, 0, 1)
    );
}

// ---- leases and the reaper -------------------------------------------------

#[tokio::test]
async fn an_expired_lease_returns_the_task_to_pending_through_the_running_reaper() {
    let app = spawn_app().await;
    let worker = app.worker_token();
    let (id, claimed) = create_and_claim(&app, 1, "w-crashed").await;
    assert_eq!(claimed["claimTask"]["attempts"], 1);

    // The worker goes silent; nothing but the server's reaper acts.
    let requeued = eventually(
        "the reaper to requeue the task",
        Duration::from_secs(15),
        || async {
            let task = fetch(&app.db, id).await;
            (task.status == TaskStatus::Pending).then_some(task)
        },
    )
    .await;
    assert_eq!(requeued.attempts, 1, "attempts are kept");
    assert!(requeued.worker_id.is_none() && requeued.lease_expires_at.is_none());
    assert!(requeued.completed_at.is_none() && requeued.error_message.is_none());

    let again = data(
        app.gql(
            Some(&worker),
            CLAIM,
            json!({ "lease": 60, "worker": "w-2" }),
        )
        .await,
    );
    assert_eq!(
        (&again["claimTask"]["id"], &again["claimTask"]["attempts"]),
        (&json!(id.to_string()), &json!(2))
    );
}

#[tokio::test]
async fn a_task_whose_leases_keep_expiring_fails_after_max_attempts() {
    let database = Arc::new(TestDb::new().await);
    let app = spawn_app_with(database, |s| s.tasks.max_attempts = 2).await;
    let worker = app.worker_token();
    let alice = app.user_token("alice");
    let task = create_via_api(&app, &alice, json!({ "type": "image" })).await;
    let id = gql_id(&task);

    for attempt in 1..=2 {
        let claimed = data(app.gql(Some(&worker), CLAIM, json!({ "lease": 60 })).await);
        assert_eq!(claimed["claimTask"]["attempts"], attempt);
        expire_leases(&app.db, &[id]).await;
        let want = if attempt < 2 {
            TaskStatus::Pending
        } else {
            TaskStatus::Failed
        };
        let reaped = eventually("the reaper", Duration::from_secs(15), || async {
            let task = fetch(&app.db, id).await;
            (task.status == want).then_some(task)
        })
        .await;
        assert_eq!(reaped.attempts, attempt);
    }

    // The owner sees why it failed.
    let seen = data(app.gql(Some(&alice), TASK, json!({ "id": id })).await)["task"].clone();
    assert_eq!(seen["status"], "FAILED");
    let message = seen["errorMessage"].as_str().expect("an error message");
    assert!(
        message.contains("lease expired") && message.contains("2 attempt"),
        "{message}"
    );
    let failed = fetch(&app.db, id).await;
    assert!(failed.completed_at.is_some() && failed.lease_expires_at.is_none());
    let none = data(app.gql(Some(&worker), CLAIM, json!({})).await);
    assert!(
        none["claimTask"].is_null(),
        "a failed task is not claimed again"
    );
}

#[tokio::test]
async fn a_late_update_from_an_old_attempt_is_conflict_and_the_new_claim_wins() {
    let app = spawn_app().await;
    let worker = app.worker_token();
    let (id, first) = create_and_claim(&app, 60, "slow").await;
    assert_eq!(first["claimTask"]["attempts"], 1);
    expire_leases(&app.db, &[id]).await;
    eventually("the reaper to requeue", Duration::from_secs(15), || async {
        (fetch(&app.db, id).await.status == TaskStatus::Pending).then_some(())
    })
    .await;
    let second = data(
        app.gql(
            Some(&worker),
            CLAIM,
            json!({ "lease": 60, "worker": "fast" }),
        )
        .await,
    );
    assert_eq!(second["claimTask"]["attempts"], 2);

    // The slow worker wakes up: its heartbeat and its result are refused.
    let beat = app
        .gql(
            Some(&worker),
            HEARTBEAT,
            json!({ "id": id, "progress": 90, "attempt": 1 }),
        )
        .await;
    assert_eq!(error_code(&beat), Some("CONFLICT"), "{beat}");
    let late = json!({ "input": {
        "id": id, "status": "COMPLETED", "resultId": "from-slow", "expectedAttempt": 1,
    }});
    let body = app.gql(Some(&worker), UPDATE, late.clone()).await;
    assert_eq!(error_code(&body), Some("CONFLICT"), "{body}");
    let failing = json!({ "input": {
        "id": id, "status": "FAILED", "errorMessage": "slow gave up", "expectedAttempt": 1,
    }});
    let body = app.gql(Some(&worker), UPDATE, failing).await;
    assert_eq!(error_code(&body), Some("CONFLICT"), "{body}");
    let mid = fetch(&app.db, id).await;
    assert_eq!(
        (mid.status, mid.attempts, mid.progress),
        (TaskStatus::Processing, 2, None)
    );

    let done = json!({ "input": {
        "id": id, "status": "COMPLETED", "resultId": "from-fast", "expectedAttempt": 2,
    }});
    let body = data(app.gql(Some(&worker), UPDATE, done.clone()).await);
    assert_eq!(body["updateTaskStatus"]["resultId"], "from-fast");
    // The slow one retries; the fast one retries too (a no-op).
    let body = app.gql(Some(&worker), UPDATE, late).await;
    assert_eq!(error_code(&body), Some("CONFLICT"), "{body}");
    let body = data(app.gql(Some(&worker), UPDATE, done).await);
    assert_eq!(body["updateTaskStatus"]["status"], "COMPLETED");

    let last = fetch(&app.db, id).await;
    assert_eq!(last.status, TaskStatus::Completed);
    assert_eq!(last.result_id.as_deref(), Some("from-fast"));
    assert_eq!(last.attempts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_completion_racing_the_reaper_leaves_the_task_completed() {
    let test = TestDb::new().await;
    let (service, db) = test.service().await;
    let mut reaper_first = 0;
    for round in 0..50 {
        let task = new_task(service.as_ref(), &alice(), "image").await;
        let claimed = service
            .claim_task(&as_worker(), claim_request("w", 60))
            .await
            .unwrap()
            .expect("a task to claim");
        assert_eq!(claimed.id, task.id);
        expire_leases(&db, &[task.id]).await;

        let start = Arc::new(Barrier::new(2));
        let finish = {
            let (service, start) = (service.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                service
                    .update_task_status(&as_worker(), completion(task.id, 1, &format!("r-{round}")))
                    .await
            })
        };
        let reap = {
            let (service, start) = (service.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                service.reap_expired_leases().await
            })
        };
        let finished = finish.await.unwrap().expect("the completion is accepted");
        let reaped = reap.await.unwrap().expect("reaper pass");
        assert_eq!(finished.status, TaskStatus::Completed, "round {round}");
        assert_eq!(reaped.failed, 0);
        reaper_first += reaped.requeued;

        let last = fetch(&db, task.id).await;
        assert_eq!(
            last.status,
            TaskStatus::Completed,
            "round {round}: {last:?}"
        );
        assert_eq!(last.result_id, Some(format!("r-{round}")));
        assert_eq!(last.attempts, 1);
        assert!(last.lease_expires_at.is_none());
        // create, claim, (requeue), complete: nothing ran twice.
        assert_eq!(last.version, 3 + reaped.requeued as i64, "round {round}");
    }
    eprintln!("the reaper requeued first in {reaper_first} of 50 rounds");
    assert_statuses(&db, &[("completed", 50)]).await;
}

// ---- heartbeats --------------------------------------------------------------

#[tokio::test]
async fn heartbeats_keep_a_task_processing_past_its_first_lease() {
    let app = spawn_app().await;
    let worker = app.worker_token();
    let task = create_via_api(&app, &app.user_token("alice"), json!({ "type": "image" })).await;
    let id = gql_id(&task);
    let claimed = data(app.gql(Some(&worker), CLAIM, json!({ "lease": 2 })).await);
    assert_eq!(claimed["claimTask"]["id"], task["id"]);
    let first_lease: DateTime<Utc> = fetch(&app.db, id).await.lease_expires_at.expect("leased");

    // Heartbeat well inside each 2 s lease until the first lease is long
    // past (several reaper passes), with the real reaper running.
    let mut progress = 0;
    while Utc::now() < first_lease + chrono::Duration::milliseconds(2500) {
        tokio::time::sleep(Duration::from_millis(400)).await;
        progress = (progress + 10).min(100);
        let beat = data(
            app.gql(
                Some(&worker),
                HEARTBEAT,
                json!({ "id": id, "progress": progress, "lease": 2, "attempt": 1 }),
            )
            .await,
        );
        assert_eq!(beat["heartbeatTask"]["status"], "PROCESSING");
        assert_eq!(beat["heartbeatTask"]["progress"], progress);
    }
    let alive = fetch(&app.db, id).await;
    assert_eq!((alive.status, alive.attempts), (TaskStatus::Processing, 1));
    assert!(alive.lease_expires_at.expect("leased") > first_lease);

    // Silence: the same reaper now takes it back.
    let requeued = eventually(
        "the reaper after heartbeats stop",
        Duration::from_secs(15),
        || async {
            let task = fetch(&app.db, id).await;
            (task.status == TaskStatus::Pending).then_some(task)
        },
    )
    .await;
    assert_eq!(requeued.attempts, 1);
    let beat = app
        .gql(Some(&worker), HEARTBEAT, json!({ "id": id, "attempt": 1 }))
        .await;
    assert_eq!(
        error_code(&beat),
        Some("CONFLICT"),
        "a requeued task is not ours: {beat}"
    );
}

#[tokio::test]
async fn a_heartbeat_after_cancel_is_conflict() {
    let app = spawn_app().await;
    let (alice, worker) = (app.user_token("alice"), app.worker_token());
    let task = create_via_api(&app, &alice, json!({ "type": "image" })).await;
    let claimed = data(app.gql(Some(&worker), CLAIM, json!({ "lease": 60 })).await);
    assert_eq!(claimed["claimTask"]["id"], task["id"]);
    let beat = data(
        app.gql(
            Some(&worker),
            HEARTBEAT,
            json!({ "id": task["id"], "progress": 30, "attempt": 1 }),
        )
        .await,
    );
    assert_eq!(beat["heartbeatTask"]["progress"], 30);

    let cancelled = data(
        app.gql(Some(&alice), CANCEL, json!({ "id": task["id"] }))
            .await,
    );
    assert_eq!(cancelled["cancelTask"]["status"], "CANCELLED");

    for variables in [
        json!({ "id": task["id"], "progress": 60, "attempt": 1 }),
        json!({ "id": task["id"], "progress": 60 }),
    ] {
        let body = app.gql(Some(&worker), HEARTBEAT, variables).await;
        assert_eq!(error_code(&body), Some("CONFLICT"), "{body}");
    }
    let body = app
        .gql(
            Some(&worker),
            UPDATE,
            json!({ "input": { "id": task["id"], "status": "COMPLETED", "resultId": "x", "expectedAttempt": 1 } }),
        )
        .await;
    assert_eq!(error_code(&body), Some("CONFLICT"), "{body}");
    let last = fetch(&app.db, gql_id(&task)).await;
    assert_eq!(
        (last.status, last.progress),
        (TaskStatus::Cancelled, Some(30))
    );
    assert!(last.result_id.is_none());
}

#[tokio::test]
async fn heartbeat_through_the_service_checks_the_attempt() {
    let test = TestDb::new().await;
    let (service, db) = test.service().await;
    let task = new_task(service.as_ref(), &alice(), "image").await;
    service
        .claim_task(&as_worker(), claim_request("a", 60))
        .await
        .unwrap();
    expire_leases(&db, &[task.id]).await;
    assert_eq!(service.reap_expired_leases().await.unwrap().requeued, 1);
    let again = service
        .claim_task(&as_worker(), claim_request("b", 60))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.attempts, 2);

    let stale = service
        .heartbeat_task(
            &as_worker(),
            Heartbeat {
                task_id: task.id,
                progress: Some(50),
                lease: lease(60),
                expected_attempt: Some(1),
            },
        )
        .await;
    assert!(matches!(stale, Err(TaskError::Conflict(_))), "{stale:?}");
    let current = service
        .heartbeat_task(
            &as_worker(),
            Heartbeat {
                task_id: task.id,
                progress: Some(50),
                lease: lease(60),
                expected_attempt: Some(2),
            },
        )
        .await
        .unwrap();
    assert_eq!((current.progress, current.attempts), (Some(50), 2));
    let missing = service
        .heartbeat_task(
            &as_worker(),
            Heartbeat {
                task_id: Uuid::now_v7(),
                progress: None,
                lease: None,
                expected_attempt: None,
            },
        )
        .await;
    assert!(matches!(missing, Err(TaskError::NotFound)), "{missing:?}");
}

// ---- idempotent creates ------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_with_one_idempotency_key_make_one_task() {
    let app = Arc::new(spawn_app().await);
    let input =
        json!({ "type": "image", "metadata": { "prompt": "a fox" }, "idempotencyKey": "job-42" });
    let start = Arc::new(Barrier::new(20));
    let creators: Vec<_> = (0..20)
        .map(|_| {
            let (app, start, input) = (app.clone(), start.clone(), input.clone());
            tokio::spawn(async move {
                let token = app.user_token("alice");
                start.wait().await;
                create_via_api(&app, &token, input).await
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for creator in creators {
        let task = creator.await.expect("creator");
        assert_eq!(task["status"], "PENDING");
        ids.insert(gql_id(&task));
    }
    assert_eq!(ids.len(), 1, "all 20 got the same task");
    let alices = Tasks::find()
        .filter(Column::UserId.eq("alice"))
        .all(&app.db)
        .await
        .unwrap();
    assert_eq!(alices.len(), 1);
    assert_eq!(alices[0].version, 1, "the repeats changed nothing");
    let repeat = create_via_api(&app, &app.user_token("alice"), input.clone()).await;
    assert!(ids.contains(&gql_id(&repeat)), "a later retry gets it too");

    let bobs = create_via_api(&app, &app.user_token("bob"), input.clone()).await;
    assert!(!ids.contains(&gql_id(&bobs)), "keys are per user");

    let other_type =
        json!({ "type": "report", "metadata": { "prompt": "a fox" }, "idempotencyKey": "job-42" });
    let body = app
        .gql(
            Some(&app.user_token("alice")),
            CREATE,
            json!({ "input": other_type }),
        )
        .await;
    assert_eq!(error_code(&body), Some("CONFLICT"), "{body}");
    assert_eq!(all_tasks(&app.db).await.len(), 2);
}

// ---- retention ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prune_finished_deletes_only_old_terminal_tasks_in_batches() {
    let test = TestDb::new().await;
    let (service, db) = test.service().await;
    let ids = create_many(&service, &alice(), "image", 1200).await;
    let (old_done, rest) = ids.split_at(1100);
    let (recent_done, rest) = rest.split_at(20);
    let (processing, pending) = rest.split_at(40);

    // Finish 1120 tasks three ways, concurrently.
    let finished: Vec<Uuid> = old_done.iter().chain(recent_done).copied().collect();
    let finishers: Vec<_> = finished
        .chunks(finished.len().div_ceil(CLAIMERS))
        .map(|chunk| {
            let (service, chunk) = (service.clone(), chunk.to_vec());
            tokio::spawn(async move {
                for (i, id) in chunk.into_iter().enumerate() {
                    match i % 3 {
                        0 => {
                            service
                                .update_task_status(&as_worker(), completion(id, 0, "r"))
                                .await
                                .unwrap();
                        }
                        1 => {
                            let mut update = StatusUpdate::new(id, TaskStatus::Failed);
                            update.error_message = Some("boom".into());
                            service
                                .update_task_status(&as_worker(), update)
                                .await
                                .unwrap();
                        }
                        _ => {
                            service.cancel_task(id, &alice()).await.unwrap();
                        }
                    }
                }
            })
        })
        .collect();
    for finisher in finishers {
        finisher.await.unwrap();
    }
    for &id in processing {
        let update = StatusUpdate::new(id, TaskStatus::Processing);
        service
            .update_task_status(&as_worker(), update)
            .await
            .unwrap();
    }
    // Age everything but the recent 20 by two days: created, updated and finished.
    let two_days_ago = Utc::now() - chrono::Duration::days(2);
    let aged: Vec<Uuid> = old_done
        .iter()
        .chain(processing)
        .chain(pending)
        .copied()
        .collect();
    for chunk in aged.chunks(400) {
        Tasks::update_many()
            .col_expr(Column::CreatedAt, Expr::value(two_days_ago))
            .col_expr(Column::UpdatedAt, Expr::value(two_days_ago))
            .col_expr(Column::StartedAt, Expr::value(two_days_ago))
            .filter(Column::Id.is_in(chunk.to_vec()))
            .exec(&db)
            .await
            .unwrap();
    }
    Tasks::update_many()
        .col_expr(Column::CompletedAt, Expr::value(two_days_ago))
        .filter(Column::Id.is_in(old_done.to_vec()))
        .exec(&db)
        .await
        .unwrap();

    let deleted = service
        .prune_finished(Duration::from_secs(86_400))
        .await
        .unwrap();
    assert_eq!(
        deleted, 1100,
        "every old terminal task, over several batches"
    );

    let left: HashSet<Uuid> = all_tasks(&db).await.iter().map(|t| t.id).collect();
    let kept: HashSet<Uuid> = recent_done
        .iter()
        .chain(processing)
        .chain(pending)
        .copied()
        .collect();
    assert_eq!(left, kept);
    let counts = by_status(&all_tasks(&db).await);
    assert_eq!(counts.get("pending"), Some(&40));
    assert_eq!(counts.get("processing"), Some(&40));
    assert_eq!(
        service
            .prune_finished(Duration::from_secs(86_400))
            .await
            .unwrap(),
        0
    );
    assert_eq!(count_rows(&db).await, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_pruning_at_once_delete_each_task_once() {
    let test = TestDb::new().await;
    let (one, db) = test.service().await;
    let (two, _) = test.service().await;
    let ids = create_many(&one, &alice(), "image", 1200).await;
    let two_days_ago = Utc::now() - chrono::Duration::days(2);
    for chunk in ids.chunks(400) {
        Tasks::update_many()
            .col_expr(Column::Status, Expr::value(TaskStatus::Completed.as_str()))
            .col_expr(Column::CompletedAt, Expr::value(two_days_ago))
            .filter(Column::Id.is_in(chunk.to_vec()))
            .exec(&db)
            .await
            .unwrap();
    }
    let start = Arc::new(Barrier::new(4));
    let passes: Vec<_> = (0..4)
        .map(|i| {
            let service = if i % 2 == 0 { one.clone() } else { two.clone() };
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                service.prune_finished(Duration::from_secs(86_400)).await
            })
        })
        .collect();
    let mut deleted = 0;
    for pass in passes {
        deleted += pass.await.unwrap().expect("a retention pass never fails");
    }
    assert_eq!(deleted, 1200, "each task deleted (and reported) once");
    assert_eq!(count_rows(&db).await, 0);
}

// ---- two instances -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_reaping_one_database_requeue_each_task_once() {
    let (a, b) = two_apps().await;
    const N: usize = 300;
    const REAP_PASSES: usize = 8;
    let ids = create_many(&a.service, &alice(), "image", N).await;

    // Round 1 and 2: the leases lapse and both instances' reapers, plus
    // direct passes started at the same instant on each, race to requeue.
    for round in 1..=2 {
        for _ in 0..N {
            let service = if round == 1 { &b.service } else { &a.service };
            service
                .claim_task(&as_worker(), claim_request("w", 60))
                .await
                .unwrap()
                .expect("a task");
        }
        expire_leases(&a.db, &ids).await;
        let services = [a.service.clone(), b.service.clone()];
        let start = Arc::new(Barrier::new(REAP_PASSES));
        let passes: Vec<_> = (0..REAP_PASSES)
            .map(|i| {
                let (service, start) = (services[i % 2].clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    service.reap_expired_leases().await
                })
            })
            .collect();
        let mut direct = 0;
        for pass in passes {
            let outcome = pass.await.unwrap().expect("a reaper pass never fails");
            direct += outcome.requeued;
        }
        assert!(direct <= N, "requeued {direct} of {N}");
        let tasks = eventually("every task requeued", Duration::from_secs(15), || async {
            let tasks = all_tasks(&a.db).await;
            tasks
                .iter()
                .all(|t| t.status == TaskStatus::Pending)
                .then_some(tasks)
        })
        .await;
        for task in &tasks {
            // Per round: one claim and one requeue, each once.
            assert_eq!(task.attempts, round, "{task:?}");
            assert_eq!(
                task.version,
                1 + 2 * round as i64,
                "requeued twice: {task:?}"
            );
        }
    }

    // Round 3 (the default 3 attempts): real 1 s leases lapse with only the
    // two background reapers running, and each task fails exactly once.
    for _ in 0..N {
        b.service
            .claim_task(&as_worker(), claim_request("w", 1))
            .await
            .unwrap()
            .expect("a task");
    }
    let tasks = eventually("every task failed", Duration::from_secs(20), || async {
        let tasks = all_tasks(&b.db).await;
        tasks
            .iter()
            .all(|t| t.status == TaskStatus::Failed)
            .then_some(tasks)
    })
    .await;
    for task in &tasks {
        assert_eq!((task.attempts, task.version), (3, 7), "{task:?}");
        let message = task.error_message.as_deref().unwrap_or_default();
        assert!(message.contains("after 3 attempt"), "{message}");
    }
}

// ---- the example worker ---------------------------------------------------------

fn example_config(app: &TestApp) -> worker_client::WorkerConfig {
    let mut config =
        worker_client::WorkerConfig::new(format!("{}/graphql", app.base), app.worker_token());
    config.concurrency = 3;
    config.lease_seconds = 10;
    config.steps = 2;
    config.step_time = Duration::from_millis(20);
    config.exit_when_idle = true;
    config.worker_id = "example".into();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_example_worker_completes_users_tasks_end_to_end() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let mut wanted = Vec::new();
    for i in 0..12 {
        let task_type = if i % 3 == 0 {
            "report"
        } else {
            "concept.image"
        };
        let task = create_via_api(
            &app,
            &alice,
            json!({ "type": task_type, "metadata": { "n": i } }),
        )
        .await;
        wanted.push(task["id"].as_str().unwrap().to_owned());
    }
    let email = create_via_api(&app, &alice, json!({ "type": "email" })).await;

    let mut config = example_config(&app);
    config.types = vec!["concept.image".into(), "report".into()];
    let report = tokio::time::timeout(Duration::from_secs(60), worker_client::run(config))
        .await
        .expect("the worker exits when idle")
        .expect("the worker runs cleanly");
    assert_eq!(
        report,
        worker_client::Report {
            completed: 12,
            abandoned: 0
        }
    );

    // What alice sees.
    for id in &wanted {
        let task = data(app.gql(Some(&alice), TASK, json!({ "id": id })).await)["task"].clone();
        assert_eq!(task["status"], "COMPLETED", "{task}");
        assert_eq!(task["resultId"], worker_client::result_id_for(id));
        assert_eq!(
            (&task["progress"], &task["attempts"]),
            (&json!(100), &json!(1))
        );
    }
    let untouched = data(
        app.gql(Some(&alice), TASK, json!({ "id": email["id"] }))
            .await,
    );
    assert_eq!(
        untouched["task"]["status"], "PENDING",
        "not a type it takes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_example_worker_stops_after_max_tasks() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    for _ in 0..8 {
        create_via_api(&app, &alice, json!({ "type": "image" })).await;
    }
    let mut config = example_config(&app);
    config.max_tasks = Some(5);
    config.exit_when_idle = false;
    let report = tokio::time::timeout(Duration::from_secs(60), worker_client::run(config))
        .await
        .expect("the worker stops after 5 tasks")
        .expect("the worker runs cleanly");
    assert_eq!(report.completed, 5);
    assert_statuses(&app.db, &[("completed", 5), ("pending", 3)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_example_worker_drops_a_task_cancelled_under_it() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let task = create_via_api(&app, &alice, json!({ "type": "image" })).await;
    let id = gql_id(&task);
    let mut config = example_config(&app);
    config.concurrency = 1;
    config.steps = 50;
    config.step_time = Duration::from_millis(100);
    let worker = tokio::spawn(worker_client::run(config));

    eventually(
        "the worker to report progress",
        Duration::from_secs(15),
        || async {
            let task = fetch(&app.db, id).await;
            (task.progress.is_some()).then_some(())
        },
    )
    .await;
    let cancelled = data(app.gql(Some(&alice), CANCEL, json!({ "id": id })).await);
    assert_eq!(cancelled["cancelTask"]["status"], "CANCELLED");

    let report = tokio::time::timeout(Duration::from_secs(30), worker)
        .await
        .expect("the worker gives up at its next heartbeat")
        .expect("joined")
        .expect("the worker runs cleanly");
    assert_eq!(
        report,
        worker_client::Report {
            completed: 0,
            abandoned: 1
        }
    );
    let last = fetch(&app.db, id).await;
    assert_eq!(last.status, TaskStatus::Cancelled);
    assert!(last.result_id.is_none());
}
