-- 0002_retention.sql: purging stored responses after their retention time.
--
-- Purging never lets a key that made a transfer make a second one: ledger.transfers keeps the key under a unique
-- constraint, and ledger.post_transfer answers a late retry of such a key with the original transfer (same status,
-- same body). A purged stored failure (404 account-not-found, 422 insufficient-funds, currency-mismatch,
-- balance-overflow) moved no money: after the purge, its key executes afresh.

CREATE FUNCTION ledger.purge_idempotency_keys(p_older_than interval, p_batch_size integer)
RETURNS integer
LANGUAGE plpgsql AS $$
-- Deletes at most p_batch_size stored responses older than p_older_than, oldest first, and returns how many.
-- SKIP LOCKED: several replicas purging at once share the work instead of waiting on each other.
DECLARE
    v_deleted integer;
BEGIN
    IF p_batch_size < 1 OR p_batch_size > 100000 THEN
        RAISE EXCEPTION 'batch size % outside 1..100000', p_batch_size USING ERRCODE = 'invalid_parameter_value';
    END IF;
    WITH old AS (
        SELECT k.client_id, k.key
        FROM ledger.idempotency_keys k
        WHERE k.created_at < now() - p_older_than
        ORDER BY k.created_at
        LIMIT p_batch_size
        FOR UPDATE SKIP LOCKED
    )
    DELETE FROM ledger.idempotency_keys k
    USING old
    WHERE k.client_id = old.client_id AND k.key = old.key;
    GET DIAGNOSTICS v_deleted = ROW_COUNT;
    RETURN v_deleted;
END;
$$;
COMMENT ON FUNCTION ledger.purge_idempotency_keys(interval, integer) IS 'Deletes one bounded batch of stored responses older than the retention time; `ledger purge` and the service''s background purge call it until it returns less than a batch.';
