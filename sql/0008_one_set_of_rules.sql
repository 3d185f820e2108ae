-- 0008_one_set_of_rules.sql: one implementation of the money rules for every path.
--
-- Before this file, the rules of a credit, debit or transfer stood twice: ledger.execute_transfer (0001) for a lone
-- request and ledger.execute_movements (0005) for group commit and batches, and they had drifted apart (a failing
-- request created `@world:<CUR>` only when grouped; a currency-mismatch named either account when alone). Now:
--   ledger.execute_movements  the rules (checks, `@world`, lock order, funds, overflow, writes), set-based;
--   ledger.post_transfers     idempotency of independent keyed requests around it (group commit);
--   ledger.post_transfer      a lone request: waits for its key's lock, then runs the rules with one item;
--   ledger.post_batch         one key for up to 1,000 items (unchanged, already on execute_movements).
-- The descriptions of what each function does live in COMMENT ON (\df+ in psql).

DROP FUNCTION ledger.execute_movements(text, boolean, text[], bytea[], integer[], text[], text[], bigint[], text[], jsonb[]);
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
) RETURNS TABLE (n integer, status_code integer, transfer_id bigint, problem text, body text)
LANGUAGE plpgsql
-- Generic plans: these statements run with arrays of 1 to 1,000 elements, and planning them afresh for each call cost
-- a fifth of a batch of 8 (measured); the generic plans are as good for 1,000.
SET plan_cache_mode = force_generic_plan
AS $$
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
    v_from_ver  bigint[];      -- per item: the versions and balances its two entries produce
    v_to_ver    bigint[];
    v_from_bal  bigint[];
    v_to_bal    bigint[];
    v_made_n    integer[];     -- the items made, their transfers' ids and JSON
    v_made_id   bigint[];
    v_made_body text[];
    v_f         integer;
    v_t         integer;
BEGIN
    IF v_count = 0 THEN
        RETURN;
    END IF;
    -- 1. What fails whatever the balances, read before anything is written or locked (an account's existence and
    -- currency never change): another currency (`from` first), then an unknown account (`from` first). `@world`
    -- always holds the item's currency.
    SELECT array_agg(i.src ORDER BY i.n), array_agg(i.dst ORDER BY i.n), array_agg(CASE
               WHEN f.currency <> i.currency THEN ledger.batch_item_problem('currency-mismatch', i.src, f.currency, i.currency)
               WHEN t.currency <> i.currency THEN ledger.batch_item_problem('currency-mismatch', i.dst, t.currency, i.currency)
               WHEN i.f IS NOT NULL AND f.id IS NULL THEN ledger.batch_item_problem('account-not-found', i.src, NULL, NULL)
               WHEN i.t IS NOT NULL AND t.id IS NULL THEN ledger.batch_item_problem('account-not-found', i.dst, NULL, NULL)
           END ORDER BY i.n)
    INTO v_src, v_dst, v_problem
    FROM (SELECT x.f, x.t, coalesce(x.f, '@world:' || x.currency) AS src, coalesce(x.t, '@world:' || x.currency) AS dst,
                 x.currency, x.n
          FROM unnest(p_from, p_to, p_currency) WITH ORDINALITY AS x(f, t, currency, n)) i
    LEFT JOIN ledger.accounts f ON i.f IS NOT NULL AND f.client_id = p_client AND f.id = i.f
    LEFT JOIN ledger.accounts t ON i.t IS NOT NULL AND t.client_id = p_client AND t.id = i.t;

    -- 2. `@world` of a currency is created on first use by an item that can run: never by a failing request, so a
    -- request leaves the same rows whether it runs alone or grouped. An atomic batch with a failing item writes
    -- nothing at all.
    IF (array_position(p_from, NULL) IS NOT NULL OR array_position(p_to, NULL) IS NOT NULL)
       AND NOT (p_atomic AND cardinality(array_remove(v_problem, NULL)) > 0) THEN
        INSERT INTO ledger.accounts (client_id, id, currency, allow_negative)
        SELECT DISTINCT p_client, '@world:' || x.c, x.c, true
        FROM unnest(p_from, p_to, p_currency, v_problem) AS x(f, t, c, p)
        WHERE (x.f IS NULL OR x.t IS NULL) AND x.p IS NULL
        ON CONFLICT DO NOTHING;
    END IF;

    -- 3. Lock every account in one pass, in one fixed order (byte order of the id), and read them. A `@world` not
    -- created in step 2 serves only items that fail or batches that write nothing: it reads as a new one (balance 0).
    WITH wanted AS (
        SELECT DISTINCT x.id FROM unnest(v_src || v_dst) AS x(id)
    ), locked AS MATERIALIZED (
        SELECT a.id, a.balance, a.version, a.allow_negative
        FROM ledger.accounts a
        WHERE a.client_id = p_client AND a.id IN (SELECT w.id FROM wanted w)
        ORDER BY a.id COLLATE "C"
        FOR UPDATE
    )
    SELECT array_agg(w.id), array_agg(coalesce(l.balance, 0)), array_agg(coalesce(l.version, 0)),
           array_agg(coalesce(l.allow_negative, true))
    INTO v_ids, v_balance, v_version, v_allow
    FROM wanted w
    LEFT JOIN locked l ON l.id = w.id
    WHERE l.id IS NOT NULL OR starts_with(w.id, '@world:');
    SELECT array_agg(f.at ORDER BY i.n), array_agg(t.at ORDER BY i.n)
    INTO v_from_at, v_to_at
    FROM unnest(v_src, v_dst) WITH ORDINALITY AS i(src, dst, n)
    LEFT JOIN unnest(v_ids) WITH ORDINALITY AS f(id, at) ON f.id = i.src
    LEFT JOIN unnest(v_ids) WITH ORDINALITY AS t(id, at) ON t.id = i.dst;

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
            RETURN QUERY SELECT i, ((v_problem[i]::jsonb) ->> 'status')::integer, NULL::bigint, v_problem[i], v_problem[i];
            RETURN;
        END IF;
    END LOOP;

    -- 5. Write: the transfers and their entries in one statement, the balances in another.
    WITH made AS (
        INSERT INTO ledger.transfers AS t
            (client_id, idempotency_key, request_sha256, from_account, to_account, amount, currency, metadata, batch_item)
        SELECT p_client, i.key, i.sha, i.src, i.dst, i.amount, i.currency, i.metadata, i.item
        FROM unnest(p_keys, p_shas, p_items, v_src, v_dst, p_amount, p_currency, p_metadata, v_from_ver)
             WITH ORDINALITY AS i(key, sha, item, src, dst, amount, currency, metadata, from_version, n)
        WHERE i.from_version IS NOT NULL
        ORDER BY i.n
        RETURNING t.id, t.idempotency_key, t.batch_item, t.from_account, t.to_account, t.amount, t.created_at,
                  ledger.transfer_json(t) AS body
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
    SELECT array_agg(x.n), array_agg(x.id), array_agg(x.body) INTO v_made_n, v_made_id, v_made_body FROM numbered x;

    UPDATE ledger.accounts a SET balance = u.balance, version = u.version
    FROM unnest(v_ids, v_balance, v_version) AS u(id, balance, version)
    WHERE a.client_id = p_client AND a.id = u.id AND a.version <> u.version;

    RETURN QUERY
    SELECT x.n::integer, CASE WHEN x.problem IS NULL THEN 201 ELSE ((x.problem::jsonb) ->> 'status')::integer END,
           m.id, x.problem, coalesce(m.body, x.problem)
    FROM unnest(v_problem) WITH ORDINALITY AS x(problem, n)
    LEFT JOIN unnest(v_made_n, v_made_id, v_made_body) AS m(n, id, body) ON m.n = x.n
    ORDER BY x.n;
END;
$$;

CREATE OR REPLACE FUNCTION ledger.post_transfers(p_client text, p_items jsonb)
RETURNS TABLE (item integer, outcome text, status_code integer, response_body text)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
-- Deadlock-free: key locks are only tried, never waited for; the
-- accounts are locked in one sorted pass. Two items with one key: the first decides, the second replays it (or is
-- reused), as if it came right after. What each key already holds (a stored answer, or the transfer of a purged one)
-- is read in ONE statement under the locks, and every answer is decided from that read: a purge committing meanwhile
-- cannot turn a replay into "reused".
DECLARE
    v_count        integer := jsonb_array_length(p_items);
    v_keys         text[];
    v_shas         bytea[];
    v_busy         text[] := '{}';
    v_lock         record;
    v_known_sha    bytea[];   -- per item: what its key held when the locks were taken (NULL: nothing)
    v_known_status integer[];
    v_known_body   text[];
    v_run          integer[]; -- items to execute: the first of their key, key holding nothing, not busy
    v_ran_n        integer[];
    v_ran_status   integer[];
    v_ran_body     text[];
    v_ran_transfer bigint[];
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

    -- 2. Under the locks, one snapshot: each key's stored answer, else the transfer a purged answer left behind.
    SELECT array_agg(coalesce(s.request_sha256, t.request_sha256) ORDER BY x.n),
           array_agg(coalesce(s.status_code, CASE WHEN t.request_sha256 IS NOT NULL THEN 201 END) ORDER BY x.n),
           array_agg(coalesce(s.response_body, t.body) ORDER BY x.n)
    INTO v_known_sha, v_known_status, v_known_body
    FROM unnest(v_keys, v_shas) WITH ORDINALITY AS x(key, sha, n)
    LEFT JOIN ledger.idempotency_keys s ON s.client_id = p_client AND s.key = x.key
    LEFT JOIN LATERAL (
        SELECT p.request_sha256, ledger.transfer_json(p) AS body FROM ledger.transfers p
        WHERE s.key IS NULL AND p.client_id = p_client AND p.idempotency_key = x.key
        ORDER BY (p.request_sha256 = x.sha) DESC, p.batch_item
        LIMIT 1
    ) t ON true;

    SELECT array_agg(x.n::integer ORDER BY x.n) INTO v_run
    FROM unnest(v_keys, v_known_sha) WITH ORDINALITY AS x(key, known, n)
    WHERE x.known IS NULL AND NOT (x.key = ANY (v_busy))
      AND x.n = (SELECT min(y.n) FROM unnest(v_keys) WITH ORDINALITY AS y(key, n) WHERE y.key = x.key);

    -- 3. Execute them, then store each one's answer (a conflict would mean a second execution: abort).
    IF v_run IS NOT NULL THEN
        SELECT array_agg(v_run[m.n] ORDER BY m.n), array_agg(m.status_code ORDER BY m.n),
               array_agg(m.body ORDER BY m.n), array_agg(m.transfer_id ORDER BY m.n)
        INTO v_ran_n, v_ran_status, v_ran_body, v_ran_transfer
        FROM ledger.movement_arrays(p_items, v_run) AS items,
        LATERAL ledger.execute_movements(
            p_client, false, (SELECT array_agg(v_keys[u.r] ORDER BY u.o) FROM unnest(v_run) WITH ORDINALITY AS u(r, o)),
            (SELECT array_agg(v_shas[u.r] ORDER BY u.o) FROM unnest(v_run) WITH ORDINALITY AS u(r, o)),
            array_fill(0, ARRAY[cardinality(v_run)]), items.from_ids, items.to_ids, items.amounts, items.currencies,
            items.metadata) AS m;
        INSERT INTO ledger.idempotency_keys (client_id, key, request_sha256, status_code, response_body, transfer_id)
        SELECT p_client, v_keys[r.n], v_shas[r.n], r.status, r.body, r.transfer
        FROM unnest(v_ran_n, v_ran_status, v_ran_body, v_ran_transfer) AS r(n, status, body, transfer)
        ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS v_count = ROW_COUNT;
        IF v_count <> cardinality(v_run) THEN
            -- Impossible under the keys' locks: it would be a bug. Roll back with a retryable SQLSTATE.
            RAISE EXCEPTION 'idempotency key stored twice' USING ERRCODE = 'serialization_failure';
        END IF;
    END IF;

    -- 4. Every item's answer, in order: what it ran to; else what its key held (step 2) or what the first item of its
    -- key ran to in step 3, replayed for the same request and reused for another.
    RETURN QUERY
    SELECT x.n::integer,
           CASE WHEN x.key = ANY (v_busy) THEN 'busy'
                WHEN r.n = x.n THEN 'executed'
                WHEN coalesce(x.known, v_shas[r.n]) = x.sha THEN 'replayed'
                ELSE 'reused' END,
           CASE WHEN x.key = ANY (v_busy) THEN 0
                WHEN r.n = x.n THEN r.status
                WHEN coalesce(x.known, v_shas[r.n]) = x.sha THEN coalesce(x.status, r.status)
                ELSE 422 END,
           CASE WHEN x.key = ANY (v_busy) THEN NULL
                WHEN r.n = x.n THEN r.body
                WHEN coalesce(x.known, v_shas[r.n]) = x.sha THEN coalesce(x.body, r.body)
                END
    FROM unnest(v_keys, v_shas, v_known_sha, v_known_status, v_known_body) WITH ORDINALITY AS x(key, sha, known, status, body, n)
    LEFT JOIN unnest(v_ran_n, v_ran_status, v_ran_body) AS r(n, status, body) ON v_keys[r.n] = x.key
    ORDER BY x.n;
END;
$$;

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
DECLARE
    v_sha      bytea := sha256(convert_to(p_request, 'UTF8'));
    v_transfer ledger.transfers;
    v_result   record;
BEGIN
    -- 1. A completed key is one indexed read: no lock, no write.
    RETURN QUERY SELECT * FROM ledger.stored_outcome(p_client, p_key, v_sha);
    IF FOUND THEN
        RETURN;
    END IF;
    -- 2. Serialise executions of this key across every process sharing the database; wait at most p_key_wait_ms.
    -- Under the lock a new statement sees what the holder we waited for committed.
    IF NOT ledger.lock_key(p_client, p_key, p_key_wait_ms) THEN
        RETURN QUERY SELECT 'in_progress', 409, NULL::text;
        RETURN;
    END IF;
    RETURN QUERY SELECT * FROM ledger.stored_outcome(p_client, p_key, v_sha);
    IF FOUND THEN
        RETURN;
    END IF;
    -- 3. A key whose stored answer was purged still names its transfer: answer with it, never make a second one.
    SELECT * INTO v_transfer FROM ledger.transfers t
    WHERE t.client_id = p_client AND t.idempotency_key = p_key
    ORDER BY (t.request_sha256 = v_sha) DESC, t.batch_item
    LIMIT 1;
    IF FOUND THEN
        IF v_transfer.request_sha256 <> v_sha THEN
            RETURN QUERY SELECT 'reused', 422, NULL::text;
        ELSE
            RETURN QUERY SELECT 'replayed', 201, ledger.transfer_json(v_transfer);
        END IF;
        RETURN;
    END IF;
    -- 4. The rules, as one item of ledger.execute_movements; then the stored outcome.
    SELECT * INTO v_result FROM ledger.execute_movements(p_client, false, ARRAY[p_key], ARRAY[v_sha], ARRAY[0],
        ARRAY[p_from], ARRAY[p_to], ARRAY[p_amount], ARRAY[p_currency], ARRAY[p_metadata]);
    PERFORM ledger.store_outcome(p_client, p_key, v_sha, v_result.status_code, v_result.body, v_result.transfer_id);
    RETURN QUERY SELECT 'executed', v_result.status_code, v_result.body;
END;
$$;

DROP FUNCTION ledger.execute_transfer(text, text, bytea, text, text, bigint, text, jsonb);

COMMENT ON SCHEMA ledger IS 'Ledger: accounts, transfers, entries and stored idempotency outcomes. Money moves only through ledger.execute_movements, the one implementation of the rules; ledger.post_transfer, post_transfers and post_batch wrap it with idempotency. `SELECT * FROM ledger.invariant_breaches` is empty on a healthy ledger.';
COMMENT ON FUNCTION ledger.execute_movements(text, boolean, text[], bytea[], integer[], text[], text[], bigint[], text[], jsonb[]) IS 'THE money rules. Runs credits (from NULL: from @world), debits (to NULL: to @world) and transfers of one client in order, each as if alone after the ones before it: 422 currency-mismatch (from first), 404 account-not-found (from first), 422 insufficient-funds, 422 balance-overflow, else the transfer, its two entries and both balances. @world:<CUR> is created only for an item that can run. Accounts are locked in one pass in byte order of their ids (deadlock-free). Atomic: at the first failure nothing is written and only that item is answered. The caller holds the keys'' advisory locks and has checked that none completed. Answers one row per item: 201 and the transfer id, or the status and problem JSON.';
COMMENT ON FUNCTION ledger.post_transfers(text, jsonb) IS 'Independent credits, debits and transfers of one client, each under its own idempotency key, in one transaction (group commit), through ledger.execute_movements. p_items: [{"key","request","from","to","amount","currency","metadata"}]. One row per item: executed, replayed, reused (422, not stored) or busy (its key is held elsewhere: nothing done).';
COMMENT ON FUNCTION ledger.post_transfer(text, text, text, text, text, bigint, text, jsonb, integer) IS 'POST /v1/credits, /v1/debits, /v1/transfers alone (--batch-max 1): replays a completed key at once, else waits up to p_key_wait_ms for the key''s lock (in_progress, 409, after that), answers a purged key with its transfer, or runs ledger.execute_movements with one item and stores the outcome.';
COMMENT ON FUNCTION ledger.post_batch(text, text, text, boolean, jsonb, integer) IS 'POST /v1/transfers/batch: up to 1,000 transfers under one idempotency key through ledger.execute_movements, atomic or item by item, and its stored outcome.';
COMMENT ON FUNCTION ledger.lock_key(text, text, integer) IS 'The transaction-scoped advisory lock of one (client, idempotency key), waited for at most p_wait_ms; taken by post_transfer and post_batch, tried by post_transfers.';
