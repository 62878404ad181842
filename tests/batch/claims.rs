//! `claimTasks`: the tasks, in the order, of as many `claimTask` calls one
//! after the other; the cap's room, pauses, and the limit's bounds.

use super::*;

/// Who creates what, in creation order: (owner, type, priority, due tomorrow).
const MIX: [(&str, &str, i64, bool); 22] = [
    ("alice", "image", 0, false),
    ("alice", "report", 0, false),
    ("alice", "image", 10, false),
    ("alice", "image", 0, true),
    ("alice", "report", -5, false),
    ("alice", "image", 0, false),
    ("bob", "image", 0, false),
    ("bob", "report", 10, false),
    ("carol", "image", -5, false),
    ("alice", "report", 0, false),
    ("alice", "image", 10, false),
    ("alice", "report", 0, false),
    ("alice", "image", 0, false),
    ("bob", "image", 0, true),
    ("bob", "image", 0, false),
    ("carol", "report", 0, false),
    ("carol", "image", 10, false),
    ("dave", "report", 0, false),
    ("alice", "image", -5, false),
    ("bob", "report", 0, false),
    ("dave", "image", 0, false),
    ("alice", "report", 10, true),
];

/// `MIX`, created one task at a time, each labelled with its place in it.
async fn create_mix(app: &TestApp) {
    let tomorrow = (Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    for (i, (owner, task_type, priority, later)) in MIX.iter().enumerate() {
        let mut input = json!({
            "type": task_type,
            "priority": priority,
            "metadata": { "label": format!("{i}:{owner}") },
        });
        if *later {
            input["runAt"] = json!(tomorrow);
        }
        app.create_task(&app.user_token(owner), input, "id").await;
    }
}

fn labels(tasks: &[Value]) -> Vec<String> {
    tasks
        .iter()
        .map(|t| t["metadata"]["label"].as_str().expect("a label").to_owned())
        .collect()
}

/// `claimTask(types)` until it is null: the labels of its claims, in order.
async fn drain_one_by_one(app: &TestApp, types: Value) -> Vec<String> {
    let mut claimed = Vec::new();
    loop {
        let task = app.claim_task(types.clone(), None, "w", "metadata").await;
        if task.is_null() {
            return labels(&claimed);
        }
        claimed.push(task);
    }
}

/// `claimTasks(types, limit: 4)` until it is empty: the labels of its
/// claims, in order. Every batch but the last is full.
async fn drain_by_fours(app: &TestApp, types: Value) -> Vec<String> {
    let mut batches = Vec::new();
    loop {
        let batch = claim_tasks(app, types.clone(), 4).await;
        if batch.is_empty() {
            break;
        }
        batches.push(batch);
    }
    let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
    if let Some((_, full)) = sizes.split_last() {
        assert!(full.iter().all(|&n| n == 4), "batch sizes {sizes:?}");
    }
    labels(&batches.concat())
}

#[tokio::test]
async fn a_batch_claims_what_claim_task_one_after_another_would() {
    let one_by_one = spawn_app().await;
    let by_fours = spawn_app().await;
    create_mix(&one_by_one).await;
    create_mix(&by_fours).await;

    // Reports first, then whatever is left: in both apps alike.
    let mut claimed = 0;
    for types in [json!(["report"]), json!(null)] {
        let want = drain_one_by_one(&one_by_one, types.clone()).await;
        let got = drain_by_fours(&by_fours, types.clone()).await;
        assert_eq!(got, want, "types {types}");
        // The queue's order, not the creation order: highest priority first.
        let priorities: Vec<i64> = want.iter().map(|label| MIX[place(label)].2).collect();
        assert!(
            priorities.windows(2).all(|w| w[0] >= w[1]),
            "types {types}: {want:?}"
        );
        claimed += want.len();
    }
    // Everything runnable was compared; the tasks due tomorrow were left.
    assert_eq!(claimed, MIX.iter().filter(|(.., later)| !later).count());
}

/// Where a label's task is in `MIX`.
fn place(label: &str) -> usize {
    let (place, _) = label.split_once(':').expect("place:owner");
    place.parse().expect("a place")
}

#[tokio::test]
async fn a_capped_type_gives_a_batch_only_the_room_under_its_cap() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    set_policy(&app, "gpu", json!({ "concurrency": 3 })).await;
    let gpu = ids(&create_tasks(&app, &alice, &inputs("gpu", "gpu", 6)).await);
    let cpu = ids(&create_tasks(&app, &alice, &inputs("cpu", "cpu", 2)).await);

    let first = claim_tasks(&app, json!(["gpu"]), 1).await;
    assert_eq!(ids(&first), gpu[..1]);
    let batch = claim_tasks(&app, json!(["gpu"]), 10).await;
    assert_eq!(ids(&batch), gpu[1..3], "a cap of 3 with 1 running: 2 more");
    assert!(
        claim_tasks(&app, json!(["gpu"]), 10).await.is_empty(),
        "at its cap"
    );
    let others = claim_tasks(&app, json!(null), 10).await;
    assert_eq!(ids(&others), cpu, "other types are still claimed");

    // One finishes: one more, and no more.
    let input = json!({ "id": first[0]["id"], "status": "COMPLETED", "expectedAttempt": 1 });
    let done = data(app.update_status(input, "status").await);
    assert_eq!(done["updateTaskStatus"]["status"], "COMPLETED");
    assert_eq!(ids(&claim_tasks(&app, json!(null), 10).await), gpu[3..4]);
    assert!(claim_tasks(&app, json!(null), 10).await.is_empty());
}

#[tokio::test]
async fn a_paused_type_is_left_out_of_a_batch() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let mut urgent = inputs("video", "video", 3);
    for input in &mut urgent {
        input["priority"] = json!(100);
    }
    let videos = ids(&create_tasks(&app, &alice, &urgent).await);
    let images = ids(&create_tasks(&app, &alice, &inputs("image", "image", 3)).await);
    set_policy(&app, "video", json!({ "paused": true })).await;

    assert_eq!(ids(&claim_tasks(&app, json!(null), 10).await), images);
    assert!(claim_tasks(&app, json!(["video"]), 10).await.is_empty());
    assert!(claim_tasks(&app, json!(null), 10).await.is_empty());

    set_policy(&app, "video", json!({ "paused": false })).await;
    assert_eq!(ids(&claim_tasks(&app, json!(null), 10).await), videos);
}

#[tokio::test]
async fn a_limit_outside_1_to_100_is_refused_and_an_idle_queue_gives_an_empty_list() {
    let app = spawn_app().await;
    let worker = app.worker_token();
    for limit in [1, 100] {
        assert!(
            claim_tasks(&app, json!(null), limit).await.is_empty(),
            "limit {limit}"
        );
    }
    let created =
        ids(&create_tasks(&app, &app.user_token("alice"), &inputs("image", "i", 101)).await);

    for limit in [0, -1, 101, 1000] {
        let body = try_claim_tasks(&app, &worker, json!(null), limit).await;
        assert_eq!(
            error_code(&body),
            Some("BAD_USER_INPUT"),
            "limit {limit}: {body}"
        );
    }
    let untouched = task_of(&app, &created[0]).await;
    assert_eq!(
        (&untouched["status"], &untouched["attempts"]),
        (&json!("PENDING"), &json!(0))
    );

    // The bounds: 100 then the one left, each under the lease asked for.
    let before = Utc::now();
    let hundred = claim_tasks_as(&app, json!(["image"]), 100, 30, "w-7").await;
    assert_eq!(ids(&hundred), created[..100]);
    for task in &hundred {
        assert_eq!(
            (&task["status"], &task["attempts"], &task["workerId"]),
            (&json!("PROCESSING"), &json!(1), &json!("w-7"))
        );
        let lease = time(&task["leaseExpiresAt"]) - before;
        assert!(
            (29..=32).contains(&lease.num_seconds()),
            "a 30 s lease ends in {lease}"
        );
    }
    assert_eq!(
        ids(&claim_tasks(&app, json!(null), 100).await),
        created[100..]
    );
    assert!(claim_tasks(&app, json!(null), 100).await.is_empty());
}
