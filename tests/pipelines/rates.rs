//! Rate limits: a type's claims (or each key's) held to `count` per
//! `periodSeconds` by a token bucket, other types and keys not slowed, and
//! the wait shown in `estimatedStartAt`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;

/// Sets `task_type`'s rate limit as a worker; the whole answer.
async fn limit_rate(app: &TestApp, task_type: &str, limit: Value) -> Value {
    app.gql(
        Some(&app.worker_token()),
        "mutation($type: String!, $limit: RateLimitInput) { setTaskTypePolicy(type: $type, policy: {rateLimit: $limit}) { policy { rateLimit { count periodSeconds perKey } } } }",
        json!({ "type": task_type, "limit": limit }),
    )
    .await
}

async fn create_many(app: &TestApp, task_type: &str, key: Option<&str>, n: usize) {
    let inputs: Vec<Value> = (0..n)
        .map(|_| json!({ "type": task_type, "concurrencyKey": key }))
        .collect();
    let body = app
        .gql(
            Some(&app.user_token("alice")),
            "mutation($inputs: [CreateTaskInput!]!) { createTasks(inputs: $inputs) { id } }",
            json!({ "inputs": inputs }),
        )
        .await;
    assert_eq!(data(body)["createTasks"].as_array().map(Vec::len), Some(n));
}

#[tokio::test]
async fn five_a_second_hold_over_ten_seconds_and_other_types_run_freely() {
    let app = Arc::new(spawn_app().await);
    let set = limit_rate(&app, "api.paid", json!({"count": 5, "periodSeconds": 1})).await;
    assert_eq!(
        data(set)["setTaskTypePolicy"]["policy"]["rateLimit"],
        json!({"count": 5, "periodSeconds": 1, "perKey": false})
    );
    create_many(&app, "api.paid", None, 200).await;
    create_many(&app, "api.free", None, 100).await;

    let started = Instant::now();
    let window = Duration::from_secs(10);
    let claims: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (app, claims) = (app.clone(), claims.clone());
        workers.push(tokio::spawn(async move {
            while started.elapsed() < window + Duration::from_millis(500) {
                match claimed_id(&app, "api.paid").await {
                    Some(_) => claims.lock().unwrap().push(started.elapsed()),
                    None => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }));
    }
    // Meanwhile another type's claims are not held back.
    let free_started = Instant::now();
    for _ in 0..100 {
        assert!(
            claimed_id(&app, "api.free").await.is_some(),
            "api.free ran dry"
        );
    }
    let free_took = free_started.elapsed();
    for worker in workers {
        worker.await.expect("no panic");
    }
    let claims = claims.lock().unwrap().clone();
    let first = *claims.iter().min().expect("claims");
    let within = claims.iter().filter(|at| **at < first + window).count();
    eprintln!(
        "rate 5/s: {within} claims in the 10 s after the first ({} in all); 100 claims of another type in {free_took:?}",
        claims.len()
    );
    // A full bucket of 5, then 5 a second: 55 in 10 s.
    assert!((54..=56).contains(&within), "{within} claims in 10 s");
    assert!(
        free_took < Duration::from_secs(5),
        "another type took {free_took:?}"
    );
    let mut app = Arc::into_inner(app).expect("one owner");
    app.stop().await;
}

#[tokio::test]
async fn a_rate_limit_per_key_holds_each_key_apart() {
    let mut app = spawn_app().await;
    limit_rate(
        &app,
        "api.keyed",
        json!({"count": 2, "periodSeconds": 60, "perKey": true}),
    )
    .await;
    create_many(&app, "api.keyed", Some("a"), 3).await;
    create_many(&app, "api.keyed", Some("b"), 3).await;
    create_many(&app, "api.keyed", None, 3).await;
    let mut claimed = 0;
    while claimed_id(&app, "api.keyed").await.is_some() {
        claimed += 1;
        assert!(claimed <= 6, "more than two per key");
    }
    assert_eq!(claimed, 6, "two of key a, two of b, two without a key");

    // In a batch the same: a fresh type, one call.
    limit_rate(
        &app,
        "api.keyed2",
        json!({"count": 2, "periodSeconds": 60, "perKey": true}),
    )
    .await;
    create_many(&app, "api.keyed2", Some("a"), 3).await;
    create_many(&app, "api.keyed2", Some("b"), 3).await;
    let body = app
        .gql(
            Some(&app.worker_token()),
            "mutation { claimTasks(types: [\"api.keyed2\"], limit: 10) { id concurrencyKey } }",
            json!({}),
        )
        .await;
    let keys: Vec<Value> = data(body)["claimTasks"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|t| t["concurrencyKey"].clone())
        .collect();
    assert_eq!(keys, vec![json!("a"), json!("a"), json!("b"), json!("b")]);

    // Lifting the limit lets the rest run.
    limit_rate(&app, "api.keyed", Value::Null).await;
    assert!(claimed_id(&app, "api.keyed").await.is_some());
    app.stop().await;
}

#[tokio::test]
async fn an_empty_bucket_pushes_the_estimated_start_back() {
    let mut app = spawn_app().await;
    limit_rate(&app, "api.slow", json!({"count": 1, "periodSeconds": 30})).await;
    create_many(&app, "api.slow", None, 3).await;
    assert!(claimed_id(&app, "api.slow").await.is_some());
    assert_eq!(
        claimed_id(&app, "api.slow").await,
        None,
        "the bucket is empty"
    );
    let body = app
        .gql(
            Some(&app.user_token("alice")),
            "{ tasks(status: [PENDING], type: \"api.slow\") { nodes { queuePosition estimatedStartAt } } }",
            json!({}),
        )
        .await;
    let nodes = data(body)["tasks"]["nodes"].clone();
    let now = chrono::Utc::now();
    for node in nodes.as_array().expect("a list") {
        let position = node["queuePosition"].as_i64().expect("a position");
        let start = time(&node["estimatedStartAt"]);
        // Each claim waits for its token: position × 30 s from the last.
        let soonest = now + chrono::Duration::seconds(30 * position - 5);
        assert!(
            start >= soonest,
            "position {position} starts at {start}, before {soonest}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn bad_rate_limits_are_refused() {
    let mut app = spawn_app().await;
    for (limit, says) in [
        (json!({"count": 0, "periodSeconds": 1}), "rateLimit.count"),
        (
            json!({"count": 5, "periodSeconds": 0}),
            "rateLimit.periodSeconds",
        ),
        (
            json!({"count": 5, "periodSeconds": 86401}),
            "rateLimit.periodSeconds",
        ),
    ] {
        let refused = limit_rate(&app, "api.bad", limit.clone()).await;
        assert_eq!(
            error_code(&refused),
            Some("BAD_USER_INPUT"),
            "{limit}: {refused}"
        );
        let message = refused["errors"][0]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{message}");
    }
    app.stop().await;
}
