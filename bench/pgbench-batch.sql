-- The ceiling for the `batch` workload: the very SQL function call `ledger serve` makes for one
-- POST /v1/transfers/batch of 1,000 random transfers (atomic), sent by pgbench straight to PostgreSQL. The items are
-- built in SQL here, which the service does not pay for: if anything this flatters the ceiling a little.
-- Variables: run (unique per run, -D run=...). Accounts bench-0 .. bench-9999 of client `bench` exist and are funded.
-- pgbench's tps counts batches: transfers/s is 1,000 times it.
\set k random(1, 1000000000000000)
SELECT outcome, status_code, response_body FROM ledger.post_batch(
    'bench', 'pgbench-batch-' || :run || '-' || :client_id || '-' || :k,
    'POST /v1/transfers/batch' || chr(10) || 'pgbench ' || :run || '-' || :client_id || '-' || :k,
    true,
    (SELECT jsonb_agg(jsonb_build_object(
                'from', 'bench-' || x.a, 'to', 'bench-' || CASE WHEN x.b >= x.a THEN x.b + 1 ELSE x.b END,
                'amount', 1, 'currency', 'USD', 'metadata', '{}'::jsonb))
     FROM (SELECT floor(random() * 10000)::integer AS a, floor(random() * 9999)::integer AS b
           FROM generate_series(1, 1000)) AS x),
    5000);
