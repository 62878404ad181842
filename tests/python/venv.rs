//! The Python the tests run the worker library with: a virtual environment
//! under target/tmp with clients/python installed (with mypy and the
//! OpenTelemetry API), made on the first use of a test run and reused while
//! the package's files and the interpreter are the same.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

use crate::common::tool_or_skip;

const PACKAGE: &str = "clients/python";

/// The venv's python, or `None` after printing why `test` is skipped when
/// there is no python3 (a failure instead when `CI` is set).
pub fn python_or_skip(test: &str) -> Option<PathBuf> {
    let on_path = find_on_path("python3").unwrap_or_else(|| PathBuf::from("/usr/bin/python3"));
    let base = tool_or_skip(
        test,
        "TASKQL_PYTHON",
        &on_path.to_string_lossy(),
        "apt-get install python3 python3-venv",
    )?;
    static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match VENV.get_or_init(|| make_venv(&base)) {
        Ok(python) => Some(python.clone()),
        Err(problem) => panic!("{test}: the Python environment: {problem}"),
    }
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn crate_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A venv with the package installed, up to date with its sources.
fn make_venv(base: &Path) -> Result<PathBuf, String> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("taskql-python-venv");
    let python = dir.join("bin").join("python");
    let stamp_path = dir.join("taskql-stamp");
    let stamp = stamp(base)?;
    std::fs::create_dir_all(env!("CARGO_TARGET_TMPDIR")).map_err(|e| e.to_string())?;
    // Two test runs at once (SQLite and PostgreSQL) make it one at a time.
    let lock_path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("taskql-python-venv.lock");
    let lock = File::create(&lock_path).map_err(|e| format!("{}: {e}", lock_path.display()))?;
    lock.lock()
        .map_err(|e| format!("lock {}: {e}", lock_path.display()))?;
    if std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) && python.is_file() {
        return Ok(python);
    }
    eprintln!(
        "making the Python environment in {} (pip install {PACKAGE})",
        dir.display()
    );
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    run(Command::new(base).args(["-m", "venv"]).arg(&dir))
        .map_err(|e| format!("{e} (on Debian: apt-get install python3-venv)"))?;
    let package = crate_root().join(PACKAGE);
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg(format!("{}[dev,otel]", package.display())))?;
    std::fs::write(&stamp_path, stamp).map_err(|e| e.to_string())?;
    Ok(python)
}

/// What the venv is made from: the interpreter's version and every file of
/// the package but what building it leaves behind.
fn stamp(base: &Path) -> Result<String, String> {
    let version = Command::new(base)
        .arg("--version")
        .output()
        .map_err(|e| format!("{} does not run: {e}", base.display()))?;
    let mut hash = Sha256::new();
    hash.update(&version.stdout);
    hash.update(base.to_string_lossy().as_bytes());
    let mut files = Vec::new();
    collect(&crate_root().join(PACKAGE), &mut files);
    files.sort();
    for file in files {
        hash.update(file.to_string_lossy().as_bytes());
        hash.update(std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?);
    }
    Ok(format!("{:x}", hash.finalize()))
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.')
            || name == "__pycache__"
            || name == "build"
            || name == "bench"
            || name.ends_with(".egg-info")
        {
            continue;
        }
        if path.is_dir() {
            collect(&path, files);
        } else {
            files.push(path);
        }
    }
}

fn run(command: &mut Command) -> Result<(), String> {
    let output = command
        .output()
        .map_err(|e| format!("{command:?} does not run: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{command:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}
