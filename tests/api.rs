//! The GraphQL API over real HTTP: lifecycle, isolation, auth, roles, limits.
mod common;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const TASK_FIELDS: &str = "id type status resultId errorMessage metadata progress attempts createdAt updatedAt startedAt completedAt";

async fn create(app: &TestApp, token: &str, task_type: &str) -> Value {
    let input = json!({ "type": task_type, "metadata": { "prompt": "a red fox" } });
    app.create_task(token, input, TASK_FIELDS).await
}

async fn set_status(app: &TestApp, input: Value) -> Value {
    app.update_status(input, TASK_FIELDS).await
}

async fn get(app: &TestApp, token: &str, id: &str) -> Value {
    app.gql(
        Some(token),
        &format!("query($id: ID!) {{ task(id: $id) {{ {TASK_FIELDS} }} }}"),
        json!({ "id": id }),
    )
    .await
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

fn sign(claims: Value, key: &EncodingKey, alg: Algorithm) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[tokio::test]
async fn bad_tokens_are_unauthenticated_everywhere() {
    let app = spawn_app().await;
    let good = EncodingKey::from_secret(TEST_SECRET.as_bytes());
    let wrong = EncodingKey::from_secret(b"another-secret-another-secret-xx");
    let expired = sign(
        json!({ "sub": "alice", "exp": now() - 3600 }),
        &good,
        Algorithm::HS256,
    );
    let wrong_key = sign(
        json!({ "sub": "alice", "exp": now() + 3600 }),
        &wrong,
        Algorithm::HS256,
    );
    let no_sub = sign(json!({ "exp": now() + 3600 }), &good, Algorithm::HS256);
    let no_exp = sign(json!({ "sub": "alice" }), &good, Algorithm::HS256);
    // Not valid for another hour: beyond the leeway.
    let not_yet = sign(
        json!({ "sub": "alice", "exp": now() + 7200, "nbf": now() + 3600 }),
        &good,
        Algorithm::HS256,
    );
    let hs384 = sign(
        json!({ "sub": "alice", "exp": now() + 3600 }),
        &EncodingKey::from_secret(TEST_SECRET.as_bytes()),
        Algorithm::HS384,
    );
    // alg "none": header and claims, no signature.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let none = format!(
        "{}.{}.",
        b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(
            json!({ "sub": "alice", "exp": now() + 3600, "role": "service_role" }).to_string()
        )
    );
    let valid = app.user_token("alice");
    let headers = [
        format!("Bearer {expired}"),
        format!("Bearer {wrong_key}"),
        format!("Bearer {no_sub}"),
        format!("Bearer {no_exp}"),
        format!("Bearer {not_yet}"),
        format!("Bearer {hs384}"),
        format!("Bearer {none}"),
        "Bearer not-a-jwt".to_owned(),
        format!("Token {valid}"),
        format!("Basic {valid}"),
        valid.clone(),
        "Bearer ".to_owned(),
    ];
    let operations = [
        "query { tasks { nodes { id } } }",
        "query { task(id: \"00000000-0000-0000-0000-000000000000\") { id } }",
        "query { taskByResultId(resultId: \"x\") { id } }",
        "mutation { createTask(input: {type: \"x\"}) { id } }",
        "mutation { cancelTask(id: \"00000000-0000-0000-0000-000000000000\") { id } }",
        "mutation { deleteTask(id: \"00000000-0000-0000-0000-000000000000\") }",
        "mutation { claimTask { id } }",
    ];
    for header in headers.iter().map(Some).chain([None]) {
        for operation in operations {
            let mut request = app
                .http
                .post(format!("{}/graphql", app.base))
                .json(&json!({ "query": operation }));
            if let Some(header) = header {
                request = request.header("Authorization", header);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            let body: Value = response.json().await.unwrap();
            assert_eq!(
                error_code(&body),
                Some("UNAUTHENTICATED"),
                "{header:?} {operation}: {body}"
            );
        }
    }
    assert_eq!(count_rows(&app.db).await, 0, "nothing was created");

    // A clock a few seconds ahead of ours is within the leeway.
    let almost = sign(
        json!({ "sub": "alice", "exp": now() + 3600, "nbf": now() + 10 }),
        &good,
        Algorithm::HS256,
    );
    let body = app
        .gql(Some(&almost), "query { tasks { nodes { id } } }", json!({}))
        .await;
    assert_eq!(body["data"]["tasks"]["nodes"], json!([]), "{body}");
}

#[tokio::test]
async fn roles_decide_who_updates_status() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let task = create(&app, &alice, "job").await;
    let id = task["id"].as_str().unwrap();
    for query in [
        "mutation($id: ID!) { updateTaskStatus(input: {id: $id, status: COMPLETED}) { id } }",
        "mutation($id: ID!) { heartbeatTask(id: $id) { id } }",
        "mutation { claimTask { id } }",
    ] {
        let body = app.gql(Some(&alice), query, json!({ "id": id })).await;
        assert_eq!(error_code(&body), Some("FORBIDDEN"), "{query}: {body}");
    }
    assert_eq!(
        get(&app, &alice, id).await["data"]["task"]["status"],
        "PENDING"
    );
    // A custom service role name is honoured.
    let custom = spawn_app_with(app.database.clone(), |s| {
        s.auth.service_role = "worker".into()
    })
    .await;
    let body = custom
        .gql(
            Some(&token_for("w", Some("worker"))),
            "mutation($id: ID!) { updateTaskStatus(input: {id: $id, status: PROCESSING}) { status } }",
            json!({ "id": id }),
        )
        .await;
    assert_eq!(
        body["data"]["updateTaskStatus"]["status"], "PROCESSING",
        "{body}"
    );
    let refused = custom
        .gql(
            Some(&app.worker_token()),
            "mutation { claimTask { id } }",
            json!({}),
        )
        .await;
    assert_eq!(
        error_code(&refused),
        Some("FORBIDDEN"),
        "service_role is not the role here"
    );
}

#[tokio::test]
async fn supabase_shaped_and_asymmetric_tokens_work() {
    let database = std::sync::Arc::new(TestDb::new().await);
    // Supabase: HS256, role "authenticated", aud "authenticated", iss set.
    let issuer = "https://example.supabase.co/auth/v1";
    let app = spawn_app_with(database.clone(), |s| {
        s.auth.issuer = Some(issuer.into());
        s.auth.audience = Some("authenticated".into());
    })
    .await;
    let key = EncodingKey::from_secret(TEST_SECRET.as_bytes());
    let supabase = sign(
        json!({ "sub": "8d4b4c1e-0000-4000-8000-000000000001", "role": "authenticated", "aud": "authenticated",
                "iss": issuer, "exp": now() + 3600, "iat": now(), "email": "a@example.com", "session_id": "s" }),
        &key,
        Algorithm::HS256,
    );
    let body = app
        .gql(
            Some(&supabase),
            "mutation { createTask(input: {type: \"x\"}) { status } }",
            json!({}),
        )
        .await;
    assert_eq!(body["data"]["createTask"]["status"], "PENDING", "{body}");
    for claims in [
        json!({ "sub": "u", "aud": "authenticated", "iss": "https://evil.example", "exp": now() + 3600 }),
        json!({ "sub": "u", "aud": "anon-key", "iss": issuer, "exp": now() + 3600 }),
        json!({ "sub": "u", "iss": issuer, "exp": now() + 3600 }),
    ] {
        let token = sign(claims.clone(), &key, Algorithm::HS256);
        let body = app
            .gql(Some(&token), "query { tasks { nodes { id } } }", json!({}))
            .await;
        assert_eq!(error_code(&body), Some("UNAUTHENTICATED"), "{claims}");
    }

    // Supabase's service_role key: no sub, no aud, `iss: "supabase"`. A worker.
    let service_key = sign(
        json!({ "iss": "supabase", "ref": "example", "role": "service_role", "iat": now(), "exp": now() + 3600 }),
        &key,
        Algorithm::HS256,
    );
    let body = app
        .gql(
            Some(&service_key),
            "mutation { claimTask { status } }",
            json!({}),
        )
        .await;
    assert_eq!(body["data"]["claimTask"]["status"], "PROCESSING", "{body}");
    // Without the service role, a token with no sub is refused.
    let anon = sign(
        json!({ "iss": issuer, "aud": "authenticated", "role": "anon", "exp": now() + 3600 }),
        &key,
        Algorithm::HS256,
    );
    let body = app
        .gql(Some(&anon), "query { tasks { nodes { id } } }", json!({}))
        .await;
    assert_eq!(error_code(&body), Some("UNAUTHENTICATED"), "{body}");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("no sub")
    );

    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for (public, private, alg) in [
        ("rs256-public.pem", "rs256-private.pem", Algorithm::RS256),
        ("es256-public.pem", "es256-private.pem", Algorithm::ES256),
    ] {
        let app = spawn_app_with(database.clone(), |s| {
            s.auth.secret = None;
            s.auth.public_key_file = Some(fixtures.join(public));
        })
        .await;
        let pem = std::fs::read(fixtures.join(private)).unwrap();
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
            _ => EncodingKey::from_ec_pem(&pem).unwrap(),
        };
        let token = sign(json!({ "sub": "carol", "exp": now() + 3600 }), &key, alg);
        let body = app
            .gql(Some(&token), "query { tasks { nodes { id } } }", json!({}))
            .await;
        assert!(body["errors"].is_null(), "{alg:?}: {body}");
        // An HS256 token signed with the public key's bytes is refused.
        let confused = sign(
            json!({ "sub": "carol", "exp": now() + 3600 }),
            &EncodingKey::from_secret(&std::fs::read(fixtures.join(public)).unwrap()),
            Algorithm::HS256,
        );
        let body = app
            .gql(
                Some(&confused),
                "query { tasks { nodes { id } } }",
                json!({}),
            )
            .await;
        assert_eq!(
            error_code(&body),
            Some("UNAUTHENTICATED"),
            "{alg:?} key confusion"
        );
    }
}

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

#[test]
fn schema_file_matches_the_code() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schema.graphql");
    let sdl = taskql::graphql::sdl();
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    if current == sdl {
        return;
    }
    if std::env::var("UPDATE_SCHEMA").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &sdl).unwrap();
        return;
    }
    panic!(
        "schema.graphql is out of date with the code; run `UPDATE_SCHEMA=1 cargo test --test api schema_file` and commit it"
    );
}

#[tokio::test]
async fn database_failures_are_internal_and_say_nothing_of_the_database() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    create(&app, &alice, "x").await;
    use sea_orm::ConnectionTrait;
    app.db.execute_unprepared("DROP TABLE tasks").await.unwrap();
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

/// GraphQL over HTTP as its spec has it (graphql-http's audits in
/// tests/conformance.rs check the rest): media types, GET, and statuses.
#[tokio::test]
async fn graphql_over_http_negotiates_and_refuses_what_it_should() {
    let app = spawn_app().await;
    let url = format!("{}/graphql", app.base);
    let token = app.user_token("alice");
    let query = json!({ "query": "{ tasks { nodes { id } } }" }).to_string();
    let post = |content_type: Option<&str>, accept: Option<&str>, body: String| {
        let mut request = app.http.post(&url).bearer_auth(&token).body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        request.send()
    };
    let content_type = |response: &reqwest::Response| {
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned()
    };

    // Not JSON (none, text/plain, a form): 415, so no cross-site simple request runs.
    for kind in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("application/json; charset=latin1"),
    ] {
        let response = post(kind, None, query.clone()).await.unwrap();
        assert_eq!(response.status(), 415, "{kind:?}");
    }

    // The answer's media type follows Accept.
    for (accept, expected) in [
        (None, "application/json"),
        (Some("*/*"), "application/json"),
        (Some("application/json"), "application/json"),
        (
            Some("application/graphql-response+json"),
            "application/graphql-response+json",
        ),
        (
            Some("application/graphql-response+json, application/json;q=0.9"),
            "application/graphql-response+json",
        ),
    ] {
        let response = post(Some("application/json"), accept, query.clone())
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{accept:?}");
        assert!(
            content_type(&response).starts_with(expected),
            "{accept:?}: {}",
            content_type(&response)
        );
    }
    let response = post(Some("application/json"), Some("text/csv"), query.clone())
        .await
        .unwrap();
    assert_eq!(response.status(), 406);

    // A request error has no data; under the newer media type it is a 400.
    for (body, accept, status) in [
        ("{", "application/graphql-response+json", 400),
        ("{ nope }", "application/graphql-response+json", 400),
        ("{", "application/json", 200),
    ] {
        let response = post(
            Some("application/json"),
            Some(accept),
            json!({ "query": body }).to_string(),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), status, "{body} as {accept}");
        let body: Value = response.json().await.unwrap();
        assert!(body.get("data").is_none(), "{body}");
        assert_eq!(body["errors"][0]["extensions"]["code"], "BAD_USER_INPUT");
    }
    // A field error is not a request error: data is there, status 200.
    let response = post(
        Some("application/json"),
        Some("application/graphql-response+json"),
        json!({ "query": "{ task(id: \"nope\") { id } }" }).to_string(),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert!(body.get("data").is_some(), "{body}");

    // Not a GraphQL request: 400.
    let response = post(
        Some("application/json"),
        None,
        json!({ "notquery": "{ tasks { nodes { id } } }" }).to_string(),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 400);

    // GET runs queries, refuses mutations with 405 and Allow: POST.
    let get = |params: &[(&str, &str)]| {
        app.http
            .get(&url)
            .bearer_auth(&token)
            .header("accept", "application/graphql-response+json")
            .query(params)
            .send()
    };
    let response = get(&[("query", "{ tasks { nodes { id } } }")])
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["data"]["tasks"]["nodes"], json!([]), "{body}");
    let response = get(&[(
        "query",
        "mutation { createTask(input: {type: \"x\"}) { id } }",
    )])
    .await
    .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "POST");
    let response = get(&[
        (
            "query",
            "query($first: Int) { tasks(first: $first) { nodes { id } } }",
        ),
        ("variables", "{\"first\": 5}"),
    ])
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let response = get(&[("query", "{ tasks { nodes { id } } }"), ("variables", "[1")])
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let response = get(&[]).await.unwrap();
    assert_eq!(response.status(), 400);
}

/// JSON text is UTF-8 throughout: invalid bytes anywhere in a body are a 400,
/// even in parts taskql ignores; valid non-ASCII text goes through intact.
#[tokio::test]
async fn a_body_with_invalid_utf8_anywhere_is_a_400() {
    let app = spawn_app().await;
    let url = format!("{}/graphql", app.base);
    let token = app.user_token("alice");
    let post = |body: Vec<u8>, accept: &'static str| {
        app.http
            .post(&url)
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .header("accept", accept)
            .body(body)
            .send()
    };
    let query = "{ tasks { nodes { id } } }";
    // `@` marks where the bad bytes go.
    let places = [
        (
            "the query",
            r#"{"query": "{ tasks { nodes { id } } } # @"}"#,
        ),
        (
            "a variable",
            r#"{"query": "{ tasks { nodes { id } } }", "variables": {"note": "@"}}"#,
        ),
        (
            "a variable's name",
            r#"{"query": "{ tasks { nodes { id } } }", "variables": {"@": 1}}"#,
        ),
        (
            "the extensions",
            r#"{"query": "{ tasks { nodes { id } } }", "extensions": {"trace": "@"}}"#,
        ),
        (
            "the operation name",
            r#"{"query": "query A { tasks { nodes { id } } }", "operationName": "A@"}"#,
        ),
        (
            "deep in an unknown field",
            r#"{"query": "{ tasks { nodes { id } } }", "x": {"y": [1, {"z": "@"}]}}"#,
        ),
        (
            "an unknown field",
            r#"{"query": "{ tasks { nodes { id } } }", "clientInfo": "@"}"#,
        ),
        (
            "an unknown field's name",
            r#"{"query": "{ tasks { nodes { id } } }", "@": true}"#,
        ),
        (
            "a batch",
            r#"[{"query": "{ tasks { nodes { id } } }"}, {"query": "{ tasks { nodes { id } } }", "extensions": {"a": "@"}}]"#,
        ),
    ];
    let bad_bytes: [(&str, &[u8]); 5] = [
        ("a lone 0xFF", b"\xff"),
        ("a bad continuation", b"\xc3\x28"),
        ("an overlong slash", b"\xc0\xaf"),
        ("a surrogate", b"\xed\xa0\x80"),
        ("a cut-off euro sign", b"\xe2\x82"),
    ];
    let mut accepted = Vec::new();
    for (place, template) in places {
        let (before, after) = template.split_once('@').expect("a marker");
        for (what, bad) in bad_bytes {
            let body = [before.as_bytes(), bad, after.as_bytes()].concat();
            for accept in ["application/graphql-response+json", "application/json"] {
                let response = post(body.clone(), accept).await.unwrap();
                let status = response.status();
                let answer: Value = response.json().await.unwrap();
                let message = answer["errors"][0]["message"].as_str().unwrap_or_default();
                if status != 400
                    || answer.get("data").is_some()
                    || error_code(&answer) != Some("BAD_REQUEST")
                    || !message.contains("UTF-8")
                {
                    accepted.push(format!("{what} in {place} as {accept}: {status} {answer}"));
                }
            }
        }
        // The same body with "é" is JSON (an operation named "Aé" is then
        // not found, which is GraphQL's business, not a bad body).
        let body = [before, "é", after].concat();
        let response = post(body.into_bytes(), "application/json").await.unwrap();
        assert_eq!(response.status(), 200, "é in {place}");
        let answer: Value = response.json().await.unwrap();
        assert_ne!(error_code(&answer), Some("BAD_REQUEST"), "{answer}");
    }

    assert!(
        accepted.is_empty(),
        "not a 400 BAD_REQUEST that says UTF-8:\n{}",
        accepted.join("\n")
    );

    // Non-ASCII text, emoji included, is accepted anywhere; metadata keeps it as sent.
    let metadata = json!({ "prompt": "un café crème 🦊", "tags": ["日本語", "Ωmega"] });
    let created = app
        .create_task(
            &token,
            json!({ "type": "x", "metadata": metadata }),
            "id metadata",
        )
        .await;
    assert_eq!(created["metadata"], metadata);
    let body = json!({
        "query": format!("# résumé 🦊\n{query}"),
        "extensions": { "note": "🐱 é" },
        "clientName": "appli mobile 📱",
    });
    let response = post(body.to_string().into_bytes(), "application/json")
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(data(answer)["tasks"]["nodes"][0]["id"], created["id"]);
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
