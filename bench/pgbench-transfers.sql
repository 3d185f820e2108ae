-- The ceiling for the `transfers` workload: the very SQL function call `ledger serve` makes for one
-- POST /v1/transfers, with the same arguments, sent by pgbench straight to PostgreSQL.
-- Variables: run (unique per run, -D run=...). Accounts bench-0 .. bench-9999 of client `bench` exist and are funded.
\set a random(0, 9999)
\set b random(0, 9998)
\set b CASE WHEN :b >= :a THEN :b + 1 ELSE :b END
\set k random(1, 1000000000000000)
SELECT outcome, status_code, response_body FROM ledger.post_transfer(
    'bench', 'pgbench-' || :run || '-' || :client_id || '-' || :k,
    'POST /v1/transfers' || chr(10) || '{"amount":1,"currency":"USD","from":"bench-' || :a || '","to":"bench-' || :b || '"}',
    'bench-' || :a, 'bench-' || :b, 1, 'USD', '{}', NULL, 5000);
