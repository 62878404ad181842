//! A pending task's place in line, through the real router: `queuePosition`
//! follows the claim order, `estimatedStartAt` the type's claim rate, and
//! `taskUpdated` sends the task again as its position moves. On SQLite by
//! default, on PostgreSQL when `TASKQL_TEST_DATABASE_URL` is set.

use std::time::{Duration, Instant};

use crate::common::ws::{Event, WsClient};
use crate::common::*;
use chrono::Utc;
use serde_json::{Value, json};

const FIELDS: &str = "id type status userId priority queuePosition estimatedStartAt";

async fn create(app: &TestApp, token: &str, input: Value) -> Value {
    app.create_task(token, input, FIELDS).await
}

async fn task(app: &TestApp, token: &str, id: &str) -> Value {
    let query = format!("query($id: ID!) {{ task(id: $id) {{ {FIELDS} }} }}");
    data(app.gql(Some(token), &query, json!({ "id": id })).await)["task"].clone()
}

async fn claim(app: &TestApp, types: Value) -> Value {
    app.claim_task(types, Some(60), "w", &format!("{FIELDS} attempts"))
        .await
}

async fn complete(app: &TestApp, claimed: &Value) {
    let input = json!({
        "id": claimed["id"],
        "status": "COMPLETED",
        "resultId": "r",
        "expectedAttempt": claimed["attempts"],
    });
    let done = app.update_status(input, "status").await;
    assert_eq!(data(done)["updateTaskStatus"]["status"], "COMPLETED");
}

async fn set_paused(app: &TestApp, task_type: &str, paused: bool) {
    let query = "mutation($type: String!, $policy: TaskTypePolicyInput!) {
                   setTaskTypePolicy(type: $type, policy: $policy) { type }
                 }";
    let body = app
        .gql(
            Some(&app.worker_token()),
            query,
            json!({ "type": task_type, "policy": { "paused": paused } }),
        )
        .await;
    data(body);
}

#[tokio::test]
async fn queue_position_counts_the_runnable_tasks_of_its_type_ahead_in_claim_order() {
    let app = spawn_app().await;
    let (alice, bob) = (app.user_token("alice"), app.user_token("bob"));
    let mut line = Vec::new();
    for _ in 0..4 {
        line.push(id_of(
            &create(&app, &alice, json!({ "type": "render" })).await,
        ));
    }
    line.push(id_of(
        &create(&app, &bob, json!({ "type": "render" })).await,
    ));
    line.push(id_of(
        &create(&app, &bob, json!({ "type": "render", "priority": 5 })).await,
    ));
    let other = create(&app, &alice, json!({ "type": "upscale" })).await;
    let later = create(
        &app,
        &alice,
        json!({ "type": "render", "runAt": (Utc::now() + chrono::Duration::hours(1)).to_rfc3339() }),
    )
    .await;

    // Another type is a line of its own; a task not runnable yet has none.
    assert_eq!(other["queuePosition"], 1);
    assert_eq!(later["queuePosition"], Value::Null);
    assert_eq!(later["estimatedStartAt"], Value::Null);

    // Each claim takes the task at position 1, and everyone behind moves up.
    let mut pending = line.clone();
    while !pending.is_empty() {
        let mut positions = Vec::new();
        for id in &pending {
            let owner = if line[..4].contains(id) { &alice } else { &bob };
            let seen = task(&app, owner, id).await;
            positions.push((
                seen["queuePosition"].as_i64().expect("a position"),
                id.clone(),
            ));
        }
        positions.sort();
        let numbers: Vec<i64> = positions.iter().map(|(p, _)| *p).collect();
        assert_eq!(numbers, (1..=pending.len() as i64).collect::<Vec<_>>());
        let claimed = claim(&app, json!(["render"])).await;
        assert_eq!(
            claimed["id"],
            positions[0].1.as_str(),
            "a claim takes position 1"
        );
        assert_eq!(claimed["status"], "PROCESSING");
        assert_eq!(
            claimed["queuePosition"],
            Value::Null,
            "a running task has no position"
        );
        pending.retain(|id| *id != positions[0].1);
    }
    assert_eq!(
        task(&app, &alice, &id_of(&later)).await["queuePosition"],
        Value::Null
    );
}

#[tokio::test]
async fn estimated_start_at_needs_recent_claims_grows_with_position_and_stops_while_paused() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(id_of(
            &create(&app, &alice, json!({ "type": "render" })).await,
        ));
    }
    let first = task(&app, &alice, &ids[0]).await;
    assert_eq!(first["queuePosition"], 1);
    assert_eq!(
        first["estimatedStartAt"],
        Value::Null,
        "no claims of the type yet: no estimate"
    );

    for _ in 0..3 {
        let claimed = claim(&app, json!(["render"])).await;
        complete(&app, &claimed).await;
    }
    let before = Utc::now();
    let mut starts = Vec::new();
    for id in &ids[3..] {
        let seen = task(&app, &alice, id).await;
        starts.push(time(&seen["estimatedStartAt"]));
    }
    assert!(
        starts[0] >= before - chrono::Duration::seconds(1),
        "{starts:?}"
    );
    assert!(
        starts.windows(2).all(|pair| pair[0] <= pair[1]),
        "later positions start later: {starts:?}"
    );
    assert!(starts[0] < starts[4], "{starts:?}");

    set_paused(&app, "render", true).await;
    let paused = task(&app, &alice, &ids[3]).await;
    assert_eq!(paused["queuePosition"], 1, "a paused type keeps its order");
    assert_eq!(
        paused["estimatedStartAt"],
        Value::Null,
        "a paused type starts nothing"
    );
}

#[tokio::test]
async fn a_user_reads_the_place_of_their_own_tasks_in_lists_too() {
    let app = spawn_app().await;
    let (alice, bob) = (app.user_token("alice"), app.user_token("bob"));
    create(&app, &bob, json!({ "type": "render" })).await;
    create(&app, &alice, json!({ "type": "render" })).await;
    create(&app, &alice, json!({ "type": "render" })).await;
    let query = "{ tasks(first: 10) { nodes { queuePosition } } }";
    let body = app.gql(Some(&alice), query, json!({})).await;
    let mut positions: Vec<i64> = data(body)["tasks"]["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|task| task["queuePosition"].as_i64().expect("a position"))
        .collect();
    positions.sort();
    // Bob's task is in the same line: Alice sees where hers stand in it.
    assert_eq!(positions.len(), 2);
    assert!(
        positions.iter().all(|p| (1..=3).contains(p)),
        "{positions:?}"
    );
    assert_ne!(positions[0], positions[1]);
}

/// Watches `id` on `app`'s websocket; the subscription and its client.
async fn watch(
    app: &TestApp,
    token: &str,
    id: &str,
) -> (WsClient, crate::common::ws::Subscription) {
    let client = WsClient::connect_as(&app.ws_url, token).await;
    let query = format!("subscription($id: ID!) {{ taskUpdated(id: $id) {{ {FIELDS} }} }}");
    let subscription = client.subscribe(&query, json!({ "id": id }));
    (client, subscription)
}

/// Waits for the watched task to reach `position`; every push on the way.
async fn until_position(
    watching: &mut crate::common::ws::Subscription,
    position: Value,
) -> Vec<(Instant, Value)> {
    let mut pushes = Vec::new();
    loop {
        let event = watching.next().await;
        let Event::Next(_) = &event else {
            panic!("the subscription ended early: {event:?}");
        };
        let task = event.data().expect("data")["taskUpdated"].clone();
        pushes.push((Instant::now(), task.clone()));
        if task["queuePosition"] == position {
            return pushes;
        }
    }
}

/// Claims on `claims` move a task watched on `watched` (the same instance,
/// or another on PostgreSQL) up its line, one push per move, at most one a
/// second; its claim ends its place.
async fn position_moves_are_pushed(watched: &TestApp, claims: &TestApp) {
    let alice = watched.user_token("alice");
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(id_of(
            &create(watched, &alice, json!({ "type": "render" })).await,
        ));
    }
    let mine = ids[3].clone();
    let (_client, mut watching) = watch(watched, &alice, &mine).await;
    let first = watching.next_data().await["taskUpdated"].clone();
    assert_eq!(first["queuePosition"], 4);
    assert_eq!(first["status"], "PENDING");

    let mut pushes = Vec::new();
    for position in [3, 2, 1] {
        claim(claims, json!(["render"])).await;
        pushes.extend(until_position(&mut watching, json!(position)).await);
    }
    let positions: Vec<&Value> = pushes.iter().map(|(_, t)| &t["queuePosition"]).collect();
    assert_eq!(
        positions,
        [&json!(3), &json!(2), &json!(1)],
        "one push per move"
    );
    for pair in pushes.windows(2) {
        assert!(
            pair[1].0 - pair[0].0 >= Duration::from_millis(900),
            "at most one push a second"
        );
    }

    let claimed = claim(claims, json!(["render"])).await;
    assert_eq!(claimed["id"], mine.as_str());
    let running = watching.next_data().await["taskUpdated"].clone();
    assert_eq!(running["status"], "PROCESSING");
    assert_eq!(running["queuePosition"], Value::Null);
}

#[tokio::test]
async fn task_updated_pushes_the_task_again_when_its_position_moves() {
    let app = spawn_app().await;
    position_moves_are_pushed(&app, &app).await;
}

#[tokio::test]
async fn position_moves_from_claims_on_another_instance_are_pushed() {
    let Some((one, two)) =
        two_apps_on_postgres_or_skip("position_moves_from_claims_on_another_instance_are_pushed")
            .await
    else {
        return;
    };
    position_moves_are_pushed(&one, &two).await;
}
