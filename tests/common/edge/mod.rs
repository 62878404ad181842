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

pub mod proxy;
pub mod raw;
pub mod server;

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
