//! Durations' percentiles over the last hour (from merged minutes, within a bucket of exact ones), the oldest pending task's age and the workers holding leases.

use super::*;

#[tokio::test]
async fn durations_are_percentiles_of_the_last_hour() {
    let app = spawn_app().await;
    let service = &app.service;
    // 100 tasks of "known": wait i*10 ms, run i*20 ms, finished 10 minutes
    // ago; half completed, half failed. Beside them, tasks that must not
    // count: cancelled, finished two hours ago, still processing.
    let mut known = Vec::new();
    for _ in 0..100 {
        known.push(new_task(service.as_ref(), &alice(), "known").await.id);
    }
    let cancelled = new_task(service.as_ref(), &alice(), "known").await.id;
    let old = new_task(service.as_ref(), &alice(), "known").await.id;
    let running = new_task(service.as_ref(), &bob(), "other").await.id;
    let base = chrono::Utc::now() - chrono::TimeDelta::minutes(20);
    let finished = chrono::Utc::now() - chrono::TimeDelta::minutes(10);
    for (i, id) in known.iter().enumerate() {
        let i = i as i64 + 1;
        let started = base + chrono::TimeDelta::milliseconds(i * 10);
        let status = if i % 2 == 0 { "completed" } else { "failed" };
        let completed = started + chrono::TimeDelta::milliseconds(i * 20);
        // completed_at must be within the hour; keep the run time exact by
        // moving created/started instead.
        let shift = finished - completed;
        let set = times(&[
            ("created_at", base + shift),
            ("started_at", started + shift),
            ("completed_at", completed + shift),
        ]);
        update_task(&app, *id, &format!("status = '{status}', {set}")).await;
    }
    let set = times(&[("started_at", base), ("completed_at", finished)]);
    update_task(&app, cancelled, &format!("status = 'cancelled', {set}")).await;
    let long_ago = base - chrono::TimeDelta::hours(2);
    let set = times(&[
        ("started_at", long_ago),
        ("completed_at", long_ago + chrono::TimeDelta::seconds(100)),
    ]);
    update_task(&app, old, &format!("status = 'completed', {set}")).await;
    let set = times(&[("started_at", base)]);
    update_task(&app, running, &format!("status = 'processing', {set}")).await;

    // Alice's view reads her rows: exact, as percentile_cont. A worker's
    // merges per-minute histograms: within a bucket (a factor 2^(1/8)) of
    // the value at the lower of the two ranks percentile_cont interpolates
    // between.
    for (token, exact) in [(app.user_token("alice"), true), (app.worker_token(), false)] {
        let view = stats(&app, &token).await;
        let durations = view["durations"].as_array().unwrap();
        assert_eq!(durations.len(), 1, "only 'known' finished: {durations:?}");
        let d = &durations[0];
        assert_eq!(d["type"], "known");
        for (key, interpolated, lower_rank) in [
            ("waitP50Ms", 505.0, 500.0),
            ("waitP95Ms", 950.5, 950.0),
            ("runP50Ms", 1010.0, 1000.0),
            ("runP95Ms", 1901.0, 1900.0),
            ("runP99Ms", 1980.2, 1980.0),
        ] {
            let got = d[key].as_f64().unwrap_or_else(|| panic!("{key}: {d}"));
            if exact {
                assert!(
                    (got - interpolated).abs() < 0.5,
                    "{key}: {got} != {interpolated}"
                );
            } else {
                assert_within_a_bucket(key, got, lower_rank);
            }
        }
    }
    let bobs = stats(&app, &app.user_token("bob")).await;
    assert_eq!(bobs["durations"], json!([]));
}

/// The bound docs/design.md states for a worker's percentiles: within a
/// factor 2^(1/8) of `value`, or within 1 ms below 1 ms (and 0.1 ms for
/// the rounding of times in SQLite's date arithmetic).
fn assert_within_a_bucket(what: &str, got: f64, value: f64) {
    let ratio = 2f64.powf(1.0 / 8.0);
    let slack = ((ratio - 1.0) * value).max(1.0) + 0.1;
    assert!(
        (got - value).abs() <= slack,
        "{what}: {got} is not within a bucket of {value}"
    );
}

#[tokio::test]
async fn oldest_pending_age_and_workers_with_leases() {
    let app = spawn_app().await;
    let service = &app.service;
    let oldest = new_task(service.as_ref(), &alice(), "image").await;
    for _ in 0..4 {
        new_task(service.as_ref(), &bob(), "image").await;
    }
    set_seconds_ago(&app, oldest.id, "created_at", 120).await;
    let all = stats(&app, &app.worker_token()).await;
    let age = all["oldestPendingAgeSeconds"].as_f64().unwrap();
    assert!((119.0..130.0).contains(&age), "{age}");
    let bobs = stats(&app, &app.user_token("bob")).await;
    assert!(bobs["oldestPendingAgeSeconds"].as_f64().unwrap() < 60.0);

    // gpu-1 holds two leases (the oldest task first), gpu-2 one whose
    // lease has run out (not reaped yet): only gpu-1 holds leases now.
    let w = as_worker();
    let claim = |worker_id: &str, lease: u64| ClaimRequest {
        worker_id: Some(worker_id.into()),
        lease: Some(Duration::from_secs(lease)),
        ..Default::default()
    };
    let first = service
        .claim_task(&w, claim("gpu-1", 30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.id, oldest.id);
    service.claim_task(&w, claim("gpu-1", 600)).await.unwrap();
    let expired = service
        .claim_task(&w, claim("gpu-2", 60))
        .await
        .unwrap()
        .unwrap();
    set_seconds_ago(&app, expired.id, "lease_expires_at", 1).await;
    let all = stats(&app, &app.worker_token()).await;
    let workers = all["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 1, "{workers:?}");
    assert_eq!(workers[0]["workerId"], "gpu-1");
    assert_eq!(workers[0]["tasks"], 2);
    let next =
        chrono::DateTime::parse_from_rfc3339(workers[0]["nextLeaseExpiry"].as_str().unwrap())
            .unwrap();
    let lease = first.lease_expires_at.unwrap();
    assert_eq!(
        next.timestamp_micros(),
        lease.timestamp_micros(),
        "the sooner lease"
    );
    let alices = stats(&app, &app.user_token("alice")).await;
    assert_eq!(alices["workers"][0]["tasks"], 1, "{alices}");
    assert!(alices["oldestPendingAgeSeconds"].is_null());
}

#[tokio::test]
async fn percentiles_from_merged_minutes_are_within_a_bucket_of_exact_ones() {
    let app = spawn_app().await;
    let service = &app.service;
    // 240 tasks of two types finished over the last 50 minutes, with waits
    // from 0.4 ms to about 20 minutes and runs from 2 ms to about an hour,
    // spread evenly on a log scale; a failed one among every three.
    let now = chrono::Utc::now();
    let mut expected: BTreeMap<&str, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for i in 0..240i64 {
        let task_type = if i % 2 == 0 { "even" } else { "odd" };
        let owner = if i % 5 == 0 { bob() } else { alice() };
        let id = new_task(service.as_ref(), &owner, task_type).await.id;
        let x = (i * 97 % 240) as f64 / 239.0;
        let wait_us = (400.0 * 3_000_000f64.powf(x)).round() as i64;
        let run_us = (2000.0 * 1_800_000f64.powf(1.0 - x)).round() as i64;
        let done = now - chrono::TimeDelta::seconds(5 + i * 12);
        let started = done - chrono::TimeDelta::microseconds(run_us);
        let created = started - chrono::TimeDelta::microseconds(wait_us);
        let status = if i % 3 == 0 { "failed" } else { "completed" };
        let set = times(&[
            ("created_at", created),
            ("started_at", started),
            ("completed_at", done),
        ]);
        update_task(&app, id, &format!("status = '{status}', {set}")).await;
        let (waits, runs) = expected.entry(task_type).or_default();
        waits.push(wait_us as f64 / 1000.0);
        runs.push(run_us as f64 / 1000.0);
    }
    let view = stats(&app, &app.worker_token()).await;
    let durations = view["durations"].as_array().unwrap();
    assert_eq!(durations.len(), 2, "{durations:?}");
    for d in durations {
        let (waits, runs) = expected.get_mut(d["type"].as_str().unwrap()).unwrap();
        waits.sort_by(f64::total_cmp);
        runs.sort_by(f64::total_cmp);
        for (key, values, p) in [
            ("waitP50Ms", &*waits, 0.50),
            ("waitP95Ms", &*waits, 0.95),
            ("runP50Ms", &*runs, 0.50),
            ("runP95Ms", &*runs, 0.95),
            ("runP99Ms", &*runs, 0.99),
        ] {
            let lower_rank = values[(p * (values.len() - 1) as f64).floor() as usize];
            let got = d[key].as_f64().unwrap();
            assert_within_a_bucket(key, got, lower_rank);
            let exact = taskql::service::stats::percentile(values, p).unwrap();
            assert!(
                (got - exact).abs() <= 0.25 * exact + 1.0,
                "{key}: {got} against {exact}"
            );
        }
    }
    // Bob's view is his rows (of both types), exact.
    let bobs = stats(&app, &app.user_token("bob")).await;
    assert_eq!(bobs["durations"].as_array().unwrap().len(), 2, "{bobs}");
}
