//! Dependencies under real concurrency: creates naming parents race the
//! workers completing those parents, on one instance and on two sharing a
//! PostgreSQL database, several rounds. Every child must run exactly once,
//! and only after all its parents completed: no completion missed (a child
//! stuck waiting) and none counted twice (a child run early).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;

const PARENTS: usize = 60;
const CREATORS: usize = 4;
const CHILDREN_EACH: usize = 30;
const WORKERS: usize = 6;

/// Claims one task of `task_type` as worker `w`: its id and attempt.
async fn claim_one(app: &TestApp, task_type: &str, w: usize) -> Option<(String, i64)> {
    claim_as(app, task_type, &format!("w{w}"))
        .await
        .map(|task| (id_of(&task), task["attempts"].as_i64().unwrap_or_default()))
}

/// One round on `apps`: parents completed by workers while creators add
/// children of three parents each; then the children are run.
async fn round(apps: &[Arc<TestApp>], n: usize) {
    let parent_type = format!("race{n}.parent");
    let child_type = format!("race{n}.child");
    let mut parents = Vec::new();
    for i in 0..PARENTS {
        parents.push(create(&apps[i % apps.len()], &parent_type).await);
    }
    let parents = Arc::new(parents);
    // When each parent completed, and when each child was claimed.
    let completed_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let children: Arc<Mutex<Vec<String>>> = Arc::default();

    let mut creators = Vec::new();
    for c in 0..CREATORS {
        let app = apps[c % apps.len()].clone();
        let (parents, children, child_type) =
            (parents.clone(), children.clone(), child_type.clone());
        creators.push(tokio::spawn(async move {
            for k in 0..CHILDREN_EACH {
                let on: Vec<String> = (0..3)
                    .map(|j| parents[(c * 7 + k * 3 + j * 11) % PARENTS].clone())
                    .collect::<HashSet<_>>()
                    .into_iter()
                    .collect();
                let body = app
                    .gql(
                        Some(&app.user_token("alice")),
                        "mutation($input: CreateTaskInput!) { createTask(input: $input) { id } }",
                        json!({ "input": { "type": child_type, "dependsOn": on } }),
                    )
                    .await;
                let id = id_of(&data(body)["createTask"]);
                children.lock().unwrap().push(id);
            }
        }));
    }
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let app = apps[w % apps.len()].clone();
        let (completed_at, parent_type) = (completed_at.clone(), parent_type.clone());
        workers.push(tokio::spawn(async move {
            while let Some((id, attempt)) = claim_one(&app, &parent_type, w).await {
                complete(&app, &id, attempt, Value::Null).await;
                completed_at.lock().unwrap().insert(id, Instant::now());
            }
        }));
    }
    for task in creators.into_iter().chain(workers) {
        task.await.expect("no panic");
    }
    assert_eq!(completed_at.lock().unwrap().len(), PARENTS);

    // Every parent completed: every child runs, once, whoever claims it.
    let children = children.lock().unwrap().clone();
    let claimed: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let app = apps[w % apps.len()].clone();
        let (claimed, child_type) = (claimed.clone(), child_type.clone());
        workers.push(tokio::spawn(async move {
            while let Some((id, attempt)) = claim_one(&app, &child_type, w).await {
                claimed.lock().unwrap().push(id.clone());
                complete(&app, &id, attempt, Value::Null).await;
            }
        }));
    }
    for task in workers {
        task.await.expect("no panic");
    }
    let claimed = claimed.lock().unwrap().clone();
    let distinct: HashSet<&String> = claimed.iter().collect();
    assert_eq!(
        distinct.len(),
        claimed.len(),
        "round {n}: a child was claimed twice"
    );
    let stuck: Vec<&String> = children
        .iter()
        .filter(|id| !distinct.contains(id))
        .collect();
    assert!(
        stuck.is_empty(),
        "round {n}: {} of {} children never became runnable: {stuck:?}",
        stuck.len(),
        children.len()
    );
}

/// A child is not claimable while its parent runs, and is once it completed.
async fn a_child_waits_for_its_parent(app: &TestApp) {
    create(app, "early.parent").await;
    let parent = claim_one(app, "early.parent", 0).await.expect("the parent");
    let body = app
        .gql(
            Some(&app.user_token("alice")),
            "mutation($input: CreateTaskInput!) { createTask(input: $input) { id } }",
            json!({ "input": { "type": "early.child", "dependsOn": [parent.0] } }),
        )
        .await;
    let child = id_of(&data(body)["createTask"]);
    assert_eq!(claim_one(app, "early.child", 0).await, None);
    complete(app, &parent.0, parent.1, Value::Null).await;
    let claimed = claim_one(app, "early.child", 0).await.expect("the child");
    assert_eq!(claimed.0, child);
}

#[tokio::test]
async fn children_created_while_their_parents_complete_all_run_once() {
    let app = spawn_app().await;
    a_child_waits_for_its_parent(&app).await;
    let apps = [Arc::new(app)];
    let deadline = Duration::from_secs(120);
    for n in 0..3 {
        tokio::time::timeout(deadline, round(&apps, n))
            .await
            .expect("a round ends");
    }
    let [app] = apps;
    let mut app = Arc::into_inner(app).expect("one owner");
    app.stop().await;
}

#[tokio::test]
async fn on_two_instances_children_created_while_their_parents_complete_all_run_once() {
    let name = "on_two_instances_children_created_while_their_parents_complete_all_run_once";
    let Some((a, b)) = two_apps_on_postgres_or_skip(name).await else {
        return;
    };
    let apps = [Arc::new(a), Arc::new(b)];
    for n in 0..3 {
        tokio::time::timeout(Duration::from_secs(120), round(&apps, n))
            .await
            .expect("a round ends");
    }
}
