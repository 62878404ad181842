#!/usr/bin/env bash
# What each write of a task costs PostgreSQL, trigger by trigger: EXPLAIN
# ANALYZE of 5,000 tasks created, claimed and completed, each in one
# statement, in a database migrated by the given build, three times.
#
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres examples/explain_writes.sh
#
# It makes a database of its own (taskql_explain_<pid>) with `taskql
# migrate` (TASKQL_BIN, default target/release/taskql) and drops it at the
# end. Each line: the statement's execution time, then each trigger's.
set -euo pipefail
base="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
bin="${TASKQL_BIN:-target/release/taskql}"
db="taskql_explain_$$"
url="${base%/*}/$db"
psql "$base" -qc "CREATE DATABASE $db"
trap 'psql "$base" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)"' EXIT
"$bin" migrate --database-url "$url" >/dev/null 2>&1

explain() {  # $1 label, $2 statement
  psql "$url" -Atc "EXPLAIN (ANALYZE, COSTS OFF) $2" |
    awk -v label="$1" '/^Trigger|^Execution Time/ { line = line "  " $0 } END { print label ":" line }'
}
for rep in 1 2 3; do
  explain create "INSERT INTO tasks (id, user_id, type, status, metadata, created_at, updated_at, run_at, max_attempts, fair_rank)
    SELECT gen_random_uuid(), 'u' || (i % 100), 'concept.image', 'pending', '{\"prompt\": \"a red fox\"}', now(), now(), now(), 3, i
    FROM generate_series(1, 5000) i"
  explain claim "UPDATE tasks SET status = 'processing', attempts = attempts + 1, worker_id = 'w',
    lease_expires_at = now() + interval '30 seconds', started_at = coalesce(started_at, now()), updated_at = now(),
    version = version + 1 WHERE status = 'pending'"
  explain completion "UPDATE tasks SET status = 'completed', result_id = 'r-' || id, lease_expires_at = NULL,
    completed_at = now(), updated_at = now(), version = version + 1, progress = 100 WHERE status = 'processing'"
  psql "$url" -qAtc "SELECT task_events_take_changes()" >/dev/null
done
