//! The queue through the real router: `runAt`, priority, the owners' turns,
//! retryable failures and their backoff, task type policies (attempts,
//! backoff, pause, the concurrency cap), and fencing across `retryTask` and
//! the reaper. On SQLite by default, on PostgreSQL when
//! `TASKQL_TEST_DATABASE_URL` is set.
mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use common::*;
use entity::tasks::Column;
use entity::{TaskStatus, Tasks};
use sea_orm::prelude::Expr;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter};
use serde_json::{Value, json};
use taskql::service::TaskService;
use tokio::sync::Barrier;
use uuid::Uuid;

const FIELDS: &str = "id type status userId attempts priority maxAttempts runAt createdAt \
                      updatedAt startedAt completedAt errorMessage resultId workerId leaseExpiresAt";
const POLICY_FIELDS: &str = "type policy { maxAttempts backoff { initialSeconds factor maxSeconds jitter } concurrency paused } pending processing";

// ---- set-up ------------------------------------------------------------------

/// One app on a fresh database (dropped after the test).
async fn fresh_app() -> TestApp {
    fresh_app_with(|_| {}).await
}

async fn fresh_app_with(tweak: impl FnOnce(&mut taskql::config::Settings)) -> TestApp {
    spawn_app_with(Arc::new(TestDb::new().await), tweak).await
}

// ---- helpers -------------------------------------------------------------------

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn seconds(delta: chrono::TimeDelta) -> f64 {
    delta.num_microseconds().expect("a short delta") as f64 / 1e6
}

/// Creates a task as the owner of `token`; every field of it.
async fn create(app: &TestApp, token: &str, input: Value) -> Value {
    app.create_task(token, input, FIELDS).await
}

/// `createTask`'s whole answer, errors included.
async fn try_create(app: &TestApp, token: &str, input: Value) -> Value {
    let query = format!(
        "mutation($input: CreateTaskInput!) {{ createTask(input: $input) {{ {FIELDS} }} }}"
    );
    app.gql(Some(token), &query, json!({ "input": input }))
        .await
}

/// `claimTask` as a worker with a 60 s lease: the task, or null.
async fn claim(app: &TestApp, types: Value) -> Value {
    claim_with(app, types, 60, "w").await
}

async fn claim_with(app: &TestApp, types: Value, lease: i64, worker_id: &str) -> Value {
    let query = format!(
        "mutation($types: [String!], $lease: Int, $worker: String) {{
           claimTask(types: $types, leaseSeconds: $lease, workerId: $worker) {{ {FIELDS} }}
         }}"
    );
    let variables = json!({ "types": types, "lease": lease, "worker": worker_id });
    data(app.gql(Some(&app.worker_token()), &query, variables).await)["claimTask"].clone()
}

/// Claims until nothing is runnable; the claims in order.
async fn claim_all(app: &TestApp, types: Value) -> Vec<Value> {
    let mut claimed = Vec::new();
    loop {
        let task = claim(app, types.clone()).await;
        if task.is_null() {
            return claimed;
        }
        claimed.push(task);
    }
}

/// `updateTaskStatus(FAILED)` as a worker, fenced by `attempt`; the whole answer.
async fn fail(
    app: &TestApp,
    id: &str,
    attempt: i64,
    message: Option<&str>,
    retryable: bool,
) -> Value {
    let mut input =
        json!({ "id": id, "status": "FAILED", "expectedAttempt": attempt, "retryable": retryable });
    if let Some(message) = message {
        input["errorMessage"] = json!(message);
    }
    app.update_status(input, FIELDS).await
}

/// `updateTaskStatus(COMPLETED)` as a worker, fenced by `attempt`; the whole answer.
async fn complete(app: &TestApp, id: &str, attempt: i64) -> Value {
    let input = json!({ "id": id, "status": "COMPLETED", "resultId": format!("r-{id}"), "expectedAttempt": attempt });
    app.update_status(input, FIELDS).await
}

/// The task as its owner (the token's user) sees it.
async fn task(app: &TestApp, token: &str, id: &str) -> Value {
    let query = format!("query($id: ID!) {{ task(id: $id) {{ {FIELDS} }} }}");
    data(app.gql(Some(token), &query, json!({ "id": id })).await)["task"].clone()
}

async fn retry(app: &TestApp, token: &str, id: &str) -> Value {
    let query = format!("mutation($id: ID!) {{ retryTask(id: $id) {{ {FIELDS} }} }}");
    data(app.gql(Some(token), &query, json!({ "id": id })).await)["retryTask"].clone()
}

/// `setTaskTypePolicy` with `token`; the whole answer.
async fn try_set_policy(app: &TestApp, token: &str, task_type: &str, policy: Value) -> Value {
    let query = format!(
        "mutation($type: String!, $policy: TaskTypePolicyInput!) {{
           setTaskTypePolicy(type: $type, policy: $policy) {{ {POLICY_FIELDS} }}
         }}"
    );
    app.gql(
        Some(token),
        &query,
        json!({ "type": task_type, "policy": policy }),
    )
    .await
}

/// `setTaskTypePolicy` as a worker: the task type it returns.
async fn set_policy(app: &TestApp, task_type: &str, policy: Value) -> Value {
    let body = try_set_policy(app, &app.worker_token(), task_type, policy).await;
    data(body)["setTaskTypePolicy"].clone()
}

/// `taskTypes` as a worker.
async fn task_types(app: &TestApp) -> Vec<Value> {
    let query = format!("{{ taskTypes {{ {POLICY_FIELDS} }} }}");
    let body = data(app.gql(Some(&app.worker_token()), &query, json!({})).await);
    body["taskTypes"].as_array().expect("a list").clone()
}

/// The policy of a type nobody set, on a server whose default is `max_attempts`.
fn default_policy(max_attempts: i64) -> Value {
    json!({
        "maxAttempts": max_attempts,
        "backoff": { "initialSeconds": 1.0, "factor": 2.0, "maxSeconds": 3600.0, "jitter": true },
        "concurrency": null,
        "paused": false,
    })
}

/// Makes a backed-off task runnable now, as if its backoff had passed.
async fn backoff_passed(db: &impl ConnectionTrait, id: &str) {
    let past = Utc::now() - chrono::Duration::seconds(1);
    Tasks::update_many()
        .col_expr(Column::RunAt, Expr::value(past))
        .filter(Column::Id.eq(Uuid::parse_str(id).expect("uuid")))
        .exec(db)
        .await
        .expect("move run_at");
}

/// Puts the lease of `id` in the past, as if its worker went silent long ago.
async fn expire_lease(db: &impl ConnectionTrait, id: &str) {
    let past = Utc::now() - chrono::Duration::minutes(5);
    Tasks::update_many()
        .col_expr(Column::LeaseExpiresAt, Expr::value(past))
        .filter(Column::Id.eq(Uuid::parse_str(id).expect("uuid")))
        .exec(db)
        .await
        .expect("expire the lease");
}

/// The delay a backed-off task waits: `runAt` minus the time of the
/// failure (its `updatedAt`), in seconds.
fn delay_of(task: &Value) -> f64 {
    seconds(time(&task["runAt"]) - time(&task["updatedAt"]))
}

/// Asserts that `delay` is `want` seconds, to the millisecond.
fn assert_delay(delay: f64, want: f64, what: &str) {
    assert!(
        (delay - want).abs() < 0.001,
        "{what}: waits {delay} s, not {want} s"
    );
}

// ---- runAt ---------------------------------------------------------------------

#[tokio::test]
async fn a_task_with_run_at_in_the_future_is_claimed_only_once_it_passes() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    let run_at = Utc::now() + chrono::Duration::milliseconds(2000);
    let later = create(
        &app,
        &alice,
        json!({ "type": "report", "runAt": rfc3339(run_at) }),
    )
    .await;
    assert_eq!(later["status"], "PENDING");
    assert_eq!(
        time(&later["runAt"]),
        DateTime::from_timestamp_micros(run_at.timestamp_micros()).unwrap(),
        "runAt is kept to the microsecond"
    );

    // An answer that came before runAt must be null (the server claimed
    // before it answered); a slower one checks nothing.
    let answer = claim(&app, json!(null)).await;
    assert!(
        Utc::now() >= run_at || answer.is_null(),
        "claimed early: {answer}"
    );
    let answer = claim(&app, json!(["report"])).await;
    assert!(
        Utc::now() >= run_at || answer.is_null(),
        "claimed early: {answer}"
    );

    // A task created after it without runAt is runnable now and goes first.
    let now = create(&app, &alice, json!({ "type": "report" })).await;
    assert_eq!(
        now["runAt"], now["createdAt"],
        "runAt defaults to createdAt"
    );
    assert_eq!(claim(&app, json!(["report"])).await["id"], now["id"]);
    let answer = claim(&app, json!(null)).await;
    assert!(
        Utc::now() >= run_at || answer.is_null(),
        "claimed early: {answer}"
    );

    let claimed = eventually(
        "the task to become runnable",
        Duration::from_secs(10),
        || async {
            let task = claim(&app, json!(null)).await;
            (!task.is_null()).then_some(task)
        },
    )
    .await;
    assert_eq!(claimed["id"], later["id"]);
    assert_eq!(
        (&claimed["status"], &claimed["attempts"]),
        (&json!("PROCESSING"), &json!(1))
    );
    assert!(
        time(&claimed["startedAt"]) >= run_at,
        "claimed at {} before its runAt {run_at}",
        claimed["startedAt"]
    );
    assert_eq!(claimed["runAt"], later["runAt"], "a claim leaves runAt");
}

#[tokio::test]
async fn run_at_is_kept_as_given_in_any_offset_and_a_past_one_is_runnable_at_once() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    let given = "2030-05-06T09:10:11.123456+02:00";
    let future = create(&app, &alice, json!({ "type": "image", "runAt": given })).await;
    assert_eq!(
        time(&future["runAt"]),
        time(&json!("2030-05-06T07:10:11.123456Z"))
    );
    let seen = task(&app, &alice, &id_of(&future)).await;
    assert_eq!(time(&seen["runAt"]), time(&json!(given)), "as stored");

    let an_hour_ago = Utc::now() - chrono::Duration::hours(1);
    let past = create(
        &app,
        &alice,
        json!({ "type": "image", "runAt": rfc3339(an_hour_ago) }),
    )
    .await;
    assert_eq!(
        time(&past["runAt"]).timestamp_micros(),
        an_hour_ago.timestamp_micros()
    );
    assert!(time(&past["runAt"]) < time(&past["createdAt"]));
    let claimed = claim(&app, json!(null)).await;
    assert_eq!(claimed["id"], past["id"]);
    assert!(
        claim(&app, json!(null)).await.is_null(),
        "the task due in 2030 waits"
    );

    for bad in ["tomorrow", "2030-13-01T00:00:00Z", ""] {
        let body = try_create(&app, &alice, json!({ "type": "image", "runAt": bad })).await;
        assert!(body["errors"][0]["message"].is_string(), "{bad}: {body}");
        assert!(body["data"].is_null(), "{bad}: {body}");
    }
}

// ---- priority --------------------------------------------------------------------

#[tokio::test]
async fn higher_priority_is_claimed_first_whatever_the_creation_order() {
    let app = fresh_app().await;
    let (alice, bob) = (app.user_token("alice"), app.user_token("bob"));
    // Bob's task comes first and would go first by turns: priority wins.
    let bobs = create(&app, &bob, json!({ "type": "image" })).await;
    assert_eq!(bobs["priority"], 0, "the default priority");
    let mut by_priority = Vec::new();
    for priority in [0, -5, 10, 100, -100, 10] {
        let task = create(
            &app,
            &alice,
            json!({ "type": "image", "priority": priority }),
        )
        .await;
        assert_eq!(task["priority"], priority);
        by_priority.push((priority, id_of(&task)));
    }
    // Highest first; alice's two 10s in the order she created them.
    by_priority.sort_by_key(|(priority, _)| -priority);
    let mut want: Vec<String> = by_priority.into_iter().map(|(_, id)| id).collect();
    // Bob's 0 shares turn 0 with alice's 0 (her first task) and came earlier.
    want.insert(3, id_of(&bobs));

    let claimed: Vec<String> = claim_all(&app, json!(null))
        .await
        .iter()
        .map(id_of)
        .collect();
    assert_eq!(claimed, want);
}

#[tokio::test]
async fn priority_and_max_attempts_out_of_range_are_bad_user_input_naming_the_range() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    // Each refusal names the field and its bounds.
    let cases = [
        (
            "priority",
            ["-100", "100"],
            vec![101, -101, i32::MAX, i32::MIN],
        ),
        ("maxAttempts", ["1", "100"], vec![0, -1, 101, i32::MAX]),
    ];
    for (field, bounds, bads) in cases {
        for bad in bads {
            let body = try_create(&app, &alice, json!({ "type": "image", field: bad })).await;
            assert_eq!(
                error_code(&body),
                Some("BAD_USER_INPUT"),
                "{field} {bad}: {body}"
            );
            let message = body["errors"][0]["message"].as_str().unwrap_or_default();
            assert!(
                message.contains(field) && bounds.iter().all(|bound| message.contains(bound)),
                "{field} {bad}: {message}"
            );
        }
    }
    assert_eq!(count_rows(&app.db).await, 0, "nothing was created");

    // The bounds themselves are accepted.
    for (priority, max_attempts) in [(-100, 1), (100, 100)] {
        let task = create(
            &app,
            &alice,
            json!({ "type": "image", "priority": priority, "maxAttempts": max_attempts }),
        )
        .await;
        assert_eq!(
            (&task["priority"], &task["maxAttempts"]),
            (&json!(priority), &json!(max_attempts))
        );
    }
}

// ---- the owners' turns -------------------------------------------------------------

#[tokio::test]
async fn one_task_of_a_second_owner_is_claimed_first_or_second_after_thirty_of_the_first() {
    let app = fresh_app().await;
    let (alice, bob) = (app.user_token("alice"), app.user_token("bob"));
    let mut alices = Vec::new();
    for i in 0..30 {
        alices.push(id_of(
            &create(
                &app,
                &alice,
                json!({ "type": "image", "metadata": { "n": i } }),
            )
            .await,
        ));
    }
    let bobs = id_of(&create(&app, &bob, json!({ "type": "image" })).await);

    let claimed: Vec<String> = claim_all(&app, json!(["image"]))
        .await
        .iter()
        .map(id_of)
        .collect();
    assert!(
        claimed[..2].contains(&bobs),
        "bob's task was claim #{} of 31",
        claimed
            .iter()
            .position(|id| *id == bobs)
            .map_or(0, |i| i + 1)
    );
    // Alice's own tasks still come in the order she created them.
    let alice_order: Vec<&String> = claimed.iter().filter(|id| **id != bobs).collect();
    assert_eq!(alice_order, alices.iter().collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_task_of_a_second_owner_goes_first_or_second_after_thirty_created_at_once() {
    let app = Arc::new(fresh_app().await);
    let start = Arc::new(Barrier::new(30));
    let creators: Vec<_> = (0..30)
        .map(|i| {
            let (app, start) = (app.clone(), start.clone());
            tokio::spawn(async move {
                let alice = app.user_token("alice");
                start.wait().await;
                id_of(
                    &create(
                        &app,
                        &alice,
                        json!({ "type": "image", "metadata": { "n": i } }),
                    )
                    .await,
                )
            })
        })
        .collect();
    let mut alices = HashSet::new();
    for creator in creators {
        alices.insert(creator.await.expect("creator"));
    }
    assert_eq!(alices.len(), 30);
    let bobs = id_of(&create(&app, &app.user_token("bob"), json!({ "type": "image" })).await);

    let claimed: Vec<String> = claim_all(&app, json!(["image"]))
        .await
        .iter()
        .map(id_of)
        .collect();
    assert_eq!(claimed.len(), 31);
    assert!(
        claimed[..2].contains(&bobs),
        "bob's task was claim #{} of 31",
        claimed
            .iter()
            .position(|id| *id == bobs)
            .map_or(0, |i| i + 1)
    );
    assert_eq!(claimed.iter().filter(|id| alices.contains(*id)).count(), 30);
}

#[tokio::test]
async fn owners_take_turns_and_a_newcomer_starts_at_the_turn_being_served() {
    let app = fresh_app().await;
    let (alice, bob, carol) = (
        app.user_token("alice"),
        app.user_token("bob"),
        app.user_token("carol"),
    );
    for _ in 0..30 {
        create(&app, &alice, json!({ "type": "image" })).await;
    }
    let mut bobs = HashSet::new();
    for _ in 0..5 {
        bobs.insert(id_of(&create(&app, &bob, json!({ "type": "image" })).await));
    }
    // Turns 0..4 of both: bob's five are all within the first ten claims.
    let mut first_ten = Vec::new();
    for _ in 0..10 {
        first_ten.push(id_of(&claim(&app, json!(null)).await));
    }
    assert_eq!(
        first_ten.iter().filter(|id| bobs.contains(*id)).count(),
        5,
        "alice's and bob's tasks alternate: {first_ten:?}"
    );

    // Alice is at turn 5 now; carol, new, joins that turn, not the back of the queue.
    let carols = id_of(&create(&app, &carol, json!({ "type": "image" })).await);
    let next = [
        claim(&app, json!(null)).await,
        claim(&app, json!(null)).await,
    ];
    assert!(
        next.iter().any(|t| id_of(t) == carols),
        "carol's task is claimed first or second: {next:?}"
    );
}

#[tokio::test]
async fn a_newcomers_turn_is_the_one_served_at_its_priority() {
    let app = fresh_app().await;
    let (alice, bob) = (app.user_token("alice"), app.user_token("bob"));

    // Alice's backlog, then one urgent task of hers: claimed first, by priority.
    for _ in 0..30 {
        create(&app, &alice, json!({ "type": "image" })).await;
    }
    let urgent = create(&app, &alice, json!({ "type": "image", "priority": 10 })).await;
    let bobs = id_of(&create(&app, &bob, json!({ "type": "image" })).await);
    let claimed: Vec<String> = claim_all(&app, json!(null))
        .await
        .iter()
        .map(id_of)
        .collect();
    assert_eq!(claimed[0], id_of(&urgent));
    let place = claimed
        .iter()
        .position(|id| *id == bobs)
        .map_or(0, |i| i + 1);

    // Alice's backlog, then one urgent task of hers due tomorrow: it is not
    // runnable, and alice's first task is the one being served.
    for _ in 0..30 {
        create(&app, &alice, json!({ "type": "report" })).await;
    }
    let tomorrow = rfc3339(Utc::now() + chrono::Duration::days(1));
    create(
        &app,
        &alice,
        json!({ "type": "report", "priority": 10, "runAt": tomorrow }),
    )
    .await;
    let bobs = id_of(&create(&app, &bob, json!({ "type": "report" })).await);
    let claimed: Vec<String> = claim_all(&app, json!(null))
        .await
        .iter()
        .map(id_of)
        .collect();
    let place_scheduled = claimed
        .iter()
        .position(|id| *id == bobs)
        .map_or(0, |i| i + 1);
    assert!(
        (2..=3).contains(&place) && (1..=2).contains(&place_scheduled),
        "bob's task, created after alice's 30 and her one urgent task, was claim #{place} \
         (want #2 or #3); after her 30 and one urgent task due tomorrow, claim #{place_scheduled} \
         (want #1 or #2)"
    );
}

// ---- retryable failures and backoff ------------------------------------------------------

/// Fails attempt `attempt` of `id` retryably and checks that it backs off
/// for `wait` seconds; the task as the failure left it.
async fn fail_and_back_off(
    app: &TestApp,
    id: &str,
    attempt: i64,
    message: Option<&str>,
    wait: f64,
) -> Value {
    let before = Utc::now();
    let failed = data(fail(app, id, attempt, message, true).await)["updateTaskStatus"].clone();
    let after = Utc::now();
    assert_eq!(failed["status"], "PENDING", "attempt {attempt}: {failed}");
    assert_eq!(failed["attempts"], attempt, "a backoff keeps attempts");
    assert!(failed["workerId"].is_null() && failed["leaseExpiresAt"].is_null());
    assert!(failed["completedAt"].is_null());
    let run_at = time(&failed["runAt"]);
    assert!(
        run_at > before,
        "runAt {run_at} is after the failure at {before}"
    );
    assert!(
        run_at <= after + chrono::Duration::microseconds((wait * 1e6) as i64 + 1000),
        "runAt {run_at} is at most {wait} s after {after}"
    );
    assert_delay(delay_of(&failed), wait, &format!("attempt {attempt}"));
    failed
}

/// Claims `id` again once its backoff (until `run_at`) has passed, and
/// not before.
async fn claim_after_backoff(app: &TestApp, id: &str, run_at: DateTime<Utc>) -> Value {
    let early = claim(app, json!(null)).await;
    // The server claimed before this answer came: had it come before runAt,
    // the claim was early. (A slow answer checks nothing here.)
    if Utc::now() < run_at {
        assert!(
            early.is_null(),
            "claimed before its runAt {run_at}: {early}"
        );
    }
    let again = if early.is_null() {
        eventually("the backoff to pass", Duration::from_secs(10), || async {
            let task = claim(app, json!(null)).await;
            (!task.is_null()).then_some(task)
        })
        .await
    } else {
        early
    };
    assert_eq!(again["id"], json!(id));
    // A claim's time is its updatedAt.
    assert!(
        time(&again["updatedAt"]) >= run_at,
        "claimed before its runAt {run_at}: {again}"
    );
    again
}

#[tokio::test]
async fn a_retryable_failure_backs_off_then_fails_for_good_at_max_attempts() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    set_policy(
        &app,
        "flaky",
        json!({ "maxAttempts": 3, "backoff": { "initialSeconds": 0.3, "factor": 2, "jitter": false } }),
    )
    .await;
    let created = create(&app, &alice, json!({ "type": "flaky" })).await;
    let id = id_of(&created);
    assert_eq!(created["maxAttempts"], 3, "the type's policy");

    assert_eq!(claim(&app, json!(null)).await["attempts"], 1);
    let failed = fail_and_back_off(&app, &id, 1, Some("boom 1"), 0.3).await;
    assert_eq!(failed["errorMessage"], "boom 1");
    let again = claim_after_backoff(&app, &id, time(&failed["runAt"])).await;
    assert_eq!(again["attempts"], 2);
    assert_eq!(again["errorMessage"], "boom 1", "kept while it runs again");

    // No new message: the last one is kept. The delay doubles.
    let failed = fail_and_back_off(&app, &id, 2, None, 0.6).await;
    assert_eq!(failed["errorMessage"], "boom 1");
    let seen = task(&app, &alice, &id).await;
    assert_eq!(
        (&seen["status"], &seen["errorMessage"]),
        (&json!("PENDING"), &json!("boom 1")),
        "what the owner sees while it waits"
    );
    let again = claim_after_backoff(&app, &id, time(&failed["runAt"])).await;
    assert_eq!(again["attempts"], 3);

    // The third attempt is the last: a retryable failure is final.
    let last = data(fail(&app, &id, 3, Some("boom 3"), true).await)["updateTaskStatus"].clone();
    assert_eq!(
        (&last["status"], &last["errorMessage"], &last["attempts"]),
        (&json!("FAILED"), &json!("boom 3"), &json!(3))
    );
    assert!(!last["completedAt"].is_null() && last["leaseExpiresAt"].is_null());
    assert!(claim(&app, json!(null)).await.is_null(), "failed for good");
    let seen = task(&app, &alice, &id).await;
    assert_eq!(
        (&seen["status"], &seen["errorMessage"]),
        (&json!("FAILED"), &json!("boom 3"))
    );

    // Without retryable, FAILED is final even with attempts left.
    let other = id_of(&create(&app, &alice, json!({ "type": "flaky" })).await);
    assert_eq!(claim(&app, json!(null)).await["id"], json!(other));
    let failed =
        data(fail(&app, &other, 1, Some("fatal"), false).await)["updateTaskStatus"].clone();
    assert_eq!(failed["status"], "FAILED");
    assert!(claim(&app, json!(null)).await.is_null());
}

#[tokio::test]
async fn backoff_grows_by_its_factor_up_to_max_seconds() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    set_policy(
        &app,
        "render",
        json!({ "backoff": { "initialSeconds": 10, "factor": 2, "maxSeconds": 25, "jitter": false } }),
    )
    .await;
    let id = id_of(&create(&app, &alice, json!({ "type": "render", "maxAttempts": 5 })).await);
    // After attempt n: 10 × 2^(n−1), at most 25.
    for (attempt, want) in [(1, 10.0), (2, 20.0), (3, 25.0), (4, 25.0)] {
        let claimed = claim(&app, json!(null)).await;
        assert_eq!(
            (&claimed["id"], &claimed["attempts"]),
            (&json!(id), &json!(attempt))
        );
        let failed =
            data(fail(&app, &id, attempt, Some("again"), true).await)["updateTaskStatus"].clone();
        assert_eq!(failed["status"], "PENDING", "attempt {attempt}");
        assert_delay(delay_of(&failed), want, &format!("attempt {attempt}"));
        assert!(
            claim(&app, json!(null)).await.is_null(),
            "attempt {attempt}: backing off"
        );
        backoff_passed(&app.db, &id).await;
    }
    let claimed = claim(&app, json!(null)).await;
    assert_eq!(claimed["attempts"], 5);
    let last = data(fail(&app, &id, 5, Some("again"), true).await)["updateTaskStatus"].clone();
    assert_eq!(last["status"], "FAILED", "the fifth attempt was the last");
}

#[tokio::test]
async fn jittered_backoff_waits_in_the_upper_half_of_the_delay() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    set_policy(
        &app,
        "jittery",
        json!({ "backoff": { "initialSeconds": 8, "factor": 2 } }),
    )
    .await;
    let policy = set_policy(&app, "jittery", json!({})).await;
    assert_eq!(
        policy["policy"]["backoff"]["jitter"], true,
        "jitter is on by default"
    );
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(id_of(
            &create(&app, &alice, json!({ "type": "jittery" })).await,
        ));
    }
    let mut delays = Vec::new();
    for round in 1..=2 {
        // After attempt 1 the delay is 8 s, after attempt 2 16 s.
        let full = 8.0 * f64::from(round);
        for _ in &ids {
            let claimed = claim(&app, json!(null)).await;
            assert_eq!(claimed["attempts"], round);
            let failed =
                data(fail(&app, &id_of(&claimed), round.into(), Some("x"), true).await)["updateTaskStatus"].clone();
            assert_eq!(failed["status"], "PENDING");
            let delay = delay_of(&failed);
            assert!(
                (full / 2.0 - 0.001..=full + 0.001).contains(&delay),
                "after attempt {round}: {delay} s is outside [{}, {full}]",
                full / 2.0
            );
            delays.push(delay);
        }
        assert!(claim(&app, json!(null)).await.is_null());
        for id in &ids {
            backoff_passed(&app.db, id).await;
        }
    }
    let distinct: HashSet<u64> = delays.iter().map(|d| d.to_bits()).collect();
    assert!(distinct.len() > 1, "every delay was the same: {delays:?}");
}

// ---- policies --------------------------------------------------------------------------

#[tokio::test]
async fn set_task_type_policy_returns_what_was_set_keeps_absent_fields_and_resets_nulls() {
    let app = fresh_app_with(|s| s.tasks.max_attempts = 4).await;
    let alice = app.user_token("alice");
    assert_eq!(
        task_types(&app).await,
        Vec::<Value>::new(),
        "a fresh database"
    );
    create(&app, &alice, json!({ "type": "image" })).await;
    create(&app, &alice, json!({ "type": "image" })).await;
    assert_eq!(claim(&app, json!(null)).await["type"], "image");
    assert_eq!(
        task_types(&app).await,
        vec![
            json!({ "type": "image", "policy": default_policy(4), "pending": 1, "processing": 1 })
        ],
        "a type with tasks and no policy has the defaults"
    );

    let everything = json!({
        "maxAttempts": 7,
        "backoff": { "initialSeconds": 0.5, "factor": 3.0, "maxSeconds": 60.0, "jitter": false },
        "concurrency": 4,
        "paused": true,
    });
    let set = set_policy(&app, "render", everything.clone()).await;
    assert_eq!(
        set,
        json!({ "type": "render", "policy": everything, "pending": 0, "processing": 0 })
    );

    // Absent fields stay: one backoff field, then nothing at all.
    let mut want = everything.clone();
    want["backoff"]["factor"] = json!(1.5);
    let set = set_policy(&app, "render", json!({ "backoff": { "factor": 1.5 } })).await;
    assert_eq!(set["policy"], want);
    assert_eq!(set_policy(&app, "render", json!({})).await["policy"], want);
    want["paused"] = json!(false);
    assert_eq!(
        set_policy(&app, "render", json!({ "paused": false })).await["policy"],
        want
    );

    // Explicit nulls: the server's default attempts, no cap; the rest stays.
    let set = set_policy(
        &app,
        "render",
        json!({ "maxAttempts": null, "concurrency": null }),
    )
    .await;
    want["maxAttempts"] = json!(4);
    want["concurrency"] = Value::Null;
    assert_eq!(set["policy"], want);
    // A null backoff or paused changes nothing.
    assert_eq!(
        set_policy(&app, "render", json!({ "backoff": null, "paused": null })).await["policy"],
        want
    );

    create(&app, &alice, json!({ "type": "render" })).await;
    assert_eq!(
        task_types(&app).await,
        vec![
            json!({ "type": "image", "policy": default_policy(4), "pending": 1, "processing": 1 }),
            json!({ "type": "render", "policy": want, "pending": 1, "processing": 0 }),
        ],
        "by name, with their queues"
    );
}

#[tokio::test]
async fn bad_policy_values_are_bad_user_input_and_change_nothing() {
    let app = fresh_app().await;
    let set = set_policy(
        &app,
        "render",
        json!({ "backoff": { "initialSeconds": 10, "maxSeconds": 100 } }),
    )
    .await;
    let before = set["policy"].clone();
    let cases = [
        ("render", json!({ "maxAttempts": 0 })),
        ("render", json!({ "maxAttempts": 101 })),
        ("render", json!({ "concurrency": 0 })),
        ("render", json!({ "concurrency": 100_001 })),
        ("render", json!({ "concurrency": -1 })),
        ("render", json!({ "backoff": { "initialSeconds": -1 } })),
        (
            "render",
            json!({ "backoff": { "initialSeconds": 604_801 } }),
        ),
        ("render", json!({ "backoff": { "maxSeconds": -1 } })),
        ("render", json!({ "backoff": { "maxSeconds": 604_801 } })),
        ("render", json!({ "backoff": { "factor": 0.5 } })),
        ("render", json!({ "backoff": { "factor": 101 } })),
        (
            "render",
            json!({ "backoff": { "initialSeconds": 5, "maxSeconds": 1 } }),
        ),
        // Against what is stored: the initial 10 s is above a max of 5 s.
        ("render", json!({ "backoff": { "maxSeconds": 5 } })),
        ("render", json!({ "backoff": { "initialSeconds": 101 } })),
        // A valid change alongside a bad one is refused whole.
        ("render", json!({ "paused": true, "maxAttempts": 0 })),
        ("Render", json!({ "paused": true })),
        ("a b", json!({ "paused": true })),
        ("", json!({ "paused": true })),
        (&*"x".repeat(65), json!({ "paused": true })),
    ];
    for (task_type, policy) in &cases {
        let body = try_set_policy(&app, &app.worker_token(), task_type, policy.clone()).await;
        assert_eq!(
            error_code(&body),
            Some("BAD_USER_INPUT"),
            "{task_type:?} {policy}: {body}"
        );
    }
    let types = task_types(&app).await;
    assert_eq!(types.len(), 1, "no other type got a policy: {types:?}");
    assert_eq!(types[0]["policy"], before, "render's policy is unchanged");

    // The bounds themselves are accepted.
    let edges = json!({
        "maxAttempts": 100,
        "backoff": { "initialSeconds": 0.0, "factor": 100.0, "maxSeconds": 604_800.0, "jitter": true },
        "concurrency": 100_000,
        "paused": false,
    });
    assert_eq!(
        set_policy(&app, "edge", edges.clone()).await["policy"],
        edges
    );
    let low = json!({ "maxAttempts": 1, "backoff": { "factor": 1.0, "maxSeconds": 0.0 }, "concurrency": 1 });
    let set = set_policy(&app, "edge", low).await;
    assert_eq!(
        (&set["policy"]["maxAttempts"], &set["policy"]["concurrency"]),
        (&json!(1), &json!(1))
    );
    assert_eq!(set["policy"]["backoff"]["factor"], json!(1.0));
    assert_eq!(set["policy"]["backoff"]["maxSeconds"], json!(0.0));
}

#[tokio::test]
async fn a_user_token_cannot_set_or_read_task_type_policies() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    create(&app, &alice, json!({ "type": "image" })).await;
    let body = try_set_policy(&app, &alice, "image", json!({ "paused": true })).await;
    assert_eq!(error_code(&body), Some("FORBIDDEN"), "{body}");
    let body = try_set_policy(&app, &alice, "mine", json!({ "maxAttempts": 9 })).await;
    assert_eq!(error_code(&body), Some("FORBIDDEN"), "{body}");
    let query = format!("{{ taskTypes {{ {POLICY_FIELDS} }} }}");
    let body = app.gql(Some(&alice), &query, json!({})).await;
    assert_eq!(error_code(&body), Some("FORBIDDEN"), "{body}");
    let body = app.gql(None, &query, json!({})).await;
    assert_eq!(error_code(&body), Some("UNAUTHENTICATED"), "{body}");

    assert_eq!(
        task_types(&app).await,
        vec![
            json!({ "type": "image", "policy": default_policy(3), "pending": 1, "processing": 0 })
        ],
        "nothing was set"
    );
    assert!(
        !claim(&app, json!(null)).await.is_null(),
        "image is not paused"
    );
}

#[tokio::test]
async fn a_tasks_own_max_attempts_overrides_its_types_policy_which_applies_to_later_tasks() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    let before = create(&app, &alice, json!({ "type": "report" })).await;
    assert_eq!(before["maxAttempts"], 3, "the server's default");

    set_policy(
        &app,
        "report",
        json!({ "maxAttempts": 1, "backoff": { "initialSeconds": 0 } }),
    )
    .await;
    let by_policy = create(&app, &alice, json!({ "type": "report" })).await;
    let own = create(&app, &alice, json!({ "type": "report", "maxAttempts": 2 })).await;
    assert_eq!(by_policy["maxAttempts"], 1);
    assert_eq!(own["maxAttempts"], 2);
    let unchanged = task(&app, &alice, &id_of(&before)).await;
    assert_eq!(unchanged["maxAttempts"], 3, "fixed when it was created");

    // Each budget holds: one attempt by the policy, two by its own.
    let mut outcomes = HashMap::new();
    for task in claim_all(&app, json!(null)).await {
        let failed =
            data(fail(&app, &id_of(&task), 1, Some("no"), true).await)["updateTaskStatus"].clone();
        outcomes.insert(id_of(&task), failed["status"].clone());
    }
    assert_eq!(
        outcomes,
        HashMap::from([
            (id_of(&before), json!("PENDING")),
            (id_of(&by_policy), json!("FAILED")),
            (id_of(&own), json!("PENDING")),
        ])
    );

    // Reset to the default: later tasks get 3 again, earlier ones keep theirs.
    set_policy(&app, "report", json!({ "maxAttempts": null })).await;
    let after = create(&app, &alice, json!({ "type": "report" })).await;
    assert_eq!(after["maxAttempts"], 3);
    assert_eq!(task(&app, &alice, &id_of(&own)).await["maxAttempts"], 2);
    assert_eq!(
        task(&app, &alice, &id_of(&by_policy)).await["maxAttempts"],
        1
    );
}

// ---- fencing across retryTask and the reaper ----------------------------------------------------

#[tokio::test]
async fn retry_task_never_lowers_attempts_fences_the_old_worker_and_gives_a_fresh_budget() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    set_policy(
        &app,
        "fenced",
        json!({ "backoff": { "initialSeconds": 0 } }),
    )
    .await;
    let id = id_of(&create(&app, &alice, json!({ "type": "fenced", "maxAttempts": 2 })).await);

    // Two attempts, each a retryable failure: the second is final.
    for attempt in 1..=2 {
        let claimed = claim_with(&app, json!(null), 60, "w-old").await;
        assert_eq!(claimed["attempts"], attempt);
        let failed =
            data(fail(&app, &id, attempt, Some("flaky"), true).await)["updateTaskStatus"].clone();
        let want = if attempt < 2 { "PENDING" } else { "FAILED" };
        assert_eq!(failed["status"], want, "attempt {attempt}");
    }
    assert!(claim(&app, json!(null)).await.is_null());

    let before = Utc::now();
    let retried = retry(&app, &alice, &id).await;
    let after = Utc::now();
    assert_eq!(retried["status"], "PENDING");
    assert_eq!(retried["attempts"], 2, "attempts never goes down");
    assert_eq!(retried["maxAttempts"], 2);
    assert!(retried["errorMessage"].is_null() && retried["workerId"].is_null());
    let run_at = time(&retried["runAt"]);
    assert!(
        before - chrono::Duration::milliseconds(1) <= run_at && run_at <= after,
        "runAt {run_at} is the time of the retry"
    );

    let claimed = claim_with(&app, json!(null), 60, "w-new").await;
    assert_eq!(
        (&claimed["id"], &claimed["attempts"]),
        (&json!(id), &json!(3))
    );
    // The old worker's reports of attempt 2 are stale.
    let body = complete(&app, &id, 2).await;
    assert_eq!(error_code(&body), Some("CONFLICT"), "a late result: {body}");
    let body = fail(&app, &id, 2, Some("flaky"), true).await;
    assert_eq!(
        error_code(&body),
        Some("CONFLICT"),
        "a repeated failure: {body}"
    );
    let seen = task(&app, &alice, &id).await;
    assert_eq!(
        (&seen["status"], &seen["attempts"], &seen["workerId"]),
        (&json!("PROCESSING"), &json!(3), &json!("w-new"))
    );

    // A fresh budget of two: attempt 3 backs off, attempt 4 is final.
    let failed = data(fail(&app, &id, 3, Some("again"), true).await)["updateTaskStatus"].clone();
    assert_eq!(
        (&failed["status"], &failed["attempts"]),
        (&json!("PENDING"), &json!(3))
    );
    let claimed = claim(&app, json!(null)).await;
    assert_eq!(claimed["attempts"], 4);
    let failed = data(fail(&app, &id, 4, Some("again"), true).await)["updateTaskStatus"].clone();
    assert_eq!(
        (&failed["status"], &failed["attempts"]),
        (&json!("FAILED"), &json!(4))
    );
}

#[tokio::test]
async fn a_report_of_an_attempt_from_before_retry_task_is_conflict_even_before_the_next_claim() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    let cancel = "mutation($id: ID!) { cancelTask(id: $id) { status } }";
    let progress = |id: &str| json!({ "id": id, "status": "PROCESSING", "progress": 50, "expectedAttempt": 1 });
    // (what the old worker sends, how attempt 1 ended, the report less its id)
    let cases = [
        (
            "a repeat of its retryable failure",
            "FAILED",
            json!({ "status": "FAILED", "errorMessage": "flaky", "retryable": true, "expectedAttempt": 1 }),
        ),
        (
            "a repeat of its final failure",
            "FAILED",
            json!({ "status": "FAILED", "errorMessage": "flaky", "expectedAttempt": 1 }),
        ),
        (
            "a completion after its failure",
            "FAILED",
            json!({ "status": "COMPLETED", "resultId": "late", "expectedAttempt": 1 }),
        ),
        (
            "a completion after the owner cancelled",
            "CANCELLED",
            json!({ "status": "COMPLETED", "resultId": "late", "expectedAttempt": 1 }),
        ),
        (
            "a failure after the owner cancelled",
            "CANCELLED",
            json!({ "status": "FAILED", "errorMessage": "gave up", "expectedAttempt": 1 }),
        ),
    ];
    let mut wrong = Vec::new();
    for (n, (case, ended, report)) in cases.iter().enumerate() {
        // One attempt, which failed retryably (its last) or was cancelled.
        // A type per case: what one case leaves runnable is not claimed in another.
        let task_type = format!("case-{n}");
        let input = json!({ "type": task_type, "maxAttempts": 1 });
        let id = id_of(&create(&app, &alice, input).await);
        assert_eq!(
            claim_with(&app, json!([task_type]), 60, "w-old").await["id"],
            json!(id)
        );
        if *ended == "FAILED" {
            let failed = data(fail(&app, &id, 1, Some("flaky"), true).await);
            assert_eq!(failed["updateTaskStatus"]["status"], "FAILED", "{case}");
        } else {
            let body = data(app.gql(Some(&alice), cancel, json!({ "id": id })).await);
            assert_eq!(body["cancelTask"]["status"], "CANCELLED", "{case}");
        }
        let retried = retry(&app, &alice, &id).await;
        assert_eq!(
            (&retried["status"], &retried["attempts"]),
            (&json!("PENDING"), &json!(1))
        );

        // The worker of attempt 1 reports late; nobody has claimed the task since.
        let mut report = report.clone();
        report["id"] = json!(id);
        let body = app.update_status(report, FIELDS).await;
        let seen = task(&app, &alice, &id).await;
        let untouched = seen["status"] == "PENDING"
            && seen["runAt"] == retried["runAt"]
            && seen["errorMessage"].is_null()
            && seen["resultId"].is_null();
        if error_code(&body) != Some("CONFLICT") || !untouched {
            wrong.push(format!(
                "{case} (retried after {ended}): answered {}, and the task became {} (runAt {} -> {}, errorMessage {}, resultId {})",
                error_code(&body).unwrap_or("no error"),
                seen["status"],
                retried["runAt"],
                seen["runAt"],
                seen["errorMessage"],
                seen["resultId"],
            ));
        }
    }
    // A fenced progress report already requires PROCESSING.
    let id = id_of(
        &create(
            &app,
            &alice,
            json!({ "type": "progress", "maxAttempts": 1 }),
        )
        .await,
    );
    assert_eq!(claim(&app, json!(["progress"])).await["id"], json!(id));
    data(fail(&app, &id, 1, Some("flaky"), false).await);
    retry(&app, &alice, &id).await;
    let body = app.update_status(progress(&id), FIELDS).await;
    assert_eq!(error_code(&body), Some("CONFLICT"), "{body}");

    assert!(
        wrong.is_empty(),
        "a worker's report of an attempt from before retryTask must be CONFLICT and leave the retried task PENDING as it was:\n{}",
        wrong.join("\n")
    );
}

#[tokio::test]
async fn a_lease_expiring_at_the_end_of_the_budget_fails_the_task_and_retry_starts_a_new_one() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    let id = id_of(&create(&app, &alice, json!({ "type": "image", "maxAttempts": 2 })).await);

    // Each claim's 1 s lease runs out; the reaper (ours, or the server's) acts.
    let reaped = |want: &'static str| {
        let (app, alice, id) = (&app, &alice, &id);
        async move {
            eventually(
                &format!("the reaper to make the task {want}"),
                Duration::from_secs(10),
                || async move {
                    app.service
                        .reap_expired_leases()
                        .await
                        .expect("a reaper pass");
                    let seen = task(app, alice, id).await;
                    (seen["status"] == want).then_some(seen)
                },
            )
            .await
        }
    };
    for (attempt, want) in [(1, "PENDING"), (2, "FAILED"), (3, "PENDING"), (4, "FAILED")] {
        // Real 1 s leases for the first budget; after the retry, leases the
        // test puts in the past (quicker, and the same to the reaper).
        let lease = if attempt <= 2 { 1 } else { 60 };
        let claimed = claim_with(&app, json!(null), lease, "w-silent").await;
        assert_eq!(
            (&claimed["id"], &claimed["attempts"]),
            (&json!(id), &json!(attempt))
        );
        if attempt > 2 {
            expire_lease(&app.db, &id).await;
        }
        let seen = reaped(want).await;
        assert_eq!(seen["attempts"], attempt, "attempts are kept");
        assert!(seen["leaseExpiresAt"].is_null());
        if want == "FAILED" {
            let message = seen["errorMessage"].as_str().unwrap_or_default();
            assert!(message.contains("lease expired"), "{message}");
            assert!(claim(&app, json!(null)).await.is_null(), "failed for good");
            let body = complete(&app, &id, attempt).await;
            assert_eq!(error_code(&body), Some("CONFLICT"), "{body}");
            if attempt == 2 {
                let retried = retry(&app, &alice, &id).await;
                assert_eq!(
                    (&retried["status"], &retried["attempts"]),
                    (&json!("PENDING"), &json!(2))
                );
            }
        } else {
            assert!(seen["errorMessage"].is_null());
        }
    }
}

// ---- pause --------------------------------------------------------------------------------

#[tokio::test]
async fn a_paused_type_is_skipped_by_claims_and_its_tasks_can_still_be_cancelled_and_deleted() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    let running = create(&app, &alice, json!({ "type": "video" })).await;
    assert_eq!(claim(&app, json!(null)).await["id"], running["id"]);

    let paused = set_policy(&app, "video", json!({ "paused": true })).await;
    assert_eq!(paused["policy"]["paused"], true);
    assert_eq!(
        (&paused["pending"], &paused["processing"]),
        (&json!(0), &json!(1))
    );
    let doomed = create(&app, &alice, json!({ "type": "video", "priority": 100 })).await;
    let deleted = create(&app, &alice, json!({ "type": "video", "priority": 100 })).await;
    let waiting = create(&app, &alice, json!({ "type": "video", "priority": 100 })).await;
    let image = create(&app, &alice, json!({ "type": "image" })).await;

    assert_eq!(
        claim(&app, json!(null)).await["id"],
        image["id"],
        "another type is still claimed"
    );
    assert!(claim(&app, json!(null)).await.is_null());
    assert!(claim(&app, json!(["video"])).await.is_null());

    // What was running goes on; cancel and delete work.
    let done = data(complete(&app, &id_of(&running), 1).await);
    assert_eq!(done["updateTaskStatus"]["status"], "COMPLETED");
    let cancel = "mutation($id: ID!) { cancelTask(id: $id) { status } }";
    let body = data(
        app.gql(Some(&alice), cancel, json!({ "id": doomed["id"] }))
            .await,
    );
    assert_eq!(body["cancelTask"]["status"], "CANCELLED");
    let delete = "mutation($id: ID!) { deleteTask(id: $id) }";
    let body = data(
        app.gql(Some(&alice), delete, json!({ "id": deleted["id"] }))
            .await,
    );
    assert_eq!(body["deleteTask"], true);
    let video = task_types(&app)
        .await
        .into_iter()
        .find(|t| t["type"] == "video")
        .expect("video");
    assert_eq!(
        (&video["pending"], &video["processing"]),
        (&json!(1), &json!(0))
    );

    let resumed = set_policy(&app, "video", json!({ "paused": false })).await;
    assert_eq!(resumed["policy"]["paused"], false);
    assert_eq!(claim(&app, json!(["video"])).await["id"], waiting["id"]);
    assert!(claim(&app, json!(null)).await.is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pause_set_on_one_instance_stops_claims_on_another_at_once() {
    let Some((one, two)) =
        two_apps_on_postgres_or_skip("a_pause_set_on_one_instance_stops_claims_on_another_at_once")
            .await
    else {
        return;
    };
    let alice = one.user_token("alice");
    for _ in 0..3 {
        create(&one, &alice, json!({ "type": "video" })).await;
    }
    assert!(!claim(&two, json!(null)).await.is_null());
    set_policy(&one, "video", json!({ "paused": true })).await;
    assert!(
        claim(&two, json!(null)).await.is_null(),
        "paused everywhere"
    );
    set_policy(&one, "video", json!({ "paused": false })).await;
    assert!(!claim(&two, json!(null)).await.is_null());
}

// ---- the concurrency cap ----------------------------------------------------------------------

#[tokio::test]
async fn a_capped_type_is_claimed_up_to_its_cap_and_again_when_one_finishes() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    set_policy(&app, "gpu", json!({ "concurrency": 2 })).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(id_of(&create(&app, &alice, json!({ "type": "gpu" })).await));
    }
    let cpu = create(&app, &alice, json!({ "type": "cpu" })).await;

    let first = claim(&app, json!(["gpu"])).await;
    let second = claim(&app, json!(["gpu"])).await;
    assert_eq!(
        (id_of(&first), id_of(&second)),
        (ids[0].clone(), ids[1].clone())
    );
    assert!(claim(&app, json!(["gpu"])).await.is_null(), "at its cap");
    assert_eq!(
        claim(&app, json!(null)).await["id"],
        cpu["id"],
        "other types are still claimed"
    );
    let gpu = set_policy(&app, "gpu", json!({})).await;
    assert_eq!(
        (&gpu["pending"], &gpu["processing"]),
        (&json!(2), &json!(2))
    );

    assert_eq!(
        data(complete(&app, &ids[0], 1).await)["updateTaskStatus"]["status"],
        "COMPLETED"
    );
    assert_eq!(claim(&app, json!(null)).await["id"], json!(ids[2]));
    assert!(claim(&app, json!(null)).await.is_null());

    // A lower cap holds back claims until enough finish; no cap, none.
    set_policy(&app, "gpu", json!({ "concurrency": 1 })).await;
    assert_eq!(
        data(complete(&app, &ids[1], 1).await)["updateTaskStatus"]["status"],
        "COMPLETED"
    );
    assert!(claim(&app, json!(null)).await.is_null(), "one still runs");
    set_policy(&app, "gpu", json!({ "concurrency": null })).await;
    assert_eq!(claim(&app, json!(null)).await["id"], json!(ids[3]));
}

/// Workers on `apps` (worker w on app w % apps) claim any type and complete
/// what they claim until all `total` tasks are done. Each holds a task of
/// `capped` ~10 ms; it counts itself in `running` right after its claim and
/// out right before its completion, so the count never exceeds what is
/// PROCESSING. The most it saw at once, and every claim as (id, type,
/// attempts, app).
async fn race_workers(
    apps: &[Arc<TestApp>],
    workers: usize,
    capped: &str,
    total: usize,
) -> (usize, Vec<(String, String, i64, usize)>) {
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let claims = Arc::new(Mutex::new(Vec::new()));
    let start = Arc::new(Barrier::new(workers));
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let app = apps[w % apps.len()].clone();
            let (running, most, finished, claims, start) = (
                running.clone(),
                most.clone(),
                finished.clone(),
                claims.clone(),
                start.clone(),
            );
            let (capped, on) = (capped.to_owned(), w % apps.len());
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(20);
                start.wait().await;
                while finished.load(Ordering::SeqCst) < total {
                    assert!(
                        Instant::now() < deadline,
                        "worker {w}: tasks are left unclaimed"
                    );
                    let task = claim_with(&app, json!(null), 60, &format!("w{w}")).await;
                    if task.is_null() {
                        tokio::time::sleep(Duration::from_millis(3)).await;
                        continue;
                    }
                    let (id, attempts) =
                        (id_of(&task), task["attempts"].as_i64().expect("attempts"));
                    let task_type = task["type"].as_str().expect("type").to_owned();
                    if task_type == capped {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(8 + (w as u64 % 4))).await;
                        running.fetch_sub(1, Ordering::SeqCst);
                    }
                    let done = data(complete(&app, &id, attempts).await);
                    assert_eq!(done["updateTaskStatus"]["status"], "COMPLETED");
                    claims.lock().unwrap().push((id, task_type, attempts, on));
                    finished.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.expect("worker");
    }
    let claims = std::mem::take(&mut *claims.lock().unwrap());
    (most.load(Ordering::SeqCst), claims)
}

/// Rounds of `workers` racing over tasks of a capped type (and of an
/// uncapped one) on `apps`, one cap per round; asserts the cap held as the
/// workers saw it and each task was claimed once and completed.
async fn assert_cap_holds(apps: &[Arc<TestApp>], workers: usize, per_round: usize, caps: &[usize]) {
    let one = &apps[0];
    let mut most_ever = 0;
    for (round, &cap) in caps.iter().enumerate() {
        set_policy(one, "render", json!({ "concurrency": cap })).await;
        if round == 0 && apps.len() > 1 {
            // An instance learns which types are capped from the database at
            // most once a second (the instance that set the policy, at
            // once); until then it skips the type. Wait, so that every
            // instance's workers take part in the race. Later rounds only
            // change the cap, which each claim reads from the database.
            tokio::time::sleep(Duration::from_millis(1200)).await;
        }
        let mut ids = HashSet::new();
        for i in 0..per_round {
            let owner = if i % 3 == 0 { bob() } else { alice() };
            ids.insert(
                new_task(one.service.as_ref(), &owner, "render")
                    .await
                    .id
                    .to_string(),
            );
        }
        for _ in 0..per_round / 3 {
            ids.insert(
                new_task(one.service.as_ref(), &alice(), "email")
                    .await
                    .id
                    .to_string(),
            );
        }
        let (most, claims) = race_workers(apps, workers, "render", ids.len()).await;
        assert!(
            most <= cap,
            "round {round}: {most} tasks of a type capped at {cap} ran at once"
        );
        most_ever = most_ever.max(most);

        let claimed: HashSet<String> = claims.iter().map(|(id, ..)| id.clone()).collect();
        assert_eq!(
            claims.len(),
            ids.len(),
            "round {round}: claims made (a task claimed twice?)"
        );
        assert_eq!(claimed, ids, "round {round}: every task claimed once");
        assert!(claims.iter().all(|(_, _, attempts, _)| *attempts == 1));
        for app in 0..apps.len() {
            assert!(
                claims
                    .iter()
                    .any(|(_, t, _, on)| t == "render" && *on == app),
                "round {round}: instance {app} never took a capped task"
            );
        }
        let uuids: Vec<Uuid> = ids.iter().map(|id| Uuid::parse_str(id).unwrap()).collect();
        for chunk in uuids.chunks(200) {
            let tasks = Tasks::find()
                .filter(Column::Id.is_in(chunk.to_vec()))
                .all(&one.db)
                .await
                .expect("read tasks");
            assert_eq!(tasks.len(), chunk.len());
            for task in tasks {
                assert_eq!(
                    (task.status, task.attempts),
                    (TaskStatus::Completed, 1),
                    "{task:?}"
                );
            }
        }
    }
    assert!(
        most_ever >= 2,
        "the workers never ran two capped tasks at once: no race was tested"
    );
    let render = task_types(one)
        .await
        .into_iter()
        .find(|t| t["type"] == "render")
        .expect("render");
    assert_eq!(
        (&render["pending"], &render["processing"]),
        (&json!(0), &json!(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_concurrency_cap_holds_for_six_workers_on_one_instance() {
    let database = Arc::new(TestDb::new().await);
    let apps = [Arc::new(spawn_app_with(database, |_| {}).await)];
    assert_cap_holds(&apps, 6, 30, &[2, 1, 3]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_concurrency_cap_holds_for_eight_workers_on_two_instances() {
    let Some((one, two)) = two_apps_on_postgres_or_skip(
        "the_concurrency_cap_holds_for_eight_workers_on_two_instances",
    )
    .await
    else {
        return;
    };
    let apps = [Arc::new(one), Arc::new(two)];
    assert_cap_holds(&apps, 8, 60, &[2, 3, 1]).await;
}
