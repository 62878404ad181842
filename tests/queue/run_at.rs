//! `runAt`: a task waits until its time, kept as given in any offset.

use super::*;

#[tokio::test]
async fn a_task_with_run_at_in_the_future_is_claimed_only_once_it_passes() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    let run_at = Utc::now() + chrono::Duration::milliseconds(2000);
    let later = create(
        &app,
        &alice,
        json!({ "type": "report", "runAt": rfc3339(run_at) }),
    )
    .await;
    assert_eq!(later["status"], "PENDING");
    assert_eq!(
        time(&later["runAt"]),
        DateTime::from_timestamp_micros(run_at.timestamp_micros()).unwrap(),
        "runAt is kept to the microsecond"
    );

    // An answer that came before runAt must be null (the server claimed
    // before it answered); a slower one checks nothing.
    let answer = claim(&app, json!(null)).await;
    assert!(
        Utc::now() >= run_at || answer.is_null(),
        "claimed early: {answer}"
    );
    let answer = claim(&app, json!(["report"])).await;
    assert!(
        Utc::now() >= run_at || answer.is_null(),
        "claimed early: {answer}"
    );

    // A task created after it without runAt is runnable now and goes first.
    let now = create(&app, &alice, json!({ "type": "report" })).await;
    assert_eq!(
        now["runAt"], now["createdAt"],
        "runAt defaults to createdAt"
    );
    assert_eq!(claim(&app, json!(["report"])).await["id"], now["id"]);
    let answer = claim(&app, json!(null)).await;
    assert!(
        Utc::now() >= run_at || answer.is_null(),
        "claimed early: {answer}"
    );

    let claimed = eventually(
        "the task to become runnable",
        Duration::from_secs(10),
        || async {
            let task = claim(&app, json!(null)).await;
            (!task.is_null()).then_some(task)
        },
    )
    .await;
    assert_eq!(claimed["id"], later["id"]);
    assert_eq!(
        (&claimed["status"], &claimed["attempts"]),
        (&json!("PROCESSING"), &json!(1))
    );
    assert!(
        time(&claimed["startedAt"]) >= run_at,
        "claimed at {} before its runAt {run_at}",
        claimed["startedAt"]
    );
    assert_eq!(claimed["runAt"], later["runAt"], "a claim leaves runAt");
}

#[tokio::test]
async fn run_at_is_kept_as_given_in_any_offset_and_a_past_one_is_runnable_at_once() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    let given = "2030-05-06T09:10:11.123456+02:00";
    let future = create(&app, &alice, json!({ "type": "image", "runAt": given })).await;
    assert_eq!(
        time(&future["runAt"]),
        time(&json!("2030-05-06T07:10:11.123456Z"))
    );
    let seen = task(&app, &alice, &id_of(&future)).await;
    assert_eq!(time(&seen["runAt"]), time(&json!(given)), "as stored");

    let an_hour_ago = Utc::now() - chrono::Duration::hours(1);
    let past = create(
        &app,
        &alice,
        json!({ "type": "image", "runAt": rfc3339(an_hour_ago) }),
    )
    .await;
    assert_eq!(
        time(&past["runAt"]).timestamp_micros(),
        an_hour_ago.timestamp_micros()
    );
    assert!(time(&past["runAt"]) < time(&past["createdAt"]));
    let claimed = claim(&app, json!(null)).await;
    assert_eq!(claimed["id"], past["id"]);
    assert!(
        claim(&app, json!(null)).await.is_null(),
        "the task due in 2030 waits"
    );

    for bad in ["tomorrow", "2030-13-01T00:00:00Z", ""] {
        let body = try_create(&app, &alice, json!({ "type": "image", "runAt": bad })).await;
        assert!(body["errors"][0]["message"].is_string(), "{bad}: {body}");
        assert!(body["data"].is_null(), "{bad}: {body}");
    }
}
