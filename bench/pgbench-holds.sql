-- The ceiling for the `holds` workload: the very SQL function calls `ledger serve` makes for one POST /v1/holds and
-- the POST /v1/holds/{id}/capture that follows it, with the same arguments, sent by pgbench straight to PostgreSQL.
-- One pgbench transaction is the pair (two database transactions, as over HTTP).
-- Variables: run (unique per run, -D run=...). Accounts bench-0 .. bench-9999 of client `bench` exist and are funded.
\set a random(0, 9999)
\set b random(0, 9998)
\set b CASE WHEN :b >= :a THEN :b + 1 ELSE :b END
\set k random(1, 1000000000000000)
SELECT response_body::jsonb ->> 'id' AS hold_id FROM ledger.post_hold(
    'bench', 'pgbench-' || :run || '-' || :client_id || '-' || :k || '-hold',
    'POST /v1/holds' || chr(10) || '{"amount":1,"currency":"USD","from":"bench-' || :a || '","to":"bench-' || :b || '"}',
    'bench-' || :a, 'bench-' || :b, 1, 'USD', '{}', 604800, NULL, 5000) \gset
SELECT outcome, status_code, response_body FROM ledger.post_capture(
    'bench', 'pgbench-' || :run || '-' || :client_id || '-' || :k || '-capture',
    'POST /v1/holds/' || :hold_id || '/capture' || chr(10) || '{}', (:hold_id)::text, NULL, NULL, 5000);
