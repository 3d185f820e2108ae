-- 0004_batching.sql: one function holds the rules of a transfer under its key's lock, so that a single request
-- (ledger.post_transfer) and several requests committed together (ledger.post_transfers) follow the very same rules.

CREATE FUNCTION ledger.stored_outcome(p_client text, p_key text, p_sha bytea)
RETURNS TABLE (outcome text, status_code integer, response_body text)
LANGUAGE sql STABLE AS $$
    -- The stored answer of a completed key: 'replayed' with its status and body for the same request (p_sha, the
    -- request fingerprint's SHA-256), 'reused' (422, nothing stored) for another. No row for a key not completed.
    SELECT CASE WHEN k.request_sha256 = p_sha THEN 'replayed' ELSE 'reused' END,
           CASE WHEN k.request_sha256 = p_sha THEN k.status_code ELSE 422 END,
           CASE WHEN k.request_sha256 = p_sha THEN k.response_body END
    FROM ledger.idempotency_keys k
    WHERE k.client_id = p_client AND k.key = p_key
$$;
COMMENT ON FUNCTION ledger.stored_outcome(text, text, bytea) IS 'The replay (or 422 reused) of a completed idempotency key; no row when the key is not completed.';

CREATE FUNCTION ledger.execute_transfer(
    p_client   text,
    p_key      text,
    p_sha      bytea,
    p_from     text,
    p_to       text,
    p_amount   bigint,
    p_currency text,
    p_metadata jsonb
) RETURNS TABLE (outcome text, status_code integer, response_body text)
LANGUAGE plpgsql AS $$
-- The part of a credit, debit or transfer that runs once the key's advisory lock is held: look up a stored outcome,
-- else check, lock, write and store. Shared by ledger.post_transfer (one request) and ledger.post_transfers (many in
-- one transaction), so that both follow the very same rules.
DECLARE
    v_transfer ledger.transfers;
    v_from     text := coalesce(p_from, '@world:' || p_currency);
    v_to       text := coalesce(p_to, '@world:' || p_currency);
    v_account  ledger.accounts;
    v_from_acc ledger.accounts;
    v_to_acc   ledger.accounts;
    v_body     text;
    v_sha      bytea := p_sha;
BEGIN
    -- Under the lock: an execution that held it before us has committed or rolled back, and this new statement sees
    -- its commit (or, in a batch, an earlier item of the same key).
    RETURN QUERY SELECT * FROM ledger.stored_outcome(p_client, p_key, v_sha);
    IF FOUND THEN
        RETURN;
    END IF;

    -- 3. A key whose stored response was purged still names its transfer: answer with it, never a second one.
    SELECT * INTO v_transfer FROM ledger.transfers t WHERE t.client_id = p_client AND t.idempotency_key = p_key;
    IF FOUND THEN
        IF v_transfer.request_sha256 <> v_sha THEN
            RETURN QUERY SELECT 'reused', 422, NULL::text;
        ELSE
            RETURN QUERY SELECT 'replayed', 201, ledger.transfer_json(v_transfer);
        END IF;
        RETURN;
    END IF;

    -- 4. The client's accounts must exist and hold the currency. Both facts never change: no lock needed yet.
    FOR v_account IN
        SELECT * FROM ledger.accounts a
        WHERE a.client_id = p_client AND a.id IN (p_from, p_to)
    LOOP
        IF v_account.currency <> p_currency THEN
            v_body := ledger.problem_json(422, 'currency-mismatch', 'Currency mismatch',
                'Account ' || v_account.id || ' holds ' || v_account.currency || ', not ' || p_currency || '.');
            PERFORM ledger.store_outcome(p_client, p_key, v_sha, 422, v_body, NULL);
            RETURN QUERY SELECT 'executed', 422, v_body;
            RETURN;
        END IF;
        IF v_account.id = p_from THEN v_from_acc := v_account; ELSE v_to_acc := v_account; END IF;
    END LOOP;
    IF (p_from IS NOT NULL AND v_from_acc.id IS NULL) OR (p_to IS NOT NULL AND v_to_acc.id IS NULL) THEN
        v_body := ledger.problem_json(404, 'account-not-found', 'Account not found',
            'Account ' || CASE WHEN p_from IS NOT NULL AND v_from_acc.id IS NULL THEN p_from ELSE p_to END
            || ' does not exist.');
        PERFORM ledger.store_outcome(p_client, p_key, v_sha, 404, v_body, NULL);
        RETURN QUERY SELECT 'executed', 404, v_body;
        RETURN;
    END IF;

    -- 5. `@world` for this currency is created on first use.
    IF p_from IS NULL OR p_to IS NULL THEN
        INSERT INTO ledger.accounts (client_id, id, currency, allow_negative)
        VALUES (p_client, '@world:' || p_currency, p_currency, true)
        ON CONFLICT DO NOTHING;
    END IF;

    -- 6. Lock both accounts in one fixed order (byte order of the id), so that A->B and B->A never deadlock.
    FOR v_account IN
        SELECT * FROM ledger.accounts a
        WHERE a.client_id = p_client AND a.id IN (v_from, v_to)
        ORDER BY a.id COLLATE "C"
        FOR UPDATE
    LOOP
        IF v_account.id = v_from THEN v_from_acc := v_account; ELSE v_to_acc := v_account; END IF;
    END LOOP;

    -- 7. Funds and range, on the locked balances.
    IF NOT v_from_acc.allow_negative AND v_from_acc.balance < p_amount THEN
        v_body := ledger.problem_json(422, 'insufficient-funds', 'Insufficient funds',
            'Account ' || p_from || ' has insufficient funds.');
        PERFORM ledger.store_outcome(p_client, p_key, v_sha, 422, v_body, NULL);
        RETURN QUERY SELECT 'executed', 422, v_body;
        RETURN;
    END IF;
    IF v_to_acc.balance > 9223372036854775807 - p_amount
       OR v_from_acc.balance < -9223372036854775808 + p_amount THEN
        v_body := ledger.problem_json(422, 'balance-overflow', 'Balance overflow',
            'The transfer would take a balance outside the signed 64-bit range.');
        PERFORM ledger.store_outcome(p_client, p_key, v_sha, 422, v_body, NULL);
        RETURN QUERY SELECT 'executed', 422, v_body;
        RETURN;
    END IF;

    -- 8. Write: the transfer, both balances, both entries, the stored response. One transaction, all or none.
    INSERT INTO ledger.transfers
        (client_id, idempotency_key, request_sha256, from_account, to_account, amount, currency, metadata)
    VALUES (p_client, p_key, v_sha, v_from, v_to, p_amount, p_currency, p_metadata)
    RETURNING * INTO v_transfer;

    UPDATE ledger.accounts a SET balance = a.balance - p_amount, version = a.version + 1
    WHERE a.client_id = p_client AND a.id = v_from
    RETURNING * INTO v_from_acc;
    UPDATE ledger.accounts a SET balance = a.balance + p_amount, version = a.version + 1
    WHERE a.client_id = p_client AND a.id = v_to
    RETURNING * INTO v_to_acc;

    INSERT INTO ledger.entries (client_id, account_id, account_version, transfer_id, amount, balance_after, created_at)
    VALUES (p_client, v_from, v_from_acc.version, v_transfer.id, -p_amount, v_from_acc.balance, v_transfer.created_at),
           (p_client, v_to, v_to_acc.version, v_transfer.id, p_amount, v_to_acc.balance, v_transfer.created_at);

    v_body := ledger.transfer_json(v_transfer);
    PERFORM ledger.store_outcome(p_client, p_key, v_sha, 201, v_body, v_transfer.id);
    RETURN QUERY SELECT 'executed', 201, v_body;
END;
$$;
COMMENT ON FUNCTION ledger.execute_transfer(text, text, bytea, text, text, bigint, text, jsonb) IS 'The rules of one credit, debit or transfer, run under its key''s advisory lock; called by post_transfer and post_transfers.';

CREATE OR REPLACE FUNCTION ledger.post_transfer(
    p_client        text,
    p_key           text,
    p_request       text,
    p_from          text,
    p_to            text,
    p_amount        bigint,
    p_currency      text,
    p_metadata      jsonb,
    p_key_wait_ms   integer
) RETURNS TABLE (outcome text, status_code integer, response_body text)
LANGUAGE plpgsql AS $$
-- Executes a credit (p_from NULL), a debit (p_to NULL) or a transfer exactly once per (client, key), in the
-- caller's transaction. Outcomes: 'replayed', 'executed', 'reused' (422, not stored), 'in_progress' (409).
DECLARE
    v_sha bytea := sha256(convert_to(p_request, 'UTF8'));
BEGIN
    -- 1. A completed key is one indexed read: no lock, no write.
    RETURN QUERY SELECT * FROM ledger.stored_outcome(p_client, p_key, v_sha);
    IF FOUND THEN
        RETURN;
    END IF;

    -- 2. Serialise executions of this key across every process sharing the database; wait at most p_key_wait_ms.
    IF NOT pg_try_advisory_xact_lock(hashtextextended(p_client || ' ' || p_key, 0)) THEN
        PERFORM set_config('lock_timeout', p_key_wait_ms::text || 'ms', true);
        BEGIN
            PERFORM pg_advisory_xact_lock(hashtextextended(p_client || ' ' || p_key, 0));
        EXCEPTION WHEN lock_not_available THEN
            RETURN QUERY SELECT 'in_progress', 409, NULL::text;
            RETURN;
        END;
        PERFORM set_config('lock_timeout', '0', true);
    END IF;

    -- 3. The rules, under the lock.
    RETURN QUERY SELECT * FROM ledger.execute_transfer(
        p_client, p_key, v_sha, p_from, p_to, p_amount, p_currency, p_metadata);
END;
$$;

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
