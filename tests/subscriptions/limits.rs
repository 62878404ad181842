//! Many subscriptions: a thousand on one instance, and one connection's limit.

use super::*;

#[tokio::test]
async fn a_thousand_subscriptions_on_one_instance_all_see_their_task_complete() {
    const CONNECTIONS: usize = 10;
    const PER_CONNECTION: usize = 100;
    let app = spawn_app().await;
    let alice = app.user_token("alice");

    let service = app.service.clone();
    let tasks: Vec<entity::Task> = futures::stream::iter(0..CONNECTIONS * PER_CONNECTION)
        .map(|_| {
            let service = service.clone();
            async move {
                service
                    .create_task(&common::alice(), new_task())
                    .await
                    .expect("create")
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;

    let mut clients = Vec::new();
    let mut watches = Vec::new();
    for chunk in tasks.chunks(PER_CONNECTION) {
        let client = WsClient::connect_as(&app.ws_url, &alice).await;
        for task in chunk {
            watches.push((
                task.id,
                client.subscribe(WATCH, json!({ "id": task.id.to_string() })),
            ));
        }
        clients.push(client);
    }
    for (_, watch) in &mut watches {
        assert_eq!(watch.next_data().await["taskUpdated"]["status"], "PENDING");
    }
    assert_eq!(live_subscriptions(&app).await, CONNECTIONS * PER_CONNECTION);

    futures::stream::iter(tasks.iter().map(|task| {
        let service = service.clone();
        let result_id = format!("concept-{}", task.id);
        async move {
            service
                .update_task_status(&as_worker(), completion(task.id, &result_id))
                .await
                .expect("complete")
        }
    }))
    .buffer_unordered(16)
    .collect::<Vec<_>>()
    .await;

    for (id, watch) in &mut watches {
        let (results, end) = watch.until_end().await;
        assert_eq!(
            states(&results),
            owned(&[("COMPLETED", json!(100), json!(format!("concept-{id}")))]),
            "task {id}"
        );
        assert_eq!(end, Event::Complete, "task {id}");
    }
    // Finished streams give their place back.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while live_subscriptions(&app).await != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "subscriptions still counted as live"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(clients);
}

/// `taskql_subscriptions` from /metrics.
async fn live_subscriptions(app: &TestApp) -> usize {
    let text = app
        .http
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|line| line.strip_prefix("taskql_subscriptions "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no taskql_subscriptions in /metrics:\n{text}"))
}

#[tokio::test]
async fn one_connection_runs_at_most_its_limit_of_subscriptions() {
    let database = Arc::new(TestDb::new().await);
    let app = spawn_app_with(database, |settings| {
        settings.http.max_subscriptions_per_connection = 3;
    })
    .await;
    let alice = app.user_token("alice");
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(create_task(&app, &alice).await);
    }

    let client = WsClient::connect_as(&app.ws_url, &alice).await;
    let mut running = Vec::new();
    for id in &ids[..3] {
        let mut watch = client.subscribe(WATCH, json!({ "id": id }));
        assert_eq!(watch.next_data().await["taskUpdated"]["status"], "PENDING");
        running.push(watch);
    }
    let mut over = client.subscribe(WATCH, json!({ "id": ids[3] }));
    let message = expect_error(&mut over, "BAD_USER_INPUT").await;
    assert!(
        message.as_str().unwrap_or_default().contains('3'),
        "the error names the limit: {message}"
    );
    let mut over_events = client.subscribe(EVENTS, json!({}));
    expect_error(&mut over_events, "BAD_USER_INPUT").await;

    // Stopping one frees its place.
    running[0].stop();
    assert_eq!(running[0].next().await, Event::Complete);
    let mut again = client.subscribe(WATCH, json!({ "id": ids[3] }));
    assert_eq!(again.next_data().await["taskUpdated"]["id"], ids[3]);

    // The limit is per connection.
    let other = WsClient::connect_as(&app.ws_url, &alice).await;
    for id in &ids[..3] {
        let mut watch = other.subscribe(WATCH, json!({ "id": id }));
        assert_eq!(watch.next_data().await["taskUpdated"]["id"], *id);
        running.push(watch);
    }
    // Those still running on the first connection are unaffected.
    set_status(&app, &ids[1], "COMPLETED", json!({ "resultId": "r" })).await;
    let (results, end) = running[1].until_end().await;
    assert_eq!(states(&results)[0].0, "COMPLETED");
    assert_eq!(end, Event::Complete);
}
