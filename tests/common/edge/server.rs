//! The `taskql serve` child process: started as an operator does, with what the kernel says of it (descriptors, memory, accepted connections) and its log.

use super::*;

/// A `taskql serve` child process on a port of its own.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub base: String,
    pub ws_url: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// `taskql serve` on `database_url`, signing tokens with `TEST_SECRET`,
    /// with `settings` (environment variables) on top.
    pub async fn start(database_url: &str, settings: &[(&str, &str)]) -> Self {
        Self::spawn(database_url, settings, None).await
    }

    /// Like `start`, under `ulimit -n open_files`.
    pub async fn start_with_open_files(
        database_url: &str,
        settings: &[(&str, &str)],
        open_files: u32,
    ) -> Self {
        Self::spawn(database_url, settings, Some(open_files)).await
    }

    async fn spawn(database_url: &str, settings: &[(&str, &str)], open_files: Option<u32>) -> Self {
        let mut command = match open_files {
            None => {
                let mut command = Command::new(BIN);
                command.arg("serve");
                command
            }
            Some(limit) => {
                // `exec` keeps the pid: the child is taskql itself.
                let mut command = Command::new("sh");
                command
                    .arg("-c")
                    .arg(format!("ulimit -n {limit} && exec \"$0\" serve"))
                    .arg(BIN);
                command
            }
        };
        for (key, _) in std::env::vars() {
            if key.starts_with("TASKQL_") || key == "DATABASE_URL" || key == "RUST_LOG" {
                command.env_remove(key);
            }
        }
        command
            .env("DATABASE_URL", database_url)
            .env("TASKQL_LISTEN", "127.0.0.1:0")
            .env("TASKQL_JWT_SECRET", TEST_SECRET)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        for (key, value) in settings {
            command.env(key, value);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start taskql");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line);
                }
            });
        }
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            // Read to the end, as a terminal would.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(address) = line.strip_prefix("taskql is serving on http://")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(address.trim().to_owned());
                }
            }
        });
        let address = match tokio::time::timeout(Duration::from_secs(60), rx).await {
            Ok(Ok(address)) => address,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("taskql did not start:\n{}", log.lock().unwrap().join("\n"));
            }
        };
        let addr: SocketAddr = address.parse().expect("a socket address");
        Self {
            child,
            addr,
            base: format!("http://{addr}"),
            ws_url: format!("ws://{addr}/graphql/ws"),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Descriptors the process has open (`/proc/<pid>/fd`).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|dir| dir.count())
            .unwrap_or(0)
    }

    /// How many of the connections from these local `ports` the server has
    /// accepted (a socket still in the listen backlog belongs to no process).
    pub fn accepted_from(&self, ports: &[u16]) -> usize {
        let mut own = std::collections::HashSet::new();
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{}/fd", self.pid())) {
            for entry in dir.flatten() {
                if let Ok(target) = std::fs::read_link(entry.path())
                    && let Some(inode) = target
                        .to_str()
                        .and_then(|t| t.strip_prefix("socket:["))
                        .and_then(|t| t.strip_suffix(']'))
                {
                    own.insert(inode.to_owned());
                }
            }
        }
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        let port_of = |address: &str| {
            address
                .rsplit_once(':')
                .and_then(|(_, port)| u16::from_str_radix(port, 16).ok())
        };
        table
            .lines()
            .skip(1)
            .filter(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.len() > 9
                    && port_of(fields[1]) == Some(self.addr.port())
                    && port_of(fields[2]).is_some_and(|port| ports.contains(&port))
                    && own.contains(fields[9])
            })
            .count()
    }

    /// Resident memory in KiB (`VmRSS` in `/proc/<pid>/status`).
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// What the server has logged so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM, as `kill -TERM` does.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// The exit status, if the process exits within `within`.
    pub async fn exit_within(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A GraphQL request over a fresh connection: the HTTP status and body.
    pub async fn graphql(
        &self,
        token: &str,
        query: &str,
        variables: Value,
        within: Duration,
    ) -> Result<(u16, Value), String> {
        let request = http_client(within)
            .post(format!("{}/graphql", self.base))
            .bearer_auth(token)
            .header("accept", "application/json")
            .json(&serde_json::json!({ "query": query, "variables": variables }));
        let response = request.send().await.map_err(|e| describe(&e))?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(|e| describe(&e))?;
        let body = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        Ok((status, body))
    }

    /// A GET over a fresh connection: the HTTP status.
    pub async fn get_status(&self, path: &str, within: Duration) -> Result<u16, String> {
        http_client(within)
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .map_err(|e| describe(&e))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log_lines();
            let tail = &log[log.len().saturating_sub(30)..];
            eprintln!("taskql's last log lines:\n{}", tail.join("\n"));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
