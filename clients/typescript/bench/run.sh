#!/usr/bin/env bash
# Runs bench/watch_latency.mjs against a release taskql on a fresh SQLite
# database (or on PostgreSQL: DATABASE_URL=postgres://…/db bench/run.sh),
# from clients/typescript. Env for the bench passes through (TASKS,
# CONCURRENCY, TRANSPORT).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
cargo build --release --quiet
bin="$root/target/release/taskql"
dir="$(mktemp -d)"
secret="$(openssl rand -hex 32)"
export TASKQL_JWT_SECRET="$secret"
export DATABASE_URL="${DATABASE_URL:-sqlite://$dir/taskql.db?mode=rwc}"
export TASKQL_LISTEN="${TASKQL_LISTEN:-127.0.0.1:8097}"
"$bin" serve > "$dir/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do
    grep -q "taskql is serving" "$dir/server.log" && break
    sleep 0.1
done
grep -q "taskql is serving" "$dir/server.log" || { cat "$dir/server.log"; exit 1; }
export TASKQL_URL="http://$TASKQL_LISTEN"
export TASKQL_USER_TOKEN="$("$bin" token --user bench)"
export TASKQL_WORKER_TOKEN="$("$bin" token --user bench-worker --role service_role)"
cd "$here"
[ -f dist/index.js ] || { npm ci --no-audit --no-fund && npm run build; }
node bench/watch_latency.mjs
