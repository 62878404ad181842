//! The `taskql` binary: parses the command line and calls into the library.
use std::process::ExitCode;

use clap::Parser;
use taskql::config::{
    Cli, Command, Config, log_filter, parse_bounded_duration, validate_database_url,
};

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("taskql: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    // Checked before any subcommand runs: a bad filter is never replaced.
    init_tracing(&cli.settings.log)?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(&cli.settings).await,
        Command::Migrate => migrate(&cli.settings).await,
        Command::Token { user, role, ttl } => token(&cli.settings, &user, role.as_deref(), &ttl),
        Command::Schema => {
            print!("{}", taskql::graphql::sdl());
            Ok(())
        }
    }
}

fn init_tracing(filter: &str) -> Result<(), String> {
    let filter = log_filter(filter).map_err(|e| e.to_string())?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}

async fn serve(settings: &taskql::config::Settings) -> Result<(), String> {
    let config = Config::from_settings(settings).map_err(|e| e.to_string())?;
    let shutdown = taskql::shutdown_signal();
    let app = taskql::App::build(&config)
        .await
        .map_err(|e| e.to_string())?;
    let listener = taskql::http::serve::bind(config.listen)
        .map_err(|e| format!("TASKQL_LISTEN: cannot listen on {}: {e}", config.listen))?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(%address, "taskql is serving");
    // Printed with errors ignored: a closed stdout must not stop the server.
    let say = |line: String| {
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), "{line}");
    };
    say(format!("taskql is serving on http://{address}"));
    if let (Some(path), taskql::auth::JwtKey::Secret(secret)) =
        (&config.local_secret_file, &config.jwt_key)
    {
        let token = taskql::auth::issue_token(
            secret,
            "demo",
            None,
            std::time::Duration::from_secs(7 * 86_400),
            config.jwt_issuer.as_deref(),
            config.jwt_audience.as_deref(),
        )?;
        say(format!(
            "No JWT settings: signing tokens with the local secret in {}",
            path.display()
        ));
        say("GraphiQL, signed in as user 'demo' for 7 days:".into());
        say(format!("  http://{address}/graphql#token={token}"));
        say("Token (for the Authorization: Bearer header):".into());
        say(format!("  {token}"));
        // A worker token: the dashboard shows (and can change) every user's tasks.
        let dashboard = taskql::auth::issue_token(
            secret,
            "dashboard",
            Some(&config.service_role),
            std::time::Duration::from_secs(7 * 86_400),
            config.jwt_issuer.as_deref(),
            config.jwt_audience.as_deref(),
        )?;
        say(format!(
            "Dashboard, signed in for 7 days as worker 'dashboard' (role '{}': sees and changes every user's tasks):",
            config.service_role
        ));
        say(format!("  http://{address}/ui#token={dashboard}"));
    }
    app.serve(listener, shutdown)
        .await
        .map_err(|e| format!("server error: {e}"))
}

async fn migrate(settings: &taskql::config::Settings) -> Result<(), String> {
    let url = validate_database_url(&settings.database_url).map_err(|e| e.to_string())?;
    let db = taskql::db::connect(&url, 2)
        .await
        .map_err(|e| format!("DATABASE_URL: cannot open the database: {e}"))?;
    taskql::db::migrate(&db)
        .await
        .map_err(|e| format!("migrations failed: {e}"))?;
    println!("migrations are up to date");
    Ok(())
}

fn token(
    settings: &taskql::config::Settings,
    user: &str,
    role: Option<&str>,
    ttl: &str,
) -> Result<(), String> {
    let ttl = parse_bounded_duration(ttl).map_err(|problem| format!("--ttl: {problem}"))?;
    if user.is_empty() || user.len() > 255 {
        return Err("--user: must be 1 to 255 bytes".into());
    }
    let config = Config::from_settings(settings).map_err(|e| e.to_string())?;
    let taskql::auth::JwtKey::Secret(secret) = &config.jwt_key else {
        return Err("TASKQL_JWT_PUBLIC_KEY_FILE is set: taskql token signs HS256 only; set TASKQL_JWT_SECRET, or sign tokens with your identity provider".into());
    };
    let token = taskql::auth::issue_token(
        secret,
        user,
        role,
        ttl,
        config.jwt_issuer.as_deref(),
        config.jwt_audience.as_deref(),
    )?;
    println!("{token}");
    Ok(())
}
