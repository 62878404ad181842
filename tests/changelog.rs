//! The change log behind `taskEvents(after:)`: a resumed stream replays
//! exactly the events after its cursor and then continues live with no gap
//! and no repeat, on any instance, after a restart, under concurrent writes
//! and bulk statements, and for changes whose writer never woke anyone.
//! Pruned cursors are `CURSOR_EXPIRED`. On SQLite by default; on PostgreSQL
//! when `TASKQL_TEST_DATABASE_URL` is set (some tests only mean something
//! there and say they were skipped otherwise).
mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::ws::{self, Event, WsClient};
use common::{
    TestApp, TestDb, alice, as_worker, bob, data, spawn_app, spawn_app_with,
    two_apps_on_postgres_or_skip, worker,
};
use entity::{TaskStatus, Tasks};
use futures::StreamExt;
use futures::stream::BoxStream;
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter};
use serde_json::{Value, json};
use taskql::auth::CurrentUser;
use taskql::error::TaskResult;
use taskql::service::watch::bus::{TaskEvent, TaskEventKind};
use taskql::service::watch::changelog::{decode_cursor, encode_cursor};
use taskql::service::{NewTask, SeaTaskService, StatusUpdate, TaskService};
use uuid::Uuid;

const EVENTS: &str = "subscription Events($after: String) {
  taskEvents(after: $after) {
    cursor
    kind
    task { id userId type status progress attempts resultId workerId updatedAt }
  }
}";
const WATCH: &str = "subscription Watch($id: ID!) {
  taskUpdated(id: $id) { id status progress }
}";

/// Longest a test waits for any one event.
const WAIT: Duration = Duration::from_secs(10);
/// How long a stream is watched to show that nothing (more) arrives.
const QUIET: Duration = Duration::from_millis(600);
/// Longest a change committed behind every instance's back may take to
/// reach a subscriber (the readers' tick is 250 ms).
const ORPHAN_LATENCY: Duration = Duration::from_secs(3);

type Events = BoxStream<'static, TaskResult<TaskEvent>>;

fn task_of(task_type: &str) -> NewTask {
    NewTask {
        task_type: task_type.into(),
        metadata: Some(json!({ "prompt": "a cat" })),
        idempotency_key: None,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------
// GraphQL over the websocket

/// The `taskEvents` payload of the next message; fails on errors, on the
/// end of the operation, and after `WAIT`.
async fn next_event(sub: &mut ws::Subscription) -> Value {
    let event = sub
        .next_within(WAIT)
        .await
        .unwrap_or_else(|| panic!("subscription {}: no event within {WAIT:?}", sub.id));
    match event.data() {
        Some(data) if event.errors().is_none() => data["taskEvents"].clone(),
        _ => panic!("subscription {}: expected an event, got {event:?}", sub.id),
    }
}

async fn next_events(sub: &mut ws::Subscription, count: usize) -> Vec<Value> {
    let mut events = Vec::with_capacity(count);
    for _ in 0..count {
        events.push(next_event(sub).await);
    }
    events
}

/// Fails if the subscription sends anything within `QUIET`.
async fn assert_quiet(sub: &mut ws::Subscription, why: &str) {
    if let Some(event) = sub.next_within(QUIET).await {
        panic!("{why}: got {event:?}");
    }
}

/// The log position a `taskEvents` cursor stands for (to check order).
fn pos(event: &Value) -> i64 {
    let cursor = event["cursor"].as_str().expect("a cursor");
    decode_cursor(cursor).unwrap_or_else(|e| panic!("{cursor:?} is not a cursor: {e:?}"))
}

/// (kind, task id, status) of each event.
fn summary(events: &[Value]) -> Vec<(String, String, String)> {
    events
        .iter()
        .map(|event| {
            (
                event["kind"].as_str().expect("kind").to_owned(),
                event["task"]["id"].as_str().expect("id").to_owned(),
                event["task"]["status"].as_str().expect("status").to_owned(),
            )
        })
        .collect()
}

fn expect(rows: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    rows.iter()
        .map(|(kind, id, status)| (kind.to_string(), id.to_string(), status.to_string()))
        .collect()
}

fn assert_increasing(events: &[Value], what: &str) {
    let positions: Vec<i64> = events.iter().map(pos).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "{what}: positions must strictly increase: {positions:?}"
    );
}

/// Makes `subs` (`taskEvents` subscriptions that all see alice's tasks)
/// live: creates probe tasks for alice until every one has delivered the
/// newest probe's CREATED, and returns that event as each received it.
/// Nothing but probes may arrive before it.
async fn go_live(app: &TestApp, subs: &mut [&mut ws::Subscription]) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    let mut probes = HashSet::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "taskEvents subscriptions never went live"
        );
        let probe = app
            .service
            .create_task(&alice(), task_of("probe"))
            .await
            .expect("create a probe")
            .id
            .to_string();
        probes.insert(probe.clone());
        let mut reached = Vec::new();
        for sub in subs.iter_mut() {
            let mut found = None;
            while let Some(event) = sub.next_within(Duration::from_millis(300)).await {
                let event = match event.data() {
                    Some(data) if event.errors().is_none() => data["taskEvents"].clone(),
                    _ => panic!("taskEvents failed: {event:?}"),
                };
                let id = event["task"]["id"].as_str().expect("an id");
                assert!(probes.contains(id), "an event before the probe: {event}");
                if id == probe {
                    found = Some(event);
                    break;
                }
            }
            reached.push(found);
        }
        if reached.iter().all(Option::is_some) {
            return reached.into_iter().flatten().collect();
        }
    }
}

async fn gql_ok(app: &TestApp, token: &str, query: &str, variables: Value) -> Value {
    data(app.gql(Some(token), query, variables).await)
}

async fn create_via_gql(app: &TestApp, token: &str, task_type: &str) -> String {
    let task = app
        .create_task(token, json!({ "type": task_type }), "id")
        .await;
    task["id"].as_str().expect("an id").to_owned()
}

/// `updateTaskStatus` as a worker.
async fn set_status(app: &TestApp, id: &str, status: &str, extra: Value) {
    let mut input = json!({ "id": id, "status": status });
    if let (Some(input), Some(extra)) = (input.as_object_mut(), extra.as_object()) {
        input.extend(extra.clone());
    }
    data(app.update_status(input, "id").await);
}

async fn on_task(app: &TestApp, token: &str, mutation: &str, id: &str) -> Value {
    gql_ok(
        app,
        token,
        &format!("mutation($id: ID!) {{ {mutation}(id: $id) {{ id status }} }}"),
        json!({ "id": id }),
    )
    .await[mutation]
        .clone()
}

async fn delete_via_gql(app: &TestApp, token: &str, id: &str) {
    let done = gql_ok(
        app,
        token,
        "mutation($id: ID!) { deleteTask(id: $id) }",
        json!({ "id": id }),
    )
    .await;
    assert_eq!(done["deleteTask"], true, "{done}");
}

/// Asserts the operation failed with `code` and no data.
async fn expect_error(sub: &mut ws::Subscription, code: &str, what: &str) {
    let event = sub
        .next_within(WAIT)
        .await
        .unwrap_or_else(|| panic!("{what}: no answer within {WAIT:?}"));
    assert_eq!(
        event.error_code(),
        Some(code),
        "{what}: expected {code}, got {event:?}"
    );
    assert!(event.data().is_none(), "{what}: an error carries no data");
    if !matches!(event, Event::Error(_)) {
        assert_eq!(
            sub.next_within(WAIT).await,
            Some(Event::Complete),
            "{what}: the failed operation must end"
        );
    }
}

// ---------------------------------------------------------------------------
// The service's streams

async fn next_of(stream: &mut Events) -> TaskEvent {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .unwrap_or_else(|_| panic!("no event within {WAIT:?}"))
        .expect("the stream ended")
        .expect("the stream failed")
}

async fn next_n(stream: &mut Events, count: usize) -> Vec<TaskEvent> {
    let mut events = Vec::with_capacity(count);
    for _ in 0..count {
        events.push(next_of(stream).await);
    }
    events
}

/// [`go_live`] for the service's streams; returns the probe's position.
/// Events of changes committed before (which a stream opened without
/// `after` may still receive) are skipped.
async fn go_live_streams(service: &SeaTaskService, streams: &mut [&mut Events]) -> i64 {
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "streams never went live");
        let probe = service
            .create_task(&alice(), task_of("probe"))
            .await
            .expect("create a probe")
            .id;
        let mut reached = Vec::new();
        for stream in streams.iter_mut() {
            let mut found = None;
            while let Ok(event) =
                tokio::time::timeout(Duration::from_millis(300), stream.next()).await
            {
                let event = event.expect("the stream ended").expect("the stream failed");
                if event.task.id == probe {
                    found = Some(event.pos);
                    break;
                }
            }
            reached.push(found);
        }
        if let [Some(first), ..] = reached[..]
            && reached.iter().all(|pos| *pos == Some(first))
        {
            return first;
        }
    }
}

/// What a replay must reproduce exactly: position, kind and the whole task.
fn exact(events: &[TaskEvent]) -> Vec<(i64, TaskEventKind, entity::Task)> {
    events
        .iter()
        .map(|event| (event.pos, event.kind, event.task.clone()))
        .collect()
}

/// Asserts the next event of each stream is the CREATED of `id`: nothing
/// else (no repeat, nothing of another user) came before it.
async fn next_is_created(streams: &mut [&mut Events], id: Uuid, what: &str) {
    for (i, stream) in streams.iter_mut().enumerate() {
        let event = next_of(stream).await;
        assert_eq!(
            (event.kind, event.task.id),
            (TaskEventKind::Created, id),
            "{what} (stream {i}): the next event must be the marker's"
        );
    }
}

/// A plain connection to the test's database: no taskql service on it, so
/// nothing is woken by what it writes.
async fn plain_connection(url: &str) -> DatabaseConnection {
    taskql::db::connect(url, 1)
        .await
        .expect("a plain connection")
}

/// Inserts a PENDING task for `user` with a plain SQL statement; its id.
async fn raw_insert(conn: &DatabaseConnection, user: &str, task_type: &str) -> Uuid {
    let model = entity::tasks::ActiveModel::pending(
        user.into(),
        task_type.into(),
        json!({ "raw": true }),
        None,
        chrono::Utc::now(),
    );
    let id = model.id.clone().unwrap();
    Tasks::insert(model)
        .exec(conn)
        .await
        .expect("a raw INSERT of a task");
    id
}

/// Sets the task PROCESSING at `progress` with a plain SQL UPDATE (a new
/// version, as every write makes).
async fn raw_update(conn: &DatabaseConnection, id: Uuid, progress: i32) {
    let now = chrono::Utc::now();
    let done = Tasks::update_many()
        .col_expr(
            entity::tasks::Column::Status,
            Expr::value(TaskStatus::Processing.as_str()),
        )
        .col_expr(entity::tasks::Column::Progress, Expr::value(progress))
        .col_expr(entity::tasks::Column::StartedAt, Expr::value(now))
        .col_expr(entity::tasks::Column::UpdatedAt, Expr::value(now))
        .col_expr(
            entity::tasks::Column::Version,
            Expr::col(entity::tasks::Column::Version).add(1),
        )
        .filter(entity::tasks::Column::Id.eq(id))
        .exec(conn)
        .await
        .expect("a raw UPDATE of a task");
    assert_eq!(done.rows_affected, 1);
}

// ---------------------------------------------------------------------------
// 1. Replay is exact, for every kind of change and every user

#[tokio::test]
async fn a_replay_after_any_cursor_is_exactly_the_live_events_after_it() {
    let app = spawn_app().await;
    let alice_token = app.user_token("alice");
    let bob_token = app.user_token("bob");
    let worker_token = app.worker_token();
    let alice_ws = WsClient::connect_as(&app.ws_url, &alice_token).await;
    let worker_ws = WsClient::connect_as(&app.ws_url, &worker_token).await;
    let mut alice_live = alice_ws.subscribe(EVENTS, json!({}));
    let mut worker_live = worker_ws.subscribe(EVENTS, json!({}));
    let probes = go_live(&app, &mut [&mut alice_live, &mut worker_live]).await;
    assert_eq!(
        probes[0], probes[1],
        "a user and a worker receive one event alike, cursor included"
    );
    let probe = probes[0].clone();
    // The bus has published the probe: streams opened now are live at once.
    let mut alice_stream = app.service.watch_events(&alice(), None).await.unwrap();
    let mut worker_stream = app.service.watch_events(&worker(), None).await.unwrap();

    // Every kind of change, alice's and bob's interleaved.
    let t1 = create_via_gql(&app, &alice_token, "alice.job").await;
    let b1 = create_via_gql(&app, &bob_token, "bob.job").await;
    let claimed = gql_ok(
        &app,
        &worker_token,
        r#"mutation { claimTask(types: ["alice.job"]) { id status attempts } }"#,
        json!({}),
    )
    .await;
    assert_eq!(claimed["claimTask"]["id"], t1.as_str(), "{claimed}");
    gql_ok(
        &app,
        &worker_token,
        "mutation($id: ID!) { heartbeatTask(id: $id, progress: 30) { id } }",
        json!({ "id": t1 }),
    )
    .await;
    set_status(&app, &b1, "PROCESSING", json!({ "progress": 5 })).await;
    set_status(&app, &t1, "COMPLETED", json!({ "resultId": "r-1" })).await;
    let t2 = create_via_gql(&app, &alice_token, "alice.other").await;
    assert_eq!(
        on_task(&app, &alice_token, "cancelTask", &t2).await["status"],
        "CANCELLED"
    );
    assert_eq!(
        on_task(&app, &alice_token, "retryTask", &t2).await["status"],
        "PENDING"
    );
    delete_via_gql(&app, &alice_token, &t1).await;
    delete_via_gql(&app, &bob_token, &b1).await;

    let alices = next_events(&mut alice_live, 8).await;
    let everyones = next_events(&mut worker_live, 11).await;
    assert_eq!(
        summary(&alices),
        expect(&[
            ("CREATED", &t1, "PENDING"),
            ("UPDATED", &t1, "PROCESSING"),
            ("UPDATED", &t1, "PROCESSING"),
            ("UPDATED", &t1, "COMPLETED"),
            ("CREATED", &t2, "PENDING"),
            ("UPDATED", &t2, "CANCELLED"),
            ("UPDATED", &t2, "PENDING"),
            ("DELETED", &t1, "COMPLETED"),
        ]),
        "alice's live events: every change of her tasks, in order"
    );
    assert_eq!(alices[1]["task"]["attempts"], 1, "the claim");
    assert_eq!(alices[2]["task"]["progress"], 30, "the heartbeat");
    assert_eq!(alices[3]["task"]["resultId"], "r-1");
    assert!(
        alices
            .iter()
            .all(|event| event["task"]["userId"] == "alice"),
        "none of bob's changes reach alice: {alices:?}"
    );
    assert_eq!(
        summary(&everyones),
        expect(&[
            ("CREATED", &t1, "PENDING"),
            ("CREATED", &b1, "PENDING"),
            ("UPDATED", &t1, "PROCESSING"),
            ("UPDATED", &t1, "PROCESSING"),
            ("UPDATED", &b1, "PROCESSING"),
            ("UPDATED", &t1, "COMPLETED"),
            ("CREATED", &t2, "PENDING"),
            ("UPDATED", &t2, "CANCELLED"),
            ("UPDATED", &t2, "PENDING"),
            ("DELETED", &t1, "COMPLETED"),
            ("DELETED", &b1, "PROCESSING"),
        ]),
        "a worker's live events: everyone's changes, in order"
    );
    assert_increasing(&alices, "alice's live events");
    assert_increasing(&everyones, "the worker's live events");
    assert!(pos(&alices[0]) > pos(&probe));
    // The same change is the same event, cursor included, whoever receives it.
    let by_cursor: HashMap<&Value, &Value> = everyones
        .iter()
        .map(|event| (&event["cursor"], event))
        .collect();
    for event in &alices {
        assert_eq!(Some(&event), by_cursor.get(&event["cursor"]), "{event}");
    }

    // The service's streams saw the same events; they show versions too.
    let alice_events = next_n(&mut alice_stream, 8).await;
    let worker_events = next_n(&mut worker_stream, 11).await;
    assert_eq!(
        alice_events.iter().map(|e| e.pos).collect::<Vec<_>>(),
        alices.iter().map(pos).collect::<Vec<_>>()
    );
    assert_eq!(
        worker_events.iter().map(|e| e.pos).collect::<Vec<_>>(),
        everyones.iter().map(pos).collect::<Vec<_>>()
    );
    let versions = |id: &str| -> Vec<i64> {
        worker_events
            .iter()
            .filter(|e| e.task.id.to_string() == id)
            .map(|e| e.task.version)
            .collect()
    };
    // A deletion carries the last state, so the last version again.
    assert_eq!(versions(&t1), [1, 2, 3, 4, 4], "t1's versions");
    assert_eq!(versions(&t2), [1, 2, 3], "t2's versions");
    assert_eq!(versions(&b1), [1, 2, 2], "b1's versions");

    // Replay after every cursor received, as alice and as a worker, over
    // the websocket: exactly the live events after it, in order.
    let mut alice_replays = Vec::new();
    for (i, event) in std::iter::once(&probe).chain(&alices).enumerate() {
        let sub = alice_ws.subscribe(EVENTS, json!({ "after": event["cursor"] }));
        alice_replays.push((i, sub));
    }
    let mut worker_replays = Vec::new();
    for (i, event) in std::iter::once(&probe).chain(&everyones).enumerate() {
        let sub = worker_ws.subscribe(EVENTS, json!({ "after": event["cursor"] }));
        worker_replays.push((i, sub));
    }
    for (i, sub) in &mut alice_replays {
        let replayed = next_events(sub, alices.len() - *i).await;
        assert_eq!(
            replayed,
            alices[*i..],
            "alice's replay after her event {i} (0 = the probe)"
        );
    }
    for (i, sub) in &mut worker_replays {
        let replayed = next_events(sub, everyones.len() - *i).await;
        assert_eq!(
            replayed,
            everyones[*i..],
            "the worker's replay after event {i} (0 = the probe)"
        );
    }
    // And through the service: the same positions, kinds and whole tasks.
    for (user, live) in [(alice(), &alice_events), (worker(), &worker_events)] {
        let probe_cursor = encode_cursor(pos(&probe));
        let mut replay = app
            .service
            .watch_events(&user, Some(&probe_cursor))
            .await
            .unwrap();
        let replayed = next_n(&mut replay, live.len()).await;
        assert_eq!(exact(&replayed), exact(live), "{}'s replay", user.id);
    }

    // After the newest cursor nothing is replayed; a new change comes live.
    let (_, after_newest) = alice_replays.last_mut().expect("a replay");
    assert_quiet(after_newest, "nothing comes after the newest cursor").await;
    let marker = create_via_gql(&app, &alice_token, "marker").await;
    let mut all = vec![&mut alice_live, &mut worker_live];
    all.extend(alice_replays.iter_mut().map(|(_, sub)| sub));
    all.extend(worker_replays.iter_mut().map(|(_, sub)| sub));
    let newest = pos(everyones.last().expect("events"));
    for sub in all {
        let event = next_event(sub).await;
        assert_eq!(
            (event["kind"].as_str(), event["task"]["id"].as_str()),
            (Some("CREATED"), Some(marker.as_str())),
            "the next event of every stream is the marker's: no repeat, nothing of bob's"
        );
        assert!(pos(&event) > newest);
    }
}

// ---------------------------------------------------------------------------
// 2. Across instances and across a restart

#[tokio::test]
async fn on_postgres_a_cursor_resumes_on_another_instance_and_after_a_restart() {
    let Some((mut a, mut b)) = two_apps_on_postgres_or_skip(
        "on_postgres_a_cursor_resumes_on_another_instance_and_after_a_restart",
    )
    .await
    else {
        return;
    };
    let database = a.database.clone();
    let token = a.user_token("alice");

    let client = WsClient::connect_as(&a.ws_url, &token).await;
    let mut live = client.subscribe(EVENTS, json!({}));
    let probe = go_live(&a, &mut [&mut live]).await.remove(0);
    live.stop();
    drop(client);

    // Changes through A while nobody listens anywhere.
    let t1 = create_via_gql(&a, &token, "resume.one").await;
    let t2 = create_via_gql(&a, &token, "resume.two").await;
    set_status(&a, &t1, "PROCESSING", json!({ "progress": 50 })).await;
    set_status(&a, &t1, "COMPLETED", json!({ "resultId": "r-a" })).await;
    on_task(&a, &token, "cancelTask", &t2).await;
    delete_via_gql(&a, &token, &t1).await;
    let expected = expect(&[
        ("CREATED", &t1, "PENDING"),
        ("CREATED", &t2, "PENDING"),
        ("UPDATED", &t1, "PROCESSING"),
        ("UPDATED", &t1, "COMPLETED"),
        ("UPDATED", &t2, "CANCELLED"),
        ("DELETED", &t1, "COMPLETED"),
    ]);

    // On B, after A's cursor: all of them, in order, then nothing.
    let client_b = WsClient::connect_as(&b.ws_url, &token).await;
    let mut on_b = client_b.subscribe(EVENTS, json!({ "after": probe["cursor"] }));
    let replayed = next_events(&mut on_b, expected.len()).await;
    assert_eq!(
        summary(&replayed),
        expected,
        "B replays what was made through A"
    );
    assert_increasing(&replayed, "B's replay");
    assert!(pos(&replayed[0]) > pos(&probe));
    assert_quiet(&mut on_b, "B replays nothing more").await;
    let last = replayed.last().expect("events")["cursor"].clone();

    // Both instances go away entirely; a change is committed while none runs.
    drop(on_b);
    drop(client_b);
    a.stop().await;
    b.stop().await;
    drop(a);
    drop(b);
    let plain = plain_connection(&database.url).await;
    let orphan = raw_insert(&plain, "alice", "while.down").await;

    // A new instance on the same database resumes from the last cursor.
    let c = spawn_app_with(database.clone(), |_| {}).await;
    let client_c = WsClient::connect_as(&c.ws_url, &token).await;
    let mut on_c = client_c.subscribe(EVENTS, json!({ "after": last }));
    let t3 = create_via_gql(&c, &token, "after.restart").await;
    let resumed = next_events(&mut on_c, 2).await;
    assert_eq!(
        summary(&resumed),
        expect(&[
            ("CREATED", &orphan.to_string(), "PENDING"),
            ("CREATED", &t3, "PENDING"),
        ]),
        "after a restart: the change made while no instance ran, then the new one"
    );
    let last_pos = decode_cursor(last.as_str().expect("a cursor")).expect("a cursor");
    assert!(pos(&resumed[0]) > last_pos);
    assert_increasing(&resumed, "C's events");
    assert_quiet(&mut on_c, "C sends nothing more").await;
}

// ---------------------------------------------------------------------------
// 3. The seam between replay and live under concurrent writes

#[tokio::test]
async fn a_replay_started_during_concurrent_writes_misses_nothing_and_repeats_nothing() {
    const WRITERS: usize = 8;
    const EACH: usize = 50;
    const TOTAL: usize = WRITERS * EACH;
    let test = TestDb::new().await;
    // Two instances write; streams run on the first.
    let (a, _) = test.service().await;
    let (b, _) = test.service().await;

    for round in 0..3 {
        let mut live = a.watch_events(&worker(), None).await.unwrap();
        let start = go_live_streams(&a, &mut [&mut live]).await;
        drop(live);
        let cursor = encode_cursor(start);
        let created = Arc::new(AtomicUsize::new(0));
        let subscribe_at = 40 + (Uuid::new_v4().as_u128() % (TOTAL as u128 - 80)) as usize;
        let began = Instant::now();

        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let service = if w % 2 == 0 { a.clone() } else { b.clone() };
            let user: CurrentUser = if w < WRITERS / 2 { alice() } else { bob() };
            let created = created.clone();
            writers.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..EACH {
                    let task = service
                        .create_task(&user, task_of(&format!("seam.{round}")))
                        .await
                        .expect("create");
                    created.fetch_add(1, Ordering::SeqCst);
                    service
                        .update_task_status(
                            &as_worker(),
                            StatusUpdate {
                                progress: Some(i as i32),
                                ..StatusUpdate::new(task.id, TaskStatus::Processing)
                            },
                        )
                        .await
                        .expect("update");
                    ids.push((task.id, user.id.clone()));
                }
                ids
            }));
        }
        while created.load(Ordering::SeqCst) < subscribe_at {
            assert!(began.elapsed() < WAIT, "the writers stalled");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let seen_when_subscribing = created.load(Ordering::SeqCst);
        // Each stream is read as the writers go on, so its replay races them.
        let read_while_writing = |stream: Events, count: usize| {
            tokio::spawn(async move {
                let mut stream = stream;
                let events = next_n(&mut stream, count).await;
                (events, stream)
            })
        };
        let everyone = a.watch_events(&worker(), Some(&cursor)).await.unwrap();
        let everyone = read_while_writing(everyone, 2 * TOTAL);
        let alices = a.watch_events(&alice(), Some(&cursor)).await.unwrap();
        // Half the writers write alice's tasks: a create and an update each.
        let alices = read_while_writing(alices, TOTAL);

        let mut ids = Vec::new();
        for writer in writers {
            ids.extend(writer.await.expect("a writer"));
        }
        let all: HashSet<Uuid> = ids.iter().map(|(id, _)| *id).collect();
        let alice_ids: HashSet<Uuid> = ids
            .iter()
            .filter(|(_, user)| user == "alice")
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(all.len(), TOTAL);
        let (everyones, mut everyone) = everyone.await.expect("the worker's stream");
        let (alices_events, mut alices) = alices.await.expect("alice's stream");

        for (name, events, expected) in [
            ("the worker", &everyones, &all),
            ("alice", &alices_events, &alice_ids),
        ] {
            let mut seen = HashSet::new();
            let mut versions = HashMap::new();
            let mut last = start;
            for event in events {
                // Each task's changes in the order they were made.
                let before = versions.insert(event.task.id, event.task.version);
                assert!(
                    before < Some(event.task.version),
                    "round {round}, {name}: version {} of {} after version {before:?}",
                    event.task.version,
                    event.task.id
                );
                assert!(
                    event.pos > last,
                    "round {round}, {name}: position {} after {last} (subscribed after {seen_when_subscribing} creates)",
                    event.pos
                );
                last = event.pos;
                assert!(
                    expected.contains(&event.task.id),
                    "round {round}, {name}: an event of another task: {event:?}"
                );
                assert!(
                    seen.insert((event.task.id, event.kind)),
                    "round {round}, {name}: {:?} of {} twice (subscribed after {seen_when_subscribing} creates)",
                    event.kind,
                    event.task.id
                );
            }
            for id in expected {
                for kind in [TaskEventKind::Created, TaskEventKind::Updated] {
                    assert!(
                        seen.contains(&(*id, kind)),
                        "round {round}, {name}: {kind:?} of {id} never came"
                    );
                }
            }
        }
        // Nothing else follows: the next event of both is a new change.
        let marker = a.create_task(&alice(), task_of("marker")).await.unwrap().id;
        next_is_created(
            &mut [&mut everyone, &mut alices],
            marker,
            &format!("round {round}"),
        )
        .await;
        eprintln!(
            "round {round}: subscribed after {seen_when_subscribing} of {TOTAL} creates; done in {:?}",
            began.elapsed()
        );
    }
}

// ---------------------------------------------------------------------------
// 4. One statement changing more rows than a page

/// Asserts the next events of `stream` are the bulk UPDATE's: one UPDATED
/// of each of `ids`, in order, past `before`.
async fn expect_bulk(name: &str, stream: &mut Events, before: i64, ids: &HashSet<Uuid>) {
    let mut seen = HashSet::new();
    let mut last = before;
    for _ in 0..ids.len() {
        let event = next_of(stream).await;
        assert_eq!(event.kind, TaskEventKind::Updated, "{name}: {event:?}");
        assert!(event.pos > last, "{name}: {} after {last}", event.pos);
        last = event.pos;
        assert!(ids.contains(&event.task.id), "{name}: {event:?}");
        assert!(
            seen.insert(event.task.id),
            "{name}: {:?} twice",
            event.task.id
        );
        assert_eq!(
            (event.task.progress, event.task.version),
            (Some(1), 2),
            "{name}: the state after the UPDATE"
        );
    }
}

#[tokio::test]
async fn a_bulk_update_of_more_than_a_page_is_replayed_whole_once_in_order() {
    const COUNT: usize = 1500;
    let test = TestDb::new().await;
    let (service, _) = test.service().await;
    let ids: HashSet<Uuid> = futures::stream::iter(0..COUNT)
        .map(|_| {
            let service = service.clone();
            async move {
                service
                    .create_task(&alice(), task_of("bulk.job"))
                    .await
                    .expect("create")
                    .id
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    assert_eq!(ids.len(), COUNT);

    let mut everyone_live = service.watch_events(&worker(), None).await.unwrap();
    let mut alice_live = service.watch_events(&alice(), None).await.unwrap();
    let before = go_live_streams(&service, &mut [&mut everyone_live, &mut alice_live]).await;

    let conn = test.connect().await;
    let updated = conn
        .execute_unprepared(
            "UPDATE tasks SET progress = 1, version = version + 1 WHERE type = 'bulk.job'",
        )
        .await
        .expect("the bulk UPDATE");
    assert_eq!(updated.rows_affected(), COUNT as u64);

    // The worker's live stream receives the whole statement; once it has,
    // the reader has published it all. Alice's live stream was not read
    // meanwhile: it fell behind its buffer (1024) and catches up from the log.
    expect_bulk("a worker's live stream", &mut everyone_live, before, &ids).await;
    expect_bulk("alice's live stream", &mut alice_live, before, &ids).await;
    // Streams opened now replay it all from the log, a page at a time.
    let cursor = encode_cursor(before);
    let mut everyone_replay = service
        .watch_events(&worker(), Some(&cursor))
        .await
        .unwrap();
    let mut alice_replay = service.watch_events(&alice(), Some(&cursor)).await.unwrap();
    expect_bulk("a worker's replay", &mut everyone_replay, before, &ids).await;
    expect_bulk("alice's replay", &mut alice_replay, before, &ids).await;
    let marker = service
        .create_task(&alice(), task_of("marker"))
        .await
        .unwrap()
        .id;
    next_is_created(
        &mut [
            &mut everyone_replay,
            &mut alice_replay,
            &mut everyone_live,
            &mut alice_live,
        ],
        marker,
        "after the bulk update",
    )
    .await;
}

// ---------------------------------------------------------------------------
// 5. Pruning

#[tokio::test]
async fn a_pruned_cursor_is_cursor_expired_and_new_cursors_resume() {
    let app = spawn_app().await;
    let token = app.user_token("alice");
    let client = WsClient::connect_as(&app.ws_url, &token).await;
    let mut live = client.subscribe(EVENTS, json!({}));
    let probe = go_live(&app, &mut [&mut live]).await.remove(0);
    for i in 0..3 {
        create_via_gql(&app, &token, &format!("old.{i}")).await;
    }
    let old = next_events(&mut live, 3).await;
    // Old enough to be pruned below, unlike what follows.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let f1 = create_via_gql(&app, &token, "kept.1").await;
    let f2 = create_via_gql(&app, &token, "kept.2").await;
    let kept = next_events(&mut live, 2).await;
    assert_eq!(
        summary(&kept),
        expect(&[("CREATED", &f1, "PENDING"), ("CREATED", &f2, "PENDING")])
    );
    let pruned = app
        .service
        .prune_events(Duration::from_millis(250))
        .await
        .expect("prune");
    assert!(pruned >= 4, "the probe(s) and the 3 old events: {pruned}");

    for (what, cursor) in [
        ("the probe's cursor", &probe["cursor"]),
        ("the first old event's cursor", &old[0]["cursor"]),
        ("the second old event's cursor", &old[1]["cursor"]),
    ] {
        let mut sub = client.subscribe(EVENTS, json!({ "after": cursor }));
        expect_error(&mut sub, "CURSOR_EXPIRED", what).await;
    }
    // The newest pruned event: nothing after it is gone, so it resumes.
    let mut at_horizon = client.subscribe(EVENTS, json!({ "after": old[2]["cursor"] }));
    assert_eq!(
        next_events(&mut at_horizon, 2).await,
        kept,
        "after the newest pruned event: exactly the events kept"
    );
    for (what, cursor) in [
        ("garbage", json!("not-a-cursor")),
        ("an empty cursor", json!("")),
        ("a task cursor", json!("MTIzOmFiYw")),
        (
            "a cursor past the newest event",
            json!(encode_cursor(pos(&kept[1]) + 1000)),
        ),
    ] {
        let mut sub = client.subscribe(EVENTS, json!({ "after": cursor }));
        expect_error(&mut sub, "BAD_USER_INPUT", what).await;
    }

    // Everything pruned: a fresh stream works, and new cursors resume.
    tokio::time::sleep(Duration::from_millis(20)).await;
    app.service
        .prune_events(Duration::from_millis(1))
        .await
        .expect("prune everything");
    let mut expired = client.subscribe(EVENTS, json!({ "after": kept[0]["cursor"] }));
    expect_error(
        &mut expired,
        "CURSOR_EXPIRED",
        "a cursor before the newest, all pruned",
    )
    .await;
    let mut fresh = client.subscribe(EVENTS, json!({}));
    let mut from_newest = client.subscribe(EVENTS, json!({ "after": kept[1]["cursor"] }));
    let probes = go_live(&app, &mut [&mut fresh, &mut from_newest, &mut live]).await;
    assert!(probes.iter().all(|p| *p == probes[0]));
    let t4 = create_via_gql(&app, &token, "new.4").await;
    let t5 = create_via_gql(&app, &token, "new.5").await;
    let mut news = Vec::new();
    for sub in [&mut fresh, &mut from_newest, &mut live] {
        let events = next_events(sub, 2).await;
        assert_eq!(
            summary(&events),
            expect(&[("CREATED", &t4, "PENDING"), ("CREATED", &t5, "PENDING")])
        );
        news.push(events);
    }
    assert!(news.iter().all(|events| *events == news[0]));
    assert!(
        pos(&news[0][0]) > pos(&kept[1]),
        "positions are never reused after pruning"
    );
    let mut resumed = client.subscribe(EVENTS, json!({ "after": news[0][0]["cursor"] }));
    assert_eq!(next_event(&mut resumed).await, news[0][1]);
    assert_quiet(&mut resumed, "nothing more after the resumed event").await;
}

// ---------------------------------------------------------------------------
// 6. A writer that dies right after its commit

#[tokio::test]
async fn a_change_whose_writer_never_woke_anyone_still_reaches_subscribers() {
    let app = spawn_app().await;
    let token = app.user_token("alice");
    let client = WsClient::connect_as(&app.ws_url, &token).await;
    let mut events = client.subscribe(EVENTS, json!({}));
    go_live(&app, &mut [&mut events]).await;
    let task = app
        .service
        .create_task(&alice(), task_of("orphan.job"))
        .await
        .unwrap()
        .id;
    assert_eq!(
        summary(&[next_event(&mut events).await]),
        expect(&[("CREATED", &task.to_string(), "PENDING")])
    );
    let mut watch = client.subscribe(WATCH, json!({ "id": task.to_string() }));
    assert_eq!(watch.next_data().await["taskUpdated"]["status"], "PENDING");

    // Committed on a connection no taskql process knows of: as if the
    // instance that wrote it died right after its commit.
    let plain = plain_connection(&app.database.url).await;
    let began = Instant::now();
    raw_update(&plain, task, 42).await;
    let state = tokio::time::timeout(ORPHAN_LATENCY, watch.next_data())
        .await
        .expect("taskUpdated receives a change no instance was told of");
    assert_eq!(
        (
            &state["taskUpdated"]["status"],
            &state["taskUpdated"]["progress"]
        ),
        (&json!("PROCESSING"), &json!(42))
    );
    let updated = tokio::time::timeout(ORPHAN_LATENCY, next_event(&mut events))
        .await
        .expect("taskEvents receives a change no instance was told of");
    eprintln!(
        "a raw UPDATE reached both subscriptions in {:?}",
        began.elapsed()
    );
    assert_eq!(
        summary(std::slice::from_ref(&updated)),
        expect(&[("UPDATED", &task.to_string(), "PROCESSING")])
    );
    assert_eq!(updated["task"]["progress"], 42);

    let began = Instant::now();
    let inserted = raw_insert(&plain, "alice", "orphan.insert").await;
    let created = tokio::time::timeout(ORPHAN_LATENCY, next_event(&mut events))
        .await
        .expect("taskEvents receives an insert no instance was told of");
    eprintln!("a raw INSERT reached taskEvents in {:?}", began.elapsed());
    assert_eq!(
        summary(std::slice::from_ref(&created)),
        expect(&[("CREATED", &inserted.to_string(), "PENDING")])
    );
    assert!(pos(&created) > pos(&updated));
    assert_quiet(&mut events, "nothing more").await;
}

// ---------------------------------------------------------------------------
// 7. The first change after an instance starts

/// Alice creates a task on a service that just started; `stream`, opened
/// (or resumed) before, receives its CREATED within 3 s.
async fn first_change_arrives(service: &SeaTaskService, stream: &mut Events, opened: &str) {
    let task = service
        .create_task(&alice(), task_of("first.after.start"))
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(3), stream.next())
        .await
        .unwrap_or_else(|_| {
            panic!("the first change after the start never reached a stream {opened} before it")
        })
        .expect("the stream ended")
        .expect("the stream failed");
    assert_eq!(
        (event.kind, event.task.id),
        (TaskEventKind::Created, task.id)
    );
}

/// A stream opened on an instance that has just started (as clients
/// reconnect to a restarted server) receives the first change made there.
#[tokio::test]
async fn a_stream_opened_as_the_instance_starts_receives_the_first_change() {
    let test = TestDb::new().await;
    // Something in the log already, as after a restart.
    {
        let (service, _) = test.service().await;
        service
            .create_task(&alice(), task_of("before.restart"))
            .await
            .unwrap();
    }
    let (service, _) = test.service().await;
    let mut live = service.watch_events(&alice(), None).await.unwrap();
    first_change_arrives(&service, &mut live, "opened").await;
}

/// The same with `after`: a client resuming as the instance starts misses
/// nothing made after its cursor.
#[tokio::test]
async fn a_stream_resumed_as_the_instance_starts_receives_the_first_change() {
    let test = TestDb::new().await;
    let cursor = {
        let (service, _) = test.service().await;
        let mut live = service.watch_events(&alice(), None).await.unwrap();
        encode_cursor(go_live_streams(&service, &mut [&mut live]).await)
    };
    let (service, _) = test.service().await;
    let mut resumed = service.watch_events(&alice(), Some(&cursor)).await.unwrap();
    // The replay finds nothing and the stream waits live.
    assert!(
        tokio::time::timeout(Duration::from_millis(50), resumed.next())
            .await
            .is_err(),
        "nothing was made after the cursor"
    );
    first_change_arrives(&service, &mut resumed, "resumed").await;
}

/// What a client sees of the above: the server restarts, the client
/// reconnects at once with its last cursor, and a task is created.
#[tokio::test]
async fn a_client_resuming_right_after_a_server_restart_receives_the_next_change() {
    let database = Arc::new(TestDb::new().await);
    let mut first = spawn_app_with(database.clone(), |_| {}).await;
    let token = first.user_token("alice");
    let cursor = {
        let client = WsClient::connect_as(&first.ws_url, &token).await;
        let mut live = client.subscribe(EVENTS, json!({}));
        go_live(&first, &mut [&mut live]).await.remove(0)["cursor"].clone()
    };
    first.stop().await;
    drop(first);

    let restarted = spawn_app_with(database.clone(), |_| {}).await;
    let client = WsClient::connect_as(&restarted.ws_url, &token).await;
    let mut resumed = client.subscribe(EVENTS, json!({ "after": cursor }));
    let task = create_via_gql(&restarted, &token, "first.after.restart").await;
    let event = tokio::time::timeout(Duration::from_secs(3), next_event(&mut resumed))
        .await
        .expect("the first change after a restart never reached a client that resumed");
    assert_eq!(summary(&[event]), expect(&[("CREATED", &task, "PENDING")]));
}
