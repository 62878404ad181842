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

/// The dependencies in `dir/package.json` that `dir/node_modules` lacks.
fn missing_dependencies(dir: &Path) -> Vec<String> {
    let manifest = dir.join("package.json");
    let text = std::fs::read_to_string(&manifest)
        .unwrap_or_else(|e| panic!("read {}: {e}", manifest.display()));
    let manifest: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", manifest.display()));
    manifest["dependencies"]
        .as_object()
        .into_iter()
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
