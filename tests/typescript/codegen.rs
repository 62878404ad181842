//! The client's documents are checked against the schema: codegen from a
//! schema that renames a field they select fails, naming it.

use crate::package::{built_package, node_or_skip};

#[tokio::test]
async fn a_schema_that_breaks_the_documents_fails_the_client_build() {
    if node_or_skip("a_schema_that_breaks_the_documents_fails_the_client_build").is_none() {
        return;
    }
    let package = built_package();
    let schema_path = package.join("../../schema.graphql");
    let schema = std::fs::read_to_string(&schema_path).expect("schema.graphql");
    // TaskEvent.cursor (and TaskEdge.cursor) renamed.
    assert!(schema.contains("\tcursor: String!\n"));
    let broken = schema.replace("\tcursor: String!\n", "\tposition: String!\n");
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("schema.graphql"), broken).expect("write");
    let out = dir.path().join("graphql.ts");
    let run = |schema: &std::path::Path| {
        std::process::Command::new("npx")
            .args(["--no-install", "graphql-codegen", "--config", "codegen.ts"])
            .current_dir(&package)
            .env("TASKQL_SCHEMA", schema)
            .env("TASKQL_CODEGEN_OUT", &out)
            .output()
            .expect("npx runs")
    };
    let failed = run(&dir.path().join("schema.graphql"));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&failed.stdout),
        String::from_utf8_lossy(&failed.stderr)
    );
    assert!(!failed.status.success(), "codegen passed: {said}");
    assert!(said.contains("cursor"), "names the field: {said}");
    assert!(!out.exists(), "nothing generated");
    // The same run on the real schema passes: the failure was the rename.
    let passed = run(&schema_path);
    assert!(
        passed.status.success(),
        "{}",
        String::from_utf8_lossy(&passed.stderr)
    );
    assert!(out.is_file());
}
