//! The `taskql` binary: parses the command line and calls into the library.
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser as _;
use taskql::StartError;
use taskql::auth::AuthError;
use taskql::config::{
    Cli, Command, Config, ConfigError, LogFormat, Settings, log_filter, setting_error, trace_export,
};
use taskql::telemetry::Traces;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Why the command failed, as the one line it prints.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// A subcommand's own argument, e.g. `--user: …`.
    #[error("{0}")]
    Argument(String),
    #[error("TASKQL_LISTEN: cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("server error: {0}")]
    Serve(std::io::Error),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // A setting's bad value is one line naming it, like any other.
        Err(err) => match setting_error(&err) {
            Some(problem) => {
                eprintln!("taskql: {problem}");
                return ExitCode::FAILURE;
            }
            None => err.exit(),
        },
    };
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("taskql: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let command = cli.command.unwrap_or(Command::Serve);
    // Only the server sends traces; it checks their settings first.
    let traces = match command {
        Command::Serve => trace_export(&cli.settings.telemetry)?
            .map(|export| Traces::start(&export))
            .transpose()?,
        _ => None,
    };
    // Checked before any subcommand runs: a bad filter is never replaced.
    init_tracing(&cli.settings.log, cli.settings.log_format, traces.as_ref())?;
    let result = match command {
        Command::Serve => serve(&cli.settings).await,
        Command::Migrate => migrate(&cli.settings).await,
        Command::Token { user, role, ttl } => token(&cli.settings, &user, role.as_deref(), ttl),
        Command::Schema => {
            print!("{}", taskql::graphql::sdl());
            Ok(())
        }
    };
    if let Some(traces) = traces {
        // Waits for the last batch on a thread that may block.
        let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
    }
    result
}

/// Logs go to stderr: as text, coloured only when stderr is a terminal, or
/// as one JSON object per line for log pipelines. Spans go to `traces`
/// when tracing is on, whatever the log filter.
fn init_tracing(
    filter: &str,
    format: LogFormat,
    traces: Option<&Traces>,
) -> Result<(), ConfigError> {
    use tracing_subscriber::prelude::*;
    let filter = log_filter(filter)?;
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).boxed(),
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(traces.map(|traces| traces.layer()))
        .init();
    Ok(())
}

async fn serve(settings: &Settings) -> Result<(), CliError> {
    let config = Config::from_settings(settings)?;
    let key = taskql::auth::load_key(&config.auth)?;
    let shutdown = taskql::shutdown_signal();
    let app = taskql::App::build(&config, &key).await?;
    let listen_error = |source| CliError::Listen {
        address: config.http.listen,
        source,
    };
    let listener = taskql::http::serve::bind(config.http.listen).map_err(listen_error)?;
    let address = listener.local_addr().map_err(listen_error)?;
    tracing::info!(%address, "taskql is serving");
    // Printed with errors ignored: a closed stdout must not stop the server.
    let say = |line: String| {
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), "{line}");
    };
    say(format!("taskql is serving on http://{address}"));
    if let (Some(path), taskql::auth::JwtKey::Secret(secret)) =
        (config.auth.local_secret_file(), &key)
    {
        // Week-long tokens, for a person trying taskql on their own machine.
        let sign = |user: &str, role: Option<&str>| {
            taskql::auth::issue_token(
                secret,
                user,
                role,
                std::time::Duration::from_secs(7 * 86_400),
                config.auth.issuer.as_deref(),
                config.auth.audience.as_deref(),
            )
        };
        let token = sign("demo", None)?;
        say(format!(
            "No JWT settings: signing tokens with the local secret in {}",
            path.display()
        ));
        say("GraphiQL, signed in as user 'demo' for 7 days:".into());
        say(format!("  http://{address}/graphql#token={token}"));
        say("Token (for the Authorization: Bearer header):".into());
        say(format!("  {token}"));
        // A worker token: the dashboard shows (and can change) every user's tasks.
        let dashboard = sign("dashboard", Some(&config.auth.service_role))?;
        say(format!(
            "Dashboard, signed in for 7 days as worker 'dashboard' (role '{}': sees and changes every user's tasks):",
            config.auth.service_role
        ));
        say(format!("  http://{address}/ui#token={dashboard}"));
    }
    app.serve(listener, shutdown).await.map_err(CliError::Serve)
}

async fn migrate(settings: &Settings) -> Result<(), CliError> {
    let db = taskql::db::connect(settings.database.url.as_str(), 2)
        .await
        .map_err(|e| StartError::Database(e.to_string()))?;
    taskql::db::migrate(&db)
        .await
        .map_err(|e| StartError::Migration(e.to_string()))?;
    println!("migrations are up to date");
    Ok(())
}

fn token(
    settings: &Settings,
    user: &str,
    role: Option<&str>,
    ttl: std::time::Duration,
) -> Result<(), CliError> {
    if !taskql::auth::is_valid_subject(user) {
        return Err(CliError::Argument(format!(
            "--user: must be 1 to {} bytes of printable text",
            taskql::auth::MAX_SUBJECT_LEN
        )));
    }
    let config = Config::from_settings(settings)?;
    let key = taskql::auth::load_key(&config.auth)?;
    let taskql::auth::JwtKey::Secret(secret) = &key else {
        return Err(CliError::Argument("TASKQL_JWT_PUBLIC_KEY_FILE is set: taskql token signs HS256 only; set TASKQL_JWT_SECRET, or sign tokens with your identity provider".into()));
    };
    let token = taskql::auth::issue_token(
        secret,
        user,
        role,
        ttl,
        config.auth.issuer.as_deref(),
        config.auth.audience.as_deref(),
    )?;
    println!("{token}");
    Ok(())
}
