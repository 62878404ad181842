//! The `taskql` binary as a newcomer and an operator use it.
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_taskql");

/// A `taskql` command with none of the caller's taskql settings.
fn taskql(dir: &std::path::Path) -> Command {
    let mut command = Command::new(BIN);
    command.current_dir(dir);
    for var in [
        "DATABASE_URL",
        "TASKQL_LISTEN",
        "TASKQL_JWT_SECRET",
        "TASKQL_JWT_PUBLIC_KEY_FILE",
        "TASKQL_JWT_ISSUER",
        "TASKQL_JWT_AUDIENCE",
        "TASKQL_SERVICE_ROLE",
        "TASKQL_MAX_ATTEMPTS",
        "TASKQL_RETENTION",
        "TASKQL_DB_MAX_CONNECTIONS",
        "TASKQL_MAX_SUBSCRIPTIONS_PER_CONNECTION",
        "TASKQL_LOG_FORMAT",
    ] {
        command.env_remove(var);
    }
    command.env("RUST_LOG", "warn");
    command
}

#[test]
fn schema_subcommand_prints_the_sdl() {
    let dir = tempfile::tempdir().unwrap();
    let output = taskql(dir.path()).arg("schema").output().unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        taskql::graphql::sdl()
    );
}

/// Runs `command` to its end, or fails the test if it is still running
/// after 30 s (a setting that should have stopped it was accepted).
fn output_of(command: &mut Command) -> std::process::Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..300 {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().ok();
    let output = child.wait_with_output().unwrap();
    panic!(
        "still running after 30 s: {:?}\n{}",
        command,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Asserts that `output` is a failure whose stderr has exactly one
/// `taskql:` line, naming `name`, and that nothing went to stdout.
fn assert_one_line_naming(output: &std::process::Output, name: &str) -> String {
    assert!(!output.status.success(), "{name} accepted");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<_> = stderr
        .lines()
        .filter(|l| l.starts_with("taskql:"))
        .collect();
    assert_eq!(lines.len(), 1, "{name}: {stderr}");
    assert!(lines[0].contains(name), "{name}: {stderr}");
    assert!(
        output.stdout.is_empty(),
        "{name}: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    lines[0].to_owned()
}

#[test]
fn bad_settings_stop_start_up_with_a_line_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("TASKQL_LISTEN", "not-an-address")], "TASKQL_LISTEN"),
        (&[("TASKQL_MAX_ATTEMPTS", "zero")], "TASKQL_MAX_ATTEMPTS"),
        (&[("TASKQL_RETENTION", "forever")], "TASKQL_RETENTION"),
        (&[("DATABASE_URL", "mysql://localhost/x")], "DATABASE_URL"),
        (
            &[("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")],
            "TASKQL_JWT_SECRET",
        ),
        (
            &[("TASKQL_JWT_PUBLIC_KEY_FILE", "/nonexistent/key.pem")],
            "TASKQL_JWT_PUBLIC_KEY_FILE",
        ),
        (&[("TASKQL_JWT_SECRET", "short")], "TASKQL_JWT_SECRET"),
        (&[("TASKQL_RETENTION", "100000000d")], "TASKQL_RETENTION"),
        (&[("RUST_LOG", "info,[bad")], "RUST_LOG"),
    ];
    for (env, name) in cases {
        let mut command = taskql(dir.path());
        command.arg("serve");
        for (key, value) in *env {
            command.env(key, value);
        }
        assert_one_line_naming(&output_of(&mut command), name);
    }
    // A flag works like its variable.
    let output = taskql(dir.path())
        .args(["serve", "--max-attempts", "-1"])
        .output()
        .unwrap();
    assert!(!output.status.success());
}

/// Starts `taskql` (no subcommand) in `dir` on a free port; returns the child
/// and its printed URL and token.
fn start_demo(dir: &std::path::Path) -> (std::process::Child, String, String) {
    serve_demo(taskql(dir).stderr(Stdio::null()))
}

/// Runs `command` as a server on a free port, reading its banner.
fn serve_demo(command: &mut Command) -> (std::process::Child, String, String) {
    let mut child = command
        .env("TASKQL_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut base = None;
    let mut token = None;
    while let Some(Ok(line)) = lines.next() {
        if let Some(url) = line.strip_prefix("taskql is serving on ") {
            base = Some(url.trim().to_owned());
        }
        if let Some((_, t)) = line.split_once("/graphql#token=") {
            token = Some(t.trim().to_owned());
            break;
        }
    }
    // Keep reading, as a terminal would, so the rest is not cut off.
    std::thread::spawn(move || for _ in lines {});
    (
        child,
        base.expect("printed its URL"),
        token.expect("printed a token"),
    )
}

async fn graphql(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    query: &str,
) -> serde_json::Value {
    http.post(format!("{base}/graphql"))
        .bearer_auth(token)
        .json(&json!({ "query": query }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    for _ in 0..100 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().ok();
    panic!("taskql did not stop on SIGTERM");
}

#[tokio::test]
async fn first_run_serves_sqlite_with_a_printed_token_and_keeps_its_secret() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, base, token) = start_demo(dir.path());
    let http = reqwest::Client::new();
    let created = graphql(
        &http,
        &base,
        &token,
        "mutation { createTask(input: {type: \"concept.image\"}) { id status } }",
    )
    .await;
    assert_eq!(
        created["data"]["createTask"]["status"], "PENDING",
        "{created}"
    );
    let secret_file = dir.path().join("taskql.db.jwt-secret");
    let secret = std::fs::read_to_string(&secret_file).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&secret_file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert!(terminate(&mut child).success(), "clean exit on SIGTERM");

    // Second run: same secret, the old token still works, the task is there.
    let (mut child, base, _) = start_demo(dir.path());
    assert_eq!(std::fs::read_to_string(&secret_file).unwrap(), secret);
    let listed = graphql(&http, &base, &token, "{ tasks { nodes { id } } }").await;
    assert_eq!(
        listed["data"]["tasks"]["nodes"][0]["id"],
        created["data"]["createTask"]["id"]
    );

    // `taskql token` signs with the same local secret.
    let output = taskql(dir.path())
        .args([
            "token",
            "--user",
            "worker-9",
            "--role",
            "service_role",
            "--ttl",
            "1h",
        ])
        .output()
        .unwrap();
    assert!(output.status.success());
    let worker = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    let claimed = graphql(
        &http,
        &base,
        &worker,
        "mutation { claimTask { id status } }",
    )
    .await;
    assert_eq!(
        claimed["data"]["claimTask"]["status"], "PROCESSING",
        "{claimed}"
    );
    assert!(terminate(&mut child).success());
}

#[test]
fn migrate_subcommand_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let output = taskql(dir.path()).arg("migrate").output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert!(dir.path().join("taskql.db").exists());
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, base, token) = start_demo(dir.path());
    let http = reqwest::Client::new();
    // A burst of requests, then SIGTERM while they run: none is cut off.
    let requests: Vec<_> = (0..50)
        .map(|i| {
            let http = http.clone();
            let base = base.clone();
            let token = token.clone();
            tokio::spawn(async move {
                http.post(format!("{base}/graphql"))
                    .bearer_auth(&token)
                    .json(&json!({ "query": format!("mutation {{ createTask(input: {{type: \"t{i}\"}}) {{ id }} }}") }))
                    .send()
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let status = tokio::task::spawn_blocking(move || terminate(&mut child))
        .await
        .unwrap();
    assert!(status.success());
    let mut answered = 0;
    for request in requests {
        // A request either completed fully or was never accepted (refused connection).
        if let Ok(response) = request.await.unwrap() {
            assert_eq!(response.status(), 200);
            let body: serde_json::Value = response.json().await.unwrap();
            assert!(body["data"]["createTask"]["id"].is_string(), "{body}");
            answered += 1;
        }
    }
    // Every answered create is in the database.
    let db = taskql::db::connect(
        &format!(
            "sqlite://{}?mode=rw",
            dir.path().join("taskql.db").display()
        ),
        1,
    )
    .await
    .unwrap();
    assert_eq!(common::count_rows(&db).await, answered as i64);
}

#[test]
fn empty_settings_stop_start_up_instead_of_counting_as_unset() {
    for name in [
        "TASKQL_JWT_SECRET",
        "TASKQL_JWT_ISSUER",
        "TASKQL_JWT_AUDIENCE",
        "TASKQL_JWT_PUBLIC_KEY_FILE",
        "DATABASE_URL",
        "RUST_LOG",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let output = output_of(
            taskql(dir.path())
                .args(["serve", "--listen", "127.0.0.1:0"])
                .env(name, ""),
        );
        let line = assert_one_line_naming(&output, name);
        assert!(line.contains("is set but empty"), "{line}");
        // In particular an empty secret neither makes a local secret nor
        // prints a token.
        let made: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(made.is_empty(), "{name}: {made:?}");
    }
}

#[test]
fn a_malformed_log_filter_stops_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let subcommands: &[&[&str]] = &[
        &[],
        &["serve"],
        &["migrate"],
        &["schema"],
        &["token", "--user", "u"],
    ];
    for filter in ["info,[bad", "taskql=loud"] {
        for args in subcommands {
            let output = output_of(
                taskql(dir.path())
                    .args(*args)
                    .env("TASKQL_LISTEN", "127.0.0.1:0")
                    .env("RUST_LOG", filter),
            );
            let line = assert_one_line_naming(&output, "RUST_LOG");
            assert!(line.contains(filter), "{args:?}: {line}");
        }
    }
    // The flag is checked the same way.
    let output = output_of(taskql(dir.path()).args(["schema", "--log", "[x"]));
    assert_one_line_naming(&output, "RUST_LOG");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // Well-formed filters work.
    for filter in ["info", "warn", "taskql=debug,warn", "taskql=debug, warn"] {
        let output = output_of(taskql(dir.path()).arg("schema").env("RUST_LOG", filter));
        assert!(output.status.success(), "{filter}: {output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("taskql:"), "{filter}: {stderr}");
    }
    let output = output_of(taskql(dir.path()).arg("schema").env_remove("RUST_LOG"));
    assert!(output.status.success());
}

#[test]
fn token_ttl_is_at_most_100_years() {
    let dir = tempfile::tempdir().unwrap();
    let token = |ttl: &str| {
        output_of(
            taskql(dir.path())
                .args(["token", "--user", "u", "--ttl", ttl])
                .env("TASKQL_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
        )
    };
    for huge in [
        "36501d",
        "100000000d",
        "99999999999999999999d",
        "18446744073709551615",
    ] {
        let line = assert_one_line_naming(&token(huge), "--ttl");
        assert!(line.contains("too long"), "{line}");
    }
    let line = assert_one_line_naming(&token("soon"), "--ttl");
    assert!(line.contains("not a duration"), "{line}");

    // The longest allowed: exp is 100 years after iat.
    let output = token("36500d");
    assert!(output.status.success(), "{output:?}");
    let jwt = String::from_utf8(output.stdout).unwrap();
    let payload = jwt.trim().split('.').nth(1).unwrap();
    use base64::Engine as _;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        36_500 * 86_400
    );
}

#[tokio::test]
async fn the_local_secret_banner_links_the_dashboard_as_a_worker() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = taskql(dir.path())
        .env("TASKQL_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut base = None;
    let mut said = Vec::new();
    let mut link = None;
    while let Some(Ok(line)) = lines.next() {
        if let Some(url) = line.strip_prefix("taskql is serving on ") {
            base = Some(url.trim().to_owned());
        }
        if let Some((_, token)) = line.split_once("/ui#token=") {
            link = Some((line.trim().to_owned(), token.trim().to_owned()));
            break;
        }
        said.push(line);
    }
    std::thread::spawn(move || for _ in lines {});
    let base = base.expect("printed its URL");
    let (link, token) = link.expect("printed a dashboard link");
    assert_eq!(link, format!("{base}/ui#token={token}"));
    let intro = said.last().unwrap();
    assert!(
        intro.contains("Dashboard") && intro.contains("worker 'dashboard'"),
        "{intro}"
    );
    // The token is a worker's: it may claim (and sees every user's tasks).
    let http = reqwest::Client::new();
    let claimed = graphql(&http, &base, &token, "mutation { claimTask { id } }").await;
    assert!(claimed["errors"].is_null(), "{claimed}");
    let page = http.get(format!("{base}/ui")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(terminate(&mut child).success());
}

/// Serves in `dir` with stderr in a file, asks one good and one bad query
/// with a token, stops, and returns the file's text and the token.
async fn logs_of_a_session(dir: &std::path::Path, format: Option<&str>) -> (String, String) {
    let log_path = dir.join("taskql.log");
    let mut command = taskql(dir);
    command
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log_path).unwrap());
    if let Some(format) = format {
        command.env("TASKQL_LOG_FORMAT", format);
    }
    let (mut child, base, token) = serve_demo(&mut command);
    let http = reqwest::Client::new();
    let listed = http
        .post(format!("{base}/graphql"))
        .bearer_auth(&token)
        .header("x-request-id", "req-listed")
        .json(&json!({ "query": "query Listed { tasks { nodes { id } } }" }))
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);
    let refused = graphql(&http, &base, &token, "{ task(id: \"nope\") { id } }").await;
    assert_eq!(refused["errors"][0]["extensions"]["code"], "BAD_USER_INPUT");
    assert!(terminate(&mut child).success());
    (std::fs::read_to_string(&log_path).unwrap(), token)
}

#[tokio::test]
async fn logs_in_a_file_are_plain_text_without_colour_codes_or_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (log, token) = logs_of_a_session(dir.path(), None).await;
    assert!(!log.contains('\u{1b}'), "escape codes in a file:\n{log}");
    assert!(!log.contains(&token), "a token in the log:\n{log}");
    let listed = log
        .lines()
        .find(|line| line.contains("req-listed"))
        .unwrap_or_else(|| panic!("no line for the request:\n{log}"));
    for part in [
        "operation=\"Listed\"",
        "kind=\"query\"",
        "outcome=\"ok\"",
        "duration_ms=",
    ] {
        assert!(listed.contains(part), "{part} missing: {listed}");
    }
    assert!(
        log.lines()
            .any(|line| line.contains("outcome=\"BAD_USER_INPUT\"")),
        "no line for the refused query:\n{log}"
    );
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_the_request_fields() {
    let dir = tempfile::tempdir().unwrap();
    let (log, token) = logs_of_a_session(dir.path(), Some("json")).await;
    assert!(!log.contains(&token), "a token in the log:\n{log}");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert!(
        lines
            .iter()
            .all(|line| line["level"].is_string() && line["timestamp"].is_string())
    );
    let listed = lines
        .iter()
        .find(|line| line["request_id"] == "req-listed")
        .unwrap_or_else(|| panic!("no line for the request:\n{log}"));
    assert_eq!(listed["level"], "INFO");
    assert_eq!(listed["operation"], "Listed");
    assert_eq!(listed["kind"], "query");
    assert_eq!(listed["outcome"], "ok");
    assert!(listed["duration_ms"].as_f64().is_some(), "{listed}");
    assert!(
        lines.iter().any(|line| line["outcome"] == "BAD_USER_INPUT"),
        "no line for the refused query:\n{log}"
    );
}

#[test]
fn an_unknown_log_format_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let output = output_of(
        taskql(dir.path())
            .args(["schema"])
            .env("TASKQL_LOG_FORMAT", "xml"),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("xml") && stderr.contains("json"),
        "{stderr}"
    );
}
