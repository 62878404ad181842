//! What the benchmarks share: the release server as its own process, a
//! throw-away PostgreSQL database, and medians.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The release binary: `--bin`/`TASKQL_BIN`, or this checkout's `target/release/taskql`.
pub fn release_binary(bin: Option<&Path>) -> Result<PathBuf, BoxError> {
    let bin = bin
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/taskql"));
    if !bin.is_file() {
        return Err(format!(
            "{} not found: run `cargo build --release` first",
            bin.display()
        )
        .into());
    }
    Ok(bin)
}

/// `taskql serve` as its own process on a free port, so its memory and CPU
/// time can be read from /proc/<pid>.
pub struct Server {
    child: Child,
    pub port: u16,
    pub base: String,
    pub ws_url: String,
}

impl Server {
    /// Starts `bin serve` with `DATABASE_URL`, `TASKQL_JWT_SECRET` and
    /// `extra` settings, and waits until `/readyz` answers.
    pub async fn start(
        bin: &Path,
        database_url: &str,
        secret: &str,
        extra: &[(&str, &str)],
    ) -> Result<Self, BoxError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(bin)
            .arg("serve")
            .env("DATABASE_URL", database_url)
            .env("TASKQL_JWT_SECRET", secret)
            .env("TASKQL_LISTEN", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "warn")
            .envs(extra.iter().copied())
            .stdout(Stdio::null())
            .spawn()?;
        let server = Self {
            child,
            port,
            base: format!("http://127.0.0.1:{port}"),
            ws_url: format!("ws://127.0.0.1:{port}/graphql/ws"),
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(response) = http.get(format!("{}/readyz", server.base)).send().await
                && response.status().is_success()
            {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err("the server did not become ready within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory, from /proc/<pid>/status.
    pub fn rss_kib(&self) -> Result<u64, BoxError> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| "no VmRSS in /proc/<pid>/status".into())
    }

    /// CPU time (user + system) the process has used, from /proc/<pid>/stat.
    pub fn cpu_time(&self) -> Result<Duration, BoxError> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        // The command name may hold spaces; the fields after it do not.
        let after_name = stat.rsplit_once(')').ok_or("malformed /proc/<pid>/stat")?.1;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line.
        let ticks: u64 = fields
            .get(11..13)
            .ok_or("short /proc/<pid>/stat")?
            .iter()
            .map(|f| f.parse::<u64>())
            .sum::<Result<u64, _>>()?;
        Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`, 100 on Linux).
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

/// A fresh PostgreSQL database beside the one `base` names, dropped with this.
pub struct TempPostgres {
    admin: String,
    name: String,
    pub url: String,
}

impl TempPostgres {
    pub async fn create(base: &str, prefix: &str) -> Result<Self, BoxError> {
        use sea_orm::ConnectionTrait;
        let admin = taskql::db::connect(base, 1).await?;
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await?;
        admin.close().await?;
        let (server, _) = base.rsplit_once('/').ok_or("the URL names no database")?;
        Ok(Self {
            admin: base.to_owned(),
            url: format!("{server}/{name}"),
            name,
        })
    }

    pub async fn drop_database(self) -> Result<(), BoxError> {
        use sea_orm::ConnectionTrait;
        let admin = taskql::db::connect(&self.admin, 1).await?;
        admin
            .execute_unprepared(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await?;
        admin.close().await?;
        Ok(())
    }
}

pub fn median(values: &[f64]) -> f64 {
    let mut values = values.to_vec();
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The `q` quantile (0..=1) of sorted values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}
