//! Persisted documents through the real server: Apollo's automatic persisted
//! queries over POST and GET (and with Apollo Client's own link), and the
//! trusted-documents mode (`TASKQL_TRUSTED_DOCUMENTS`), in which users run
//! only the manifest's documents while workers run anything.

use std::sync::Arc;
use std::time::Duration;

use crate::common::js::NodeScript;
use crate::common::sse::{self, EventStream, Message};
use crate::common::ws::WsClient;
use crate::common::{TestApp, TestDb, spawn_app, spawn_app_with};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const TASK: &str = "query Task($id: ID!) { task(id: $id) { id status } }";
const WATCH: &str = "subscription Watch($id: ID!) { taskUpdated(id: $id) { id status } }";
const NODE_TIMEOUT: Duration = Duration::from_secs(60);

fn sha256(text: &str) -> String {
    format!("{:x}", Sha256::digest(text.as_bytes()))
}

/// `body` is refused with `code`.
fn assert_code(body: &Value, code: &str) {
    assert_eq!(crate::common::error_code(body), Some(code), "{body}");
}

/// `body` is refused with `code` and `message`, and nothing ran.
fn assert_refused(body: &Value, code: &str, message: &str) {
    assert_eq!(body["errors"][0]["message"], message, "{body}");
    assert_code(body, code);
    assert!(body.get("data").is_none(), "nothing ran: {body}");
}

fn persisted(hash: &str) -> Value {
    json!({ "persistedQuery": { "version": 1, "sha256Hash": hash } })
}

async fn create_task(app: &TestApp, token: &str) -> String {
    let input = json!({ "type": "image.generate", "metadata": { "prompt": "a cat" } });
    let task = app.create_task(token, input, "id").await;
    task["id"].as_str().expect("an id").to_owned()
}

/// Sends `request` with `token`; the answer's JSON, whatever its status.
async fn answer(request: reqwest::RequestBuilder, token: &str) -> Value {
    let response = request.bearer_auth(token).send().await.expect("request");
    response.json().await.expect("JSON")
}

/// POSTs `body` as JSON; the answer's JSON, whatever its status.
async fn post(app: &TestApp, token: &str, body: Value) -> Value {
    let request = app.http.post(format!("{}/graphql", app.base)).json(&body);
    answer(request, token).await
}

/// GETs `/graphql` with `params`; the answer's JSON.
async fn get(app: &TestApp, token: &str, params: &[(&str, &str)]) -> Value {
    let request = app
        .http
        .get(format!("{}/graphql", app.base))
        .header("accept", "application/json")
        .query(params);
    answer(request, token).await
}

/// POSTs the document of `hash` (its id, in trusted mode) by that alone,
/// with `variables`; the answer's JSON.
async fn post_by_hash(app: &TestApp, token: &str, hash: &str, variables: &Value) -> Value {
    let body = json!({ "variables": variables, "extensions": persisted(hash) });
    post(app, token, body).await
}

/// GETs the document of `hash` (its id, in trusted mode) by that alone,
/// with `variables`; the answer's JSON.
async fn get_by_hash(app: &TestApp, token: &str, hash: &str, variables: &Value) -> Value {
    let extensions = persisted(hash).to_string();
    let variables = variables.to_string();
    let params = [("variables", &*variables), ("extensions", &*extensions)];
    get(app, token, &params).await
}

#[tokio::test]
async fn a_hash_runs_once_its_document_was_sent_over_post_and_get() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let id = create_task(&app, &alice).await;
    let hash = sha256(TASK);
    let variables = json!({ "id": id });

    let unknown = post_by_hash(&app, &alice, &hash, &variables).await;
    assert_refused(
        &unknown,
        "PERSISTED_QUERY_NOT_FOUND",
        "PersistedQueryNotFound",
    );

    let registered = post(
        &app,
        &alice,
        json!({ "query": TASK, "variables": variables, "extensions": persisted(&hash) }),
    )
    .await;
    assert_eq!(crate::common::data(registered)["task"]["id"], id.as_str());

    let by_hash = post_by_hash(&app, &alice, &hash, &variables).await;
    assert_eq!(crate::common::data(by_hash)["task"]["status"], "PENDING");

    let over_get = get_by_hash(&app, &alice, &hash, &variables).await;
    assert_eq!(crate::common::data(over_get)["task"]["id"], id.as_str());

    // Over GET, a document never sent is not found either.
    let other = persisted(&sha256("{ __typename }")).to_string();
    let unknown = get(&app, &alice, &[("extensions", &other)]).await;
    assert_code(&unknown, "PERSISTED_QUERY_NOT_FOUND");
    // And registered over GET, it runs by its hash after.
    let registered = get(
        &app,
        &alice,
        &[("query", "{ __typename }"), ("extensions", &other)],
    )
    .await;
    assert_eq!(crate::common::data(registered)["__typename"], "Query");
    let by_hash = get(&app, &alice, &[("extensions", &other)]).await;
    assert_eq!(crate::common::data(by_hash)["__typename"], "Query");
}

#[tokio::test]
async fn a_hash_that_does_not_match_its_document_is_refused() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let wrong = sha256("{ __typename }");
    let body = post(
        &app,
        &alice,
        json!({ "query": TASK, "variables": { "id": "x" }, "extensions": persisted(&wrong) }),
    )
    .await;
    assert_refused(&body, "BAD_REQUEST", "provided sha does not match query");

    // Nor was the wrong pairing kept.
    let by_hash = post(&app, &alice, json!({ "extensions": persisted(&wrong) })).await;
    assert_code(&by_hash, "PERSISTED_QUERY_NOT_FOUND");

    let version_2 = post(
        &app,
        &alice,
        json!({ "extensions": { "persistedQuery": { "version": 2, "sha256Hash": wrong } } }),
    )
    .await;
    assert_code(&version_2, "PERSISTED_QUERY_NOT_SUPPORTED");
}

/// A server in trusted-documents mode, with `TASK` and `WATCH` trusted
/// (`TASK` under an id that is not its hash, as some manifests have).
async fn trusted_app(manifest: Value) -> (TestApp, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("trusted.json");
    std::fs::write(&path, manifest.to_string()).expect("write the manifest");
    let database = Arc::new(TestDb::new().await);
    let app = spawn_app_with(database, |settings| {
        settings.http.trusted_documents = Some(path);
    })
    .await;
    (app, dir)
}

fn plain_manifest() -> Value {
    json!({ "task-v1": TASK, sha256(WATCH): WATCH })
}

#[tokio::test]
async fn in_trusted_mode_users_run_only_trusted_documents() {
    let (app, _dir) = trusted_app(plain_manifest()).await;
    let alice = app.user_token("alice");
    let worker = app.worker_token();
    // Workers run anything: alice's task is made through the service.
    let task = crate::common::new_task(
        app.service.as_ref(),
        &crate::common::alice(),
        "image.generate",
    )
    .await;
    let id = task.id.to_string();
    let variables = json!({ "id": id });

    // Any other document from a user is refused, however it comes.
    let refused = post(
        &app,
        &alice,
        json!({ "query": "{ __schema { types { name } } }" }),
    )
    .await;
    assert_code(&refused, "PERSISTED_QUERY_REQUIRED");
    let message = refused["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("only trusted documents"), "{message}");
    assert!(refused.get("data").is_none(), "{refused}");
    let other = "query { tasks(first: 1) { totalCount } }";
    let registering = post(
        &app,
        &alice,
        json!({ "query": other, "extensions": persisted(&sha256(other)) }),
    )
    .await;
    assert_code(&registering, "PERSISTED_QUERY_REQUIRED");
    let over_get = get(&app, &alice, &[("query", other)]).await;
    assert_code(&over_get, "PERSISTED_QUERY_REQUIRED");
    let unknown = post(
        &app,
        &alice,
        json!({ "extensions": persisted(&sha256(other)) }),
    )
    .await;
    assert_code(&unknown, "PERSISTED_QUERY_REQUIRED");

    // A trusted document runs by its id, over POST and GET, or sent whole.
    let by_id = post_by_hash(&app, &alice, "task-v1", &variables).await;
    assert_eq!(crate::common::data(by_id)["task"]["id"], id.as_str());
    let by_get = get_by_hash(&app, &alice, "task-v1", &variables).await;
    assert_eq!(crate::common::data(by_get)["task"]["status"], "PENDING");
    let whole = post(
        &app,
        &alice,
        json!({ "query": TASK, "variables": variables }),
    )
    .await;
    assert_eq!(crate::common::data(whole)["task"]["id"], id.as_str());

    // The service role runs anything, GraphiQL's introspection included.
    let introspection = post(
        &app,
        &worker,
        json!({ "query": "{ __schema { queryType { name } } }" }),
    )
    .await;
    assert_eq!(
        crate::common::data(introspection)["__schema"]["queryType"]["name"],
        "Query"
    );

    // A bad token hears about its token, not about documents.
    let bad = post(&app, "not-a-jwt", json!({ "query": "{ __typename }" })).await;
    assert_code(&bad, "UNAUTHENTICATED");
}

#[tokio::test]
async fn in_trusted_mode_streams_and_websockets_refuse_other_documents_too() {
    let (app, _dir) = trusted_app(plain_manifest()).await;
    let alice = app.user_token("alice");
    let task = crate::common::new_task(
        app.service.as_ref(),
        &crate::common::alice(),
        "image.generate",
    )
    .await;
    let id = task.id.to_string();

    // An event stream of a trusted subscription, by its hash.
    let body = json!({ "variables": { "id": id }, "extensions": persisted(&sha256(WATCH)) });
    let mut stream = EventStream::new(sse::post(&app, Some(&alice), &body).await);
    assert_eq!(stream.next_data().await["taskUpdated"]["status"], "PENDING");
    drop(stream);
    // Any other one is refused in a `next`, then completed.
    let other = json!({ "query": "subscription { taskEvents { kind } }" });
    let mut stream = EventStream::new(sse::post(&app, Some(&alice), &other).await);
    match stream.next_event().await {
        Message::Next(payload) => assert_eq!(
            crate::common::error_code(&payload),
            Some("PERSISTED_QUERY_REQUIRED"),
            "{payload}"
        ),
        other => panic!("expected the refusal in a next, got {other:?}"),
    }
    assert_eq!(stream.next_event().await, Message::Complete);

    let client = WsClient::connect_as(&app.ws_url, &alice).await;
    let mut refused = client.subscribe("subscription { taskEvents { kind } }", json!({}));
    let event = refused.next().await;
    assert_eq!(
        event.error_code(),
        Some("PERSISTED_QUERY_REQUIRED"),
        "{event:?}"
    );
    let mut trusted = client.subscribe(WATCH, json!({ "id": id }));
    assert_eq!(
        trusted.next_data().await["taskUpdated"]["status"],
        "PENDING"
    );

    // A worker (the dashboard with a service-role token) subscribes to
    // anything, over a websocket and an event stream.
    let worker = app.worker_token();
    let dashboard = WsClient::connect_as(&app.ws_url, &worker).await;
    let mut events = dashboard.subscribe(
        "subscription Events { taskEvents { kind task { id status } } }",
        json!({}),
    );
    let mut stream = EventStream::new(
        sse::post(
            &app,
            Some(&worker),
            &json!({ "query": "subscription { taskEvents { kind task { status } } }" }),
        )
        .await,
    );
    // Both are live once a change made now reaches them.
    let mut progress = 0;
    let (on_socket, on_stream) = loop {
        progress += 1;
        let update = app
            .update_status(
                json!({ "id": id, "status": "PROCESSING", "progress": progress }),
                "status",
            )
            .await;
        assert_eq!(
            update["data"]["updateTaskStatus"]["status"], "PROCESSING",
            "{update}"
        );
        let socket = events.next_within(Duration::from_millis(500)).await;
        let stream = stream.next_within(Duration::from_millis(500)).await;
        if let (Some(socket), Some(stream)) = (socket, stream) {
            break (socket, stream);
        }
        assert!(progress < 20, "the worker's subscriptions never went live");
    };
    let on_socket = on_socket.data().cloned().unwrap_or_default();
    assert_eq!(
        on_socket["taskEvents"]["task"]["status"], "PROCESSING",
        "{on_socket}"
    );
    match on_stream {
        Message::Next(payload) => assert_eq!(
            payload["data"]["taskEvents"]["task"]["status"], "PROCESSING",
            "{payload}"
        ),
        other => panic!("expected a next event, got {other:?}"),
    }
}

#[tokio::test]
async fn an_apollo_manifest_is_read_too() {
    let manifest = json!({
        "format": "apollo-persisted-query-manifest",
        "version": 1,
        "operations": [
            { "id": sha256(TASK), "body": TASK, "name": "Task", "type": "query" }
        ]
    });
    let (app, _dir) = trusted_app(manifest).await;
    let alice = app.user_token("alice");
    let task = crate::common::new_task(
        app.service.as_ref(),
        &crate::common::alice(),
        "image.generate",
    )
    .await;
    let id = task.id.to_string();
    let by_hash = post_by_hash(&app, &alice, &sha256(TASK), &json!({ "id": id })).await;
    assert_eq!(crate::common::data(by_hash)["task"]["id"], id.as_str());
    let other = post(
        &app,
        &alice,
        json!({ "query": WATCH, "variables": { "id": id } }),
    )
    .await;
    assert_code(&other, "PERSISTED_QUERY_REQUIRED");
}

#[test]
fn a_manifest_that_cannot_be_used_is_a_start_up_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("trusted.json");
    std::fs::write(&path, r#"{"abc": "query {"}"#).expect("write");
    let mut settings = crate::common::settings_for("sqlite://x.db");
    settings.http.trusted_documents = Some(path);
    let trusted = taskql::http::persisted::TrustedDocuments::configured;
    let err = trusted(&settings.http).expect_err("refused");
    let err = err.to_string();
    assert!(err.starts_with("TASKQL_TRUSTED_DOCUMENTS:"), "{err}");
    assert!(err.contains("'abc' does not parse"), "{err}");
    settings.http.trusted_documents = Some(dir.path().join("missing.json"));
    let err = trusted(&settings.http).expect_err("refused").to_string();
    assert!(err.contains("cannot read"), "{err}");
}

#[tokio::test]
async fn apollo_clients_persisted_query_link_registers_then_sends_hashes() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let id = create_task(&app, &alice).await;
    let report = NodeScript::start(
        "apollo_persisted.mjs",
        &[
            ("TASKQL_URL", &app.base),
            ("TASKQL_TOKEN", &alice),
            ("TASKQL_TASK_ID", &id),
        ],
    )
    .finish(NODE_TIMEOUT)
    .await
    .report();
    for run in ["post", "get"] {
        let seen = &report[run];
        assert!(seen["error"].is_null(), "{run}: {report:#}");
        assert_eq!(
            seen["first"]["task"]["id"],
            id.as_str(),
            "{run}: {report:#}"
        );
        assert_eq!(
            seen["second"]["task"]["id"],
            id.as_str(),
            "{run}: {report:#}"
        );
        // The first call: the hash alone, refused as not found, then the
        // document with it; the second: the hash alone, answered.
        let requests = seen["requests"].as_array().expect("requests");
        let sent: Vec<(bool, bool)> = requests
            .iter()
            .map(|r| (r["hasQuery"] == true, r["hasHash"] == true))
            .collect();
        assert_eq!(
            sent,
            vec![(false, true), (true, true), (false, true)],
            "{run}: {report:#}"
        );
        assert_eq!(requests[0]["notFound"], true, "{run}: {report:#}");
    }
    // Over GET, hashes go in the URL; the document goes with a POST.
    let methods: Vec<&Value> = report["get"]["requests"]
        .as_array()
        .expect("requests")
        .iter()
        .map(|r| &r["method"])
        .collect();
    assert_eq!(methods, ["GET", "POST", "GET"], "{report:#}");
}
