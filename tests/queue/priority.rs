//! Priority: the higher claimed first, and its range (and `maxAttempts`') checked.

use super::*;

#[tokio::test]
async fn higher_priority_is_claimed_first_whatever_the_creation_order() {
    let app = fresh_app().await;
    let (alice, bob) = (app.user_token("alice"), app.user_token("bob"));
    // Bob's task comes first and would go first by turns: priority wins.
    let bobs = create(&app, &bob, json!({ "type": "image" })).await;
    assert_eq!(bobs["priority"], 0, "the default priority");
    let mut by_priority = Vec::new();
    for priority in [0, -5, 10, 100, -100, 10] {
        let task = create(
            &app,
            &alice,
            json!({ "type": "image", "priority": priority }),
        )
        .await;
        assert_eq!(task["priority"], priority);
        by_priority.push((priority, id_of(&task)));
    }
    // Highest first; alice's two 10s in the order she created them.
    by_priority.sort_by_key(|(priority, _)| -priority);
    let mut want: Vec<String> = by_priority.into_iter().map(|(_, id)| id).collect();
    // Bob's 0 shares turn 0 with alice's 0 (her first task) and came earlier.
    want.insert(3, id_of(&bobs));

    assert_eq!(claimed_ids(&app, json!(null)).await, want);
}

#[tokio::test]
async fn priority_and_max_attempts_out_of_range_are_bad_user_input_naming_the_range() {
    let app = fresh_app().await;
    let alice = app.user_token("alice");
    // Each refusal names the field and its bounds.
    let cases = [
        (
            "priority",
            ["-100", "100"],
            vec![101, -101, i32::MAX, i32::MIN],
        ),
        ("maxAttempts", ["1", "100"], vec![0, -1, 101, i32::MAX]),
    ];
    for (field, bounds, bads) in cases {
        for bad in bads {
            let body = try_create(&app, &alice, json!({ "type": "image", field: bad })).await;
            assert_eq!(
                error_code(&body),
                Some("BAD_USER_INPUT"),
                "{field} {bad}: {body}"
            );
            let message = body["errors"][0]["message"].as_str().unwrap_or_default();
            assert!(
                message.contains(field) && bounds.iter().all(|bound| message.contains(bound)),
                "{field} {bad}: {message}"
            );
        }
    }
    assert_eq!(count_rows(&app.db).await, 0, "nothing was created");

    // The bounds themselves are accepted.
    for (priority, max_attempts) in [(-100, 1), (100, 100)] {
        let task = create(
            &app,
            &alice,
            json!({ "type": "image", "priority": priority, "maxAttempts": max_attempts }),
        )
        .await;
        assert_eq!(
            (&task["priority"], &task["maxAttempts"]),
            (&json!(priority), &json!(max_attempts))
        );
    }
}
