//! The owners' turns: one owner's many tasks do not starve another's.

use super::*;

#[tokio::test]
async fn one_task_of_a_second_owner_is_claimed_first_or_second_after_thirty_of_the_first() {
    let app = fresh_app().await;
    let (alice, bob) = (app.user_token("alice"), app.user_token("bob"));
    let mut alices = Vec::new();
    for i in 0..30 {
        alices.push(id_of(
            &create(
                &app,
                &alice,
                json!({ "type": "image", "metadata": { "n": i } }),
            )
            .await,
        ));
    }
    let bobs = id_of(&create(&app, &bob, json!({ "type": "image" })).await);

    let claimed = claimed_ids(&app, json!(["image"])).await;
    assert!(
        claimed[..2].contains(&bobs),
        "bob's task was claim #{} of 31",
        place_of(&claimed, &bobs)
    );
    // Alice's own tasks still come in the order she created them.
    let alice_order: Vec<&String> = claimed.iter().filter(|id| **id != bobs).collect();
    assert_eq!(alice_order, alices.iter().collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_task_of_a_second_owner_goes_first_or_second_after_thirty_created_at_once() {
    let app = Arc::new(fresh_app().await);
    let start = Arc::new(Barrier::new(30));
    let creators: Vec<_> = (0..30)
        .map(|i| {
            let (app, start) = (app.clone(), start.clone());
            tokio::spawn(async move {
                let alice = app.user_token("alice");
                start.wait().await;
                id_of(
                    &create(
                        &app,
                        &alice,
                        json!({ "type": "image", "metadata": { "n": i } }),
                    )
                    .await,
                )
            })
        })
        .collect();
    let mut alices = HashSet::new();
    for creator in creators {
        alices.insert(creator.await.expect("creator"));
    }
    assert_eq!(alices.len(), 30);
    let bobs = id_of(&create(&app, &app.user_token("bob"), json!({ "type": "image" })).await);

    let claimed = claimed_ids(&app, json!(["image"])).await;
    assert_eq!(claimed.len(), 31);
    assert!(
        claimed[..2].contains(&bobs),
        "bob's task was claim #{} of 31",
        place_of(&claimed, &bobs)
    );
    assert_eq!(claimed.iter().filter(|id| alices.contains(*id)).count(), 30);
}

#[tokio::test]
async fn owners_take_turns_and_a_newcomer_starts_at_the_turn_being_served() {
    let app = fresh_app().await;
    let (alice, bob, carol) = (
        app.user_token("alice"),
        app.user_token("bob"),
        app.user_token("carol"),
    );
    for _ in 0..30 {
        create(&app, &alice, json!({ "type": "image" })).await;
    }
    let mut bobs = HashSet::new();
    for _ in 0..5 {
        bobs.insert(id_of(&create(&app, &bob, json!({ "type": "image" })).await));
    }
    // Turns 0..4 of both: bob's five are all within the first ten claims.
    let mut first_ten = Vec::new();
    for _ in 0..10 {
        first_ten.push(id_of(&claim(&app, json!(null)).await));
    }
    assert_eq!(
        first_ten.iter().filter(|id| bobs.contains(*id)).count(),
        5,
        "alice's and bob's tasks alternate: {first_ten:?}"
    );

    // Alice is at turn 5 now; carol, new, joins that turn, not the back of the queue.
    let carols = id_of(&create(&app, &carol, json!({ "type": "image" })).await);
    let next = [
        claim(&app, json!(null)).await,
        claim(&app, json!(null)).await,
    ];
    assert!(
        next.iter().any(|t| id_of(t) == carols),
        "carol's task is claimed first or second: {next:?}"
    );
}

#[tokio::test]
async fn a_newcomers_turn_is_the_one_served_at_its_priority() {
    let app = fresh_app().await;
    let (alice, bob) = (app.user_token("alice"), app.user_token("bob"));

    // Alice's backlog, then one urgent task of hers: claimed first, by priority.
    for _ in 0..30 {
        create(&app, &alice, json!({ "type": "image" })).await;
    }
    let urgent = create(&app, &alice, json!({ "type": "image", "priority": 10 })).await;
    let bobs = id_of(&create(&app, &bob, json!({ "type": "image" })).await);
    let claimed = claimed_ids(&app, json!(null)).await;
    assert_eq!(claimed[0], id_of(&urgent));
    let place = place_of(&claimed, &bobs);

    // Alice's backlog, then one urgent task of hers due tomorrow: it is not
    // runnable, and alice's first task is the one being served.
    for _ in 0..30 {
        create(&app, &alice, json!({ "type": "report" })).await;
    }
    let tomorrow = rfc3339(Utc::now() + chrono::Duration::days(1));
    create(
        &app,
        &alice,
        json!({ "type": "report", "priority": 10, "runAt": tomorrow }),
    )
    .await;
    let bobs = id_of(&create(&app, &bob, json!({ "type": "report" })).await);
    let claimed = claimed_ids(&app, json!(null)).await;
    let place_scheduled = place_of(&claimed, &bobs);
    assert!(
        (2..=3).contains(&place) && (1..=2).contains(&place_scheduled),
        "bob's task, created after alice's 30 and her one urgent task, was claim #{place} \
         (want #2 or #3); after her 30 and one urgent task due tomorrow, claim #{place_scheduled} \
         (want #1 or #2)"
    );
}
