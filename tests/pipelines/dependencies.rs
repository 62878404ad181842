//! `dependsOn`: a task waits, not claimable, until its dependencies all
//! COMPLETED; becomes runnable in the transaction that completes the last;
//! is cancelled, transitively, when one fails for good, is cancelled or is
//! deleted; and waits again when that one is retried.

use std::time::Duration;

use super::*;

const WAITING: &str = "id status errorMessage queuePosition waitingOn { id } dependencies { id status result } dependents { id }";

/// Alice's new task of `task_type` depending on `on`: the task.
async fn create_after(app: &TestApp, task_type: &str, on: &[&str]) -> Value {
    let body = app
        .gql(
            Some(&app.user_token("alice")),
            &format!(
                "mutation($input: CreateTaskInput!) {{ createTask(input: $input) {{ {WAITING} }} }}"
            ),
            json!({ "input": { "type": task_type, "dependsOn": on } }),
        )
        .await;
    data(body)["createTask"].clone()
}

/// The task as Alice sees it.
async fn task(app: &TestApp, id: &str) -> Value {
    data(read(app, &app.user_token("alice"), id, WAITING).await)["task"].clone()
}

fn ids(tasks: &Value) -> Vec<String> {
    tasks
        .as_array()
        .expect("a list")
        .iter()
        .map(id_of)
        .collect()
}

/// Claims and completes the next task of `task_type`, leaving `result`.
async fn run(app: &TestApp, task_type: &str, result: Value) -> String {
    let (id, attempt) = claim(app, task_type).await;
    complete(app, &id, attempt, result).await;
    id
}

/// Fails the next task of `task_type` for good.
async fn fail(app: &TestApp, task_type: &str) -> String {
    let (id, attempt) = claim(app, task_type).await;
    let failed = app
        .update_status(
            json!({"id": id, "status": "FAILED", "expectedAttempt": attempt, "errorMessage": "out of memory"}),
            "status",
        )
        .await;
    assert_eq!(data(failed)["updateTaskStatus"]["status"], "FAILED");
    id
}

#[tokio::test]
async fn a_chain_runs_one_step_after_the_other_and_passes_results_on() {
    let mut app = spawn_app().await;
    let image = create(&app, "chain.image").await;
    let upscale = create_after(&app, "chain.upscale", &[&image]).await;
    let thumbs = create_after(&app, "chain.thumbs", &[&id_of(&upscale)]).await;
    for (waiting, on) in [(&upscale, &image), (&thumbs, &id_of(&upscale))] {
        assert_eq!(waiting["status"], "PENDING");
        assert_eq!(ids(&waiting["waitingOn"]), vec![on.clone()], "{waiting}");
        assert!(waiting["queuePosition"].is_null(), "{waiting}");
    }
    assert_eq!(claimed_id(&app, "chain.upscale").await, None);
    assert_eq!(claimed_id(&app, "chain.thumbs").await, None);

    run(&app, "chain.image", json!({"url": "a.png"})).await;
    let upscale = task(&app, &id_of(&upscale)).await;
    assert_eq!(upscale["waitingOn"], json!([]), "{upscale}");
    assert_eq!(upscale["queuePosition"], 1, "{upscale}");
    // The next step reads what the one before produced.
    assert_eq!(
        upscale["dependencies"][0]["result"],
        json!({"url": "a.png"})
    );
    let image_task = task(&app, &image).await;
    assert_eq!(ids(&image_task["dependents"]), vec![id_of(&upscale)]);
    assert_eq!(claimed_id(&app, "chain.thumbs").await, None, "still waits");

    run(&app, "chain.upscale", json!({"url": "a@2x.png"})).await;
    let last = run(&app, "chain.thumbs", json!(["t1.png", "t2.png"])).await;
    assert_eq!(last, id_of(&thumbs));
    app.stop().await;
}

#[tokio::test]
async fn a_task_waits_for_all_of_fifty() {
    let mut app = spawn_app().await;
    let mut parents = Vec::new();
    for _ in 0..50 {
        parents.push(create(&app, "fan.part").await);
    }
    let on: Vec<&str> = parents.iter().map(String::as_str).collect();
    let joined = create_after(&app, "fan.join", &on).await;
    assert_eq!(ids(&joined["waitingOn"]).len(), 50);
    for _ in 0..49 {
        run(&app, "fan.part", json!(1)).await;
    }
    let waiting = task(&app, &id_of(&joined)).await;
    assert_eq!(ids(&waiting["waitingOn"]).len(), 1, "{waiting}");
    assert_eq!(claimed_id(&app, "fan.join").await, None);
    run(&app, "fan.part", json!(1)).await;
    assert_eq!(claimed_id(&app, "fan.join").await, Some(id_of(&joined)));
    app.stop().await;
}

#[tokio::test]
async fn a_failure_cancels_the_chain_after_it_and_a_retry_brings_it_back() {
    let mut app = spawn_app().await;
    let first = create(&app, "cascade.a").await;
    let second = id_of(&create_after(&app, "cascade.b", &[&first]).await);
    let third = id_of(&create_after(&app, "cascade.c", &[&second]).await);
    fail(&app, "cascade.a").await;
    for (id, blamed) in [(&second, &first), (&third, &second)] {
        let task = task(&app, id).await;
        assert_eq!(task["status"], "CANCELLED", "{task}");
        let message = task["errorMessage"].as_str().unwrap_or_default();
        assert!(message.contains(blamed.as_str()), "{message}");
    }

    let retried = app
        .gql(
            Some(&app.user_token("alice")),
            "mutation($id: ID!) { retryTask(id: $id) { status } }",
            json!({ "id": first }),
        )
        .await;
    assert_eq!(data(retried)["retryTask"]["status"], "PENDING");
    for (id, on) in [(&second, &first), (&third, &second)] {
        let task = task(&app, id).await;
        assert_eq!(task["status"], "PENDING", "{task}");
        assert!(task["errorMessage"].is_null(), "{task}");
        assert_eq!(ids(&task["waitingOn"]), vec![on.clone()], "{task}");
    }
    run(&app, "cascade.a", json!("ok")).await;
    assert_eq!(claimed_id(&app, "cascade.b").await, Some(second));
    app.stop().await;
}

#[tokio::test]
async fn a_cancel_or_a_delete_cancels_what_waits_on_it() {
    let mut app = spawn_app().await;
    let alice = app.user_token("alice");
    let cancelled = create(&app, "gone.a").await;
    let deleted = create(&app, "gone.b").await;
    let after_cancel = id_of(&create_after(&app, "gone.c", &[&cancelled]).await);
    let after_delete = id_of(&create_after(&app, "gone.c", &[&deleted]).await);
    app.gql(
        Some(&alice),
        "mutation($id: ID!) { cancelTask(id: $id) { status } }",
        json!({ "id": cancelled }),
    )
    .await;
    app.gql(
        Some(&alice),
        "mutation($id: ID!) { deleteTask(id: $id) }",
        json!({ "id": deleted }),
    )
    .await;
    for (id, says) in [
        (&after_cancel, "was cancelled"),
        (&after_delete, "was deleted"),
    ] {
        let task = task(&app, id).await;
        assert_eq!(task["status"], "CANCELLED", "{task}");
        let message = task["errorMessage"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{message}");
    }
    // A task created after its dependency failed is cancelled from the start;
    // after one that completed, it is runnable at once.
    let failed = fail_one(&app, "gone.d").await;
    let born_cancelled = create_after(&app, "gone.e", &[&failed]).await;
    assert_eq!(born_cancelled["status"], "CANCELLED", "{born_cancelled}");
    create(&app, "gone.f").await;
    let done = run(&app, "gone.f", json!(0)).await;
    let ready = create_after(&app, "gone.g", &[&done]).await;
    assert_eq!(ready["waitingOn"], json!([]), "{ready}");
    assert_eq!(claimed_id(&app, "gone.g").await, Some(id_of(&ready)));
    app.stop().await;
}

/// Creates and fails a task of `task_type`.
async fn fail_one(app: &TestApp, task_type: &str) -> String {
    create(app, task_type).await;
    fail(app, task_type).await
}

#[tokio::test]
async fn a_batch_names_its_own_inputs_and_bad_dependencies_are_refused() {
    let mut app = spawn_app().await;
    let alice = app.user_token("alice");
    let create_tasks = |inputs: Value| {
        let app = &app;
        let alice = alice.clone();
        async move {
            app.gql(
                Some(&alice),
                &format!("mutation($inputs: [CreateTaskInput!]!) {{ createTasks(inputs: $inputs) {{ {WAITING} }} }}"),
                json!({ "inputs": inputs }),
            )
            .await
        }
    };
    let body = create_tasks(json!([
        {"type": "flow.render"},
        {"type": "flow.encode", "dependsOn": ["0"]},
        {"type": "flow.publish", "dependsOn": ["0", "1"]},
    ]))
    .await;
    let tasks = data(body)["createTasks"].clone();
    let made = ids(&tasks);
    assert_eq!(ids(&tasks[1]["waitingOn"]), vec![made[0].clone()]);
    let mut both = vec![made[0].clone(), made[1].clone()];
    both.sort();
    assert_eq!(ids(&tasks[2]["waitingOn"]), both);

    // A later input, the input itself, a bad id, the same task twice.
    for (inputs, index) in [
        (json!([{"type": "x"}, {"type": "x", "dependsOn": ["1"]}]), 1),
        (json!([{"type": "x", "dependsOn": ["5"]}]), 0),
        (
            json!([{"type": "x"}, {"type": "x", "dependsOn": ["nope"]}]),
            1,
        ),
        (
            json!([{"type": "x"}, {"type": "x", "dependsOn": ["0", "0"]}]),
            1,
        ),
    ] {
        let refused = create_tasks(inputs.clone()).await;
        assert_eq!(
            error_code(&refused),
            Some("BAD_USER_INPUT"),
            "{inputs}: {refused}"
        );
        assert_eq!(
            refused["errors"][0]["extensions"]["index"], index,
            "{refused}"
        );
    }
    // An index is for createTasks only; too many dependencies.
    let one = app
        .gql(
            Some(&alice),
            "mutation { createTask(input: {type: \"x\", dependsOn: [\"0\"]}) { id } }",
            json!({}),
        )
        .await;
    assert_eq!(error_code(&one), Some("BAD_USER_INPUT"), "{one}");
    let many: Vec<String> = (0..101).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let too_many = app
        .gql(
            Some(&alice),
            "mutation($on: [ID!]) { createTask(input: {type: \"x\", dependsOn: $on}) { id } }",
            json!({ "on": many }),
        )
        .await;
    assert_eq!(error_code(&too_many), Some("BAD_USER_INPUT"), "{too_many}");

    // Unknown ids, and another user's task, are not found; a worker may
    // depend on anyone's. Nothing is written when refused.
    let bobs = id_of(
        &app.create_task(&app.user_token("bob"), json!({"type": "x"}), "id")
            .await,
    );
    for on in [uuid::Uuid::now_v7().to_string(), bobs.clone()] {
        let refused = create_tasks(
            json!([{"type": "flow.never"}, {"type": "flow.never", "dependsOn": [on]}]),
        )
        .await;
        assert_eq!(error_code(&refused), Some("NOT_FOUND"), "{refused}");
        assert_eq!(refused["errors"][0]["extensions"]["index"], 1, "{refused}");
    }
    let listed = app
        .gql(
            Some(&alice),
            "{ tasks(type: \"flow.never\") { nodes { id } } }",
            json!({}),
        )
        .await;
    assert_eq!(data(listed)["tasks"]["nodes"], json!([]));
    let by_worker = app
        .gql(
            Some(&app.worker_token()),
            "mutation($on: [ID!]) { createTask(input: {type: \"flow.audit\", dependsOn: $on}) { waitingOn { id } } }",
            json!({ "on": [bobs] }),
        )
        .await;
    assert_eq!(ids(&data(by_worker)["createTask"]["waitingOn"]), vec![bobs]);
    app.stop().await;
}

#[tokio::test]
async fn a_subscription_sees_the_last_step_wait_run_and_complete() {
    let mut app = spawn_app().await;
    let first = create(&app, "watch.a").await;
    let last = id_of(&create_after(&app, "watch.b", &[&first]).await);
    let query = json!({
        "query": "subscription($id: ID!) { taskUpdated(id: $id) { status waitingOn { id } } }",
        "variables": { "id": last },
    });
    let mut events = common::sse::EventStream::new(
        common::sse::post(&app, Some(&app.user_token("alice")), &query).await,
    );
    let waiting = events.next_data().await;
    assert_eq!(
        ids(&waiting["taskUpdated"]["waitingOn"]),
        vec![first.clone()]
    );
    run(&app, "watch.a", json!(null)).await;
    let (id, attempt) = claim(&app, "watch.b").await;
    assert_eq!(id, last);
    app.update_status(
        json!({"id": id, "status": "COMPLETED", "expectedAttempt": attempt}),
        "status",
    )
    .await;
    let (payloads, _) = tokio::time::timeout(Duration::from_secs(20), events.until_end())
        .await
        .expect("the stream ends");
    let seen: Vec<(String, usize)> = payloads
        .iter()
        .map(|p| {
            let task = &p["data"]["taskUpdated"];
            (
                task["status"].as_str().unwrap_or_default().to_owned(),
                task["waitingOn"].as_array().map_or(0, Vec::len),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("PENDING".to_owned(), 0),
            ("PROCESSING".to_owned(), 0),
            ("COMPLETED".to_owned(), 0)
        ],
        "{payloads:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_retried_dependent_counts_its_dependencies_anew() {
    let mut app = spawn_app().await;
    let alice = app.user_token("alice");
    let mutate = |query: &'static str, id: String| {
        let (app, alice) = (&app, alice.clone());
        async move { app.gql(Some(&alice), query, json!({ "id": id })).await }
    };
    // Cancelled by its owner while its dependency ran; the dependency then
    // completed: retried, it is runnable at once.
    let first = create(&app, "again.a").await;
    let second = id_of(&create_after(&app, "again.b", &[&first]).await);
    mutate(
        "mutation($id: ID!) { cancelTask(id: $id) { status } }",
        second.clone(),
    )
    .await;
    run(&app, "again.a", json!(1)).await;
    let retried = mutate(
        "mutation($id: ID!) { retryTask(id: $id) { status } }",
        second.clone(),
    )
    .await;
    assert_eq!(data(retried)["retryTask"]["status"], "PENDING");
    assert_eq!(task(&app, &second).await["waitingOn"], json!([]));
    assert_eq!(claimed_id(&app, "again.b").await, Some(second));

    // Cancelled because its dependency failed: retried alone it would wait
    // for nothing that can come, so it is refused until that one is retried.
    let failing = create(&app, "again.c").await;
    let after = id_of(&create_after(&app, "again.d", &[&failing]).await);
    fail(&app, "again.c").await;
    let refused = mutate(
        "mutation($id: ID!) { retryTask(id: $id) { status } }",
        after.clone(),
    )
    .await;
    assert_eq!(error_code(&refused), Some("CONFLICT"), "{refused}");
    let message = refused["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("retry that one first"), "{message}");
    mutate(
        "mutation($id: ID!) { retryTask(id: $id) { status } }",
        failing,
    )
    .await;
    assert_eq!(task(&app, &after).await["status"], "PENDING");
    app.stop().await;
}

#[tokio::test]
async fn one_task_named_twice_is_one_dependency() {
    let mut app = spawn_app().await;
    let alice = app.user_token("alice");
    let held = id_of(
        &app.create_task(
            &alice,
            json!({"type": "twice.a", "idempotencyKey": "k"}),
            "id",
        )
        .await,
    );
    // Input 0 is the task holding key k; input 1 names it by index and by id.
    let body = app
        .gql(
            Some(&alice),
            "mutation($inputs: [CreateTaskInput!]!) { createTasks(inputs: $inputs) { id waitingOn { id } } }",
            json!({ "inputs": [
                {"type": "twice.a", "idempotencyKey": "k"},
                {"type": "twice.b", "dependsOn": ["0", held]},
            ] }),
        )
        .await;
    let tasks = data(body)["createTasks"].clone();
    assert_eq!(id_of(&tasks[0]), held);
    assert_eq!(ids(&tasks[1]["waitingOn"]), vec![held.clone()]);
    run(&app, "twice.a", json!(1)).await;
    assert_eq!(claimed_id(&app, "twice.b").await, Some(id_of(&tasks[1])));
    app.stop().await;
}
