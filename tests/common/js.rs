//! What the real-client tests need, set up by the tests themselves: the npm
//! packages under tests/ (installed with `npm ci` when their node_modules are
//! missing) and Debian's Chromium (a skip when it is missing, unless `CI` is
//! set).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, LazyLock, Mutex, OnceLock, PoisonError};

/// The npm package at `relative` (to the crate root, e.g. `tests/js`), with
/// its node_modules: runs `npm ci` there first when a dependency that its
/// package.json names is not installed. Tests of one binary run in parallel,
/// so the first caller installs and the others wait for it; panics with
/// npm's output when npm fails.
pub fn npm_package(relative: &str) -> PathBuf {
    static INSTALLS: LazyLock<Mutex<HashMap<PathBuf, Arc<OnceLock<()>>>>> =
        LazyLock::new(Default::default);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    let once = INSTALLS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(dir.clone())
        .or_default()
        .clone();
    once.get_or_init(|| {
        let missing = missing_dependencies(&dir);
        if !missing.is_empty() {
            npm_ci(&dir, &missing);
        }
    });
    dir
}

/// The dependencies (and devDependencies) in `dir/package.json` that
/// `dir/node_modules` lacks.
fn missing_dependencies(dir: &Path) -> Vec<String> {
    let manifest = dir.join("package.json");
    let text = std::fs::read_to_string(&manifest)
        .unwrap_or_else(|e| panic!("read {}: {e}", manifest.display()));
    let manifest: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", manifest.display()));
    ["dependencies", "devDependencies"]
        .iter()
        .filter_map(|key| manifest[key].as_object())
        .flat_map(|deps| deps.keys())
        .filter(|name| {
            !dir.join("node_modules")
                .join(name.as_str())
                .join("package.json")
                .is_file()
        })
        .cloned()
        .collect()
}

fn npm_ci(dir: &Path, missing: &[String]) {
    eprintln!(
        "{}: installing with npm ci (missing {})",
        dir.display(),
        missing.join(", ")
    );
    let output = Command::new("npm")
        .arg("ci")
        .arg("--prefix")
        .arg(dir)
        .args(["--no-audit", "--no-fund"])
        .output()
        .unwrap_or_else(|e| panic!("npm does not run (Node.js 20 and npm must be installed): {e}"));
    assert!(
        output.status.success(),
        "npm ci --prefix {} failed ({}):\n{}\n{}",
        dir.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let still_missing = missing_dependencies(dir);
    assert!(
        still_missing.is_empty(),
        "npm ci --prefix {} did not install {}",
        dir.display(),
        still_missing.join(", ")
    );
}

/// The Chromium executable to drive (env `CHROMIUM`, default
/// /usr/bin/chromium), or `None` after printing why `test` is skipped when it
/// is missing. With `CI` set a missing Chromium fails the test instead.
pub fn chromium_or_skip(test: &str) -> Option<PathBuf> {
    super::tool_or_skip(
        test,
        "CHROMIUM",
        "/usr/bin/chromium",
        "apt-get install chromium",
    )
}

/// A script of tests/js running under node. It prints its JSON report as
/// the last line on stdout; a line `ready` on stderr says it holds what it
/// waits for. Everything else it writes on stderr is kept for failures.
pub struct NodeScript {
    child: tokio::process::Child,
    stderr: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
    diagnostics: String,
}

/// How a script ended.
pub struct NodeOutput {
    pub stdout: String,
    pub status: std::process::ExitStatus,
    /// All it wrote on stderr, but the `ready` line.
    pub diagnostics: String,
}

impl NodeScript {
    /// Starts `tests/js/<script>` with `env` (installing the package first).
    pub fn start(script: &str, env: &[(&str, &str)]) -> Self {
        use std::process::Stdio;
        use tokio::io::AsyncBufReadExt;
        let js = npm_package("tests/js");
        let mut child = tokio::process::Command::new("node")
            .arg(js.join(script))
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs (Node.js 20 must be installed)");
        let stderr = child.stderr.take().expect("piped stderr");
        Self {
            child,
            stderr: tokio::io::BufReader::new(stderr).lines(),
            diagnostics: String::new(),
        }
    }

    /// Waits up to `within` for `ready`; false if it never came.
    pub async fn ready(&mut self, within: std::time::Duration) -> bool {
        let (stderr, diagnostics) = (&mut self.stderr, &mut self.diagnostics);
        tokio::time::timeout(within, async {
            while let Ok(Some(line)) = stderr.next_line().await {
                if line == "ready" {
                    return true;
                }
                diagnostics.push_str(&line);
                diagnostics.push('\n');
            }
            false
        })
        .await
        .unwrap_or(false)
    }

    /// Waits up to `within` for the script to end.
    pub async fn finish(self, within: std::time::Duration) -> NodeOutput {
        let Self {
            child,
            stderr,
            mut diagnostics,
        } = self;
        let output = wait_for_end(child, stderr, &mut diagnostics, within).await;
        NodeOutput {
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            status: output.status,
            diagnostics,
        }
    }
}

impl NodeOutput {
    /// The JSON report on the last line of stdout.
    pub fn report(&self) -> serde_json::Value {
        let line = self.stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line).unwrap_or_else(|e| {
            panic!(
                "the script's report ({}) is not JSON ({e}): {}\n{}",
                self.status, self.stdout, self.diagnostics
            )
        })
    }
}

/// Waits up to `within` for a script to end (panics if it does not) and
/// its output; what it wrote on stderr meanwhile goes to `diagnostics`.
pub async fn wait_for_end(
    child: tokio::process::Child,
    mut stderr: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
    diagnostics: &mut String,
    within: std::time::Duration,
) -> std::process::Output {
    let rest = tokio::spawn(async move {
        let mut rest = String::new();
        while let Ok(Some(line)) = stderr.next_line().await {
            rest.push_str(&line);
            rest.push('\n');
        }
        rest
    });
    let output = tokio::time::timeout(within, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("the script did not end within {within:?}"))
        .expect("node ran");
    diagnostics.push_str(&rest.await.unwrap_or_default());
    output
}
