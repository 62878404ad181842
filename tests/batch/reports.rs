//! `completeTasks` and `heartbeatTasks`: each report applies or is refused
//! on its own, an exact repeat of a completion is answered again, and a bad
//! input (or too many) fails the whole call with nothing written.

use super::*;

/// Alice's `n` tasks of type "image", claimed by worker "w"; the claims.
async fn claimed_tasks(app: &TestApp, n: usize) -> Vec<Value> {
    let created = create_tasks(app, &app.user_token("alice"), &inputs("image", "t", n)).await;
    let claimed = claim_tasks(app, json!(["image"]), n as i64).await;
    assert_eq!(ids(&claimed), ids(&created));
    claimed
}

/// Asserts `reports` answer `input` in order: for each, the task with
/// `status`, or the error `code`.
fn assert_reports(reports: &[Value], input: &[Value], want: &[Result<&str, &str>]) {
    assert_eq!(reports.len(), want.len(), "{reports:?}");
    for (i, ((report, item), want)) in reports.iter().zip(input).zip(want).enumerate() {
        assert_eq!(report["id"], item["id"], "report {i}");
        match want {
            Ok(status) => {
                assert!(report["error"].is_null(), "report {i}: {report}");
                assert_eq!(report["task"]["id"], item["id"], "report {i}");
                assert_eq!(report["task"]["status"], *status, "report {i}: {report}");
            }
            Err(code) => {
                assert!(report["task"].is_null(), "report {i}: {report}");
                assert_eq!(report_code(report), Some(*code), "report {i}: {report}");
                assert!(
                    report["error"]["message"]
                        .as_str()
                        .is_some_and(|m| !m.is_empty())
                );
            }
        }
    }
}

#[tokio::test]
async fn completions_apply_where_they_hold_and_conflict_where_they_do_not() {
    let app = spawn_app().await;
    retry_at_once(&app, "image").await;
    let claimed = claimed_tasks(&app, 5).await;
    // Task 1 is cancelled by its owner; task 3 is claimed again by another worker.
    assert_eq!(
        cancel(&app, &app.user_token("alice"), &id_of(&claimed[1])).await,
        "CANCELLED"
    );
    let again = claim_again(&app, &claimed[3]).await;

    let input: Vec<Value> = claimed.iter().map(completion).collect();
    let reports = complete_tasks(&app, &input).await;
    let want = [
        Ok("COMPLETED"),
        Err("CONFLICT"),
        Ok("COMPLETED"),
        Err("CONFLICT"),
        Ok("COMPLETED"),
    ];
    assert_reports(&reports, &input, &want);
    for i in [0, 2, 4] {
        assert_eq!(reports[i]["task"]["resultId"], input[i]["resultId"]);
        assert_eq!(reports[i]["task"]["progress"], 100);
        assert!(reports[i]["task"]["leaseExpiresAt"].is_null());
    }

    // The tasks are as reported.
    for i in [0, 2, 4] {
        assert_eq!(task_of(&app, &id_of(&claimed[i])).await, reports[i]["task"]);
    }
    let cancelled = task_of(&app, &id_of(&claimed[1])).await;
    assert_eq!(
        (&cancelled["status"], &cancelled["resultId"]),
        (&json!("CANCELLED"), &Value::Null)
    );
    let reclaimed = task_of(&app, &id_of(&claimed[3])).await;
    assert_eq!(
        (
            &reclaimed["status"],
            &reclaimed["attempts"],
            &reclaimed["workerId"],
            &reclaimed["resultId"]
        ),
        (&json!("PROCESSING"), &json!(2), &json!("w2"), &Value::Null)
    );

    // The same call again: the completed tasks are answered as they are,
    // the others still conflict.
    let repeat = complete_tasks(&app, &input).await;
    assert_reports(&repeat, &input, &want);
    for i in [0, 2, 4] {
        assert_eq!(
            repeat[i]["task"], reports[i]["task"],
            "unchanged by the repeat"
        );
    }

    // Not an exact repeat (another result) conflicts; an unknown task is
    // NOT_FOUND; the new attempt's own completion applies beside them.
    let mut other_result = input[0].clone();
    other_result["resultId"] = json!("another");
    let unknown = json!({ "id": uuid::Uuid::now_v7().to_string(), "expectedAttempt": 1 });
    let input = [other_result, unknown, completion(&again)];
    let reports = complete_tasks(&app, &input).await;
    assert_reports(
        &reports,
        &input,
        &[Err("CONFLICT"), Err("NOT_FOUND"), Ok("COMPLETED")],
    );
    assert_eq!(
        task_of(&app, &id_of(&claimed[0])).await["resultId"],
        json!(format!("r-{}", id_of(&claimed[0])))
    );
    assert_eq!(count_rows(&app.db).await, 5);
}

#[tokio::test]
async fn heartbeats_extend_the_leases_held_and_conflict_the_rest() {
    let app = spawn_app().await;
    retry_at_once(&app, "image").await;
    let claimed = claimed_tasks(&app, 4).await;
    assert_eq!(
        cancel(&app, &app.user_token("alice"), &id_of(&claimed[1])).await,
        "CANCELLED"
    );
    let again = claim_again(&app, &claimed[2]).await;

    let input = [
        json!({ "id": claimed[0]["id"], "expectedAttempt": 1, "progress": 40 }),
        json!({ "id": claimed[1]["id"], "expectedAttempt": 1, "progress": 50 }),
        json!({ "id": claimed[2]["id"], "expectedAttempt": 1, "progress": 60 }),
        json!({ "id": claimed[3]["id"], "expectedAttempt": 1 }),
    ];
    let before = Utc::now();
    let reports = heartbeat_tasks(&app, &input, Some(600)).await;
    let want = [
        Ok("PROCESSING"),
        Err("CONFLICT"),
        Err("CONFLICT"),
        Ok("PROCESSING"),
    ];
    assert_reports(&reports, &input, &want);
    for i in [0, 3] {
        let task = &reports[i]["task"];
        let lease = time(&task["leaseExpiresAt"]) - before;
        assert!(
            (599..=602).contains(&lease.num_seconds()),
            "task {i}: lease for {lease}"
        );
        assert!(time(&task["leaseExpiresAt"]) > time(&claimed[i]["leaseExpiresAt"]));
        assert_eq!(
            task_of(&app, &id_of(&claimed[i])).await,
            *task,
            "task {i} as reported"
        );
    }
    assert_eq!(reports[0]["task"]["progress"], 40);
    assert_eq!(
        reports[3]["task"]["progress"], claimed[3]["progress"],
        "no progress: as it was"
    );

    // The refused ones are as they were.
    assert_eq!(
        task_of(&app, &id_of(&claimed[1])).await["status"],
        "CANCELLED"
    );
    let reclaimed = task_of(&app, &id_of(&claimed[2])).await;
    assert_eq!(
        (
            &reclaimed["progress"],
            &reclaimed["leaseExpiresAt"],
            &reclaimed["attempts"]
        ),
        (&again["progress"], &again["leaseExpiresAt"], &json!(2)),
    );

    // The default lease is 60 s; an unknown task is NOT_FOUND.
    let unknown = json!({ "id": uuid::Uuid::now_v7().to_string(), "expectedAttempt": 1 });
    let input = [
        json!({ "id": again["id"], "expectedAttempt": 2, "progress": 5 }),
        unknown,
    ];
    let before = Utc::now();
    let reports = heartbeat_tasks(&app, &input, None).await;
    assert_reports(&reports, &input, &[Ok("PROCESSING"), Err("NOT_FOUND")]);
    let lease = time(&reports[0]["task"]["leaseExpiresAt"]) - before;
    assert!(
        (59..=62).contains(&lease.num_seconds()),
        "lease for {lease}"
    );
    assert_eq!(reports[0]["task"]["progress"], 5);
}

#[tokio::test]
async fn a_bad_input_fails_the_whole_report_naming_its_index() {
    let app = spawn_app().await;
    let worker = app.worker_token();
    let claimed = claimed_tasks(&app, 3).await;
    let held: Vec<Value> = claimed.iter().map(completion).collect();

    let mut bad_id = held.clone();
    bad_id[2]["id"] = json!("not-a-task-id");
    let mut twice = held.clone();
    twice.push(held[0].clone());
    let mut empty_result = held.clone();
    empty_result[1]["resultId"] = json!("");
    for (what, input, index) in [
        ("a bad id", bad_id, 2),
        ("a task twice", twice, 3),
        ("an empty resultId", empty_result, 1),
    ] {
        let body = try_complete_tasks(&app, &worker, &input).await;
        assert_refused_at(
            &body,
            "BAD_USER_INPUT",
            index,
            &format!("completeTasks, {what}"),
        );
    }

    let beat = |task: &Value, progress: i64| json!({ "id": task["id"], "expectedAttempt": 1, "progress": progress });
    let beats: Vec<Value> = claimed.iter().map(|t| beat(t, 30)).collect();
    let mut bad_id = beats.clone();
    bad_id[0]["id"] = json!("42");
    let mut twice = beats.clone();
    twice.insert(1, beat(&claimed[2], 31));
    let mut too_far = beats.clone();
    too_far[1]["progress"] = json!(101);
    let mut negative = beats.clone();
    negative[2]["progress"] = json!(-1);
    let cases = [
        ("a bad id", bad_id, 0),
        ("a task twice", twice, 3),
        ("progress 101", too_far, 1),
        ("progress -1", negative, 2),
    ];
    for (what, input, index) in cases {
        let body = try_heartbeat_tasks(&app, &worker, &input, Some(600)).await;
        assert_refused_at(
            &body,
            "BAD_USER_INPUT",
            index,
            &format!("heartbeatTasks, {what}"),
        );
    }
    for lease in [0, 3601] {
        let body = try_heartbeat_tasks(&app, &worker, &beats, Some(lease)).await;
        assert_eq!(
            error_code(&body),
            Some("BAD_USER_INPUT"),
            "lease {lease}: {body}"
        );
    }

    // Nothing was written: each task as its claim left it.
    for task in &claimed {
        assert_eq!(task_of(&app, &id_of(task)).await, *task);
    }
    assert!(complete_tasks(&app, &[]).await.is_empty());
    assert!(heartbeat_tasks(&app, &[], None).await.is_empty());
}

#[tokio::test]
async fn a_hundred_reports_are_taken_and_a_hundred_and_one_refused() {
    let app = spawn_app().await;
    let worker = app.worker_token();
    let mut claimed = claimed_tasks(&app, 100).await;
    claimed.extend(claimed_tasks(&app, 1).await);
    let beats: Vec<Value> = claimed
        .iter()
        .map(|t| json!({ "id": t["id"], "expectedAttempt": 1, "progress": 50 }))
        .collect();
    let completions: Vec<Value> = claimed.iter().map(completion).collect();

    let body = try_heartbeat_tasks(&app, &worker, &beats, None).await;
    assert_eq!(error_code(&body), Some("BAD_USER_INPUT"), "{body}");
    let body = try_complete_tasks(&app, &worker, &completions).await;
    assert_eq!(error_code(&body), Some("BAD_USER_INPUT"), "{body}");
    for task in [&claimed[0], &claimed[100]] {
        assert_eq!(task_of(&app, &id_of(task)).await, *task, "untouched");
    }

    let reports = heartbeat_tasks(&app, &beats[..100], None).await;
    assert!(
        reports.iter().all(|r| r["task"]["progress"] == 50),
        "{reports:?}"
    );
    let reports = complete_tasks(&app, &completions[..100]).await;
    assert!(
        reports.iter().all(|r| r["task"]["status"] == "COMPLETED"),
        "{reports:?}"
    );
    assert_eq!(
        task_of(&app, &id_of(&claimed[100])).await["status"],
        "PROCESSING"
    );
}
