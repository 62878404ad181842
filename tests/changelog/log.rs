//! The log's edges: a bulk update of more than a page, pruned cursors, and a change whose writer woke nobody.

use super::*;

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
