-- 0004_batching.sql: group commit. Several independent requests of one client in one transaction, each under the
-- very rules of one request (ledger.execute_transfer in 0001_init.sql).

CREATE FUNCTION ledger.post_transfers(p_client text, p_items jsonb)
RETURNS TABLE (item integer, outcome text, status_code integer, response_body text)
LANGUAGE plpgsql AS $$
-- Executes several independent requests of one client in ONE transaction, so that one commit (one WAL flush) serves
-- them all. p_items is a JSON array of {"key","request","from","to","amount","currency","metadata"}; the answer has
-- one row per item (1-based, in order) with the same outcomes as ledger.post_transfer, plus 'busy': the item's key
-- is held by another execution, nothing was done for it, and the caller runs it on its own (where it may wait).
--
-- Deadlock-free by construction: key locks are only tried, never waited for; then every account of the batch is
-- locked in one sorted pass; then the items run in order under those locks. Two items with one key: the second
-- replays the first (it sees the first's stored outcome inside this transaction).
DECLARE
    v_count   integer := jsonb_array_length(p_items);
    v_busy    text[] := '{}';
    v_key     record;
    v_row     record;
    v_item    record;
    v_pending jsonb;
BEGIN
    IF v_count < 1 OR v_count > 1000 THEN
        RAISE EXCEPTION 'a batch holds 1 to 1000 items, not %', v_count USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Keys completed before are answered by one indexed read each, as ledger.post_transfer does: they take no lock,
    -- and the accounts of the batch are locked only for the items that will run.
    SELECT coalesce(jsonb_agg(x.value ORDER BY x.ordinality), '[]')
    INTO v_pending
    FROM jsonb_array_elements(p_items) WITH ORDINALITY AS x(value, ordinality)
    WHERE NOT EXISTS (
        SELECT 1 FROM ledger.idempotency_keys k WHERE k.client_id = p_client AND k.key = x.value ->> 'key');

    FOR v_key IN
        SELECT DISTINCT x.key, hashtextextended(p_client || ' ' || x.key, 0) AS lock_key
        FROM jsonb_to_recordset(v_pending) AS x(key text)
        ORDER BY 2
    LOOP
        IF NOT pg_try_advisory_xact_lock(v_key.lock_key) THEN
            v_busy := v_busy || v_key.key;
        END IF;
    END LOOP;

    INSERT INTO ledger.accounts (client_id, id, currency, allow_negative)
    SELECT DISTINCT p_client, '@world:' || x.currency, x.currency, true
    FROM jsonb_to_recordset(v_pending) AS x("from" text, "to" text, currency text)
    WHERE x."from" IS NULL OR x."to" IS NULL
    ON CONFLICT DO NOTHING;

    FOR v_row IN
        SELECT a.id FROM ledger.accounts a
        WHERE a.client_id = p_client AND a.id IN (
            SELECT coalesce(x."from", '@world:' || x.currency) FROM jsonb_to_recordset(v_pending) AS x("from" text, currency text)
            UNION
            SELECT coalesce(x."to", '@world:' || x.currency) FROM jsonb_to_recordset(v_pending) AS x("to" text, currency text))
        ORDER BY a.id COLLATE "C"
        FOR UPDATE
    LOOP
    END LOOP;

    FOR v_item IN
        SELECT x.ordinality::integer AS n, x.value ->> 'key' AS key, x.value ->> 'request' AS request,
               x.value ->> 'from' AS from_account, x.value ->> 'to' AS to_account, (x.value ->> 'amount')::bigint AS amount,
               x.value ->> 'currency' AS currency, coalesce(x.value -> 'metadata', '{}') AS metadata
        FROM jsonb_array_elements(p_items) WITH ORDINALITY AS x(value, ordinality)
        ORDER BY x.ordinality
    LOOP
        IF v_item.key = ANY (v_busy) THEN
            RETURN QUERY SELECT v_item.n, 'busy', 0, NULL::text;
            CONTINUE;
        END IF;
        RETURN QUERY SELECT v_item.n, e.outcome, e.status_code, e.response_body
        FROM ledger.execute_transfer(
            p_client, v_item.key, sha256(convert_to(v_item.request, 'UTF8')), v_item.from_account, v_item.to_account,
            v_item.amount, v_item.currency, v_item.metadata) AS e;
    END LOOP;
END;
$$;
COMMENT ON FUNCTION ledger.post_transfers(text, jsonb) IS 'Several independent credits, debits or transfers of one client in one transaction (one commit); the service batches concurrent requests with it when --batch-max > 1.';
