#!/usr/bin/env bash
# taskStats over HTTP on a seeded database (docs/benchmarks.md, "taskStats at
# a million tasks"): the dashboard's whole query, the same without
# `workers`, and `workers` alone, as a worker and as `user-7`; one first
# request, then the median of 30. With --live-leases, every PROCESSING task
# first gets an hour's lease. Then the service's `workers` statement in the
# database, timed by EXPLAIN ANALYZE (median of 10).
#   DATABASE_URL=postgres://…/taskql_bench_stats examples/bench_stats.sh [--live-leases]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATABASE_URL:?set DATABASE_URL to the seeded database}"
export TASKQL_JWT_SECRET=${TASKQL_JWT_SECRET:-$(openssl rand -hex 32)}
taskql=target/release/taskql
[ -x "$taskql" ] || cargo build --release
if [ "${1:-}" = --live-leases ]; then
    psql "$DATABASE_URL" -qc "UPDATE tasks SET lease_expires_at = now() + interval '1 hour' WHERE status = 'processing'"
fi
psql "$DATABASE_URL" -qc "VACUUM ANALYZE tasks"
echo "live leases: $(psql "$DATABASE_URL" -Atc "SELECT count(*) FROM tasks WHERE status = 'processing' AND lease_expires_at > now()")"
"$taskql" --listen 127.0.0.1:8799 >/dev/null 2>&1 &
server=$!
trap 'kill $server' EXIT
for _ in $(seq 50); do curl -sf -o /dev/null 127.0.0.1:8799/readyz && break; sleep 0.2; done

stats='byStatus { status count } byType { type pending processing completed failed cancelled } throughput(minutes: 60) { at created completed failed } durations { type waitP50Ms waitP95Ms runP50Ms runP95Ms runP99Ms } oldestPendingAgeSeconds'
workers='workers { workerId tasks nextLeaseExpiry }'
declare -A queries=(
    [whole]="query Stats { taskStats { $stats $workers } }"
    [without-workers]="query Stats { taskStats { $stats } }"
    [workers]="{ taskStats { $workers } }"
)
ms() { awk '{printf "%.1f", $1 * 1000}'; }
median() { sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
ask() {
    curl -s -o /dev/null -w '%{time_total}\n' 127.0.0.1:8799/graphql -H "Authorization: Bearer $1" \
        -H 'content-type: application/json' -d "$(jq -cn --arg q "$2" '{query: $q}')"
}
for who in worker user-7; do
    if [ "$who" = worker ]; then
        token=$("$taskql" token --user dash --role service_role)
    else
        token=$("$taskql" token --user "$who")
    fi
    for name in whole without-workers workers; do
        first=$(ask "$token" "${queries[$name]}" | ms)
        median=$(for _ in $(seq 30); do ask "$token" "${queries[$name]}"; sleep 0.2; done | median | ms)
        echo "$who $name: first ${first} ms, median of 30 ${median} ms"
    done
done

sql="SELECT worker_id, COUNT(*) AS tasks, MIN(lease_expires_at) AS next_expiry FROM tasks \
     WHERE status = 'processing' AND lease_expires_at > now() AND worker_id IS NOT NULL"
for owner in "" " AND user_id = 'user-7'"; do
    for _ in $(seq 10); do
        psql "$DATABASE_URL" -Atc "EXPLAIN (ANALYZE, FORMAT JSON) $sql$owner GROUP BY worker_id ORDER BY worker_id" |
            jq '.[0]["Execution Time"]'
    done | median | sed "s/^/workers statement${owner:+ of user-7}, median of 10: /; s/$/ ms/"
done
uptime
