//! GraphQL over HTTP as its spec has it, bodies that are not UTF-8, and the schema file matching the code.

use super::*;

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
