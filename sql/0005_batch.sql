-- 0005_batch.sql: set-based execution of many transfers in one transaction, for POST /v1/transfers/batch (up to 1,000
-- transfers under one idempotency key, all or nothing or each on its own) and for group commit (concurrent requests
-- of one client, each under its own key: ledger.post_transfers of 0004, replaced here). Both run the same function,
-- ledger.execute_movements: every account locked in one sorted pass, balances worked out in memory item by item,
-- then one statement each for the transfers with their entries, the balances and the stored answers.

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
COMMENT ON FUNCTION ledger.batch_item_problem(text, text, text, text) IS 'Problem JSON of a failed item, worded as for a single transfer.';

CREATE FUNCTION ledger.execute_movements(
    p_client   text,
    p_atomic   boolean,
    p_keys     text[],
    p_shas     bytea[],
    p_items    integer[],
    p_from     text[],
    p_to       text[],
    p_amount   bigint[],
    p_currency text[],
    p_metadata jsonb[]
) RETURNS TABLE (n integer, status_code integer, transfer_id bigint, problem text)
LANGUAGE plpgsql
-- Generic plans: these statements run with arrays of 1 to 1,000 elements, and planning them afresh for each call cost
-- a fifth of a batch of 8 (measured); the generic plans are as good for 1,000.
SET plan_cache_mode = force_generic_plan
AS $$
-- Runs credits (p_from[i] NULL: from `@world`), debits (p_to[i] NULL: to `@world`) and transfers of one client, in
-- order, each as if alone after the ones before it: it fails with the problem one request would get for an unknown
-- account, another currency, insufficient funds or a balance overflow, and writes nothing then. Each made transfer
-- carries (p_keys[i], p_shas[i], p_items[i]); the caller holds the keys' advisory locks and has checked that none of
-- them completed. Answers one row per item: 201 and the transfer's id, or the failure's status and problem JSON.
-- Atomic: at the first failure nothing at all is written, and the answer is that one item's row.
--
-- Deadlock-free: every account is locked in one pass in one fixed order (byte order of the id), as single transfers
-- lock their two.
DECLARE
    v_count     integer := coalesce(array_length(p_keys, 1), 0);
    v_src       text[];        -- per item: the debited and credited account, `@world:<CUR>` resolved
    v_dst       text[];
    v_from_at   integer[];     -- per item: its accounts, as positions in v_ids
    v_to_at     integer[];
    v_problem   text[];        -- per item: its failure, NULL while it runs
    v_ids       text[];        -- the accounts, locked, in lock order; then their balances as items run
    v_balance   bigint[];
    v_version   bigint[];
    v_allow     boolean[];
    v_held      text[];
    v_from_ver  bigint[];      -- per item: the versions and balances its two entries produce
    v_to_ver    bigint[];
    v_from_bal  bigint[];
    v_to_bal    bigint[];
    v_made_n    integer[];     -- the items made, and their transfers' ids
    v_made_id   bigint[];
    v_f         integer;
    v_t         integer;
BEGIN
    IF v_count = 0 THEN
        RETURN;
    END IF;
    SELECT array_agg(coalesce(x.f, '@world:' || x.c) ORDER BY x.i), array_agg(coalesce(x.t, '@world:' || x.c) ORDER BY x.i)
    INTO v_src, v_dst
    FROM unnest(p_from, p_to, p_currency) WITH ORDINALITY AS x(f, t, c, i);

    -- 1. `@world` of each currency credited or debited is created on first use.
    INSERT INTO ledger.accounts (client_id, id, currency, allow_negative)
    SELECT DISTINCT p_client, '@world:' || x.c, x.c, true
    FROM unnest(p_from, p_to, p_currency) AS x(f, t, c)
    WHERE x.f IS NULL OR x.t IS NULL
    ON CONFLICT DO NOTHING;

    -- 2. Lock every account in one pass, in one fixed order, and read them.
    SELECT array_agg(a.id ORDER BY a.id COLLATE "C"), array_agg(a.balance ORDER BY a.id COLLATE "C"),
           array_agg(a.version ORDER BY a.id COLLATE "C"), array_agg(a.allow_negative ORDER BY a.id COLLATE "C"),
           array_agg(a.currency ORDER BY a.id COLLATE "C")
    INTO v_ids, v_balance, v_version, v_allow, v_held
    FROM (
        SELECT a.id, a.balance, a.version, a.allow_negative, a.currency
        FROM ledger.accounts a
        WHERE a.client_id = p_client AND a.id IN (SELECT unnest(v_src) UNION SELECT unnest(v_dst))
        ORDER BY a.id COLLATE "C"
        FOR UPDATE
    ) a;

    -- 3. What fails whatever the balances: another currency (checked first, as for one request; `from` first when
    -- both differ), then an unknown account (`from` first).
    SELECT array_agg(f.at ORDER BY i.n), array_agg(t.at ORDER BY i.n),
           array_agg(CASE
               WHEN f.currency <> i.currency THEN ledger.batch_item_problem('currency-mismatch', i.src, f.currency, i.currency)
               WHEN t.currency <> i.currency THEN ledger.batch_item_problem('currency-mismatch', i.dst, t.currency, i.currency)
               WHEN f.id IS NULL THEN ledger.batch_item_problem('account-not-found', i.src, NULL, NULL)
               WHEN t.id IS NULL THEN ledger.batch_item_problem('account-not-found', i.dst, NULL, NULL)
           END ORDER BY i.n)
    INTO v_from_at, v_to_at, v_problem
    FROM unnest(v_src, v_dst, p_currency) WITH ORDINALITY AS i(src, dst, currency, n)
    LEFT JOIN unnest(v_ids, v_held) WITH ORDINALITY AS f(id, currency, at) ON f.id = i.src
    LEFT JOIN unnest(v_ids, v_held) WITH ORDINALITY AS t(id, currency, at) ON t.id = i.dst;

    -- 4. The balances, item after item, in memory: funds and range as for one request.
    v_from_ver := array_fill(NULL::bigint, ARRAY[v_count]);
    v_to_ver := v_from_ver;
    v_from_bal := v_from_ver;
    v_to_bal := v_from_ver;
    FOR i IN 1 .. v_count LOOP
        IF v_problem[i] IS NULL THEN
            v_f := v_from_at[i];
            v_t := v_to_at[i];
            IF NOT v_allow[v_f] AND v_balance[v_f] < p_amount[i] THEN
                v_problem[i] := ledger.batch_item_problem('insufficient-funds', v_src[i], NULL, NULL);
            ELSIF v_balance[v_t] > 9223372036854775807 - p_amount[i]
                  OR v_balance[v_f] < -9223372036854775808 + p_amount[i] THEN
                v_problem[i] := ledger.batch_item_problem('balance-overflow', NULL, NULL, NULL);
            ELSE
                v_balance[v_f] := v_balance[v_f] - p_amount[i];
                v_version[v_f] := v_version[v_f] + 1;
                v_balance[v_t] := v_balance[v_t] + p_amount[i];
                v_version[v_t] := v_version[v_t] + 1;
                v_from_bal[i] := v_balance[v_f];
                v_from_ver[i] := v_version[v_f];
                v_to_bal[i] := v_balance[v_t];
                v_to_ver[i] := v_version[v_t];
            END IF;
        END IF;
        IF p_atomic AND v_problem[i] IS NOT NULL THEN
            RETURN QUERY SELECT i, ((v_problem[i]::jsonb) ->> 'status')::integer, NULL::bigint, v_problem[i];
            RETURN;
        END IF;
    END LOOP;

    -- 5. Write: the transfers and their entries in one statement, the balances in another.
    WITH made AS (
        INSERT INTO ledger.transfers
            (client_id, idempotency_key, request_sha256, from_account, to_account, amount, currency, metadata, batch_item)
        SELECT p_client, i.key, i.sha, i.src, i.dst, i.amount, i.currency, i.metadata, i.item
        FROM unnest(p_keys, p_shas, p_items, v_src, v_dst, p_amount, p_currency, p_metadata, v_from_ver)
             WITH ORDINALITY AS i(key, sha, item, src, dst, amount, currency, metadata, from_version, n)
        WHERE i.from_version IS NOT NULL
        ORDER BY i.n
        RETURNING id, idempotency_key, batch_item, from_account, to_account, amount, created_at
    ), numbered AS (
        SELECT m.*, i.n::integer AS n
        FROM made m
        JOIN unnest(p_keys, p_items) WITH ORDINALITY AS i(key, item, n)
          ON i.key = m.idempotency_key AND i.item = m.batch_item
    ), entries AS (
        INSERT INTO ledger.entries (client_id, account_id, account_version, transfer_id, amount, balance_after, created_at)
        SELECT p_client, x.from_account, v_from_ver[x.n], x.id, -x.amount, v_from_bal[x.n], x.created_at FROM numbered x
        UNION ALL
        SELECT p_client, x.to_account, v_to_ver[x.n], x.id, x.amount, v_to_bal[x.n], x.created_at FROM numbered x
    )
    SELECT array_agg(x.n), array_agg(x.id) INTO v_made_n, v_made_id FROM numbered x;

    UPDATE ledger.accounts a SET balance = u.balance, version = u.version
    FROM unnest(v_ids, v_balance, v_version) AS u(id, balance, version)
    WHERE a.client_id = p_client AND a.id = u.id AND a.version <> u.version;

    RETURN QUERY
    SELECT x.n::integer, CASE WHEN x.problem IS NULL THEN 201 ELSE ((x.problem::jsonb) ->> 'status')::integer END,
           m.id, x.problem
    FROM unnest(v_problem) WITH ORDINALITY AS x(problem, n)
    LEFT JOIN unnest(v_made_n, v_made_id) AS m(n, id) ON m.n = x.n
    ORDER BY x.n;
END;
$$;
COMMENT ON FUNCTION ledger.execute_movements(text, boolean, text[], bytea[], integer[], text[], text[], bigint[], text[], jsonb[]) IS 'The rules of many credits, debits and transfers of one client, set-based, under their keys'' locks; shared by post_batch and post_transfers.';

CREATE FUNCTION ledger.movement_arrays(p_items jsonb, p_take integer[])
RETURNS TABLE (from_ids text[], to_ids text[], amounts bigint[], currencies text[], metadata jsonb[])
LANGUAGE sql IMMUTABLE PARALLEL SAFE
-- The fields of the items of a JSON array at the 1-based positions p_take (ascending), as the arrays that
-- ledger.execute_movements takes. An absent metadata is {}.
BEGIN ATOMIC
    SELECT array_agg(x.value ->> 'from' ORDER BY x.n), array_agg(x.value ->> 'to' ORDER BY x.n),
           array_agg((x.value ->> 'amount')::bigint ORDER BY x.n), array_agg(x.value ->> 'currency' ORDER BY x.n),
           array_agg(coalesce(x.value -> 'metadata', '{}') ORDER BY x.n)
    FROM jsonb_array_elements(p_items) WITH ORDINALITY AS x(value, n)
    WHERE x.n = ANY (p_take);
END;

CREATE FUNCTION ledger.post_batch(
    p_client      text,
    p_key         text,
    p_request     text,
    p_atomic      boolean,
    p_items       jsonb,
    p_key_wait_ms integer
) RETURNS TABLE (outcome text, status_code integer, response_body text)
LANGUAGE plpgsql
-- Generic plans: these statements run with arrays of 1 to 1,000 elements, and planning them afresh for each call cost
-- a fifth of a batch of 8 (measured); the generic plans are as good for 1,000.
SET plan_cache_mode = force_generic_plan
AS $$
-- POST /v1/transfers/batch: 1 to 1,000 transfers exactly once per (client, key), in the caller's transaction. p_items
-- is a JSON array of {"from","to","amount","currency","metadata"}, validated by the service. Outcomes as for
-- ledger.post_transfer: 'replayed', 'executed', 'reused' (422, not stored), 'in_progress' (409). Item i becomes the
-- transfer with batch_item i under the batch's key. Atomic: the first failing item fails the batch (its status, its
-- problem with the detail prefixed "transfers[i-1]: "), nothing is written. Not atomic: 201 with one result per item.
DECLARE
    v_sha     bytea := sha256(convert_to(p_request, 'UTF8'));
    v_count   integer := jsonb_array_length(p_items);
    v_reused  boolean;
    v_made    integer[];     -- batch items of this key made before (its stored answer was purged)
    v_run     integer[];     -- batch items to run now
    v_problem text[];        -- per batch item: its failure
    v_row     record;
    v_body    text;
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

    -- 3. Run the items not made yet.
    v_problem := array_fill(NULL::text, ARRAY[v_count]);
    SELECT array_agg(x.n::integer ORDER BY x.n) INTO v_run
    FROM generate_series(1, v_count) AS x(n)
    WHERE NOT (x.n = ANY (coalesce(v_made, '{}')));
    IF v_run IS NOT NULL THEN
        FOR v_row IN
            SELECT m.n, m.status_code, m.problem
            FROM ledger.movement_arrays(p_items, v_run) AS items,
            LATERAL ledger.execute_movements(
                p_client, p_atomic, array_fill(p_key, ARRAY[cardinality(v_run)]), array_fill(v_sha, ARRAY[cardinality(v_run)]),
                v_run, items.from_ids, items.to_ids, items.amounts, items.currencies, items.metadata) AS m
            WHERE m.problem IS NOT NULL
        LOOP
            v_problem[v_run[v_row.n]] := v_row.problem;
            -- Atomic: the one failure is the batch's answer; nothing was written.
            IF p_atomic THEN
                SELECT ledger.problem_json(v_row.status_code, p.j ->> 'code', p.j ->> 'title',
                                           'transfers[' || (v_run[v_row.n] - 1) || ']: ' || (p.j ->> 'detail'))
                INTO v_body
                FROM (SELECT v_row.problem::jsonb AS j) p;
                PERFORM ledger.store_outcome(p_client, p_key, v_sha, v_row.status_code, v_body, NULL);
                RETURN QUERY SELECT 'executed', v_row.status_code, v_body;
                RETURN;
            END IF;
        END LOOP;
    END IF;

    -- 4. The answer: one result per item, in order; stored for replay unless every item was made before.
    SELECT '{"atomic":' || p_atomic::text || ',"results":[' || string_agg(
               CASE WHEN t.id IS NOT NULL THEN '{"status":201,"transfer":' || ledger.transfer_json(t) || '}'
                    ELSE '{"status":' || ((x.problem::jsonb) ->> 'status') || ',"problem":' || x.problem || '}'
               END, ',' ORDER BY x.n) || ']}'
    INTO v_body
    FROM unnest(v_problem) WITH ORDINALITY AS x(problem, n)
    LEFT JOIN ledger.transfers t ON t.client_id = p_client AND t.idempotency_key = p_key AND t.batch_item = x.n;

    IF v_run IS NULL THEN
        RETURN QUERY SELECT 'replayed', 201, v_body;
        RETURN;
    END IF;
    PERFORM ledger.store_outcome(p_client, p_key, v_sha, 201, v_body, NULL);
    RETURN QUERY SELECT 'executed', 201, v_body;
END;
$$;
COMMENT ON FUNCTION ledger.post_batch(text, text, text, boolean, jsonb, integer) IS 'POST /v1/transfers/batch: up to 1,000 transfers exactly once per (client, idempotency key), atomic or item by item, and its stored outcome.';

CREATE OR REPLACE FUNCTION ledger.post_transfers(p_client text, p_items jsonb)
RETURNS TABLE (item integer, outcome text, status_code integer, response_body text)
LANGUAGE plpgsql
-- Generic plans: these statements run with arrays of 1 to 1,000 elements, and planning them afresh for each call cost
-- a fifth of a batch of 8 (measured); the generic plans are as good for 1,000.
SET plan_cache_mode = force_generic_plan
AS $$
-- Group commit: several independent credits, debits and transfers of one client, each under its own key, in ONE
-- transaction, so that one commit serves them all. Replaces the item-by-item loop of 0004 with the set-based
-- ledger.execute_movements; the contract is unchanged. p_items is a JSON array of
-- {"key","request","from","to","amount","currency","metadata"}; the answer has one row per item (1-based, in order)
-- with the outcomes of ledger.post_transfer, plus 'busy': the item's key is held by another execution, nothing was
-- done for it, and the caller runs it on its own (where it may wait).
--
-- Deadlock-free: key locks are only tried, never waited for; the accounts are locked in one sorted pass. Two items
-- with one key: the first decides, the second replays it (or is reused), as if it came right after.
DECLARE
    v_count   integer := jsonb_array_length(p_items);
    v_keys    text[];
    v_shas    bytea[];
    v_busy    text[] := '{}';
    v_lock    record;
    v_run     integer[];     -- items to execute: the first of their key, not completed, not busy
    v_ran_n        integer[];
    v_ran_status   integer[];
    v_ran_transfer bigint[];
    v_ran_problem  text[];
BEGIN
    IF v_count < 1 OR v_count > 1000 THEN
        RAISE EXCEPTION 'a batch holds 1 to 1000 items, not %', v_count USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT array_agg(x.value ->> 'key' ORDER BY x.n), array_agg(sha256(convert_to(x.value ->> 'request', 'UTF8')) ORDER BY x.n)
    INTO v_keys, v_shas
    FROM jsonb_array_elements(p_items) WITH ORDINALITY AS x(value, n);

    -- 1. Try the locks of the keys not completed yet (completed keys are answered without one), in a fixed order.
    FOR v_lock IN
        SELECT DISTINCT k.key, hashtextextended(p_client || ' ' || k.key, 0) AS lock_key
        FROM unnest(v_keys) AS k(key)
        WHERE NOT EXISTS (SELECT 1 FROM ledger.idempotency_keys s WHERE s.client_id = p_client AND s.key = k.key)
        ORDER BY 2
    LOOP
        IF NOT pg_try_advisory_xact_lock(v_lock.lock_key) THEN
            v_busy := v_busy || v_lock.key;
        END IF;
    END LOOP;

    -- 2. Under the locks, a new statement sees every execution that completed before: run only the first item of each
    -- key that has neither a stored answer nor a transfer (a purged answer), and is not busy.
    SELECT array_agg(x.n::integer ORDER BY x.n) INTO v_run
    FROM unnest(v_keys) WITH ORDINALITY AS x(key, n)
    WHERE NOT (x.key = ANY (v_busy))
      AND x.n = (SELECT min(y.n) FROM unnest(v_keys) WITH ORDINALITY AS y(key, n) WHERE y.key = x.key)
      AND NOT EXISTS (SELECT 1 FROM ledger.idempotency_keys s WHERE s.client_id = p_client AND s.key = x.key)
      AND NOT EXISTS (SELECT 1 FROM ledger.transfers t WHERE t.client_id = p_client AND t.idempotency_key = x.key);

    -- 3. Execute them, then store each one's answer (a conflict would mean a second execution: abort).
    IF v_run IS NOT NULL THEN
        SELECT array_agg(v_run[m.n] ORDER BY m.n), array_agg(m.status_code ORDER BY m.n),
               array_agg(m.transfer_id ORDER BY m.n), array_agg(m.problem ORDER BY m.n)
        INTO v_ran_n, v_ran_status, v_ran_transfer, v_ran_problem
        FROM ledger.movement_arrays(p_items, v_run) AS items,
        LATERAL ledger.execute_movements(
            p_client, false, (SELECT array_agg(v_keys[u.r] ORDER BY u.o) FROM unnest(v_run) WITH ORDINALITY AS u(r, o)),
            (SELECT array_agg(v_shas[u.r] ORDER BY u.o) FROM unnest(v_run) WITH ORDINALITY AS u(r, o)),
            array_fill(0, ARRAY[cardinality(v_run)]), items.from_ids, items.to_ids, items.amounts, items.currencies,
            items.metadata) AS m;

        INSERT INTO ledger.idempotency_keys (client_id, key, request_sha256, status_code, response_body, transfer_id)
        SELECT p_client, v_keys[r.n], v_shas[r.n], r.status, coalesce(ledger.transfer_json(t), r.problem), r.transfer
        FROM unnest(v_ran_n, v_ran_status, v_ran_transfer, v_ran_problem) AS r(n, status, transfer, problem)
        LEFT JOIN ledger.transfers t ON t.client_id = p_client AND t.id = r.transfer
        ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS v_count = ROW_COUNT;
        IF v_count <> cardinality(v_run) THEN
            -- Impossible under the keys' locks: it would be a bug. Roll back with a retryable SQLSTATE.
            RAISE EXCEPTION 'idempotency key stored twice' USING ERRCODE = 'serialization_failure';
        END IF;
    END IF;

    -- 4. Every item's answer, in order: what it ran to, or its key's stored answer, or its key's transfer.
    RETURN QUERY
    SELECT x.n::integer,
           CASE WHEN x.key = ANY (v_busy) THEN 'busy'
                WHEN x.n = ANY (coalesce(v_run, '{}')) THEN 'executed'
                WHEN coalesce(s.request_sha256, t.request_sha256) = x.sha THEN 'replayed'
                ELSE 'reused' END,
           CASE WHEN x.key = ANY (v_busy) THEN 0
                WHEN coalesce(s.request_sha256, t.request_sha256) = x.sha THEN coalesce(s.status_code, 201)
                ELSE 422 END,
           CASE WHEN x.key = ANY (v_busy) THEN NULL
                WHEN coalesce(s.request_sha256, t.request_sha256) = x.sha THEN coalesce(s.response_body, t.body)
                END
    FROM unnest(v_keys, v_shas) WITH ORDINALITY AS x(key, sha, n)
    LEFT JOIN ledger.idempotency_keys s ON s.client_id = p_client AND s.key = x.key
    LEFT JOIN LATERAL (
        SELECT p.request_sha256, ledger.transfer_json(p) AS body FROM ledger.transfers p
        WHERE s.key IS NULL AND p.client_id = p_client AND p.idempotency_key = x.key
        ORDER BY (p.request_sha256 = x.sha) DESC, p.batch_item
        LIMIT 1
    ) t ON true
    ORDER BY x.n;
END;
$$;
COMMENT ON FUNCTION ledger.post_transfers(text, jsonb) IS 'Several independent credits, debits or transfers of one client in one transaction (one commit), set-based; the service batches concurrent requests with it when --batch-max > 1.';
