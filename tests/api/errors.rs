//! What goes wrong and what it gets: bad input, transport errors, abusive queries, database failures.

use super::*;

#[tokio::test]
async fn bad_input_gets_bad_user_input() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let cases = [
        (
            "mutation { createTask(input: {type: \"Not Valid\"}) { id } }",
            "type may contain only",
        ),
        (
            "mutation { createTask(input: {type: \"\"}) { id } }",
            "type must be 1 to 64",
        ),
        (
            "mutation { createTask(input: {type: \"x\", metadata: [1, 2]}) { id } }",
            "metadata must be a JSON object",
        ),
        (
            "query { task(id: \"not-a-uuid\") { id } }",
            "is not a task id",
        ),
        (
            "query { tasks(first: 101) { nodes { id } } }",
            "first must be between 1 and 100",
        ),
        (
            "query { tasks(first: 0) { nodes { id } } }",
            "first must be between 1 and 100",
        ),
        (
            "query { tasks(first: -5) { nodes { id } } }",
            "first must be between 1 and 100",
        ),
        (
            "query { tasks(after: \"garbage\") { nodes { id } } }",
            "not a cursor",
        ),
        (
            "query { tasks(type: \"a\\u0000b\") { nodes { id } } }",
            "type may contain only",
        ),
        (
            "mutation { createTask(input: {type: \"x\", metadata: {a: \"x\\u0000y\"}}) { id } }",
            "NUL",
        ),
    ];
    for (query, message) in cases {
        let body = app.gql(Some(&alice), query, json!({})).await;
        assert_eq!(error_code(&body), Some("BAD_USER_INPUT"), "{query}: {body}");
        assert!(
            body["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains(message),
            "{query}: {body}"
        );
    }
    let big = json!({ "blob": "x".repeat(70 * 1024) });
    let body = app
        .gql(
            Some(&alice),
            "mutation($m: JSON) { createTask(input: {type: \"x\", metadata: $m}) { id } }",
            json!({ "m": big }),
        )
        .await;
    assert_eq!(error_code(&body), Some("BAD_USER_INPUT"), "{body}");
    let worker = app.worker_token();
    let task = create(&app, &alice, "x").await;
    let body = app
        .gql(Some(&worker), "mutation($id: ID!) { updateTaskStatus(input: {id: $id, status: PROCESSING, progress: 250}) { id } }", json!({ "id": task["id"] }))
        .await;
    assert_eq!(error_code(&body), Some("BAD_USER_INPUT"), "{body}");
    assert_eq!(count_rows(&app.db).await, 1);
}

#[tokio::test]
async fn transport_errors_have_http_statuses() {
    let app = spawn_app().await;
    let url = format!("{}/graphql", app.base);
    let response = app
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("not a GraphQL request")
    );

    let huge = json!({ "query": "query { tasks { nodes { id } } }", "variables": { "pad": "x".repeat(1024 * 1024 + 10) } });
    let response = app.http.post(&url).json(&huge).send().await.unwrap();
    assert_eq!(response.status(), 413);

    let response = app.get("/healthz").await;
    assert_eq!(response.status(), 200);
    let response = app.get("/readyz").await;
    assert_eq!(response.status(), 200);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("taskql_http_graphql_requests_total"),
        "{metrics}"
    );
    // A browser asking for a page gets GraphiQL.
    let graphiql = app
        .http
        .get(&url)
        .header(
            "accept",
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(graphiql.status(), 200);
    let page = graphiql.text().await.unwrap();
    assert!(page.contains("graphiql") && page.contains("/graphql/ws"));
    // Every response carries a request id for log correlation.
    let response = app.get("/healthz").await;
    assert!(response.headers().contains_key("x-request-id"));

    // A frontend on another origin may call with its token (CORS preflight).
    let preflight = app
        .http
        .request(reqwest::Method::OPTIONS, &url)
        .header("Origin", "https://app.example")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    let allowed = |name: &str| {
        preflight
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_lowercase()
    };
    assert_eq!(allowed("access-control-allow-origin"), "*");
    assert!(allowed("access-control-allow-headers").contains("authorization"));
}

#[tokio::test]
async fn abusive_queries_are_refused_before_they_run() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    create(&app, &alice, "x").await;

    // 40 levels of introspection.
    let mut deep = String::from("name");
    for _ in 0..40 {
        deep = format!("ofType {{ {deep} }}");
    }
    let query = format!("query {{ __type(name: \"Task\") {{ fields {{ type {{ {deep} }} }} }} }}");
    let body = app.gql(Some(&alice), &query, json!({})).await;
    assert!(body["data"].is_null(), "{body}");
    assert_eq!(error_code(&body), Some("BAD_USER_INPUT"), "{body}");

    let aliases: String = (0..2000)
        .map(|i| format!("a{i}: tasks(first: 100) {{ nodes {{ id }} }} "))
        .collect();
    let body = app
        .gql(Some(&alice), &format!("query {{ {aliases} }}"), json!({}))
        .await;
    assert!(body["data"].is_null(), "{}", &body.to_string()[..200]);
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("complex"),
        "{body}"
    );
    assert_eq!(error_code(&body), Some("BAD_USER_INPUT"));

    // Plain depth, without introspection.
    let mut nested = String::from("id");
    for _ in 0..40 {
        nested = format!("edges {{ node {{ {nested} }} }}");
    }
    let body = app
        .gql(
            Some(&alice),
            &format!("query {{ tasks {{ {nested} }} }}"),
            json!({}),
        )
        .await;
    assert!(body["data"].is_null());
    assert_eq!(error_code(&body), Some("BAD_USER_INPUT"), "{body}");
    // A wrongly typed argument is bad input too, with a code.
    let body = app
        .gql(
            Some(&alice),
            "query { tasks(first: \"ten\") { nodes { id } } }",
            json!({}),
        )
        .await;
    assert_eq!(error_code(&body), Some("BAD_USER_INPUT"), "{body}");

    // A real page with every field is allowed.
    let full = format!(
        "query {{ tasks(first: 100) {{ edges {{ cursor node {{ {TASK_FIELDS} }} }} nodes {{ {TASK_FIELDS} }} pageInfo {{ hasNextPage endCursor }} }} }}"
    );
    let body = app.gql(Some(&alice), &full, json!({})).await;
    assert!(body["errors"].is_null(), "{body}");
}

#[tokio::test]
async fn database_failures_are_internal_and_say_nothing_of_the_database() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    create(&app, &alice, "x").await;
    use sea_orm::ConnectionTrait;
    // PostgreSQL refuses to drop a table other tables reference, unless told.
    let drop = match app.db.get_database_backend() {
        sea_orm::DatabaseBackend::Postgres => "DROP TABLE tasks CASCADE",
        _ => "DROP TABLE tasks",
    };
    app.db.execute_unprepared(drop).await.unwrap();
    let body = app
        .gql(Some(&alice), "query { tasks { nodes { id } } }", json!({}))
        .await;
    assert_eq!(error_code(&body), Some("INTERNAL_SERVER_ERROR"), "{body}");
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert_eq!(message, "internal server error");
    let text = body.to_string().to_lowercase();
    for leak in ["relation", "no such table", "sql", "database"] {
        assert!(!text.contains(leak), "{leak} leaked: {body}");
    }
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 200, "the database itself is reachable");
}
