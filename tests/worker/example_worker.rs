//! The example worker (examples/worker) against a real server: it completes tasks, stops after `--max-tasks`, and drops a cancelled one.

use super::*;

fn example_config(app: &TestApp) -> worker_client::WorkerConfig {
    let mut config =
        worker_client::WorkerConfig::new(format!("{}/graphql", app.base), app.worker_token());
    config.concurrency = 3;
    config.lease_seconds = 10;
    config.steps = 2;
    config.step_time = Duration::from_millis(20);
    config.exit_when_idle = true;
    config.worker_id = "example".into();
    config
}

/// What the owner sees of each of `ids`: COMPLETED on the first attempt,
/// with the example's result and full progress.
async fn completed_by_the_example(app: &TestApp, owner: &str, ids: &[String]) {
    for id in ids {
        let task = data(app.gql(Some(owner), TASK, json!({ "id": id })).await)["task"].clone();
        assert_eq!(task["status"], "COMPLETED", "{task}");
        assert_eq!(task["resultId"], worker_client::result_id_for(id));
        assert_eq!(
            (&task["progress"], &task["attempts"]),
            (&json!(100), &json!(1))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_example_worker_completes_users_tasks_end_to_end() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let mut wanted = Vec::new();
    for i in 0..12 {
        let task_type = if i % 3 == 0 {
            "report"
        } else {
            "concept.image"
        };
        let task = create_via_api(
            &app,
            &alice,
            json!({ "type": task_type, "metadata": { "n": i } }),
        )
        .await;
        wanted.push(task["id"].as_str().unwrap().to_owned());
    }
    let email = create_via_api(&app, &alice, json!({ "type": "email" })).await;

    let mut config = example_config(&app);
    config.types = vec!["concept.image".into(), "report".into()];
    let report = tokio::time::timeout(Duration::from_secs(60), worker_client::run(config))
        .await
        .expect("the worker exits when idle")
        .expect("the worker runs cleanly");
    assert_eq!(
        report,
        worker_client::Report {
            completed: 12,
            abandoned: 0
        }
    );

    completed_by_the_example(&app, &alice, &wanted).await;
    let untouched = data(
        app.gql(Some(&alice), TASK, json!({ "id": email["id"] }))
            .await,
    );
    assert_eq!(
        untouched["task"]["status"], "PENDING",
        "not a type it takes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_example_worker_stops_after_max_tasks() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    for _ in 0..8 {
        create_via_api(&app, &alice, json!({ "type": "image" })).await;
    }
    let mut config = example_config(&app);
    config.max_tasks = Some(5);
    config.exit_when_idle = false;
    let report = tokio::time::timeout(Duration::from_secs(60), worker_client::run(config))
        .await
        .expect("the worker stops after 5 tasks")
        .expect("the worker runs cleanly");
    assert_eq!(report.completed, 5);
    assert_statuses(&app.db, &[("completed", 5), ("pending", 3)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_example_worker_drops_a_task_cancelled_under_it() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let task = create_via_api(&app, &alice, json!({ "type": "image" })).await;
    let id = gql_id(&task);
    let mut config = example_config(&app);
    config.concurrency = 1;
    config.steps = 50;
    config.step_time = Duration::from_millis(100);
    let worker = tokio::spawn(worker_client::run(config));

    eventually(
        "the worker to report progress",
        Duration::from_secs(15),
        || async {
            let task = fetch(&app.db, id).await;
            (task.progress.is_some()).then_some(())
        },
    )
    .await;
    let cancelled = data(app.gql(Some(&alice), CANCEL, json!({ "id": id })).await);
    assert_eq!(cancelled["cancelTask"]["status"], "CANCELLED");

    let report = tokio::time::timeout(Duration::from_secs(30), worker)
        .await
        .expect("the worker gives up at its next heartbeat")
        .expect("joined")
        .expect("the worker runs cleanly");
    assert_eq!(
        report,
        worker_client::Report {
            completed: 0,
            abandoned: 1
        }
    );
    let last = fetch(&app.db, id).await;
    assert_eq!(last.status, TaskStatus::Cancelled);
    assert!(last.result_id.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_example_worker_in_batches_completes_each_task_once() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let mut wanted = Vec::new();
    for i in 0..23 {
        let task = create_via_api(
            &app,
            &alice,
            json!({ "type": "image", "metadata": { "n": i } }),
        )
        .await;
        wanted.push(task["id"].as_str().unwrap().to_owned());
    }
    let mut config = example_config(&app);
    config.concurrency = 2;
    config.batch = 5;
    let report = tokio::time::timeout(Duration::from_secs(60), worker_client::run(config))
        .await
        .expect("the worker exits when idle")
        .expect("the worker runs cleanly");
    assert_eq!(
        report,
        worker_client::Report {
            completed: 23,
            abandoned: 0
        }
    );
    completed_by_the_example(&app, &alice, &wanted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_example_worker_in_batches_drops_only_the_task_cancelled_under_it() {
    let app = spawn_app().await;
    let alice = app.user_token("alice");
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(gql_id(
            &create_via_api(&app, &alice, json!({ "type": "image" })).await,
        ));
    }
    let mut config = example_config(&app);
    config.concurrency = 1;
    config.batch = 3;
    config.steps = 20;
    config.step_time = Duration::from_millis(100);
    let worker = tokio::spawn(worker_client::run(config));

    eventually(
        "the worker to report progress on all three",
        Duration::from_secs(15),
        || async {
            for id in &ids {
                fetch(&app.db, *id).await.progress?;
            }
            Some(())
        },
    )
    .await;
    let cancelled = data(app.gql(Some(&alice), CANCEL, json!({ "id": ids[1] })).await);
    assert_eq!(cancelled["cancelTask"]["status"], "CANCELLED");

    let report = tokio::time::timeout(Duration::from_secs(30), worker)
        .await
        .expect("the worker finishes the batch")
        .expect("joined")
        .expect("the worker runs cleanly");
    assert_eq!(
        report,
        worker_client::Report {
            completed: 2,
            abandoned: 1
        }
    );
    let statuses: Vec<TaskStatus> =
        futures::future::join_all(ids.iter().map(|id| fetch(&app.db, *id)))
            .await
            .into_iter()
            .map(|t| t.status)
            .collect();
    assert_eq!(
        statuses,
        [
            TaskStatus::Completed,
            TaskStatus::Cancelled,
            TaskStatus::Completed
        ]
    );
}
