//! Resuming on another instance and after a restart, and streams opened as an instance starts.

use super::*;

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

/// Alice creates a task on a service that just started; `stream`, opened
/// (or resumed) before, receives its CREATED within 3 s.
async fn first_change_arrives(service: &TaskStore, stream: &mut Events, opened: &str) {
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
