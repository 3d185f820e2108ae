-- 0003_views.sql: views for people inspecting the ledger with psql.

CREATE VIEW ledger.account_balances AS
SELECT a.client_id,
       ledger.public_account_id(a.id) AS account,
       a.id AS account_key,
       a.currency,
       a.balance,
       coalesce(e.entries_sum, 0) AS entries_sum,
       a.version,
       coalesce(e.entries, 0) AS entries,
       a.balance = coalesce(e.entries_sum, 0) AND a.version = coalesce(e.entries, 0) AS consistent
FROM ledger.accounts a
LEFT JOIN (
    SELECT client_id, account_id, sum(amount) AS entries_sum, count(*) AS entries
    FROM ledger.entries
    GROUP BY client_id, account_id
) e ON e.client_id = a.client_id AND e.account_id = a.id;
COMMENT ON VIEW ledger.account_balances IS 'Each account''s stored balance beside the sum of its entries; `consistent` is false where they (or the version and the entry count) differ.';

CREATE VIEW ledger.trial_balance AS
SELECT a.client_id,
       a.currency,
       count(*) AS accounts,
       sum(a.balance) FILTER (WHERE a.id NOT LIKE '@world:%') AS held,
       sum(a.balance) FILTER (WHERE a.id LIKE '@world:%') AS world,
       sum(a.balance) AS total
FROM ledger.accounts a
GROUP BY a.client_id, a.currency;
COMMENT ON VIEW ledger.trial_balance IS 'Per client and currency: what accounts hold, what @world carries (the outside, negative when money came in), and their total, which is always 0.';

CREATE VIEW ledger.idempotency_outcomes AS
SELECT k.client_id,
       k.key,
       k.status_code,
       CASE WHEN k.status_code = 201 THEN 'created' ELSE k.response_body::jsonb ->> 'code' END AS outcome,
       k.transfer_id,
       k.created_at,
       now() - k.created_at AS age
FROM ledger.idempotency_keys k;
COMMENT ON VIEW ledger.idempotency_outcomes IS 'Stored idempotency outcomes: created (with the transfer) or the problem code stored for replay. Order by created_at DESC for the recent ones.';
