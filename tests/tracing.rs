//! OpenTelemetry traces as an operator sees them in a collector: the real
//! `taskql` binary exports to an OTLP/HTTP receiver in this test, and one
//! trace runs from a frontend's createTask to the example worker's
//! COMPLETED. On SQLite by default, on PostgreSQL when
//! `TASKQL_TEST_DATABASE_URL` is set.
mod common;

#[allow(dead_code)]
#[path = "../examples/worker/client.rs"]
mod worker_client;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_taskql");

/// A span as the receiver got it, in hex as `traceparent` writes ids.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    attributes: HashMap<String, String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(n)) => n.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

/// An OTLP/HTTP receiver on a free port: `POST /v1/traces` with protobuf.
struct Receiver {
    endpoint: String,
    spans: Arc<Mutex<Vec<Exported>>>,
}

async fn receiver() -> Receiver {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let kept = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let kept = kept.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut kept = kept.lock().unwrap();
                for resource in request.resource_spans {
                    let service = resource
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|kv| kv.key == "service.name")
                        .map(|kv| text(kv.value.as_ref()))
                        .unwrap_or_default();
                    for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
                        kept.push(Exported {
                            service: service.clone(),
                            trace_id: hex(&span.trace_id),
                            span_id: hex(&span.span_id),
                            parent_span_id: hex(&span.parent_span_id),
                            name: span.name,
                            attributes: span
                                .attributes
                                .iter()
                                .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
                                .collect(),
                        });
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Receiver {
        endpoint: format!("http://{address}"),
        spans,
    }
}

impl Receiver {
    fn trace(&self, trace_id: &str) -> Vec<Exported> {
        let spans = self.spans.lock().unwrap();
        spans
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }

    /// The spans of `trace_id`, once `done` holds of them.
    async fn wait_for(&self, trace_id: &str, done: impl Fn(&[Exported]) -> bool) -> Vec<Exported> {
        eventually("the trace's spans", Duration::from_secs(20), || async {
            let spans = self.trace(trace_id);
            done(&spans).then_some(spans)
        })
        .await
    }
}

/// The `taskql` binary serving `database` with `env`; killed when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

fn taskql(database: &TestDb, env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars() {
        if name.starts_with("OTEL_") || name.starts_with("TASKQL_") {
            command.env_remove(name);
        }
    }
    command
        .env("DATABASE_URL", &database.url)
        .env("TASKQL_JWT_SECRET", TEST_SECRET)
        .env("TASKQL_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied());
    command
}

fn serve(database: &TestDb, env: &[(&str, &str)]) -> Server {
    let mut child = taskql(database, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("taskql starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let base = lines
        .by_ref()
        .find_map(|line| {
            line.ok()?
                .strip_prefix("taskql is serving on ")
                .map(str::to_owned)
        })
        .expect("taskql printed its URL");
    std::thread::spawn(move || for _ in lines {});
    Server { child, base }
}

/// taskql exporting to `receiver`, in batches sent every 100 ms.
fn traced(database: &TestDb, receiver: &Receiver) -> Server {
    serve(
        database,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint),
            ("OTEL_SERVICE_NAME", "taskql-under-test"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
}

const CREATE: &str = "mutation CreateTask($input: CreateTaskInput!) {
  createTask(input: $input) { id traceparent }
}";

/// createTask as a browser sends it, with `traceparent` when given.
async fn create(base: &str, traceparent: Option<&str>) -> Value {
    let mut request = reqwest::Client::new()
        .post(format!("{base}/graphql"))
        .bearer_auth(token_for("alice", None))
        .json(&json!({
            "query": CREATE,
            "operationName": "CreateTask",
            "variables": { "input": { "type": "concept.image" } },
        }));
    if let Some(traceparent) = traceparent {
        request = request.header("traceparent", traceparent);
    }
    let response = request.send().await.expect("createTask");
    assert_eq!(response.status(), 200);
    data(response.json().await.expect("JSON"))["createTask"].clone()
}

/// The parts of a `traceparent`: trace id, span id, flags.
fn parts(traceparent: &str) -> (String, String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[0], "00", "{traceparent}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

fn named<'a>(spans: &'a [Exported], name: &str) -> Option<&'a Exported> {
    spans.iter().find(|s| s.name == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_create_task_to_the_workers_completion() {
    let database = TestDb::new().await;
    let receiver = receiver().await;
    let server = traced(&database, &receiver);
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let browser_span = "00f067aa0ba902b7";
    let task = create(
        &server.base,
        Some(&format!("00-{trace_id}-{browser_span}-01")),
    )
    .await;

    // The task keeps the trace of its create: the service span's context.
    let stored = task["traceparent"]
        .as_str()
        .expect("a traced create has a traceparent");
    let (stored_trace, stored_span, flags) = parts(stored);
    assert_eq!(
        (stored_trace.as_str(), flags.as_str()),
        (trace_id, "01"),
        "{stored}"
    );

    // The example worker claims it and completes it in the same trace.
    let mut config = worker_client::WorkerConfig::new(
        format!("{}/graphql", server.base),
        token_for("worker-1", Some("service_role")),
    );
    config.concurrency = 1;
    config.steps = 1;
    config.step_time = Duration::from_millis(10);
    config.exit_when_idle = true;
    let report = tokio::time::timeout(Duration::from_secs(30), worker_client::run(config))
        .await
        .expect("the worker exits when idle")
        .expect("the worker runs cleanly");
    assert_eq!(report.completed, 1);

    let completed = |spans: &[Exported]| {
        spans.iter().any(|s| {
            s.name == "update_task_status"
                && s.attributes.get("status").map(String::as_str) == Some("completed")
        })
    };
    let spans = receiver.wait_for(trace_id, completed).await;
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    assert!(
        spans.iter().all(|s| s.service == "taskql-under-test"),
        "{spans:#?}"
    );

    // The create: HTTP request (a child of the browser's span), its
    // operation, the service call and the insert.
    let http = spans
        .iter()
        .find(|s| s.name == "POST /graphql" && s.parent_span_id == browser_span)
        .unwrap_or_else(|| panic!("the create's HTTP span in {names:?}"));
    assert_eq!(http.attributes["http.request.method"], "POST");
    assert_eq!(http.attributes["http.route"], "/graphql");
    assert_eq!(http.attributes["http.response.status_code"], "200");
    let operation = named(&spans, "mutation CreateTask")
        .unwrap_or_else(|| panic!("the create's operation span in {names:?}"));
    assert_eq!(operation.parent_span_id, http.span_id);
    assert_eq!(operation.attributes["graphql.operation.name"], "CreateTask");
    let service = named(&spans, "create_task")
        .unwrap_or_else(|| panic!("the create's service span in {names:?}"));
    assert_eq!(service.parent_span_id, operation.span_id);
    assert_eq!(
        service.span_id, stored_span,
        "the task names the service span"
    );
    let system = if database.is_postgres {
        "postgresql"
    } else {
        "sqlite"
    };
    let insert = spans
        .iter()
        .find(|s| {
            s.attributes
                .get("db.statement")
                .is_some_and(|sql| sql.starts_with("INSERT INTO \"tasks\""))
        })
        .unwrap_or_else(|| panic!("the insert's span in {spans:#?}"));
    assert_eq!(insert.attributes["db.system"], system);

    // The worker's calls: a child span of the task's, under which taskql's
    // spans for its completion hang.
    let worker_http: Vec<&Exported> = spans
        .iter()
        .filter(|s| s.name == "POST /graphql" && s.parent_span_id != browser_span)
        .collect();
    assert!(
        worker_http.len() >= 2,
        "the heartbeat and the completion: {names:?}"
    );
    let worker_span = &worker_http[0].parent_span_id;
    assert!(
        worker_http.iter().all(|s| &s.parent_span_id == worker_span),
        "one worker span per task"
    );
    assert_ne!(worker_span, &stored_span, "the worker's span is its own");
    assert!(named(&spans, "mutation Complete").is_some(), "{names:?}");
    assert!(named(&spans, "mutation Beat").is_some(), "{names:?}");
    assert!(
        spans.iter().any(|s| s
            .attributes
            .get("db.statement")
            .is_some_and(|sql| sql.starts_with("UPDATE"))),
        "the completion's UPDATE: {names:?}"
    );

    // Background work (the lease reaper runs twice a second) starts no trace.
    let all = receiver.spans.lock().unwrap().clone();
    assert!(
        all.iter().all(|s| s.name != "reap_expired_leases"),
        "{all:#?}"
    );
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_traceparent_starts_a_new_trace() {
    let database = TestDb::new().await;
    let receiver = receiver().await;
    let server = traced(&database, &receiver);
    for bad in [
        "garbage",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
    ] {
        let task = create(&server.base, Some(bad)).await;
        let stored = task["traceparent"].as_str().expect("still traced");
        let (trace_id, _, _) = parts(stored);
        assert!(!bad.contains(&trace_id), "{bad} was not continued");
        let spans = receiver
            .wait_for(&trace_id, |spans| named(spans, "create_task").is_some())
            .await;
        let http = named(&spans, "POST /graphql").expect("an HTTP span");
        assert_eq!(http.parent_span_id, "", "a root span for {bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_is_traced() {
    let database = TestDb::new().await;
    let server = serve(&database, &[]);
    let task = create(
        &server.base,
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    )
    .await;
    assert_eq!(task["traceparent"], Value::Null);
}

#[tokio::test]
async fn unsupported_trace_settings_stop_the_server_with_their_name() {
    let database = TestDb::new().await;
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ],
            "OTEL_EXPORTER_OTLP_PROTOCOL: 'grpc' is not supported",
        ),
        (
            &[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")],
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: 'http/json' is not supported",
        ),
        (
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4318")],
            "OTEL_EXPORTER_OTLP_ENDPOINT: 'localhost:4318' is not an http:// or https:// URL",
        ),
        (
            &[("OTEL_TRACES_SAMPLER", "sometimes")],
            "OTEL_TRACES_SAMPLER: 'sometimes' is not one of",
        ),
        (
            &[
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "2"),
            ],
            "OTEL_TRACES_SAMPLER_ARG: '2' is not a ratio from 0 to 1",
        ),
    ];
    for (env, message) in cases {
        let output = taskql(&database, env)
            .stdout(Stdio::null())
            .output()
            .expect("taskql runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{env:?} was accepted");
        assert!(
            stderr.starts_with(&format!("taskql: {message}")),
            "{env:?}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsampled_trace_is_kept_unsampled_and_not_exported() {
    let database = TestDb::new().await;
    let receiver = receiver().await;
    let server = serve(
        &database,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=tasks-eu"),
        ],
    );
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let task = create(
        &server.base,
        Some(&format!("00-{trace_id}-b7ad6b7169203331-00")),
    )
    .await;
    let stored = task["traceparent"]
        .as_str()
        .expect("the decision travels on");
    let (stored_trace, _, flags) = parts(stored);
    assert_eq!((stored_trace.as_str(), flags.as_str()), (trace_id, "00"));
    // A sampled request after it is exported; the unsampled one never is.
    let sampled = create(&server.base, None).await;
    let (sampled_trace, _, _) = parts(sampled["traceparent"].as_str().unwrap());
    let spans = receiver
        .wait_for(&sampled_trace, |spans| {
            named(spans, "create_task").is_some()
        })
        .await;
    assert!(receiver.trace(trace_id).is_empty());
    assert!(
        spans.iter().all(|s| s.service == "tasks-eu"),
        "named by OTEL_RESOURCE_ATTRIBUTES"
    );
}

#[tokio::test]
async fn a_frontend_on_another_origin_may_send_its_trace_context() {
    let app = spawn_app().await;
    let preflight = app
        .http
        .request(reqwest::Method::OPTIONS, format!("{}/graphql", app.base))
        .header("Origin", "https://app.example")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization,content-type,traceparent,tracestate",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    let allowed = preflight
        .headers()
        .get("access-control-allow-headers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        allowed.contains("traceparent") && allowed.contains("tracestate"),
        "{allowed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_spans_are_sent_at_shutdown() {
    let database = TestDb::new().await;
    let receiver = receiver().await;
    // Batches every minute: only the shutdown sends this one in time.
    let mut server = serve(
        &database,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "60000"),
        ],
    );
    let task = create(&server.base, None).await;
    let (trace_id, _, _) = parts(task["traceparent"].as_str().unwrap());
    let stopped = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let status = tokio::task::spawn_blocking(move || server.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    let spans = receiver.trace(&trace_id);
    assert!(named(&spans, "create_task").is_some(), "{spans:#?}");
    assert!(
        spans.iter().all(|s| s.service == "taskql"),
        "the default name"
    );
}
