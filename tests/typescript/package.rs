//! The client package, built once per run, and its Node scripts.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, ChildStdin};

/// The package, relative to the crate root.
pub const PACKAGE: &str = "clients/typescript";

/// Node.js (env `NODE`, else `node` on the PATH), or `None` after printing
/// why `test` is skipped (a failure with `CI` set).
pub fn node_or_skip(test: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("node"))
        .find(|node| node.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/bin/node"));
    crate::common::tool_or_skip(
        test,
        "NODE",
        &on_path.to_string_lossy(),
        "apt-get install nodejs npm",
    )
}

/// The node to run: env `NODE`, else `node` on the PATH.
fn node() -> std::ffi::OsString {
    std::env::var_os("NODE").unwrap_or_else(|| "node".into())
}

/// clients/typescript, installed (`npm ci` when a dependency is missing from
/// node_modules, as `common::js::npm_package` does) and built (`npm run
/// build`), once for all the tests of the run: the first caller builds, the
/// others wait. Panics with npm's output when either fails.
pub fn built_package() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = crate::common::js::npm_package(PACKAGE);
            npm(&dir, &["run", "build"]);
            dir
        })
        .clone()
}

/// Runs npm in `dir`; panics with its output when it fails.
pub fn npm(dir: &Path, args: &[&str]) {
    let output = Command::new("npm")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("npm does not run (Node.js 20 and npm must be installed): {e}"));
    assert!(
        output.status.success(),
        "npm {} in {} failed ({}):\n{}\n{}",
        args.join(" "),
        dir.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A script of clients/typescript/test under node: its report is the last
/// line on stdout; `ready <json>` on stderr says it holds what the test
/// waits for; it reads lines the test sends on stdin.
pub struct Script {
    child: Child,
    stdin: ChildStdin,
    stderr: Lines<BufReader<ChildStderr>>,
    diagnostics: String,
}

impl Script {
    /// Starts `clients/typescript/test/<name>` with `env` (the package built first).
    pub fn start(name: &str, env: &[(&str, &str)]) -> Self {
        let package = built_package();
        let mut child = tokio::process::Command::new(node())
            .arg(package.join("test").join(name))
            .current_dir(&package)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs (Node.js 20 must be installed)");
        let stdin = child.stdin.take().expect("piped stdin");
        let stderr = child.stderr.take().expect("piped stderr");
        Self {
            child,
            stdin,
            stderr: BufReader::new(stderr).lines(),
            diagnostics: String::new(),
        }
    }

    /// What the script said when ready; panics with what it wrote if it
    /// ended or took longer than `within`.
    pub async fn ready(&mut self, within: Duration) -> Value {
        let (stderr, diagnostics) = (&mut self.stderr, &mut self.diagnostics);
        let said = tokio::time::timeout(within, async {
            while let Ok(Some(line)) = stderr.next_line().await {
                if let Some(info) = line.strip_prefix("ready ") {
                    return Some(info.to_owned());
                }
                diagnostics.push_str(&line);
                diagnostics.push('\n');
            }
            None
        })
        .await
        .ok()
        .flatten();
        match said {
            Some(info) => serde_json::from_str(&info).expect("ready carries JSON"),
            None => panic!("the script was never ready:\n{}", self.diagnostics),
        }
    }

    /// Sends the script a line.
    pub async fn say(&mut self, line: &str) {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write to the script");
        self.stdin.flush().await.expect("flush");
    }

    /// Waits up to `within` for the script to end; its report. Panics with
    /// all it wrote when it failed or wrote no JSON report.
    pub async fn report(self, within: Duration) -> Value {
        let Self {
            child,
            stdin,
            stderr,
            mut diagnostics,
        } = self;
        drop(stdin);
        let output = crate::common::js::wait_for_end(child, stderr, &mut diagnostics, within).await;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let report = stdout
            .lines()
            .last()
            .and_then(|line| serde_json::from_str::<Value>(line).ok());
        match report {
            Some(report) if output.status.success() => report,
            _ => panic!(
                "the script failed ({}):\n{stdout}\n{diagnostics}",
                output.status
            ),
        }
    }
}
