#!/usr/bin/env bash
# What one create writes on PostgreSQL: WAL bytes and rows per task, read
# from pg_current_wal_lsn() before and after each run, for
#   plain     - the same INSERT into `tasks` with its triggers disabled,
#   one       - taskql's insert of one row per statement (createTask),
#   batch100  - taskql's insert of 100 rows per statement (createTasks),
# each as 4 clients x 6,000 tasks of pgbench (and, for the last two, the
# WAL of moving their changes into the log, as taskql's reader does), after a CHECKPOINT (so the
# first touch of each page writes a full image, as in production).
#
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres examples/wal_per_create.sh
#
# It makes a database of its own (taskql_wal_<pid>) with `taskql migrate`
# (TASKQL_BIN, default target/release/taskql) and drops it at the end.
set -euo pipefail
base="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
bin="${TASKQL_BIN:-target/release/taskql}"
db="taskql_wal_$$"
url="${base%/*}/$db"
work="$(mktemp -d)"
psql "$base" -qc "CREATE DATABASE $db"
trap 'psql "$base" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)"; rm -rf "$work"' EXIT
"$bin" migrate --database-url "$url" >/dev/null 2>&1

columns="id, user_id, type, status, metadata, attempts, run_at, created_at, updated_at, version, priority, max_attempts, retry_base, fair_rank"
row="gen_random_uuid(), 'user-' || :uid, 'export', 'pending', '{\"source\": \"pgbench\", \"priority\": 1}', 0, now(), now(), now(), 1, 0, 3, 0, 0"
printf '\\set uid random(1, 1000)\nINSERT INTO tasks (%s) VALUES (%s) RETURNING id;\n' "$columns" "$row" >"$work/one.sql"
printf '\\set uid random(1, 1000)\nINSERT INTO tasks (%s) SELECT %s FROM generate_series(1, 100) RETURNING id;\n' \
  "$columns" "$row" >"$work/batch100.sql"

count() { psql "$url" -Atc "SELECT (SELECT count(*) FROM $1)"; }
measure() {  # $1 label, $2 script, $3 transactions per client, $4 tasks per transaction
  psql "$url" -qc "TRUNCATE tasks, task_changes, task_events, task_count_deltas, task_stats_deltas" -c CHECKPOINT
  local before after tasks
  before="$(psql "$url" -Atc 'SELECT pg_current_wal_lsn()')"
  pgbench -n -M prepared -c 4 -j 2 -t "$3" -f "$2" "$url" >/dev/null
  after="$(psql "$url" -Atc 'SELECT pg_current_wal_lsn()')"
  tasks=$((4 * $3 * $4))
  psql "$url" -Atc "SELECT format('%-9s %6s tasks  %5s WAL bytes per task  rows per task: changes %s, count deltas %s, stats deltas %s',
      '$1', $tasks, round(pg_wal_lsn_diff('$after', '$before') / $tasks),
      round((SELECT count(*) FROM task_changes)::numeric / $tasks, 2),
      round((SELECT count(*) FROM task_count_deltas)::numeric / $tasks, 2),
      round((SELECT count(*) FROM task_stats_deltas)::numeric / $tasks, 2))"
  # What taskql's reader then does with the changes: moves them into the log.
  if [ "$1" != plain ]; then
    before="$(psql "$url" -Atc 'SELECT pg_current_wal_lsn()')"
    psql "$url" -qAtc 'SELECT task_events_take_changes()' >/dev/null
    after="$(psql "$url" -Atc 'SELECT pg_current_wal_lsn()')"
    psql "$url" -Atc "SELECT format('%-9s %6s tasks  %5s WAL bytes per task to move the changes into task_events', '', $tasks, round(pg_wal_lsn_diff('$after', '$before') / $tasks))"
  fi
}

psql "$url" -qc "ALTER TABLE tasks DISABLE TRIGGER USER"
measure plain "$work/one.sql" 6000 1
psql "$url" -qc "ALTER TABLE tasks ENABLE TRIGGER USER"
measure one "$work/one.sql" 6000 1
measure batch100 "$work/batch100.sql" 60 100
echo "indexes on tasks: $(psql "$url" -Atc "SELECT count(*) FROM pg_indexes WHERE tablename = 'tasks'"), of which partial: $(psql "$url" -Atc "SELECT count(*) FROM pg_indexes WHERE tablename = 'tasks' AND indexdef LIKE '% WHERE %'")"
