//! PostgreSQL outages through a proxy: refused, blackholed and partitioned connections, and a partition mid-statement.

use super::*;

/// One request during the outage: what an operator sees of it.
#[derive(Debug)]
struct OutageAnswer {
    what: &'static str,
    status: Option<u16>,
    codes: Vec<String>,
    has_data: bool,
    took: Duration,
}

/// A fresh PostgreSQL database, a proxy in front of it, and the real server
/// reaching the database through the proxy, with a 1 s acquire timeout and
/// `statement_timeout`.
async fn served_through_a_proxy(statement_timeout: &str) -> (TestDb, Proxy, Server) {
    let db = TestDb::new().await;
    let proxy = Proxy::start(&host_port(&db.url)).await;
    let server = Server::start(
        &through(&db.url, proxy.addr),
        &[
            ("TASKQL_DB_ACQUIRE_TIMEOUT", "1s"),
            ("TASKQL_DB_STATEMENT_TIMEOUT", statement_timeout),
        ],
    )
    .await;
    (db, proxy, server)
}

async fn survives_a_postgres_outage(name: &'static str, mode: ProxyMode) {
    if postgres_url_or_skip(name).is_none() {
        return;
    }
    let run = begin(name).await;
    let (db, proxy, mut server) = served_through_a_proxy("1s").await;
    let token = token_for("alice", None);
    let mut created = Vec::new();
    for _ in 0..5 {
        let (status, body) = server
            .graphql(&token, CREATE_TASK, json!({}), Duration::from_secs(5))
            .await
            .expect("create before the outage");
        assert_eq!(status, 200, "{body}");
        created.push(
            body["data"]["createTask"]["id"]
                .as_str()
                .expect("an id")
                .to_owned(),
        );
    }

    proxy.set(mode);
    let probe = Duration::from_secs(15);
    let asked = Instant::now();
    let healthz = (server.get_status("/healthz", probe).await, asked.elapsed());
    let asked = Instant::now();
    let readyz = (server.get_status("/readyz", probe).await, asked.elapsed());
    let mut answers = Vec::new();
    for (what, query) in [
        ("list", LIST_TASKS),
        ("create", CREATE_TASK),
        ("list again", LIST_TASKS),
    ] {
        let asked = Instant::now();
        let result = server.graphql(&token, query, json!({}), probe).await;
        let took = asked.elapsed();
        answers.push(match result {
            Ok((status, body)) => OutageAnswer {
                what,
                status: Some(status),
                codes: error_codes(&body),
                has_data: !body["data"].is_null(),
                took,
            },
            Err(err) => OutageAnswer {
                what,
                status: None,
                codes: vec![err],
                has_data: false,
                took,
            },
        });
    }

    proxy.set(ProxyMode::Forward);
    let restored = Instant::now();
    let mut recovered_after = None;
    let mut listed = Value::Null;
    while restored.elapsed() < Duration::from_secs(15) {
        if let Ok((200, body)) = server
            .graphql(&token, LIST_TASKS, json!({}), Duration::from_secs(5))
            .await
            && body["errors"].is_null()
        {
            recovered_after = Some(restored.elapsed());
            listed = body;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let readyz_after = server.get_status("/readyz", Duration::from_secs(5)).await;
    let direct = common::count_rows(&db.connect().await).await;
    eprintln!(
        "{mode:?}: /healthz {:?} in {}, /readyz {:?} in {}; during the outage {answers:?}; \
         recovered {recovered_after:?} after the restore; /readyz then {readyz_after:?}; \
         {direct} rows in the database; alive: {}",
        healthz.0,
        seconds(healthz.1),
        readyz.0,
        seconds(readyz.1),
        server.is_running(),
    );

    assert_eq!(
        healthz.0,
        Ok(200),
        "/healthz does not depend on the database"
    );
    assert!(healthz.1 < Duration::from_secs(1));
    assert_eq!(readyz.0, Ok(503), "/readyz during the outage");
    assert!(
        readyz.1 < Duration::from_millis(1500),
        "/readyz took {:?}",
        readyz.1
    );
    // A statement already sent on a silent connection waits for taskql's
    // own deadline (acquire and statement timeouts, 2 s); anything else, for
    // the acquire timeout (1 s).
    let limit = match mode {
        ProxyMode::Partition => Duration::from_secs(2) + DEADLINE_SLACK,
        _ => Duration::from_millis(2500),
    };
    for answer in &answers {
        let what = answer.what;
        assert_eq!(answer.status, Some(503), "{what}: {answer:?}");
        assert!(
            !answer.codes.is_empty() && answer.codes.iter().all(|c| c == "SERVICE_UNAVAILABLE"),
            "{answer:?}"
        );
        assert!(!answer.has_data, "{answer:?}");
        assert!(answer.took < limit, "{answer:?}: over {limit:?}");
    }
    let recovered_after = recovered_after.expect("requests succeed again after the restore");
    assert!(
        recovered_after < Duration::from_secs(5),
        "recovered only after {recovered_after:?}"
    );
    let ids: Vec<&str> = listed["data"]["tasks"]["nodes"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    for id in &created {
        assert!(ids.contains(&id.as_str()), "task {id} was lost: {ids:?}");
    }
    assert_eq!(direct, ids.len() as i64, "rows in the database vs listed");
    assert_eq!(readyz_after, Ok(200));
    assert!(server.is_running());
    drop(run);
}

#[tokio::test]
async fn postgres_refusing_connections_gives_503_then_recovers_without_losing_tasks() {
    survives_a_postgres_outage(
        "postgres_refusing_connections_gives_503_then_recovers_without_losing_tasks",
        ProxyMode::Refuse,
    )
    .await;
}

#[tokio::test]
async fn postgres_blackholed_gives_503_then_recovers_without_losing_tasks() {
    survives_a_postgres_outage(
        "postgres_blackholed_gives_503_then_recovers_without_losing_tasks",
        ProxyMode::Blackhole,
    )
    .await;
}

#[tokio::test]
async fn postgres_partitioned_mid_connection_gives_503_then_recovers_without_losing_tasks() {
    survives_a_postgres_outage(
        "postgres_partitioned_mid_connection_gives_503_then_recovers_without_losing_tasks",
        ProxyMode::Partition,
    )
    .await;
}

/// Whether `query` succeeds within `within`, tried every 200 ms; how long it took.
async fn succeeds_again(
    server: &Server,
    token: &str,
    query: &str,
    within: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        if let Ok((200, body)) = server
            .graphql(token, query, json!({}), Duration::from_secs(5))
            .await
            && body["errors"].is_null()
        {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// In a network partition PostgreSQL's own statement_timeout never reaches
/// taskql and TCP waits for as long as it likes: a statement already sent
/// on a connection that went silent ends only by taskql's deadline, the
/// acquire timeout plus the statement timeout.
#[tokio::test]
async fn a_partition_mid_statement_is_503_within_the_acquire_and_statement_timeouts() {
    let name = "a_partition_mid_statement_is_503_within_the_acquire_and_statement_timeouts";
    if postgres_url_or_skip(name).is_none() {
        return;
    }
    let run = begin(name).await;
    let acquire = Duration::from_secs(1);
    let statement = Duration::from_secs(2);
    let (_db, proxy, mut server) = served_through_a_proxy("2s").await;
    let token = token_for("alice", None);

    let mut answers = Vec::new();
    for (what, query) in [("a query", LIST_TASKS), ("a mutation", CREATE_TASK)] {
        // Succeeds on a connection that stays open in the pool, so the
        // request below sends its statement before anything goes silent.
        let warmed = succeeds_again(&server, &token, query, Duration::from_secs(10)).await;
        assert!(warmed.is_some(), "{what} fails before the partition");
        proxy.set(ProxyMode::Partition);
        let asked = Instant::now();
        let result = server
            .graphql(&token, query, json!({}), Duration::from_secs(20))
            .await;
        let took = asked.elapsed();
        proxy.set(ProxyMode::Forward);
        let recovered = succeeds_again(&server, &token, query, Duration::from_secs(10)).await;
        answers.push((what, result, took, recovered));
    }
    eprintln!(
        "partition with acquire {acquire:?} and statement {statement:?} timeouts: {:?}",
        answers
            .iter()
            .map(|(what, result, took, recovered)| format!(
                "{what}: {:?} in {}, succeeds again after {recovered:?}",
                result
                    .as_ref()
                    .map(|(status, body)| (status, error_codes(body))),
                seconds(*took)
            ))
            .collect::<Vec<_>>()
    );

    let bound = acquire + statement + DEADLINE_SLACK;
    for (what, result, took, recovered) in answers {
        let (status, body) = result.unwrap_or_else(|e| panic!("{what}: no answer: {e}"));
        assert_eq!(status, 503, "{what}: {body}");
        let codes = error_codes(&body);
        assert!(
            !codes.is_empty() && codes.iter().all(|c| c == "SERVICE_UNAVAILABLE"),
            "{what}: {body}"
        );
        assert!(body["data"].is_null(), "{what}: {body}");
        assert!(took < bound, "{what} took {took:?}, over {bound:?}");
        // Longer than the statement timeout: the statement was sent, and no
        // answer from the server ended the wait.
        assert!(
            took > statement,
            "{what} took only {took:?}: nothing was in flight"
        );
        let recovered =
            recovered.unwrap_or_else(|| panic!("{what} never succeeds after the partition heals"));
        assert!(
            recovered < Duration::from_secs(5),
            "{what} succeeds again only after {recovered:?}"
        );
    }
    assert!(server.is_running());
    drop(run);
}
