//! The real `taskql` binary under hostile clients and a failing database:
//! start it as an operator does, drive it with raw sockets, read what the
//! kernel says about the process, and cut its database off with a TCP proxy.
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::TEST_SECRET;

pub const BIN: &str = env!("CARGO_BIN_EXE_taskql");

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Held for a whole edge test. These tests count descriptors, memory and
/// seconds on a small shared machine, so they run one at a time; each prints
/// how long it ran.
pub struct TestRun {
    name: &'static str,
    started: Instant,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

pub async fn begin(name: &'static str) -> TestRun {
    let serial = SERIAL.lock().await;
    eprintln!("{name}: started");
    TestRun {
        name,
        started: Instant::now(),
        _serial: serial,
    }
}

impl TestRun {
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for TestRun {
    fn drop(&mut self) {
        let outcome = if std::thread::panicking() {
            "failed"
        } else {
            "passed"
        };
        eprintln!(
            "{}: {outcome} after {:.1} s",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
    }
}

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

/// An error with its causes: reqwest's own message leaves them out.
pub fn describe(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A client that opens a new connection for every request, so a connection
/// the server closed while idle is never reused.
pub fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(timeout)
        .build()
        .expect("http client")
}

/// Waits until `probe` holds, checking every 50 ms; whether it did within `within`.
pub async fn wait_until(within: Duration, mut probe: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if probe() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One HTTP/1.1 response as read off a raw socket.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// `extensions.code` of the first error in a JSON error body.
    pub fn error_code(&self) -> Option<String> {
        self.json()?["errors"][0]["extensions"]["code"]
            .as_str()
            .map(str::to_owned)
    }
}

/// The response at the start of `bytes`, once it is all there (`eof`: the
/// server closed, which ends a body without a length).
pub fn parse_response(bytes: &[u8], eof: bool) -> Option<RawResponse> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let rest = &bytes[end + 4..];
    let header = |name: &str| {
        head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
    };
    let body = if let Some(length) = header("content-length").and_then(|v| v.parse().ok()) {
        rest.get(..length)?.to_vec()
    } else if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(rest)?
    } else if eof {
        rest.to_vec()
    } else {
        return None;
    };
    Some(RawResponse { status, head, body })
}

fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

/// Reads one response; the error says how the connection ended instead.
pub async fn read_response(
    stream: &mut (impl AsyncRead + Unpin),
    within: Duration,
) -> Result<RawResponse, String> {
    let deadline = tokio::time::Instant::now() + within;
    let mut received = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => {
                return Err(format!(
                    "no whole response within {within:?} ({} bytes)",
                    received.len()
                ));
            }
            Ok(Ok(0)) => {
                return parse_response(&received, true).ok_or_else(|| {
                    format!("closed without a response ({} bytes)", received.len())
                });
            }
            Ok(Ok(n)) => {
                received.extend_from_slice(&buf[..n]);
                if let Some(response) = parse_response(&received, false) {
                    return Ok(response);
                }
            }
            Ok(Err(err)) => {
                return parse_response(&received, true)
                    .ok_or_else(|| format!("{err} after {} bytes", received.len()));
            }
        }
    }
}

/// How one slow client's connection went.
#[derive(Debug)]
pub struct SlowOutcome {
    /// When the server ended the connection, from the client's connect;
    /// `None` if it was still open when the test stopped watching.
    pub closed_after: Option<Duration>,
    /// The whole response the server sent, if one came.
    pub response: Option<RawResponse>,
    /// Bytes the client had sent.
    pub sent: usize,
}

/// Many connections that send `head` at once, then `drip` one byte per
/// interval, and notice when the server ends them.
pub struct SlowClients {
    /// The clients' local ports.
    pub ports: Vec<u16>,
    open: Arc<AtomicUsize>,
    stop: watch::Sender<bool>,
    clients: JoinSet<SlowOutcome>,
}

impl SlowClients {
    pub async fn connect(
        addr: SocketAddr,
        count: usize,
        head: &[u8],
        drip: &[u8],
        interval: Duration,
    ) -> Self {
        let open = Arc::new(AtomicUsize::new(0));
        let (stop, _) = watch::channel(false);
        let mut clients = JoinSet::new();
        let mut ports = Vec::new();
        for i in 0..count {
            let stream = TcpStream::connect(addr)
                .await
                .unwrap_or_else(|e| panic!("slow client {i} could not connect: {e}"));
            ports.push(stream.local_addr().expect("local address").port());
            open.fetch_add(1, Ordering::SeqCst);
            clients.spawn(slow_client(
                stream,
                head.to_vec(),
                drip.to_vec(),
                interval,
                stop.subscribe(),
                open.clone(),
            ));
        }
        Self {
            ports,
            open,
            stop,
            clients,
        }
    }

    /// Connections the server has not ended yet.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Stops the clients still going; every client's outcome.
    pub async fn finish(mut self) -> Vec<SlowOutcome> {
        let _ = self.stop.send(true);
        let mut outcomes = Vec::new();
        while let Some(outcome) = self.clients.join_next().await {
            outcomes.push(outcome.expect("slow client task"));
        }
        outcomes
    }
}

async fn slow_client(
    stream: TcpStream,
    head: Vec<u8>,
    drip: Vec<u8>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
    open: Arc<AtomicUsize>,
) -> SlowOutcome {
    let started = Instant::now();
    let (mut reader, mut writer) = stream.into_split();
    let mut sent = 0;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let mut drip = drip.into_iter();
    let mut ticker = tokio::time::interval(interval);
    let mut closed = writer.write_all(&head).await.is_err();
    if !closed {
        sent += head.len();
    }
    while !closed {
        tokio::select! {
            _ = async { stop.wait_for(|stop| *stop).await.map(|_| ()) } => {
                return SlowOutcome {
                    closed_after: None,
                    response: parse_response(&received, false),
                    sent,
                };
            }
            _ = ticker.tick() => {
                if let Some(byte) = drip.next() {
                    if writer.write_all(&[byte]).await.is_err() {
                        closed = true;
                    } else {
                        sent += 1;
                    }
                }
            }
            read = reader.read(&mut buf) => match read {
                Ok(0) | Err(_) => closed = true,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            },
        }
    }
    open.fetch_sub(1, Ordering::SeqCst);
    SlowOutcome {
        closed_after: Some(started.elapsed()),
        response: parse_response(&received, true),
        sent,
    }
}

/// How a websocket upgrade went.
pub enum Upgrade {
    /// 101: the socket is open; the task ends with the close code the server
    /// sent (`None`: closed without a code) and when.
    Open(tokio::task::JoinHandle<(Option<u16>, Instant)>),
    /// The server answered the upgrade with this status and body.
    Refused(u16, Option<Value>),
    /// Anything else (a reset, a timeout).
    Failed(String),
}

/// Opens a `graphql-transport-ws` socket and never sends `connection_init`.
pub async fn open_uninitialised_socket(ws_url: &str) -> Upgrade {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::{Error, Message, http::HeaderValue};

    let mut request = ws_url.into_client_request().expect("a websocket url");
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("graphql-transport-ws"),
    );
    let connect = tokio_tungstenite::connect_async(request);
    match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Err(_) => Upgrade::Failed("no answer to the upgrade within 5 s".into()),
        Ok(Err(Error::Http(response))) => {
            let body = response
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice(b).ok());
            Upgrade::Refused(response.status().as_u16(), body)
        }
        Ok(Err(err)) => Upgrade::Failed(err.to_string()),
        Ok(Ok((mut socket, _))) => Upgrade::Open(tokio::spawn(async move {
            while let Some(message) = socket.next().await {
                match message {
                    Ok(Message::Close(frame)) => {
                        return (frame.map(|f| u16::from(f.code)), Instant::now());
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            (None, Instant::now())
        })),
    }
}

/// What the proxy in front of the database does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forwards every connection.
    Forward,
    /// Drops every connection and closes its port: connects are refused.
    Refuse,
    /// Drops every connection; accepts new ones but never forwards a byte.
    Blackhole,
    /// A network partition: connections stay open but go silent, and new
    /// ones are accepted and never forwarded.
    Partition,
}

/// A TCP proxy between taskql and its database, which the test can cut.
/// Connections accepted while cut are forwarded once it is restored, as a
/// healed network would deliver them.
pub struct Proxy {
    pub addr: SocketAddr,
    mode: watch::Sender<ProxyMode>,
}

impl Proxy {
    /// A proxy on a free local port, forwarding to `target` (`host:port`).
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (mode, modes) = watch::channel(ProxyMode::Forward);
        tokio::spawn(run_proxy(listener, addr, target.to_owned(), modes));
        Self { addr, mode }
    }

    pub fn set(&self, mode: ProxyMode) {
        self.mode.send_replace(mode);
    }
}

async fn run_proxy(
    listener: TcpListener,
    addr: SocketAddr,
    target: String,
    mut modes: watch::Receiver<ProxyMode>,
) {
    let mut listener = Some(listener);
    let mut forwarders = JoinSet::new();
    let mut held: Vec<TcpStream> = Vec::new();
    let (frozen, _) = watch::channel(false);
    loop {
        let accept = async {
            match &listener {
                Some(listener) => listener.accept().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = modes.changed() => {
                if changed.is_err() {
                    return; // the test dropped the proxy
                }
                let mode = *modes.borrow_and_update();
                match mode {
                    ProxyMode::Refuse => {
                        forwarders.abort_all();
                        held.clear();
                        listener = None;
                    }
                    ProxyMode::Blackhole => {
                        forwarders.abort_all();
                    }
                    ProxyMode::Partition => {
                        frozen.send_replace(true);
                    }
                    ProxyMode::Forward => {
                        // Silent connections end; the held ones go through.
                        frozen.send_replace(false);
                        for client in held.drain(..) {
                            forwarders.spawn(forward(client, target.clone(), frozen.subscribe()));
                        }
                    }
                }
                if mode != ProxyMode::Refuse && listener.is_none() {
                    listener = Some(rebind(addr).await);
                }
            }
            accepted = accept => {
                let Ok((client, _)) = accepted else { continue };
                if *modes.borrow() == ProxyMode::Forward {
                    forwarders.spawn(forward(client, target.clone(), frozen.subscribe()));
                } else {
                    held.push(client);
                }
            }
            Some(_) = forwarders.join_next(), if !forwarders.is_empty() => {}
        }
    }
}

async fn rebind(addr: SocketAddr) -> TcpListener {
    for _ in 0..50 {
        if let Ok(listener) = TcpListener::bind(addr).await {
            return listener;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the proxy could not listen on {addr} again");
}

async fn forward(mut client: TcpStream, target: String, mut frozen: watch::Receiver<bool>) {
    let Ok(mut server) = TcpStream::connect(&target).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = async { frozen.wait_for(|frozen| *frozen).await.map(|_| ()) } => {
            // Silent, not closed: both sockets stay open until the partition heals.
            let _ = frozen.wait_for(|frozen| !*frozen).await;
        }
    }
}

/// The `host:port` a database URL names (PostgreSQL's port by default).
pub fn host_port(url: &str) -> String {
    let (_, authority, _) = split_url(url);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    match host_port.rsplit_once(':') {
        Some((_, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            host_port.to_owned()
        }
        _ => format!("{host_port}:5432"),
    }
}

/// `url` with its `host:port` replaced by `addr`.
pub fn through(url: &str, addr: SocketAddr) -> String {
    let (scheme, authority, path) = split_url(url);
    let user = authority
        .rsplit_once('@')
        .map_or(String::new(), |(user, _)| format!("{user}@"));
    format!("{scheme}://{user}{addr}{path}")
}

fn split_url(url: &str) -> (&str, &str, &str) {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    (scheme, authority, path)
}
