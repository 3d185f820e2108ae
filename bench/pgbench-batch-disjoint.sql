-- The ceiling for the `batch-disjoint` workload: as bench/pgbench-batch.sql (the very SQL function call `ledger serve`
-- makes for one POST /v1/transfers/batch of 1,000 random transfers, atomic), but each client draws its pairs from a
-- slice of the accounts of its own, as `ledger bench --workload batch-disjoint` does per connection: no two clients'
-- batches share an account, so none waits for another's row locks.
-- Variables: run (unique per run), clients (the -c given to pgbench), both with -D. Accounts bench-0 .. bench-9999 of
-- client `bench` exist and are funded. pgbench's tps counts batches: transfers/s is 1,000 times it.
\set k random(1, 1000000000000000)
\set first :client_id * (10000 / :clients)
\set size 10000 / :clients
SELECT outcome, status_code, response_body FROM ledger.post_batch(
    'bench', 'pgbench-batch-disjoint-' || :run || '-' || :client_id || '-' || :k,
    'POST /v1/transfers/batch' || chr(10) || 'pgbench ' || :run || '-' || :client_id || '-' || :k,
    true,
    (SELECT jsonb_agg(jsonb_build_object(
                'from', 'bench-' || (:first + x.a), 'to', 'bench-' || (:first + CASE WHEN x.b >= x.a THEN x.b + 1 ELSE x.b END),
                'amount', 1, 'currency', 'USD', 'metadata', '{}'::jsonb))
     FROM (SELECT floor(random() * :size)::integer AS a, floor(random() * (:size - 1))::integer AS b
           FROM generate_series(1, 1000)) AS x),
    5000);
