-- 0005_batch.sql: POST /v1/transfers/batch. Up to 1,000 transfers under one idempotency key, all or nothing
-- ("atomic": true) or each on its own ("atomic": false), in one transaction and a handful of set-based statements.

-- A batch's transfers all carry the batch's idempotency key; batch_item (1-based) tells them apart, and is 0 for a
-- transfer made by POST /v1/credits, /v1/debits or /v1/transfers. The unique key still allows one transfer per
-- (client, key) outside batches and one per item inside, and survives the purge of stored responses.
ALTER TABLE ledger.transfers
    ADD COLUMN batch_item integer NOT NULL DEFAULT 0
        CONSTRAINT transfers_batch_item_range CHECK (batch_item BETWEEN 0 AND 1000);
ALTER TABLE ledger.transfers DROP CONSTRAINT transfers_one_per_key;
ALTER TABLE ledger.transfers
    ADD CONSTRAINT transfers_one_per_key_item UNIQUE (client_id, idempotency_key, batch_item);
COMMENT ON COLUMN ledger.transfers.batch_item IS 'Position (1-based) of the transfer in the batch of POST /v1/transfers/batch that made it; 0 for a single credit, debit or transfer.';

-- A batch's stored answer (201) names no single transfer: its transfers are found by the key. A transfer_id still
-- goes only with a 201.
ALTER TABLE ledger.idempotency_keys DROP CONSTRAINT idempotency_keys_transfer_iff_created;
ALTER TABLE ledger.idempotency_keys
    ADD CONSTRAINT idempotency_keys_transfer_only_if_created CHECK (transfer_id IS NULL OR status_code = 201);
COMMENT ON COLUMN ledger.idempotency_keys.transfer_id IS 'The transfer made, for a 201 of POST /v1/credits, /v1/debits or /v1/transfers; NULL for a batch (its transfers carry the key).';

CREATE FUNCTION ledger.lock_key(p_client text, p_key text, p_wait_ms integer) RETURNS boolean
LANGUAGE plpgsql AS $$
-- Takes the transaction-scoped advisory lock of (client, idempotency key), waiting at most p_wait_ms when another
-- execution holds it; false when the wait ran out. The same lock as ledger.post_transfer takes, so that a batch and a
-- single request with one key serialise too.
BEGIN
    IF pg_try_advisory_xact_lock(hashtextextended(p_client || ' ' || p_key, 0)) THEN
        RETURN true;
    END IF;
    PERFORM set_config('lock_timeout', p_wait_ms::text || 'ms', true);
    BEGIN
        PERFORM pg_advisory_xact_lock(hashtextextended(p_client || ' ' || p_key, 0));
    EXCEPTION WHEN lock_not_available THEN
        RETURN false;
    END;
    PERFORM set_config('lock_timeout', '0', true);
    RETURN true;
END;
$$;
COMMENT ON FUNCTION ledger.lock_key(text, text, integer) IS 'The advisory lock of one (client, idempotency key), waited for at most p_wait_ms.';

CREATE FUNCTION ledger.batch_item_problem(p_code text, p_account text, p_held text, p_currency text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
-- The problem of one failed item: the same status, title and detail as a single transfer failing the same way.
RETURN CASE p_code
    WHEN 'account-not-found' THEN ledger.problem_json(404, p_code, 'Account not found',
        'Account ' || p_account || ' does not exist.')
    WHEN 'currency-mismatch' THEN ledger.problem_json(422, p_code, 'Currency mismatch',
        'Account ' || p_account || ' holds ' || p_held || ', not ' || p_currency || '.')
    WHEN 'insufficient-funds' THEN ledger.problem_json(422, p_code, 'Insufficient funds',
        'Account ' || p_account || ' has insufficient funds.')
    WHEN 'balance-overflow' THEN ledger.problem_json(422, p_code, 'Balance overflow',
        'The transfer would take a balance outside the signed 64-bit range.')
END;
COMMENT ON FUNCTION ledger.batch_item_problem(text, text, text, text) IS 'Problem JSON of a failed batch item, worded as for a single transfer.';

CREATE FUNCTION ledger.post_batch(
    p_client      text,
    p_key         text,
    p_request     text,
    p_atomic      boolean,
    p_items       jsonb,
    p_key_wait_ms integer
) RETURNS TABLE (outcome text, status_code integer, response_body text)
LANGUAGE plpgsql AS $$
-- Executes a batch of 1 to 1,000 transfers exactly once per (client, key), in the caller's transaction. p_items is a
-- JSON array of {"from","to","amount","currency","metadata"}, validated by the service. Outcomes as for
-- ledger.post_transfer: 'replayed', 'executed', 'reused' (422, not stored), 'in_progress' (409).
--
-- Item i runs as if alone, after items 1..i-1: it fails for an unknown account, another currency, insufficient
-- funds or a balance overflow, with the problem a single transfer would get. Atomic: the first failure fails the
-- batch (its status, its problem, detail prefixed "transfers[i-1]: ") and nothing is written. Not atomic: the others
-- still run; the answer is 201 with one result per item.
--
-- Set-based: every account of the batch is read and locked in one sorted pass (so batches and single transfers never
-- deadlock), the balances are worked out in memory item by item, then transfers, entries and balances are written by
-- one statement each.
DECLARE
    v_sha       bytea := sha256(convert_to(p_request, 'UTF8'));
    v_count     integer := jsonb_array_length(p_items);
    v_from      text[];
    v_to        text[];
    v_amount    bigint[];
    v_currency  text[];
    v_metadata  jsonb[];
    v_done      boolean[];     -- the item's transfer exists (a retry after the stored answer was purged)
    v_problem   text[];        -- the item's failure, NULL when it runs
    v_status    integer[];
    v_from_at   integer[];     -- the item's accounts, as positions in v_ids
    v_to_at     integer[];
    v_ids       text[];        -- the batch's accounts, locked, in lock order
    v_balance   bigint[];
    v_version   bigint[];
    v_allow     boolean[];
    v_held      text[];        -- their currencies
    v_from_ver  bigint[];      -- per item: the versions and balances its two entries produce
    v_to_ver    bigint[];
    v_from_bal  bigint[];
    v_to_bal    bigint[];
    v_reused    boolean;
    v_made      integer[];     -- batch items of this key made before
    v_failed    integer;
    v_f         integer;
    v_t         integer;
    v_body      text;
BEGIN
    IF v_count < 1 OR v_count > 1000 THEN
        RAISE EXCEPTION 'a batch holds 1 to 1000 items, not %', v_count USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- 1. A completed key is one indexed read: no lock, no write.
    RETURN QUERY SELECT * FROM ledger.stored_outcome(p_client, p_key, v_sha);
    IF FOUND THEN
        RETURN;
    END IF;

    -- 2. Serialise executions of this key, then look again: the holder we waited for may have completed it.
    IF NOT ledger.lock_key(p_client, p_key, p_key_wait_ms) THEN
        RETURN QUERY SELECT 'in_progress', 409, NULL::text;
        RETURN;
    END IF;
    RETURN QUERY SELECT * FROM ledger.stored_outcome(p_client, p_key, v_sha);
    IF FOUND THEN
        RETURN;
    END IF;
    -- A key whose stored answer was purged still names its transfers: another request under it is reused, and
    -- the items this very request made are answered with their transfers, never made twice.
    SELECT bool_or(t.request_sha256 <> v_sha), array_agg(t.batch_item) FILTER (WHERE t.request_sha256 = v_sha)
    INTO v_reused, v_made
    FROM ledger.transfers t
    WHERE t.client_id = p_client AND t.idempotency_key = p_key;
    IF v_reused THEN
        RETURN QUERY SELECT 'reused', 422, NULL::text;
        RETURN;
    END IF;

    -- 3. The items.
    SELECT array_agg(x.value ->> 'from' ORDER BY x.n), array_agg(x.value ->> 'to' ORDER BY x.n),
           array_agg((x.value ->> 'amount')::bigint ORDER BY x.n), array_agg(x.value ->> 'currency' ORDER BY x.n),
           array_agg(coalesce(x.value -> 'metadata', '{}') ORDER BY x.n),
           array_agg(x.n = ANY (coalesce(v_made, '{}')) ORDER BY x.n)
    INTO v_from, v_to, v_amount, v_currency, v_metadata, v_done
    FROM jsonb_array_elements(p_items) WITH ORDINALITY AS x(value, n);
    v_problem := array_fill(NULL::text, ARRAY[v_count]);
    v_status := array_fill(201, ARRAY[v_count]);

    -- 4. Lock every account of the batch in one pass, in one fixed order (byte order of the id), and read them.
    SELECT array_agg(a.id ORDER BY a.id COLLATE "C"), array_agg(a.balance ORDER BY a.id COLLATE "C"),
           array_agg(a.version ORDER BY a.id COLLATE "C"), array_agg(a.allow_negative ORDER BY a.id COLLATE "C"),
           array_agg(a.currency ORDER BY a.id COLLATE "C")
    INTO v_ids, v_balance, v_version, v_allow, v_held
    FROM (
        SELECT a.id, a.balance, a.version, a.allow_negative, a.currency
        FROM ledger.accounts a
        WHERE a.client_id = p_client AND a.id IN (SELECT unnest(v_from) UNION SELECT unnest(v_to))
        ORDER BY a.id COLLATE "C"
        FOR UPDATE
    ) a;

    -- 5. What fails whatever the balances: an unknown account, another currency (checked first, as for one transfer;
    -- when both accounts hold another currency, the batch names `from`).
    SELECT array_agg(f.at ORDER BY i.n), array_agg(t.at ORDER BY i.n),
           array_agg(CASE
               WHEN f.currency <> i.currency THEN ledger.batch_item_problem('currency-mismatch', i.from_account, f.currency, i.currency)
               WHEN t.currency <> i.currency THEN ledger.batch_item_problem('currency-mismatch', i.to_account, t.currency, i.currency)
               WHEN f.id IS NULL THEN ledger.batch_item_problem('account-not-found', i.from_account, NULL, NULL)
               WHEN t.id IS NULL THEN ledger.batch_item_problem('account-not-found', i.to_account, NULL, NULL)
           END ORDER BY i.n)
    INTO v_from_at, v_to_at, v_problem
    FROM unnest(v_from, v_to, v_currency) WITH ORDINALITY AS i(from_account, to_account, currency, n)
    LEFT JOIN unnest(v_ids, v_held) WITH ORDINALITY AS f(id, currency, at) ON f.id = i.from_account
    LEFT JOIN unnest(v_ids, v_held) WITH ORDINALITY AS t(id, currency, at) ON t.id = i.to_account;

    -- 6. The balances, item after item, in memory: funds and range as for one transfer.
    v_from_ver := array_fill(NULL::bigint, ARRAY[v_count]);
    v_to_ver := v_from_ver;
    v_from_bal := v_from_ver;
    v_to_bal := v_from_ver;
    FOR n IN 1 .. v_count LOOP
        CONTINUE WHEN v_done[n] OR v_problem[n] IS NOT NULL;
        v_f := v_from_at[n];
        v_t := v_to_at[n];
        IF NOT v_allow[v_f] AND v_balance[v_f] < v_amount[n] THEN
            v_problem[n] := ledger.batch_item_problem('insufficient-funds', v_from[n], NULL, NULL);
        ELSIF v_balance[v_t] > 9223372036854775807 - v_amount[n]
              OR v_balance[v_f] < -9223372036854775808 + v_amount[n] THEN
            v_problem[n] := ledger.batch_item_problem('balance-overflow', NULL, NULL, NULL);
        ELSE
            v_balance[v_f] := v_balance[v_f] - v_amount[n];
            v_version[v_f] := v_version[v_f] + 1;
            v_balance[v_t] := v_balance[v_t] + v_amount[n];
            v_version[v_t] := v_version[v_t] + 1;
            v_from_bal[n] := v_balance[v_f];
            v_from_ver[n] := v_version[v_f];
            v_to_bal[n] := v_balance[v_t];
            v_to_ver[n] := v_version[v_t];
        END IF;
        IF p_atomic AND v_problem[n] IS NOT NULL THEN
            EXIT;
        END IF;
    END LOOP;

    -- 7. Atomic and an item failed: the batch fails as that item did, and nothing but the answer is written.
    IF p_atomic THEN
        SELECT min(x.n) INTO v_failed FROM unnest(v_problem) WITH ORDINALITY AS x(problem, n) WHERE x.problem IS NOT NULL;
        IF v_failed IS NOT NULL THEN
            SELECT ledger.problem_json((p.j ->> 'status')::integer, p.j ->> 'code', p.j ->> 'title',
                                       'transfers[' || (v_failed - 1) || ']: ' || (p.j ->> 'detail'))
            INTO v_body
            FROM (SELECT v_problem[v_failed]::jsonb AS j) p;
            PERFORM ledger.store_outcome(p_client, p_key, v_sha, ((v_body::jsonb) ->> 'status')::integer, v_body, NULL);
            RETURN QUERY SELECT 'executed', ((v_body::jsonb) ->> 'status')::integer, v_body;
            RETURN;
        END IF;
    END IF;

    -- 8. Write: the transfers, their entries, the balances; one statement each.
    WITH made AS (
        INSERT INTO ledger.transfers
            (client_id, idempotency_key, request_sha256, from_account, to_account, amount, currency, metadata, batch_item)
        SELECT p_client, p_key, v_sha, i.from_account, i.to_account, i.amount, i.currency, i.metadata, i.n
        FROM unnest(v_from, v_to, v_amount, v_currency, v_metadata, v_from_ver)
             WITH ORDINALITY AS i(from_account, to_account, amount, currency, metadata, from_version, n)
        WHERE i.from_version IS NOT NULL
        ORDER BY i.n
        RETURNING id, batch_item, from_account, to_account, amount, created_at
    )
    INSERT INTO ledger.entries (client_id, account_id, account_version, transfer_id, amount, balance_after, created_at)
    SELECT p_client, m.from_account, v_from_ver[m.batch_item], m.id, -m.amount, v_from_bal[m.batch_item], m.created_at
    FROM made m
    UNION ALL
    SELECT p_client, m.to_account, v_to_ver[m.batch_item], m.id, m.amount, v_to_bal[m.batch_item], m.created_at
    FROM made m;

    UPDATE ledger.accounts a SET balance = u.balance, version = u.version
    FROM unnest(v_ids, v_balance, v_version) AS u(id, balance, version)
    WHERE a.client_id = p_client AND a.id = u.id AND a.version <> u.version;

    -- 9. The answer: one result per item, in order; stored for replay unless every item was made before.
    SELECT '{"atomic":' || p_atomic::text || ',"results":[' || string_agg(
               CASE WHEN t.id IS NOT NULL THEN '{"status":201,"transfer":' || ledger.transfer_json(t) || '}'
                    ELSE '{"status":' || ((x.problem::jsonb) ->> 'status') || ',"problem":' || x.problem || '}'
               END, ',' ORDER BY x.n) || ']}'
    INTO v_body
    FROM unnest(v_problem) WITH ORDINALITY AS x(problem, n)
    LEFT JOIN ledger.transfers t ON t.client_id = p_client AND t.idempotency_key = p_key AND t.batch_item = x.n;

    IF v_done[1] AND NOT (false = ANY (v_done)) THEN
        RETURN QUERY SELECT 'replayed', 201, v_body;
        RETURN;
    END IF;
    PERFORM ledger.store_outcome(p_client, p_key, v_sha, 201, v_body, NULL);
    RETURN QUERY SELECT 'executed', 201, v_body;
END;
$$;
COMMENT ON FUNCTION ledger.post_batch(text, text, text, boolean, jsonb, integer) IS 'POST /v1/transfers/batch: up to 1,000 transfers exactly once per (client, idempotency key), atomic or item by item, and its stored outcome.';
