use std::path::PathBuf;
use std::time::Duration;

use super::*;

const SECRET: &str = "0123456789abcdef0123456789abcdef";

/// The settings these arguments give, after `taskql` and (unless they
/// give one) a secret.
fn settings(args: &[&str]) -> Result<Settings, clap::Error> {
    let mut all = vec!["taskql"];
    if !args.contains(&"--jwt-secret") {
        all.extend(["--jwt-secret", SECRET]);
    }
    all.extend_from_slice(args);
    Settings::from_args(all)
}

/// The setting these arguments get wrong, whether its parser or the
/// settings together refuse it.
fn refused(args: &[&str]) -> ConfigError {
    match settings(args) {
        Err(err) => setting_error(&err)
            .unwrap_or_else(|| panic!("{args:?}: not a setting's error: {err}"))
            .clone(),
        Ok(settings) => Config::from_settings(&settings).expect_err(&format!("{args:?}")),
    }
}

#[test]
fn empty_settings_are_errors_not_unset() {
    let cases: &[(&[&str], &str)] = &[
        // Not a cue to make a local secret on SQLite.
        (&["--jwt-secret", ""], "TASKQL_JWT_SECRET"),
        (&["--jwt-secret", "  "], "TASKQL_JWT_SECRET"),
        (&["--jwt-issuer", ""], "TASKQL_JWT_ISSUER"),
        (&["--jwt-audience", ""], "TASKQL_JWT_AUDIENCE"),
        (&["--jwt-public-key-file", ""], "TASKQL_JWT_PUBLIC_KEY_FILE"),
        (&["--trusted-documents", " "], "TASKQL_TRUSTED_DOCUMENTS"),
        (&["--database-url", ""], "DATABASE_URL"),
        (&["--database-url", " "], "DATABASE_URL"),
    ];
    for (args, name) in cases {
        let err = refused(args);
        assert_eq!(err.setting, *name, "{args:?}");
        assert!(err.problem.starts_with("is set but empty"), "{err}");
    }
    // Given, they are kept.
    let config = Config::from_settings(
        &settings(&[
            "--jwt-issuer",
            "https://issuer",
            "--jwt-audience",
            "authenticated",
        ])
        .unwrap(),
    )
    .unwrap();
    assert_eq!(config.auth.issuer.as_deref(), Some("https://issuer"));
    assert_eq!(config.auth.audience.as_deref(), Some("authenticated"));
}

#[test]
fn log_filters_are_checked() {
    for good in [
        "info",
        "warn",
        "taskql=debug,warn",
        "warn,taskql::service=trace",
        "taskql=debug, tower_http=info",
    ] {
        assert!(log_filter(good).is_ok(), "{good}");
    }
    for bad in ["info,[bad", "taskql=loud", "", "  "] {
        let err = log_filter(bad).expect_err(bad);
        assert_eq!(err.setting, "RUST_LOG");
        assert!(!err.to_string().contains('\n'), "{err}");
    }
}

#[test]
fn bad_settings_name_themselves() {
    let cases: &[(&[&str], &str)] = &[
        (&["--listen", "nope"], "TASKQL_LISTEN"),
        (&["--database-url", "mysql://x"], "DATABASE_URL"),
        (&["--max-attempts", "0"], "TASKQL_MAX_ATTEMPTS"),
        (&["--max-attempts", "1001"], "TASKQL_MAX_ATTEMPTS"),
        (&["--retention", "forever"], "TASKQL_RETENTION"),
        // Would overflow taking it from now in the retention task.
        (&["--retention", "100000000d"], "TASKQL_RETENTION"),
        (&["--event-retention", "0s"], "TASKQL_EVENT_RETENTION"),
        (&["--jwt-secret", "short"], "TASKQL_JWT_SECRET"),
        (&["--service-role", " "], "TASKQL_SERVICE_ROLE"),
        (&["--db-max-connections", "0"], "TASKQL_DB_MAX_CONNECTIONS"),
        (&["--db-acquire-timeout", "0s"], "TASKQL_DB_ACQUIRE_TIMEOUT"),
        (
            &["--db-statement-timeout", "2h"],
            "TASKQL_DB_STATEMENT_TIMEOUT",
        ),
        (&["--request-timeout", "0s"], "TASKQL_REQUEST_TIMEOUT"),
        // The statement timeout must end inside the request's deadline.
        (
            &["--db-statement-timeout", "10s"],
            "TASKQL_DB_STATEMENT_TIMEOUT",
        ),
        (
            &["--db-statement-timeout", "2s", "--request-timeout", "2s"],
            "TASKQL_DB_STATEMENT_TIMEOUT",
        ),
        (
            &["--max-subscriptions-per-connection", "100001"],
            "TASKQL_MAX_SUBSCRIPTIONS_PER_CONNECTION",
        ),
        (&["--header-timeout", "soon"], "TASKQL_HEADER_TIMEOUT"),
        (&["--body-timeout", "1.5s"], "TASKQL_BODY_TIMEOUT"),
        (&["--max-connections", "0"], "TASKQL_MAX_CONNECTIONS"),
        (&["--max-websockets", "x"], "TASKQL_MAX_WEBSOCKETS"),
        (
            &["--keepalive-interval", "0ms"],
            "TASKQL_KEEPALIVE_INTERVAL",
        ),
        (&["--shutdown-timeout=-1s"], "TASKQL_SHUTDOWN_TIMEOUT"),
        (
            &["--jwt-public-key-file", "/nonexistent.pem"],
            "TASKQL_JWT_SECRET",
        ),
        (&["token", "--user", "u", "--ttl", "36501d"], "--ttl"),
    ];
    for (args, name) in cases {
        let err = refused(args);
        assert_eq!(err.setting, *name, "{args:?}");
        assert!(err.to_string().starts_with(name), "{err}");
    }
    let key_file = refused_without_secret(&["--jwt-public-key-file", "/nonexistent.pem"]);
    assert_eq!(key_file.setting, "TASKQL_JWT_PUBLIC_KEY_FILE");
    assert!(key_file.problem.starts_with("cannot read"), "{key_file}");
    let postgres = refused_without_secret(&["--database-url", "postgres://x/y"]);
    assert_eq!(postgres.setting, "TASKQL_JWT_SECRET");
}

/// Like [`refused`], without the secret.
fn refused_without_secret(args: &[&str]) -> ConfigError {
    let settings = Settings::from_args(std::iter::once("taskql").chain(args.iter().copied()))
        .expect("each setting parses");
    Config::from_settings(&settings).expect_err(&format!("{args:?}"))
}

#[test]
fn values_are_typed_by_the_parser() {
    let settings = settings(&[
        "--retention",
        "36500d",
        "--db-acquire-timeout",
        "250ms",
        "--keepalive-interval",
        "5m",
        "--max-websockets",
        "7",
        "--listen",
        " 127.0.0.1:0 ",
        "--database-url",
        "postgres://u@h/db",
    ])
    .unwrap();
    assert_eq!(
        settings.tasks.retention(),
        Some(Duration::from_secs(36_500 * 86_400))
    );
    assert_eq!(
        settings.database.acquire_timeout,
        Duration::from_millis(250)
    );
    assert_eq!(settings.http.keepalive_interval, Duration::from_secs(300));
    assert_eq!(settings.http.max_websockets, Some(7));
    assert_eq!(settings.http.listen.port(), 0);
    assert_eq!(settings.database.url.backend(), Backend::Postgres);
    for off in ["off", "", " "] {
        let settings = settings_with_retention(off);
        assert_eq!(settings.tasks.retention(), None, "{off:?}");
    }
}

fn settings_with_retention(retention: &str) -> Settings {
    settings(&["--retention", retention]).unwrap()
}

#[test]
fn defaults_come_from_the_parser() {
    let settings = Settings::from_args(["taskql"]).unwrap();
    assert_eq!(settings.tasks.max_attempts, 3);
    assert_eq!(settings.tasks.retention(), None);
    assert_eq!(settings.tasks.event_retention, Duration::from_secs(86_400));
    assert_eq!(settings.auth.service_role, "service_role");
    assert_eq!(settings.http.shutdown_timeout, Duration::from_secs(10));
    assert_eq!(settings.http.listen.to_string(), "127.0.0.1:8000");
    assert_eq!(settings.database.max_connections, 10);
    assert_eq!(settings.database.acquire_timeout, Duration::from_secs(3));
    assert_eq!(settings.database.statement_timeout, Duration::from_secs(5));
    assert_eq!(settings.database.request_timeout, Duration::from_secs(10));
    assert_eq!(
        settings.database.url.as_str(),
        "sqlite://taskql.db?mode=rwc"
    );
}

#[test]
fn reading_the_settings_writes_no_file() {
    let dir = std::env::temp_dir().join(format!("taskql-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let database = dir.join("tasks.db");
    let url = format!("sqlite://{}?mode=rwc", database.display());
    let config = Config::from_settings(
        &Settings::from_args(["taskql", "--database-url", url.as_str()]).unwrap(),
    )
    .unwrap();
    assert_eq!(config.backend(), Backend::Sqlite);
    let secret_file = dir.join("tasks.db.jwt-secret");
    assert_eq!(config.auth.local_secret_file(), Some(secret_file.as_path()));
    assert!(
        !secret_file.exists(),
        "parsing made {}",
        secret_file.display()
    );
    assert_eq!(
        DatabaseUrl::parse("sqlite::memory:").unwrap().sqlite_file(),
        None
    );
    assert_eq!(
        DatabaseUrl::parse("sqlite:x.db?mode=rwc")
            .unwrap()
            .sqlite_file(),
        Some(PathBuf::from("x.db"))
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_command_line_is_well_formed() {
    use clap::CommandFactory as _;
    Cli::command().debug_assert();
}

#[test]
fn trace_settings_follow_the_otel_variables() {
    let base = TelemetrySettings::default();
    let off = |settings: &TelemetrySettings| trace_export(settings).unwrap().is_none();
    assert!(off(&base));
    assert!(off(&TelemetrySettings {
        otlp_endpoint: Some(" ".into()),
        ..base.clone()
    }));
    let on = trace_export(&TelemetrySettings {
        otlp_endpoint: Some("http://collector:4318/".into()),
        ..base.clone()
    })
    .unwrap()
    .unwrap();
    assert_eq!(
        on,
        TraceExport {
            endpoint: "http://collector:4318/v1/traces".into(),
            service_name: None,
            sampler: TraceSampler {
                parent_based: true,
                ratio: 1.0
            },
        }
    );
    let own = trace_export(&TelemetrySettings {
        otlp_endpoint: Some("http://collector:4318".into()),
        otlp_traces_endpoint: Some("https://traces.example/in".into()),
        otlp_protocol: Some("grpc".into()),
        otlp_traces_protocol: Some("http/protobuf".into()),
        otel_service_name: Some("tasks-eu".into()),
        traces_sampler: Some("traceidratio".into()),
        traces_sampler_arg: Some("0.25".into()),
    })
    .unwrap()
    .unwrap();
    assert_eq!(own.endpoint, "https://traces.example/in");
    assert_eq!(own.service_name.as_deref(), Some("tasks-eu"));
    assert_eq!(
        own.sampler,
        TraceSampler {
            parent_based: false,
            ratio: 0.25
        }
    );
    let refused = |settings: TelemetrySettings| trace_export(&settings).unwrap_err().setting;
    assert_eq!(
        refused(TelemetrySettings {
            otlp_protocol: Some("grpc".into()),
            ..base.clone()
        }),
        "OTEL_EXPORTER_OTLP_PROTOCOL"
    );
    assert_eq!(
        refused(TelemetrySettings {
            traces_sampler: Some("parentbased_traceidratio".into()),
            traces_sampler_arg: Some("-1".into()),
            ..base.clone()
        }),
        "OTEL_TRACES_SAMPLER_ARG"
    );
    assert_eq!(
        refused(TelemetrySettings {
            otlp_traces_endpoint: Some("ftp://collector".into()),
            ..base.clone()
        }),
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    );
    // The flags set the same settings.
    let flags = settings(&[
        "--otlp-endpoint",
        "http://collector:4318",
        "--otel-service-name",
        "tasks-eu",
    ])
    .unwrap();
    assert_eq!(
        trace_export(&flags.telemetry).unwrap().unwrap().endpoint,
        "http://collector:4318/v1/traces"
    );
}
