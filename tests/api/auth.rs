//! Tokens and roles: bad tokens everywhere, who updates status, Supabase-shaped and asymmetric tokens.

use super::*;

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
