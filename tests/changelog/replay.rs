//! Replays: after any cursor exactly the live events after it, and started during concurrent writes, missing nothing.

use super::*;

async fn next_n(stream: &mut Events, count: usize) -> Vec<TaskEvent> {
    let mut events = Vec::with_capacity(count);
    for _ in 0..count {
        events.push(next_of(stream).await);
    }
    events
}

/// What a replay must reproduce exactly: position, kind and the whole task.
fn exact(events: &[TaskEvent]) -> Vec<(i64, TaskEventKind, entity::Task)> {
    events
        .iter()
        .map(|event| (event.pos, event.kind, event.task.clone()))
        .collect()
}

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
