//! A task's whole lifecycle over HTTP, another user's task invisible, and a worker finding any task by its result id.

use super::*;

async fn set_status(app: &TestApp, input: Value) -> Value {
    app.update_status(input, TASK_FIELDS).await
}

#[tokio::test]
async fn full_lifecycle_over_http() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");

    let task = create(&app, &alice, "concept.image").await;
    let id = task["id"].as_str().unwrap().to_owned();
    assert_eq!(task["status"], "PENDING");
    assert_eq!(task["type"], "concept.image");
    assert_eq!(task["metadata"], json!({ "prompt": "a red fox" }));
    assert_eq!(task["attempts"], 0);
    assert!(task["createdAt"].as_str().unwrap().contains('T'));
    assert!(task["completedAt"].is_null());

    let read = get(&app, &alice, &id).await;
    assert_eq!(read["data"]["task"], task);

    // Paging: three more tasks, two at a time, newest first.
    for _ in 0..3 {
        create(&app, &alice, "concept.image").await;
    }
    let page_query = "query($after: String) { tasks(first: 2, after: $after) { edges { cursor node { id } } nodes { id } pageInfo { hasNextPage hasPreviousPage startCursor endCursor } } }";
    let mut ids = Vec::new();
    let mut after = Value::Null;
    loop {
        let body = app
            .gql(Some(&alice), page_query, json!({ "after": after }))
            .await;
        let page = &body["data"]["tasks"];
        let edges = page["edges"].as_array().unwrap();
        let nodes = page["nodes"].as_array().unwrap();
        assert_eq!(edges.len(), nodes.len());
        for (edge, node) in edges.iter().zip(nodes) {
            assert_eq!(edge["node"]["id"], node["id"]);
            ids.push(node["id"].as_str().unwrap().to_owned());
        }
        assert_eq!(
            page["pageInfo"]["endCursor"],
            edges.last().unwrap()["cursor"]
        );
        if !page["pageInfo"]["hasNextPage"].as_bool().unwrap() {
            break;
        }
        after = page["pageInfo"]["endCursor"].clone();
    }
    assert_eq!(ids.len(), 4);
    assert_eq!(ids.last().unwrap(), &id, "oldest last");

    let processing = set_status(
        &app,
        json!({ "id": id, "status": "PROCESSING", "progress": 50 }),
    )
    .await;
    assert_eq!(
        processing["data"]["updateTaskStatus"]["status"], "PROCESSING",
        "{processing}"
    );
    assert_eq!(processing["data"]["updateTaskStatus"]["progress"], 50);
    assert!(processing["data"]["updateTaskStatus"]["startedAt"].is_string());

    let done = set_status(
        &app,
        json!({ "id": id, "status": "COMPLETED", "resultId": "concept-7" }),
    )
    .await;
    let done = &done["data"]["updateTaskStatus"];
    assert_eq!(done["status"], "COMPLETED");
    assert_eq!(done["resultId"], "concept-7");
    assert_eq!(done["progress"], 100);
    assert!(done["completedAt"].is_string());

    // The same completion again is a harmless no-op; a different one is CONFLICT.
    let again = set_status(
        &app,
        json!({ "id": id, "status": "COMPLETED", "resultId": "concept-7" }),
    )
    .await;
    assert_eq!(&again["data"]["updateTaskStatus"], done);
    let late = set_status(
        &app,
        json!({ "id": id, "status": "FAILED", "errorMessage": "late" }),
    )
    .await;
    assert_eq!(error_code(&late), Some("CONFLICT"), "{late}");

    let by_result = app
        .gql(
            Some(&alice),
            "query { taskByResultId(resultId: \"concept-7\") { id status } }",
            json!({}),
        )
        .await;
    assert_eq!(by_result["data"]["taskByResultId"]["id"], id.as_str());
    let none = app
        .gql(
            Some(&alice),
            "query { taskByResultId(resultId: \"nope\") { id } }",
            json!({}),
        )
        .await;
    assert!(
        none["data"]["taskByResultId"].is_null() && none["errors"].is_null(),
        "{none}"
    );

    let done_filter = app
        .gql(
            Some(&alice),
            "query { tasks(status: [COMPLETED], type: \"concept.image\") { nodes { id } } }",
            json!({}),
        )
        .await;
    assert_eq!(done_filter["data"]["tasks"]["nodes"], json!([{ "id": id }]));

    let cancel_done = app
        .gql(
            Some(&alice),
            "mutation($id: ID!) { cancelTask(id: $id) { status } }",
            json!({ "id": id }),
        )
        .await;
    assert_eq!(error_code(&cancel_done), Some("CONFLICT"));
    let other = ids[0].clone();
    let cancelled = app
        .gql(
            Some(&alice),
            "mutation($id: ID!) { cancelTask(id: $id) { status completedAt } }",
            json!({ "id": other }),
        )
        .await;
    assert_eq!(
        cancelled["data"]["cancelTask"]["status"], "CANCELLED",
        "{cancelled}"
    );

    let deleted = app
        .gql(
            Some(&alice),
            "mutation($id: ID!) { deleteTask(id: $id) }",
            json!({ "id": id }),
        )
        .await;
    assert_eq!(deleted["data"]["deleteTask"], true);
    assert_eq!(error_code(&get(&app, &alice, &id).await), Some("NOT_FOUND"));
    let deleted_again = app
        .gql(
            Some(&alice),
            "mutation($id: ID!) { deleteTask(id: $id) }",
            json!({ "id": id }),
        )
        .await;
    assert_eq!(error_code(&deleted_again), Some("NOT_FOUND"));
}

#[tokio::test]
async fn another_users_task_is_invisible_and_unchanged() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let bob = app.user_token("bob");
    let finished = create(&app, &alice, "report").await;
    let finished_id = finished["id"].as_str().unwrap();
    set_status(
        &app,
        json!({ "id": finished_id, "status": "COMPLETED", "resultId": "r-secret" }),
    )
    .await;
    let pending = create(&app, &alice, "report").await;
    let pending_id = pending["id"].as_str().unwrap();
    let before = [
        get(&app, &alice, finished_id).await,
        get(&app, &alice, pending_id).await,
    ];

    for id in [finished_id, pending_id] {
        let cases = [
            ("query($id: ID!) { task(id: $id) { id } }", "NOT_FOUND"),
            (
                "mutation($id: ID!) { cancelTask(id: $id) { id } }",
                "NOT_FOUND",
            ),
            ("mutation($id: ID!) { deleteTask(id: $id) }", "NOT_FOUND"),
        ];
        for (query, code) in cases {
            let body = app.gql(Some(&bob), query, json!({ "id": id })).await;
            assert_eq!(error_code(&body), Some(code), "{query}: {body}");
            let message = body["errors"][0]["message"].as_str().unwrap();
            assert!(!message.contains("alice"), "no leak: {message}");
        }
    }
    let by_result = app
        .gql(
            Some(&bob),
            "query { taskByResultId(resultId: \"r-secret\") { id } }",
            json!({}),
        )
        .await;
    assert!(by_result["data"]["taskByResultId"].is_null(), "{by_result}");
    let listed = app
        .gql(
            Some(&bob),
            "query { tasks(first: 100) { nodes { id } } }",
            json!({}),
        )
        .await;
    assert_eq!(listed["data"]["tasks"]["nodes"], json!([]));

    let after = [
        get(&app, &alice, finished_id).await,
        get(&app, &alice, pending_id).await,
    ];
    assert_eq!(before, after, "bob changed nothing");

    // A worker reads any task.
    let as_worker = get(&app, &app.worker_token(), pending_id).await;
    assert_eq!(as_worker["data"]["task"]["id"], pending_id);
}

/// A worker looks a result up by its id alone, over every user's tasks, and
/// that lookup is served by an index of its own rather than a scan.
#[tokio::test]
async fn a_worker_finds_any_users_task_by_result_id_through_an_index() {
    let app = spawn_app().await;
    let worker = app.worker_token();
    let mut ids = Vec::new();
    for user in ["alice", "bob"] {
        let task = create(&app, &app.user_token(user), "render").await;
        let id = task["id"].as_str().unwrap().to_owned();
        let done = set_status(
            &app,
            json!({ "id": id, "status": "COMPLETED", "resultId": format!("image-of-{user}") }),
        )
        .await;
        assert_eq!(
            done["data"]["updateTaskStatus"]["status"], "COMPLETED",
            "{done}"
        );
        ids.push(id);
    }
    // Enough other tasks, each with a result id of its own, that a scan
    // would cost more than the index.
    let others = (0..400).map(|i| {
        let user = if i % 2 == 0 { alice() } else { bob() };
        let service = app.service.clone();
        async move { new_task(service.as_ref(), &user, "filler").await }
    });
    futures::future::join_all(others).await;
    use sea_orm::{ConnectionTrait, Statement};
    let backend = app.db.get_database_backend();
    app.db
        .execute_raw(Statement::from_string(
            backend,
            "UPDATE tasks SET result_id = 'filler-' || id WHERE result_id IS NULL",
        ))
        .await
        .unwrap();
    app.db.execute_unprepared("ANALYZE").await.unwrap();

    let lookup = "query($r: String!) { taskByResultId(resultId: $r) { id resultId } }";
    for (user, id) in ["alice", "bob"].into_iter().zip(&ids) {
        let result_id = format!("image-of-{user}");
        let found = data(
            app.gql(Some(&worker), lookup, json!({ "r": result_id }))
                .await,
        );
        assert_eq!(found["taskByResultId"]["id"], id.as_str(), "{user}");
        assert_eq!(found["taskByResultId"]["resultId"], result_id.as_str());
    }
    let none = data(
        app.gql(Some(&worker), lookup, json!({ "r": "image-of-carol" }))
            .await,
    );
    assert!(none["taskByResultId"].is_null(), "{none}");

    // The statement a worker's lookup runs: no user, the newest first.
    let select = "SELECT * FROM tasks WHERE result_id = 'image-of-bob' \
                  ORDER BY created_at DESC, id DESC LIMIT 1";
    let explain = match backend {
        sea_orm::DatabaseBackend::Postgres => format!("EXPLAIN {select}"),
        _ => format!("EXPLAIN QUERY PLAN {select}"),
    };
    let plan: Vec<String> = app
        .db
        .query_all_raw(Statement::from_string(backend, explain))
        .await
        .unwrap()
        .iter()
        .map(|row| {
            let column = if backend == sea_orm::DatabaseBackend::Postgres {
                "QUERY PLAN"
            } else {
                "detail"
            };
            row.try_get::<String>("", column).unwrap()
        })
        .collect();
    let uses_index = plan.iter().any(|line| {
        line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .any(|word| word == "tasks_result_idx")
    });
    assert!(
        uses_index,
        "the lookup does not use tasks_result_idx: {plan:#?}"
    );
}
