//! GraphQL over Server-Sent Events (graphql-sse, distinct connections mode)
//! on `/graphql`, through the real server: the wire format, tokens, the
//! limits shared with websockets, the real graphql-sse client and urql over
//! it, and on PostgreSQL a stream on one instance seeing changes made through
//! another.

use std::sync::Arc;
use std::time::Duration;

use crate::common::js::NodeScript;
use crate::common::sse::{self, EventStream, Message};
use crate::common::{TestApp, TestDb, spawn_app, spawn_app_with, two_apps_on_postgres_or_skip};
use serde_json::{Value, json};

const WATCH: &str = "subscription Watch($id: ID!) {
  taskUpdated(id: $id) { id status progress resultId }
}";
const TASK: &str = "query Task($id: ID!) { task(id: $id) { id status } }";
/// Longest a node script may run.
const NODE_TIMEOUT: Duration = Duration::from_secs(60);

async fn create_task(app: &TestApp, token: &str) -> String {
    let input = json!({ "type": "image.generate", "metadata": { "prompt": "a cat" } });
    let task = app.create_task(token, input, "id").await;
    task["id"].as_str().expect("an id").to_owned()
}

async fn set_status(app: &TestApp, id: &str, status: &str, extra: Value) {
    let mut input = json!({ "id": id, "status": status });
    if let (Some(input), Some(extra)) = (input.as_object_mut(), extra.as_object()) {
        input.extend(extra.clone());
    }
    let answer = app.update_status(input, "status").await;
    assert_eq!(
        answer["data"]["updateTaskStatus"]["status"], status,
        "{answer}"
    );
}

fn watch(id: &str) -> Value {
    json!({ "query": WATCH, "variables": { "id": id } })
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn a_subscription_streams_each_change_then_completes() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let id = create_task(&app, &alice).await;

    let response = sse::post(&app, Some(&alice), &watch(&id)).await;
    assert_eq!(header(&response, "cache-control"), Some("no-cache"));
    assert_eq!(header(&response, "x-accel-buffering"), Some("no"));
    // Hop-by-hop, and forbidden in HTTP/2: not sent.
    assert_eq!(header(&response, "connection"), None);
    let mut stream = EventStream::new(response);
    let first = stream.next_data().await;
    assert_eq!(first["taskUpdated"]["status"], "PENDING", "{first}");

    set_status(&app, &id, "PROCESSING", json!({ "progress": 40 })).await;
    set_status(&app, &id, "COMPLETED", json!({ "resultId": "r-1" })).await;
    let (payloads, end) = stream.until_end().await;
    let states: Vec<(Value, Value)> = payloads
        .iter()
        .map(|p| {
            let task = &p["data"]["taskUpdated"];
            (task["status"].clone(), task["resultId"].clone())
        })
        .collect();
    assert_eq!(
        states,
        vec![
            (json!("PROCESSING"), Value::Null),
            (json!("COMPLETED"), json!("r-1"))
        ],
        "{payloads:?}"
    );
    assert_eq!(
        end,
        Message::Complete,
        "the server completes after COMPLETED"
    );
    assert_eq!(stream.next_message().await, Message::End);
}

#[tokio::test]
async fn queries_over_post_and_get_answer_one_next_then_complete() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let id = create_task(&app, &alice).await;

    let posted = sse::post(
        &app,
        Some(&alice),
        &json!({ "query": TASK, "variables": { "id": id } }),
    )
    .await;
    let mut stream = EventStream::new(posted);
    assert_eq!(stream.next_data().await["task"]["id"], id.as_str());
    assert_eq!(stream.next_event().await, Message::Complete);
    assert_eq!(stream.next_message().await, Message::End);

    let variables = json!({ "id": id }).to_string();
    let got = sse::get(
        &app,
        Some(&alice),
        &[("query", TASK), ("variables", &variables)],
    )
    .await;
    let mut stream = EventStream::new(got);
    assert_eq!(stream.next_data().await["task"]["status"], "PENDING");
    assert_eq!(stream.next_event().await, Message::Complete);

    // A mutation streams its one result too, over POST only.
    let mutation = json!({ "query": "mutation($id: ID!) { cancelTask(id: $id) { status } }",
                           "variables": { "id": id } });
    let mut stream = EventStream::new(sse::post(&app, Some(&alice), &mutation).await);
    assert_eq!(
        stream.next_data().await["cancelTask"]["status"],
        "CANCELLED"
    );
    assert_eq!(stream.next_event().await, Message::Complete);
    let over_get = sse::get(
        &app,
        Some(&alice),
        &[(
            "query",
            "mutation { createTask(input: {type: \"x\"}) { id } }",
        )],
    )
    .await;
    assert_eq!(over_get.status(), 405);
    assert_eq!(header(&over_get, "allow"), Some("POST"));
}

#[tokio::test]
async fn a_document_that_does_not_validate_is_reported_in_a_next() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let response = sse::post(
        &app,
        Some(&alice),
        &json!({ "query": "subscription { noSuchField }" }),
    )
    .await;
    let mut stream = EventStream::new(response);
    match stream.next_event().await {
        Message::Next(payload) => {
            assert!(payload.get("data").is_none(), "nothing ran: {payload}");
            assert_eq!(
                payload["errors"][0]["extensions"]["code"], "BAD_USER_INPUT",
                "{payload}"
            );
        }
        other => panic!("expected the errors in a next event, got {other:?}"),
    }
    assert_eq!(stream.next_event().await, Message::Complete);
}

#[tokio::test]
async fn a_missing_bad_or_expired_token_is_refused_before_any_event() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let id = create_task(&app, &alice).await;
    let expired = crate::common::expired_token_for("alice");
    for (case, token) in [
        ("no token", None),
        ("not a token", Some("not-a-jwt")),
        ("expired token", Some(expired.as_str())),
    ] {
        let response = sse::post(&app, token, &watch(&id)).await;
        assert_eq!(response.status(), 401, "{case}");
        assert_eq!(
            header(&response, "www-authenticate"),
            Some("Bearer"),
            "{case}"
        );
        assert!(
            header(&response, "content-type").is_some_and(|t| t.starts_with("application/json")),
            "{case}: a JSON error, no stream"
        );
        let body: Value = response.json().await.expect("JSON");
        assert_eq!(
            crate::common::error_code(&body),
            Some("UNAUTHENTICATED"),
            "{case}: {body}"
        );
        assert!(body.get("data").is_none(), "{case}: {body}");
    }
    let got = sse::get(&app, Some("not-a-jwt"), &[("query", "{ __typename }")]).await;
    assert_eq!(got.status(), 401);
}

#[tokio::test]
async fn keep_alive_comments_come_at_the_keepalive_interval() {
    let database = Arc::new(TestDb::new().await);
    let app = spawn_app_with(database, |settings| {
        settings.http.keepalive_interval = std::time::Duration::from_millis(200);
    })
    .await;
    let alice = app.user_token("alice");
    let id = create_task(&app, &alice).await;
    let mut stream = EventStream::new(sse::post(&app, Some(&alice), &watch(&id)).await);
    assert_eq!(stream.next_data().await["taskUpdated"]["status"], "PENDING");
    let mut comments = 0;
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Some(message) = stream
        .next_within(until.saturating_duration_since(tokio::time::Instant::now()))
        .await
    {
        assert_eq!(message, Message::Comment(String::new()), "only keep-alives");
        comments += 1;
    }
    assert!(
        (4..=9).contains(&comments),
        "a keep-alive every 200 ms for 1.5 s, got {comments}"
    );
}

#[tokio::test]
async fn event_streams_and_websockets_share_one_cap() {
    let database = Arc::new(TestDb::new().await);
    let app = spawn_app_with(database, |settings| {
        settings.http.max_websockets = Some(1);
    })
    .await;
    let alice = app.user_token("alice");
    let id = create_task(&app, &alice).await;
    let mut held = EventStream::new(sse::post(&app, Some(&alice), &watch(&id)).await);
    assert_eq!(held.next_data().await["taskUpdated"]["status"], "PENDING");

    let refused = sse::post(&app, Some(&alice), &watch(&id)).await;
    assert_eq!(refused.status(), 503);
    let refused: Value = refused.json().await.expect("JSON");
    let upgrade = app
        .http
        .get(format!("{}/graphql/ws", app.base))
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("sec-websocket-protocol", "graphql-transport-ws")
        .send()
        .await
        .expect("request");
    assert_eq!(upgrade.status(), 503, "the stream holds the only place");
    let upgrade: Value = upgrade.json().await.expect("JSON");
    assert_eq!(
        crate::common::error_code(&refused),
        Some("SERVICE_UNAVAILABLE")
    );
    assert_eq!(refused, upgrade, "one cap, one error");

    // A stream that ends gives its place back.
    drop(held);
    crate::common::eventually("the place is given back", Duration::from_secs(10), || {
        let app = &app;
        let alice = &alice;
        let id = &id;
        async move {
            let response = sse::post(app, Some(alice), &watch(id)).await;
            (response.status() == 200).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn a_stream_ends_without_complete_when_its_token_expires() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let id = create_task(&app, &alice).await;
    let expiring = crate::common::expiring_token_for("alice");
    let mut stream = EventStream::new(sse::post(&app, Some(&expiring), &watch(&id)).await);
    assert_eq!(stream.next_data().await["taskUpdated"]["status"], "PENDING");
    let mut said = Vec::new();
    loop {
        match stream.next_message().await {
            Message::Comment(text) => said.push(text),
            Message::End => break,
            other => panic!("nothing but comments after the token expired: {other:?}"),
        }
    }
    assert!(
        said.iter().any(|text| text.contains("token has expired")),
        "{said:?}"
    );
}

#[tokio::test]
async fn on_postgres_a_stream_on_one_instance_sees_changes_made_through_another() {
    let Some((a, b)) = two_apps_on_postgres_or_skip(
        "on_postgres_a_stream_on_one_instance_sees_changes_made_through_another",
    )
    .await
    else {
        return;
    };
    let alice = a.user_token("alice");
    let id = create_task(&b, &alice).await;
    let mut stream = EventStream::new(sse::post(&a, Some(&alice), &watch(&id)).await);
    assert_eq!(stream.next_data().await["taskUpdated"]["status"], "PENDING");

    set_status(&b, &id, "PROCESSING", json!({ "progress": 10 })).await;
    let next = stream.next_data().await;
    assert_eq!(next["taskUpdated"]["status"], "PROCESSING", "{next}");
    assert_eq!(next["taskUpdated"]["progress"], 10, "{next}");
    set_status(&b, &id, "COMPLETED", json!({ "resultId": "through-b" })).await;
    let (payloads, end) = stream.until_end().await;
    let last = payloads.last().expect("the completion arrived on A");
    assert_eq!(
        last["data"]["taskUpdated"]["resultId"], "through-b",
        "{payloads:?}"
    );
    assert_eq!(end, Message::Complete);
}

#[tokio::test]
async fn the_graphql_sse_client_and_urql_over_it_follow_a_task_to_completion() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let id = create_task(&app, &alice).await;

    let mut script = NodeScript::start(
        "sse_clients.mjs",
        &[
            ("TASKQL_URL", &app.base),
            ("TASKQL_TOKEN", &alice),
            ("TASKQL_TASK_ID", &id),
        ],
    );
    // `ready` on stderr: both clients hold the task's first state.
    let ready = script.ready(NODE_TIMEOUT).await;
    if ready {
        set_status(&app, &id, "PROCESSING", json!({ "progress": 50 })).await;
        set_status(&app, &id, "COMPLETED", json!({ "resultId": "concept-sse" })).await;
    }
    let output = script.finish(NODE_TIMEOUT).await;
    let (report, diagnostics) = (output.report(), &output.diagnostics);
    assert!(
        ready,
        "the clients never got the first state: {report:#}\n{diagnostics}"
    );

    assert_eq!(
        report["query"]["data"]["task"]["id"],
        id.as_str(),
        "{report:#}"
    );
    assert_eq!(report["refused"]["status"], 401, "{report:#}");
    for client in ["graphqlSse", "urql"] {
        let seen = &report[client];
        assert_eq!(
            seen["statuses"],
            json!(["PENDING", "PROCESSING", "COMPLETED"]),
            "{client}: {report:#}"
        );
        assert_eq!(
            seen["last"]["resultId"], "concept-sse",
            "{client}: {report:#}"
        );
        assert_eq!(seen["errors"], json!([]), "{client}: {report:#}");
        assert_eq!(seen["completed"], true, "{client}: {report:#}");
    }
}

#[tokio::test]
async fn a_client_that_accepts_json_as_much_as_an_event_stream_gets_json() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    // What urql's fetchExchange sends with every query.
    let urql_accept = "application/graphql-response+json, application/graphql+json, \
                       application/json, text/event-stream, multipart/mixed";
    let response = app
        .http
        .get(format!("{}/graphql", app.base))
        .bearer_auth(&alice)
        .header("accept", urql_accept)
        .query(&[("query", "{ __typename }")])
        .send()
        .await
        .expect("request");
    assert_eq!(
        header(&response, "content-type"),
        Some("application/graphql-response+json; charset=utf-8")
    );
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(crate::common::data(body)["__typename"], "Query");
    // Preferred by its quality, the event stream wins.
    let response = app
        .http
        .get(format!("{}/graphql", app.base))
        .bearer_auth(&alice)
        .header("accept", "application/json;q=0.5, text/event-stream")
        .query(&[("query", "{ __typename }")])
        .send()
        .await
        .expect("request");
    let mut stream = EventStream::new(response);
    assert_eq!(stream.next_data().await["__typename"], "Query");
    assert_eq!(stream.next_event().await, Message::Complete);
}
