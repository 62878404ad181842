//! The TypeScript client (`clients/typescript`, `@taskql/client`) against the
//! real server: built once per run (`npm ci` when its node_modules lack a
//! dependency, then `npm run build`: codegen from schema.graphql and tsc),
//! then driven by Node scripts of clients/typescript/test and in headless
//! Chromium. In both, a watch outlives a killed server, and events resume
//! after a dropped connection with nothing missed and nothing twice; the
//! token function is asked again on reconnect, pages read every task once,
//! errors carry their codes, and a schema that breaks the client's
//! documents fails its build.
//!
//! On SQLite by default; on PostgreSQL with `TASKQL_TEST_DATABASE_URL`.
//! Without Node.js (or Chromium, for the browser test) a test is skipped
//! with a printed reason, unless `CI` is set.
#[path = "../common/mod.rs"]
mod common;

mod browser;
mod codegen;
mod errors;
mod events;
mod package;
mod pages;
mod watch;

use std::time::Duration;

use common::edge::server::Server;

/// Longest a script may run.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

/// Kills the server at once (SIGKILL: no goodbye to its clients) and waits
/// until it is gone.
async fn kill(server: &mut Server) {
    let status = std::process::Command::new("kill")
        .args(["-KILL", &server.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -KILL failed");
    assert!(
        server.exit_within(Duration::from_secs(10)).await.is_some(),
        "the server did not die"
    );
}

/// A server again on `database_url`, at the address the killed one had, so
/// clients keep their URL.
async fn restart_at(database_url: &str, old: &Server) -> Server {
    let address = old.addr.to_string();
    let server = Server::start(database_url, &[("TASKQL_LISTEN", address.as_str())]).await;
    assert_eq!(server.addr, old.addr, "the same address again");
    server
}

/// The client's report says it reconnected, and asked its token function
/// again to do so (a refreshed token would be used).
fn assert_reconnected_with_a_fresh_token(report: &serde_json::Value) {
    assert!(
        report["retries"].as_u64() >= Some(1),
        "it reconnected: {report}"
    );
    let calls = &report["tokenCalls"];
    assert!(
        calls["total"].as_u64() > calls["atReady"].as_u64(),
        "the token function was asked again to reconnect: {report}"
    );
}

/// Where a test's client runs.
#[derive(Clone, Copy, PartialEq)]
enum Runtime {
    Node,
    /// Headless Chromium, on a page of another origin than the server's.
    Chromium,
}

impl Runtime {
    /// The script of clients/typescript/test to start: `node_script` in
    /// Node, `page_script` for Chromium, with `env` and Chromium's path.
    /// `None` when `test` is skipped (no Node.js, or no Chromium).
    fn start(
        self,
        test: &str,
        (node_script, page_script): (&str, &str),
        env: &[(&str, &str)],
    ) -> Option<package::Script> {
        package::node_or_skip(test)?;
        let mut env = env.to_vec();
        let chromium;
        let script = match self {
            Self::Node => node_script,
            Self::Chromium => {
                chromium = common::js::chromium_or_skip(test)?;
                env.push(("CHROMIUM", chromium.to_str().expect("a UTF-8 path")));
                page_script
            }
        };
        Some(package::Script::start(script, &env))
    }

    /// A Chromium report's page was of its own origin, not `server`'s, and
    /// had nothing uncaught; nothing to check in Node.
    fn assert_page_was_clean(self, report: &serde_json::Value, server: &str) {
        if self == Self::Chromium {
            let origin = report["origin"].as_str().expect("an origin");
            assert!(!server.starts_with(origin), "{report}");
            assert_eq!(report["pageErrors"], serde_json::json!([]), "{report}");
        }
    }
}
