-- One million tasks for measuring taskStats (docs/benchmarks.md): :users
-- users x :per_user tasks, three types, one task created per second going
-- back in time, statuses spread evenly. Terminal tasks have started and
-- finished a few seconds after creation; processing ones hold a lease of one
-- of 8 workers. The counters are rebuilt by the triggers (TRUNCATE resets
-- them, the INSERT appends deltas), then folded. :apart is the seconds
-- between two creates (1 unless set; 0.0036 puts a million in the last hour).
--   psql -v users=1000 -v per_user=1000 [-v apart=0.0036] -f examples/seed_stats.sql DATABASE
\if :{?apart}
\else
\set apart 1
\endif
TRUNCATE tasks;
INSERT INTO tasks (id, user_id, type, status, metadata, progress, attempts, version,
                   worker_id, lease_expires_at, created_at, updated_at, run_at, started_at, completed_at)
SELECT gen_random_uuid(),
       'user-' || (1 + g % :users),
       (ARRAY['export', 'import', 'report'])[1 + g % 3],
       s.status,
       jsonb_build_object('seed', g),
       CASE s.status WHEN 'processing' THEN g % 100 WHEN 'completed' THEN 100 END,
       CASE WHEN s.status = 'pending' THEN 0 ELSE 1 END, 1,
       CASE WHEN s.status = 'processing' THEN 'worker-' || (g % 8) END,
       CASE WHEN s.status = 'processing' THEN now() + interval '5 minutes' END,
       now() - make_interval(secs => g * :apart),
       now() - make_interval(secs => g * :apart),
       now() - make_interval(secs => g * :apart),
       CASE WHEN s.status IN ('processing', 'completed', 'failed')
            THEN now() - make_interval(secs => g * :apart) + make_interval(secs => g % 7) END,
       CASE WHEN s.status IN ('completed', 'failed', 'cancelled')
            THEN now() - make_interval(secs => g * :apart) + make_interval(secs => 7 + g % 30) END
FROM generate_series(0, :users * :per_user - 1) AS g
CROSS JOIN LATERAL (SELECT (ARRAY['pending', 'processing', 'completed', 'failed', 'cancelled'])[1 + (g / :users) % 5] AS status) AS s;
VACUUM ANALYZE tasks;
