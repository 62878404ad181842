//! `createTasks`: up to 1000 in input order, all or nothing, and each
//! input's idempotency key, within a call and across calls.

use super::*;

/// Every task `tasks` lists for the owner of `token`, page by page.
async fn listed_tasks(app: &TestApp, token: &str) -> Vec<Value> {
    let query = "query($after: String) {
      tasks(first: 100, after: $after) { nodes { id type metadata } pageInfo { hasNextPage endCursor } }
    }";
    let mut tasks = Vec::new();
    let mut after = Value::Null;
    loop {
        let page = data(app.gql(Some(token), query, json!({ "after": after })).await);
        tasks.extend(list(page["tasks"].clone(), "nodes"));
        if page["tasks"]["pageInfo"]["hasNextPage"] != true {
            return tasks;
        }
        after = page["tasks"]["pageInfo"]["endCursor"].clone();
    }
}

#[tokio::test]
async fn a_thousand_inputs_come_back_in_input_order_and_are_listed() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let inputs: Vec<Value> = (0..1000)
        .map(|i| {
            json!({
                "type": format!("kind-{}", i % 7),
                "metadata": { "n": i },
                "priority": i % 5 - 2,
            })
        })
        .collect();

    let tasks = create_tasks(&app, &alice, &inputs).await;
    assert_eq!(tasks.len(), 1000);
    for (i, task) in tasks.iter().enumerate() {
        let want = (
            json!(format!("kind-{}", i % 7)),
            json!({ "n": i }),
            json!(i as i64 % 5 - 2),
        );
        assert_eq!(
            (
                task["type"].clone(),
                task["metadata"].clone(),
                task["priority"].clone()
            ),
            want,
            "task {i}"
        );
        assert_eq!(
            (&task["status"], &task["userId"]),
            (&json!("PENDING"), &json!("alice"))
        );
    }
    let created: HashSet<String> = ids(&tasks).into_iter().collect();
    assert_eq!(created.len(), 1000, "a task per input");
    assert_eq!(count_rows(&app.db).await, 1000);

    let listed = listed_tasks(&app, &alice).await;
    assert_eq!(listed.len(), 1000);
    assert_eq!(ids(&listed).into_iter().collect::<HashSet<_>>(), created);
    // Each listed task is the one its input asked for.
    for task in &listed {
        let n = task["metadata"]["n"].as_u64().expect("n") as usize;
        assert_eq!(task["type"], json!(format!("kind-{}", n % 7)));
        assert_eq!(task["id"], tasks[n]["id"]);
    }
    assert!(listed_tasks(&app, &app.user_token("bob")).await.is_empty());
}

#[tokio::test]
async fn a_thousand_and_one_inputs_are_refused_and_an_empty_list_creates_nothing() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let body = try_create_tasks(&app, &alice, &inputs("image", "x", 1001)).await;
    assert_eq!(error_code(&body), Some("BAD_USER_INPUT"), "{body}");
    assert!(body["data"].is_null(), "{body}");
    assert_eq!(count_rows(&app.db).await, 0, "nothing was written");

    assert!(create_tasks(&app, &alice, &[]).await.is_empty());
    assert_eq!(count_rows(&app.db).await, 0);
}

#[tokio::test]
async fn one_bad_input_refuses_the_whole_call_naming_its_index() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    create_tasks(&app, &alice, &inputs("image", "before", 1)).await;

    // Each input of the batch has a key: a refused call must not take them.
    let batch = || -> Vec<Value> {
        (0..12)
            .map(|i| json!({ "type": "image", "metadata": { "n": i }, "idempotencyKey": format!("k-{i}") }))
            .collect()
    };
    let bad = [
        (7, "priority", json!(500)),
        (7, "type", json!("Not A Type!")),
        (0, "maxAttempts", json!(0)),
        (11, "metadata", json!([1, 2])),
        (3, "idempotencyKey", json!("")),
    ];
    for (index, field, value) in bad {
        let mut inputs = batch();
        inputs[index][field] = value.clone();
        let body = try_create_tasks(&app, &alice, &inputs).await;
        let what = format!("{field} {value} at input {index}");
        assert_refused_at(&body, "BAD_USER_INPUT", index as u64, &what);
        assert_eq!(count_rows(&app.db).await, 1, "{what}: nothing was written");
    }

    // The same batch without the bad input is written whole, with new tasks
    // for every key.
    let tasks = create_tasks(&app, &alice, &batch()).await;
    assert_eq!(tasks.len(), 12);
    assert!(tasks.iter().all(|t| t["status"] == "PENDING"));
    assert_eq!(count_rows(&app.db).await, 13);
}

#[tokio::test]
async fn one_key_twice_in_a_call_is_one_task_returned_twice() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let fox =
        json!({ "type": "image", "metadata": { "prompt": "a fox" }, "idempotencyKey": "fox" });
    let inputs = [
        fox.clone(),
        json!({ "type": "image", "metadata": { "prompt": "no key" } }),
        fox.clone(),
        json!({ "type": "report", "idempotencyKey": "report" }),
        fox.clone(),
    ];
    let tasks = create_tasks(&app, &alice, &inputs).await;
    let ids = ids(&tasks);
    assert_eq!(ids.len(), 5);
    assert_eq!((&ids[0], &ids[0]), (&ids[2], &ids[4]), "the key's one task");
    assert_eq!(tasks[2], tasks[0], "returned twice, the same");
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 3);
    assert_eq!(tasks[3]["type"], "report");
    assert_eq!(count_rows(&app.db).await, 3);

    // The same key with other metadata in one call: CONFLICT at the later
    // input, and nothing of the call written.
    let inputs = [
        json!({ "type": "image", "idempotencyKey": "cat", "metadata": { "prompt": "a cat" } }),
        json!({ "type": "image", "metadata": { "prompt": "no key" } }),
        json!({ "type": "image", "idempotencyKey": "cat", "metadata": { "prompt": "a dog" } }),
    ];
    let body = try_create_tasks(&app, &alice, &inputs).await;
    assert_refused_at(&body, "CONFLICT", 2, "one key, other metadata");
    assert_eq!(count_rows(&app.db).await, 3);
}

#[tokio::test]
async fn a_key_of_an_earlier_call_returns_its_task_and_a_changed_input_conflicts() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let a = json!({ "type": "image", "metadata": { "prompt": "a" }, "idempotencyKey": "a" });
    let b = json!({ "type": "image", "metadata": { "prompt": "b" }, "idempotencyKey": "b" });
    let first = create_tasks(&app, &alice, &[a.clone(), b.clone()]).await;
    assert_eq!(count_rows(&app.db).await, 2);

    let c = json!({ "type": "image", "idempotencyKey": "c" });
    let second = create_tasks(
        &app,
        &alice,
        &[c.clone(), a.clone(), json!({ "type": "image" })],
    )
    .await;
    assert_eq!(second[1], first[0], "the first call's task, as it was");
    assert_ne!(second[0]["id"], first[1]["id"]);
    assert_eq!(count_rows(&app.db).await, 4, "two new tasks");
    // createTask with a batch's key finds the batch's task too.
    let single = app.create_task(&alice, c, "id").await;
    assert_eq!(single["id"], second[0]["id"]);

    // A used key with other metadata, or another type: CONFLICT naming the
    // input, and none of the call's new inputs written.
    let changed = [
        (
            2,
            json!({ "type": "image", "metadata": { "prompt": "B" }, "idempotencyKey": "b" }),
        ),
        (
            0,
            json!({ "type": "report", "metadata": { "prompt": "a" }, "idempotencyKey": "a" }),
        ),
    ];
    for (index, input) in changed {
        let mut inputs = vec![
            json!({ "type": "image", "idempotencyKey": "d" }),
            json!({ "type": "image", "idempotencyKey": "e" }),
        ];
        inputs.insert(index, input);
        let body = try_create_tasks(&app, &alice, &inputs).await;
        assert_refused_at(&body, "CONFLICT", index as u64, &format!("input {index}"));
        assert_eq!(
            count_rows(&app.db).await,
            4,
            "input {index}: nothing written"
        );
    }
    let d = create_tasks(
        &app,
        &alice,
        &[json!({ "type": "report", "idempotencyKey": "d" })],
    )
    .await;
    assert_eq!(d[0]["type"], "report", "key d is still free");

    // Keys are per owner.
    let bobs = create_tasks(&app, &app.user_token("bob"), &[a]).await;
    assert_ne!(bobs[0]["id"], first[0]["id"]);
    assert_eq!(bobs[0]["userId"], "bob");
}

#[tokio::test]
async fn each_created_task_is_answered_as_it_is_then_read() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let later = "2031-01-02T03:04:05.678901Z";
    let metadata = json!({ "prompt": "a fox", "size": [1024, 768], "ratio": 0.1, "big": 12345678901234_i64, "nested": { "b": true, "a": null } });
    for keyed in [false, true] {
        let key = |i: usize| keyed.then(|| format!("same-as-read-{i}"));
        let batch = vec![
            json!({ "type": "image", "metadata": metadata, "idempotencyKey": key(0) }),
            json!({ "type": "thumb", "runAt": later, "priority": 7, "maxAttempts": 5, "idempotencyKey": key(1) }),
            json!({ "type": "image", "priority": -3, "idempotencyKey": key(2) }),
        ];
        let made = create_tasks(&app, &alice, &batch).await;
        assert_eq!(made.len(), 3);
        for task in &made {
            let read = task_of(&app, task["id"].as_str().unwrap()).await;
            assert_eq!(
                task, &read,
                "keyed: {keyed}: what createTasks answered is what is stored"
            );
        }
        assert_eq!(made[0]["metadata"], metadata);
        let run_at = made[1]["runAt"].as_str().unwrap();
        assert_eq!(
            chrono::DateTime::parse_from_rfc3339(run_at).unwrap(),
            chrono::DateTime::parse_from_rfc3339(later).unwrap()
        );
        assert_eq!(
            (&made[1]["priority"], &made[2]["priority"]),
            (&json!(7), &json!(-3))
        );
    }
}
