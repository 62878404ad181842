//! One deadline per request: in a network partition between taskql and
//! PostgreSQL, a query, a mutation, a claim, a heartbeat and a
//! subscription's start each end within `TASKQL_REQUEST_TIMEOUT`, even
//! where a single database call alone would be allowed longer (the acquire
//! and statement timeouts together), and the server serves again as soon as
//! the partition ends.

use super::*;

/// The request timeout the server runs with here, shorter than a single
/// call's own limit (`ACQUIRE` + `STATEMENT`): only the request's deadline
/// can end the waits in time.
const REQUEST: Duration = Duration::from_secs(2);
const ACQUIRE: &str = "2s";
const STATEMENT: &str = "1500ms";
/// How long past the deadline an answer may arrive.
const PAST_DEADLINE: Duration = Duration::from_millis(500);
/// How soon after the partition ends the operation must succeed again.
const RECOVERY: Duration = Duration::from_secs(1);

const TYPE: &str = "edge.deadline";

/// One operation of the test, and how to run it once.
#[derive(Clone, Copy, Debug)]
enum Step {
    Query,
    Create,
    Claim,
    Heartbeat,
    Subscribe,
}

/// What one run of a step answered: `Ok` when it succeeded, else the
/// HTTP status and error codes (or why there was no answer).
type Outcome = Result<(), String>;

struct Deadlines {
    server: Server,
    user: String,
    worker: String,
    /// The task the heartbeat beats, claimed before the partition.
    held: (String, i64),
    /// Task ids whose creation was acknowledged.
    acknowledged: Vec<String>,
    /// Task ids the subscription watches.
    watched: String,
}

impl Deadlines {
    async fn post(&self, token: &str, query: &str, within: Duration) -> Result<Value, String> {
        match self.server.graphql(token, query, json!({}), within).await {
            Ok((200, body)) if body["errors"].is_null() => Ok(body),
            Ok((status, body)) => Err(format!(
                "{status} {:?}: {}",
                error_codes(&body),
                body["errors"][0]["message"]
            )),
            Err(err) => Err(err),
        }
    }

    async fn run(&mut self, step: Step, within: Duration) -> Outcome {
        match step {
            Step::Query => self.post(&self.user, LIST_TASKS, within).await.map(drop),
            Step::Create => {
                let query = format!(
                    "mutation {{ createTask(input: {{type: \"{TYPE}.other\"}}) {{ id }} }}"
                );
                let body = self.post(&self.user, &query, within).await?;
                let id = body["data"]["createTask"]["id"].as_str().expect("an id");
                self.acknowledged.push(id.to_owned());
                Ok(())
            }
            Step::Claim => {
                // Nothing of this type is pending: the claim reads and answers null.
                let query = format!("mutation {{ claimTask(types: [\"{TYPE}.none\"]) {{ id }} }}");
                self.post(&self.worker, &query, within).await.map(drop)
            }
            Step::Heartbeat => {
                let (id, attempt) = &self.held;
                let query = format!(
                    "mutation {{ heartbeatTask(id: \"{id}\", progress: 10, expectedAttempt: {attempt}) {{ id }} }}"
                );
                self.post(&self.worker, &query, within).await.map(drop)
            }
            Step::Subscribe => self.subscribe(within).await,
        }
    }

    /// Starts `taskUpdated` over an event stream: the first `next` event
    /// carries the task, or the error the start failed with.
    async fn subscribe(&self, within: Duration) -> Outcome {
        let query = format!(
            "subscription {{ taskUpdated(id: \"{}\") {{ id status }} }}",
            self.watched
        );
        let started = Instant::now();
        let response = http_client(within)
            .post(format!("{}/graphql", self.server.base))
            .bearer_auth(&self.user)
            .header("accept", "text/event-stream")
            .json(&json!({ "query": query }))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(format!("{status}"));
        }
        let mut response = response;
        let mut text = String::new();
        loop {
            let left = within.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, response.chunk()).await {
                Ok(Ok(Some(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(Ok(None)) => return Err(format!("the stream ended: {text}")),
                Ok(Err(err)) => return Err(err.to_string()),
                Err(_) => return Err(format!("no event within {within:?}: {text}")),
            }
            let Some(event) = text.split("\n\n").find(|e| e.starts_with("event: next")) else {
                continue;
            };
            let data = event.split_once("data: ").map_or("", |(_, data)| data);
            let body: Value = serde_json::from_str(data).map_err(|e| format!("{e}: {data}"))?;
            return if body["errors"].is_null() {
                Ok(())
            } else {
                Err(format!(
                    "200 {:?}: {}",
                    error_codes(&body),
                    body["errors"][0]["message"]
                ))
            };
        }
    }

    /// How long after now `step` first succeeds, tried every 50 ms for 10 s.
    async fn recovers(&mut self, step: Step) -> Option<Duration> {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if self.run(step, Duration::from_secs(5)).await.is_ok() {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

#[tokio::test]
async fn in_a_partition_every_request_ends_by_its_deadline() {
    let name = "in_a_partition_every_request_ends_by_its_deadline";
    if postgres_url_or_skip(name).is_none() {
        return;
    }
    let run = begin(name).await;
    let db = TestDb::new().await;
    let proxy = Proxy::start(&host_port(&db.url)).await;
    let server = Server::start(
        &through(&db.url, proxy.addr),
        &[
            ("TASKQL_DB_ACQUIRE_TIMEOUT", ACQUIRE),
            ("TASKQL_DB_STATEMENT_TIMEOUT", STATEMENT),
            ("TASKQL_REQUEST_TIMEOUT", "2s"),
        ],
    )
    .await;
    let user = token_for("alice", None);
    let worker = token_for("deadline-worker", Some("service_role"));
    let create =
        |ty: &str| format!("mutation {{ createTask(input: {{type: \"{ty}\"}}) {{ id }} }}");
    let mut ids = Vec::new();
    for ty in [format!("{TYPE}.held"), format!("{TYPE}.watched")] {
        let (status, body) = server
            .graphql(&user, &create(&ty), json!({}), Duration::from_secs(5))
            .await
            .expect("create before the partition");
        assert_eq!(status, 200, "{body}");
        ids.push(
            body["data"]["createTask"]["id"]
                .as_str()
                .expect("an id")
                .to_owned(),
        );
    }
    let claim = format!("mutation {{ claimTask(types: [\"{TYPE}.held\"]) {{ id attempts }} }}");
    let (status, claimed) = server
        .graphql(&worker, &claim, json!({}), Duration::from_secs(5))
        .await
        .expect("claim before the partition");
    assert_eq!(
        claimed["data"]["claimTask"]["id"], ids[0],
        "{status} {claimed}"
    );
    let attempt = claimed["data"]["claimTask"]["attempts"]
        .as_i64()
        .expect("an attempt");
    let mut test = Deadlines {
        server,
        user,
        worker,
        held: (ids[0].clone(), attempt),
        acknowledged: ids.clone(),
        watched: ids[1].clone(),
    };

    let steps = [
        Step::Query,
        Step::Create,
        Step::Claim,
        Step::Heartbeat,
        Step::Subscribe,
    ];
    let mut answers = Vec::new();
    for step in steps {
        // Succeeds first, so pooled connections are open and the request's
        // statements go out before anything answers.
        assert!(
            test.recovers(step).await.is_some(),
            "{step:?} fails before the partition"
        );
        proxy.set(ProxyMode::Partition);
        let asked = Instant::now();
        let outcome = test.run(step, Duration::from_secs(20)).await;
        let took = asked.elapsed();
        proxy.set(ProxyMode::Forward);
        let recovered = test.recovers(step).await;
        answers.push((step, outcome, took, recovered));
    }
    eprintln!(
        "a partition with a {REQUEST:?} request timeout ({ACQUIRE} acquire, {STATEMENT} statement): {}",
        answers
            .iter()
            .map(|(step, outcome, took, recovered)| format!(
                "{step:?}: {outcome:?} in {}, succeeds again after {recovered:?}",
                seconds(*took)
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );

    for (step, outcome, took, recovered) in &answers {
        let refused = outcome
            .as_ref()
            .expect_err(&format!("{step:?} succeeded in a partition"));
        assert!(
            refused.contains("[\"SERVICE_UNAVAILABLE\"]"),
            "{step:?}: {refused}"
        );
        assert!(
            *took < REQUEST + PAST_DEADLINE,
            "{step:?} took {took:?}, past its {REQUEST:?} deadline"
        );
        let recovered =
            recovered.unwrap_or_else(|| panic!("{step:?} never succeeds after the partition"));
        assert!(
            recovered < RECOVERY,
            "{step:?} succeeds again only {recovered:?} after the partition"
        );
    }
    // A change cut in flight may or may not have been made, and says so;
    // a read has nothing to say of the kind.
    const UNKNOWN: &str = "may or may not have been made";
    for (step, outcome, _, _) in &answers {
        let message = outcome.as_ref().expect_err("refused");
        match step {
            Step::Heartbeat => assert!(message.contains(UNKNOWN), "{step:?}: {message}"),
            Step::Query | Step::Subscribe => {
                assert!(!message.contains(UNKNOWN), "{step:?}: {message}")
            }
            // Whether a create or a claim went out before the silence
            // depends on which of their statements it cut.
            Step::Create | Step::Claim => {}
        }
    }

    // Every create that was acknowledged is there.
    let listed = test
        .post(&test.user, LIST_TASKS, Duration::from_secs(5))
        .await
        .expect("list after the partition");
    let ids: Vec<&str> = listed["data"]["tasks"]["nodes"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    for id in &test.acknowledged {
        assert!(ids.contains(&id.as_str()), "task {id} was lost: {ids:?}");
    }
    assert!(test.server.is_running());
    drop(run);
}
