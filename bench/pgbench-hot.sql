-- The ceiling for the `hot` workload: every transfer between bench-hot-a and bench-hot-b, either way.
\set flip random(0, 1)
\set k random(1, 1000000000000000)
SELECT outcome, status_code, response_body FROM ledger.post_transfer(
    'bench', 'pgbench-hot-' || :run || '-' || :client_id || '-' || :k,
    'POST /v1/transfers' || chr(10) || '{"amount":1,"currency":"USD","from":"x","to":"y"}',
    CASE WHEN :flip = 1 THEN 'bench-hot-a' ELSE 'bench-hot-b' END,
    CASE WHEN :flip = 1 THEN 'bench-hot-b' ELSE 'bench-hot-a' END, 1, 'USD', '{}', NULL, 5000);
