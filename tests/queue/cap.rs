//! The concurrency cap of a type, on one instance and across two, under racing workers.

use super::*;

#[tokio::test]
async fn a_capped_type_is_claimed_up_to_its_cap_and_again_when_one_finishes() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    set_policy(&app, "gpu", json!({ "concurrency": 2 })).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(id_of(&create(&app, &alice, json!({ "type": "gpu" })).await));
    }
    let cpu = create(&app, &alice, json!({ "type": "cpu" })).await;

    let first = claim(&app, json!(["gpu"])).await;
    let second = claim(&app, json!(["gpu"])).await;
    assert_eq!(
        (id_of(&first), id_of(&second)),
        (ids[0].clone(), ids[1].clone())
    );
    assert!(claim(&app, json!(["gpu"])).await.is_null(), "at its cap");
    assert_eq!(
        claim(&app, json!(null)).await["id"],
        cpu["id"],
        "other types are still claimed"
    );
    let gpu = set_policy(&app, "gpu", json!({})).await;
    assert_eq!(
        (&gpu["pending"], &gpu["processing"]),
        (&json!(2), &json!(2))
    );

    assert_eq!(
        data(complete(&app, &ids[0], 1).await)["updateTaskStatus"]["status"],
        "COMPLETED"
    );
    assert_eq!(claim(&app, json!(null)).await["id"], json!(ids[2]));
    assert!(claim(&app, json!(null)).await.is_null());

    // A lower cap holds back claims until enough finish; no cap, none.
    set_policy(&app, "gpu", json!({ "concurrency": 1 })).await;
    assert_eq!(
        data(complete(&app, &ids[1], 1).await)["updateTaskStatus"]["status"],
        "COMPLETED"
    );
    assert!(claim(&app, json!(null)).await.is_null(), "one still runs");
    set_policy(&app, "gpu", json!({ "concurrency": null })).await;
    assert_eq!(claim(&app, json!(null)).await["id"], json!(ids[3]));
}

/// Workers on `apps` (worker w on app w % apps) claim any type and complete
/// what they claim until all `total` tasks are done. Each holds a task of
/// `capped` ~10 ms; it counts itself in `running` right after its claim and
/// out right before its completion, so the count never exceeds what is
/// PROCESSING. The most it saw at once, and every claim as (id, type,
/// attempts, app).
async fn race_workers(
    apps: &[Arc<TestApp>],
    workers: usize,
    capped: &str,
    total: usize,
) -> (usize, Vec<(String, String, i64, usize)>) {
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let claims = Arc::new(Mutex::new(Vec::new()));
    let start = Arc::new(Barrier::new(workers));
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let app = apps[w % apps.len()].clone();
            let (running, most, finished, claims, start) = (
                running.clone(),
                most.clone(),
                finished.clone(),
                claims.clone(),
                start.clone(),
            );
            let (capped, on) = (capped.to_owned(), w % apps.len());
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(20);
                start.wait().await;
                while finished.load(Ordering::SeqCst) < total {
                    assert!(
                        Instant::now() < deadline,
                        "worker {w}: tasks are left unclaimed"
                    );
                    let task = claim_with(&app, json!(null), 60, &format!("w{w}")).await;
                    if task.is_null() {
                        tokio::time::sleep(Duration::from_millis(3)).await;
                        continue;
                    }
                    let (id, attempts) =
                        (id_of(&task), task["attempts"].as_i64().expect("attempts"));
                    let task_type = task["type"].as_str().expect("type").to_owned();
                    if task_type == capped {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(8 + (w as u64 % 4))).await;
                        running.fetch_sub(1, Ordering::SeqCst);
                    }
                    let done = data(complete(&app, &id, attempts).await);
                    assert_eq!(done["updateTaskStatus"]["status"], "COMPLETED");
                    claims.lock().unwrap().push((id, task_type, attempts, on));
                    finished.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.expect("worker");
    }
    let claims = std::mem::take(&mut *claims.lock().unwrap());
    (most.load(Ordering::SeqCst), claims)
}

/// Rounds of `workers` racing over tasks of a capped type (and of an
/// uncapped one) on `apps`, one cap per round; asserts the cap held as the
/// workers saw it and each task was claimed once and completed.
async fn assert_cap_holds(apps: &[Arc<TestApp>], workers: usize, per_round: usize, caps: &[usize]) {
    let one = &apps[0];
    let mut most_ever = 0;
    for (round, &cap) in caps.iter().enumerate() {
        set_policy(one, "render", json!({ "concurrency": cap })).await;
        if round == 0 && apps.len() > 1 {
            // An instance learns which types are capped from the database at
            // most once a second (the instance that set the policy, at
            // once); until then it skips the type. Wait, so that every
            // instance's workers take part in the race. Later rounds only
            // change the cap, which each claim reads from the database.
            tokio::time::sleep(Duration::from_millis(1200)).await;
        }
        let mut ids = HashSet::new();
        for i in 0..per_round {
            let owner = if i % 3 == 0 { bob() } else { alice() };
            ids.insert(
                new_task(one.service.as_ref(), &owner, "render")
                    .await
                    .id
                    .to_string(),
            );
        }
        for _ in 0..per_round / 3 {
            ids.insert(
                new_task(one.service.as_ref(), &alice(), "email")
                    .await
                    .id
                    .to_string(),
            );
        }
        let (most, claims) = race_workers(apps, workers, "render", ids.len()).await;
        assert!(
            most <= cap,
            "round {round}: {most} tasks of a type capped at {cap} ran at once"
        );
        most_ever = most_ever.max(most);

        let claimed: HashSet<String> = claims.iter().map(|(id, ..)| id.clone()).collect();
        assert_eq!(
            claims.len(),
            ids.len(),
            "round {round}: claims made (a task claimed twice?)"
        );
        assert_eq!(claimed, ids, "round {round}: every task claimed once");
        assert!(claims.iter().all(|(_, _, attempts, _)| *attempts == 1));
        for app in 0..apps.len() {
            assert!(
                claims
                    .iter()
                    .any(|(_, t, _, on)| t == "render" && *on == app),
                "round {round}: instance {app} never took a capped task"
            );
        }
        let uuids: Vec<Uuid> = ids.iter().map(|id| Uuid::parse_str(id).unwrap()).collect();
        for chunk in uuids.chunks(200) {
            let tasks = Tasks::find()
                .filter(Column::Id.is_in(chunk.to_vec()))
                .all(&one.db)
                .await
                .expect("read tasks");
            assert_eq!(tasks.len(), chunk.len());
            for task in tasks {
                assert_eq!(
                    (task.status, task.attempts),
                    (TaskStatus::Completed, 1),
                    "{task:?}"
                );
            }
        }
    }
    assert!(
        most_ever >= 2,
        "the workers never ran two capped tasks at once: no race was tested"
    );
    let render = task_types(one)
        .await
        .into_iter()
        .find(|t| t["type"] == "render")
        .expect("render");
    assert_eq!(
        (&render["pending"], &render["processing"]),
        (&json!(0), &json!(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_concurrency_cap_holds_for_six_workers_on_one_instance() {
    let database = Arc::new(TestDb::new().await);
    let apps = [Arc::new(spawn_app_with(database, |_| {}).await)];
    assert_cap_holds(&apps, 6, 30, &[2, 1, 3]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_concurrency_cap_holds_for_eight_workers_on_two_instances() {
    let Some((one, two)) = two_apps_on_postgres_or_skip(
        "the_concurrency_cap_holds_for_eight_workers_on_two_instances",
    )
    .await
    else {
        return;
    };
    let apps = [Arc::new(one), Arc::new(two)];
    assert_cap_holds(&apps, 8, 60, &[2, 3, 1]).await;
}
