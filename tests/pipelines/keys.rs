//! Concurrency keys: at most `concurrencyPerKey` tasks of a type run at
//! once with one key, while other keys' tasks run; one at a time and in
//! batches; under racing workers on one instance and on two sharing a
//! PostgreSQL database.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;

/// Sets `task_type`'s cap per key as a worker; the whole answer.
async fn cap_per_key(app: &TestApp, task_type: &str, cap: Value) -> Value {
    app.gql(
        Some(&app.worker_token()),
        "mutation($type: String!, $cap: Int) { setTaskTypePolicy(type: $type, policy: {concurrencyPerKey: $cap}) { policy { concurrencyPerKey concurrency } } }",
        json!({ "type": task_type, "cap": cap }),
    )
    .await
}

/// Alice's task of `task_type` with `key`: its id.
async fn create_keyed(app: &TestApp, task_type: &str, key: Option<&str>) -> String {
    let task = app
        .create_task(
            &app.user_token("alice"),
            json!({ "type": task_type, "concurrencyKey": key }),
            "id concurrencyKey",
        )
        .await;
    assert_eq!(task["concurrencyKey"], json!(key));
    id_of(&task)
}

/// Claims one task of `task_type` as worker `w`: its id, attempt and key.
async fn claim_keyed(
    app: &TestApp,
    task_type: &str,
    w: &str,
) -> Option<(String, i64, Option<String>)> {
    claim_as(app, task_type, w).await.map(|task| {
        (
            id_of(&task),
            task["attempts"].as_i64().unwrap_or_default(),
            task["concurrencyKey"].as_str().map(str::to_owned),
        )
    })
}

#[tokio::test]
async fn a_full_key_waits_while_other_keys_run() {
    let mut app = spawn_app().await;
    let set = cap_per_key(&app, "api.call", json!(2)).await;
    assert_eq!(
        data(set)["setTaskTypePolicy"]["policy"]["concurrencyPerKey"],
        2
    );
    let mut made = HashMap::new();
    for key in ["a", "a", "a", "b", "b", "b"] {
        made.entry(key)
            .or_insert_with(Vec::new)
            .push(create_keyed(&app, "api.call", Some(key)).await);
    }
    let unkeyed = create_keyed(&app, "api.call", None).await;

    let mut claimed = Vec::new();
    while let Some(task) = claim_keyed(&app, "api.call", "w").await {
        claimed.push(task);
    }
    let order: Vec<&str> = claimed.iter().map(|(id, _, _)| id.as_str()).collect();
    let want = [
        &made["a"][0],
        &made["a"][1],
        &made["b"][0],
        &made["b"][1],
        &unkeyed,
    ];
    assert_eq!(
        order,
        want.map(String::as_str),
        "two of each key, then the task without one"
    );

    // One of key a finishes: the third of key a may run, still not b's.
    let (first, attempt, _) = &claimed[0];
    complete(&app, first, *attempt, Value::Null).await;
    let next = claim_keyed(&app, "api.call", "w").await.expect("a's third");
    assert_eq!(next.0, made["a"][2]);
    assert_eq!(claim_keyed(&app, "api.call", "w").await, None);

    // Lifting the cap lets b's third run too.
    cap_per_key(&app, "api.call", Value::Null).await;
    let last = claim_keyed(&app, "api.call", "w").await.expect("b's third");
    assert_eq!(last.0, made["b"][2]);
    app.stop().await;
}

#[tokio::test]
async fn a_batch_claim_takes_what_claims_one_by_one_would() {
    let mut app = spawn_app().await;
    cap_per_key(&app, "api.batch", json!(1)).await;
    let mut ids = Vec::new();
    for key in ["x", "x", "y", "z", "y"] {
        ids.push(create_keyed(&app, "api.batch", Some(key)).await);
    }
    let body = app
        .gql(
            Some(&app.worker_token()),
            "mutation { claimTasks(types: [\"api.batch\"], limit: 10) { id concurrencyKey } }",
            json!({}),
        )
        .await;
    let taken: Vec<String> = data(body)["claimTasks"]
        .as_array()
        .expect("a list")
        .iter()
        .map(id_of)
        .collect();
    assert_eq!(taken, vec![ids[0].clone(), ids[2].clone(), ids[3].clone()]);
    app.stop().await;
}

#[tokio::test]
async fn bad_keys_and_caps_are_refused() {
    let mut app = spawn_app().await;
    for cap in [json!(0), json!(100_001)] {
        let refused = cap_per_key(&app, "api.bad", cap).await;
        assert_eq!(error_code(&refused), Some("BAD_USER_INPUT"), "{refused}");
        assert!(
            refused["errors"][0]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("concurrencyPerKey")
        );
    }
    for key in [String::new(), "k".repeat(256), "a\u{7}b".to_owned()] {
        let refused = app
            .gql(
                Some(&app.user_token("alice")),
                "mutation($key: String) { createTask(input: {type: \"api.bad\", concurrencyKey: $key}) { id } }",
                json!({ "key": key }),
            )
            .await;
        assert_eq!(error_code(&refused), Some("BAD_USER_INPUT"), "{refused}");
    }
    app.stop().await;
}

/// What racing workers saw of each key.
#[derive(Default)]
struct Seen {
    /// Tasks of each key held now (counted in after the claim, out before
    /// the completion: never more than run).
    holding: Mutex<HashMap<String, usize>>,
    /// The most any key was held at once.
    most: Mutex<usize>,
    claims: Mutex<Vec<String>>,
}

const KEYS: usize = 5;
const PER_KEY: usize = 2;
const TASKS: usize = 150;
const WORKERS: usize = 8;

async fn race(apps: &[Arc<TestApp>], n: usize) {
    let task_type = format!("keys{n}.render");
    cap_per_key(&apps[0], &task_type, json!(PER_KEY)).await;
    let mut ids = Vec::new();
    for i in 0..TASKS {
        let key = format!("customer-{}", i % KEYS);
        ids.push(create_keyed(&apps[i % apps.len()], &task_type, Some(&key)).await);
    }
    let seen = Arc::new(Seen::default());
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (app, seen, task_type) = (
            apps[w % apps.len()].clone(),
            seen.clone(),
            task_type.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut idle = 0;
            while idle < 20 {
                let Some((id, attempt, key)) =
                    claim_keyed(&app, &task_type, &format!("w{w}")).await
                else {
                    idle += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                idle = 0;
                let key = key.expect("every task has a key");
                {
                    let mut holding = seen.holding.lock().unwrap();
                    let now = holding.entry(key.clone()).or_default();
                    *now += 1;
                    let mut most = seen.most.lock().unwrap();
                    *most = (*most).max(*now);
                }
                seen.claims.lock().unwrap().push(id.clone());
                tokio::time::sleep(Duration::from_millis(2 + w as u64 % 3)).await;
                *seen.holding.lock().unwrap().get_mut(&key).expect("held") -= 1;
                complete(&app, &id, attempt, Value::Null).await;
            }
        }));
    }
    for worker in workers {
        worker.await.expect("no panic");
    }
    let claims = seen.claims.lock().unwrap().clone();
    let mut sorted = claims.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        claims.len(),
        "round {n}: a task was claimed twice"
    );
    let mut want = ids.clone();
    want.sort();
    assert_eq!(sorted, want, "round {n}: every task claimed once");
    let most = *seen.most.lock().unwrap();
    assert!(
        most <= PER_KEY,
        "round {n}: {most} tasks of one key ran at once"
    );
}

#[tokio::test]
async fn racing_workers_never_run_more_of_a_key_than_its_cap() {
    let app = Arc::new(spawn_app().await);
    for n in 0..3 {
        tokio::time::timeout(
            Duration::from_secs(120),
            race(std::slice::from_ref(&app), n),
        )
        .await
        .expect("a round ends");
    }
}

#[tokio::test]
async fn on_two_instances_racing_workers_never_run_more_of_a_key_than_its_cap() {
    let name = "on_two_instances_racing_workers_never_run_more_of_a_key_than_its_cap";
    let Some((a, b)) = two_apps_on_postgres_or_skip(name).await else {
        return;
    };
    let apps = [Arc::new(a), Arc::new(b)];
    for n in 0..3 {
        tokio::time::timeout(Duration::from_secs(120), race(&apps, n))
            .await
            .expect("a round ends");
    }
}
