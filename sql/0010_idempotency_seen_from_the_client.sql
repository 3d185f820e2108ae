-- 0010_idempotency_seen_from_the_client.sql: what a client can learn about its idempotency keys.
--   Every keyed function answers the stored row's created_at beside outcome, status and body (Idempotency-TTL);
--   stored outcomes record the request's method and path (GET /v1/idempotency-keys/{key});
--   ledger.lock_key(..., 0) no longer waits at all (Prefer: wait=0);
--   ledger.idempotency_key_state answers what a key is: completed, in_progress, consumed, or nothing.
-- The functions below are those of 0005 and 0009 with these changes only. Descriptions live in COMMENT ON.

ALTER TABLE ledger.idempotency_keys ADD COLUMN method text, ADD COLUMN path text;
COMMENT ON COLUMN ledger.idempotency_keys.method IS 'HTTP method of the request that stored this outcome; NULL for rows stored before 0010.';
COMMENT ON COLUMN ledger.idempotency_keys.path IS 'Path of that request (ids percent-decoded); NULL for rows stored before 0010.';

-- The method and path of a request fingerprint ("POST /v1/credits\n{...}").
CREATE FUNCTION ledger.request_line(p_request text, OUT method text, OUT path text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
SELECT nullif(split_part(split_part(p_request, E'\n', 1), ' ', 1), ''),
       nullif(split_part(split_part(p_request, E'\n', 1), ' ', 2), '')
$$;

CREATE FUNCTION ledger.store_request_outcome(
    p_client text, p_key text, p_sha bytea, p_request text, p_status integer, p_body text, p_transfer_id bigint
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ledger.idempotency_keys (client_id, key, request_sha256, status_code, response_body, transfer_id,
                                         method, path)
    SELECT p_client, p_key, p_sha, p_status, p_body, p_transfer_id, l.method, l.path
    FROM ledger.request_line(p_request) l
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'idempotency key stored twice' USING ERRCODE = 'serialization_failure';
    END IF;
END;
$$;

-- The advisory lock id of an idempotency key, under a secret of the service. It was hashtextextended(client || ' '
-- || key): one 64-bit space for every client and an invertible hash, so one client could compute a key of its own
-- that shares another client's lock (and stall it, or learn that it is executing). Under a secret nobody outside
-- the database can aim at another's lock; collisions are left to chance (2^-64).
INSERT INTO ledger.service_keys (name, key)
SELECT 'key-lock', sha256(convert_to(gen_random_uuid()::text || gen_random_uuid()::text || gen_random_uuid()::text, 'UTF8'))
ON CONFLICT DO NOTHING;

CREATE FUNCTION ledger.key_lock_id(p_client text, p_key text) RETURNS bigint
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
SELECT ('x' || encode(substr(sha256(k.key || convert_to(p_client, 'UTF8') || '\x00'::bytea || convert_to(p_key, 'UTF8')),
                             1, 8), 'hex'))::bit(64)::bigint
FROM ledger.service_keys k WHERE k.name = 'key-lock'
$$;
COMMENT ON FUNCTION ledger.key_lock_id(text, text) IS 'The transaction-scoped advisory lock id of one (client, idempotency key): the first 8 bytes of SHA-256 over the service''s key-lock secret, the client and the key. Every execution of the key takes it (ledger.lock_key, or tried by ledger.post_transfers); the key lookup tries it to tell in_progress.';

CREATE OR REPLACE FUNCTION ledger.lock_key(p_client text, p_key text, p_wait_ms integer) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF p_wait_ms IS NULL OR p_wait_ms < 0 THEN
        RAISE EXCEPTION 'key wait % ms is not >= 0', p_wait_ms USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF pg_try_advisory_xact_lock(ledger.key_lock_id(p_client, p_key)) THEN
        RETURN true;
    END IF;
    IF p_wait_ms = 0 THEN
        RETURN false;  -- lock_timeout 0 would mean no timeout at all
    END IF;
    PERFORM set_config('lock_timeout', p_wait_ms::text || 'ms', true);
    BEGIN
        PERFORM pg_advisory_xact_lock(ledger.key_lock_id(p_client, p_key));
    EXCEPTION WHEN lock_not_available THEN
        RETURN false;
    END;
    PERFORM set_config('lock_timeout', '0', true);
    RETURN true;
END;
$$;

DROP FUNCTION ledger.post_transfer(text, text, text, text, text, bigint, text, jsonb, bigint, integer);
DROP FUNCTION ledger.post_transfers(text, jsonb);
DROP FUNCTION ledger.post_batch(text, text, text, boolean, jsonb, integer);
DROP FUNCTION ledger.post_hold(text, text, text, text, text, bigint, text, jsonb, integer, bigint, integer);
DROP FUNCTION ledger.post_capture(text, text, text, text, bigint, jsonb, integer);
DROP FUNCTION ledger.post_void(text, text, text, text, integer);
DROP FUNCTION ledger.post_reversal(text, text, text, text, bigint, jsonb, integer);
DROP FUNCTION ledger.begin_keyed(text, text, bytea, integer);
DROP FUNCTION ledger.finish_keyed(text, text, bytea, integer, text, bigint);
DROP FUNCTION ledger.purged_key_outcome(text, text, bytea);
DROP FUNCTION ledger.stored_outcome(text, text, bytea);

CREATE FUNCTION ledger.stored_outcome(p_client text, p_key text, p_sha bytea)
RETURNS TABLE (outcome text, status_code integer, response_body text, created_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN k.request_sha256 = p_sha THEN 'replayed' ELSE 'reused' END,
           CASE WHEN k.request_sha256 = p_sha THEN k.status_code ELSE 422 END,
           CASE WHEN k.request_sha256 = p_sha THEN k.response_body END,
           CASE WHEN k.request_sha256 = p_sha THEN k.created_at END
    FROM ledger.idempotency_keys k
    WHERE k.client_id = p_client AND k.key = p_key
$$;

CREATE FUNCTION ledger.finish_keyed(
    p_client text, p_key text, p_sha bytea, p_request text, p_status integer, p_body text, p_transfer_id bigint
) RETURNS TABLE (outcome text, status_code integer, response_body text, created_at timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ledger.store_request_outcome(p_client, p_key, p_sha, p_request, p_status, p_body,
                                         CASE WHEN p_status = 201 THEN p_transfer_id END);
    RETURN QUERY SELECT 'executed', p_status, p_body, now();
END;
$$;

CREATE FUNCTION ledger.purged_key_outcome(p_client text, p_key text, p_sha bytea)
RETURNS TABLE (outcome text, status_code integer, response_body text, created_at timestamptz)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_transfer ledger.transfers;
    v_hold     ledger.holds;
BEGIN
    SELECT * INTO v_hold FROM ledger.holds h
    WHERE h.client_id = p_client AND (h.idempotency_key = p_key OR h.finished_key = p_key)
    LIMIT 1;
    IF FOUND THEN
        IF (CASE WHEN v_hold.idempotency_key = p_key THEN v_hold.request_sha256 ELSE v_hold.finished_sha256 END) <> p_sha THEN
            RETURN QUERY SELECT 'reused', 422, NULL::text, NULL::timestamptz;
        ELSE
            RETURN QUERY SELECT 'replayed', CASE WHEN v_hold.idempotency_key = p_key THEN 201 ELSE 200 END,
                                ledger.hold_json(v_hold), NULL::timestamptz;
        END IF;
        RETURN;
    END IF;
    SELECT * INTO v_transfer FROM ledger.transfers t
    WHERE t.client_id = p_client AND t.idempotency_key = p_key
    ORDER BY (t.request_sha256 = p_sha) DESC, t.batch_item
    LIMIT 1;
    IF FOUND THEN
        IF v_transfer.request_sha256 <> p_sha OR v_transfer.batch_item <> 0 THEN
            RETURN QUERY SELECT 'reused', 422, NULL::text, NULL::timestamptz;
        ELSE
            RETURN QUERY SELECT 'replayed', 201, ledger.transfer_json(v_transfer), NULL::timestamptz;
        END IF;
    END IF;
END;
$$;

CREATE FUNCTION ledger.begin_keyed(p_client text, p_key text, p_sha bytea, p_key_wait_ms integer)
RETURNS TABLE (outcome text, status_code integer, response_body text, created_at timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY SELECT * FROM ledger.stored_outcome(p_client, p_key, p_sha);
    IF FOUND THEN
        RETURN;
    END IF;
    IF NOT ledger.lock_key(p_client, p_key, p_key_wait_ms) THEN
        RETURN QUERY SELECT 'in_progress', 409, NULL::text, NULL::timestamptz;
        RETURN;
    END IF;
    RETURN QUERY SELECT * FROM ledger.stored_outcome(p_client, p_key, p_sha);
    IF FOUND THEN
        RETURN;
    END IF;
    RETURN QUERY SELECT * FROM ledger.purged_key_outcome(p_client, p_key, p_sha);
END;
$$;

CREATE FUNCTION ledger.post_transfer(
    p_client        text,
    p_key           text,
    p_request       text,
    p_from          text,
    p_to            text,
    p_amount        bigint,
    p_currency      text,
    p_metadata      jsonb,
    p_if_match      bigint,
    p_key_wait_ms   integer
) RETURNS TABLE (outcome text, status_code integer, response_body text, created_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_sha    bytea := sha256(convert_to(p_request, 'UTF8'));
    v_result record;
BEGIN
    RETURN QUERY SELECT * FROM ledger.begin_keyed(p_client, p_key, v_sha, p_key_wait_ms);
    IF FOUND THEN
        RETURN;
    END IF;
    SELECT * INTO v_result FROM ledger.execute_movements(p_client, false, ARRAY[p_key], ARRAY[v_sha], ARRAY[0],
        ARRAY[p_from], ARRAY[p_to], ARRAY[p_amount], ARRAY[p_currency], ARRAY[p_metadata], ARRAY[p_if_match]);
    RETURN QUERY SELECT * FROM ledger.finish_keyed(p_client, p_key, v_sha, p_request, v_result.status_code, v_result.body,
                                                   v_result.transfer_id);
END;
$$;

CREATE FUNCTION ledger.post_transfers(p_client text, p_items jsonb)
RETURNS TABLE (item integer, outcome text, status_code integer, response_body text, created_at timestamptz)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
-- Deadlock-free: key locks are only tried, never waited for; the accounts are locked in one sorted pass. Two items
-- with one key: the first decides, the second replays it (or is reused), as if it came right after. What each key
-- already holds (a stored answer, or what a purged one made) is read in ONE statement under the locks, and every
-- answer is decided from that read: a purge committing meanwhile cannot turn a replay into "reused".
DECLARE
    v_count        integer := jsonb_array_length(p_items);
    v_keys         text[];
    v_requests     text[];
    v_shas         bytea[];
    v_busy         text[] := '{}';
    v_lock         record;
    v_known_sha    bytea[];   -- per item: what its key held when the locks were taken (NULL: nothing)
    v_known_status integer[];
    v_known_body   text[];
    v_known_at     timestamptz[];
    v_run          integer[]; -- items to execute: the first of their key, key holding nothing, not busy
    v_ran_n        integer[];
    v_ran_status   integer[];
    v_ran_body     text[];
    v_ran_transfer bigint[];
BEGIN
    IF v_count < 1 OR v_count > 1000 THEN
        RAISE EXCEPTION 'a batch holds 1 to 1000 items, not %', v_count USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT array_agg(x.value ->> 'key' ORDER BY x.n), array_agg(sha256(convert_to(x.value ->> 'request', 'UTF8')) ORDER BY x.n),
           array_agg(x.value ->> 'request' ORDER BY x.n)
    INTO v_keys, v_shas, v_requests
    FROM jsonb_array_elements(p_items) WITH ORDINALITY AS x(value, n);

    -- 1. Try the locks of the keys not completed yet (completed keys are answered without one), in a fixed order.
    FOR v_lock IN
        SELECT DISTINCT k.key, ledger.key_lock_id(p_client, k.key) AS lock_key
        FROM unnest(v_keys) AS k(key)
        WHERE NOT EXISTS (SELECT 1 FROM ledger.idempotency_keys s WHERE s.client_id = p_client AND s.key = k.key)
        ORDER BY 2
    LOOP
        IF NOT pg_try_advisory_xact_lock(v_lock.lock_key) THEN
            v_busy := v_busy || v_lock.key;
        END IF;
    END LOOP;

    -- 2. Under the locks, one snapshot: each key's stored answer, else what a purged answer left behind.
    SELECT array_agg(coalesce(s.request_sha256, CASE p.outcome WHEN 'replayed' THEN x.sha WHEN 'reused' THEN '\x'::bytea END)
                     ORDER BY x.n),
           array_agg(coalesce(s.status_code, p.status_code) ORDER BY x.n),
           array_agg(coalesce(s.response_body, p.response_body) ORDER BY x.n),
           array_agg(s.created_at ORDER BY x.n)
    INTO v_known_sha, v_known_status, v_known_body, v_known_at
    FROM unnest(v_keys, v_shas) WITH ORDINALITY AS x(key, sha, n)
    LEFT JOIN ledger.idempotency_keys s ON s.client_id = p_client AND s.key = x.key
    LEFT JOIN LATERAL ledger.purged_key_outcome(p_client, x.key, x.sha) p ON s.key IS NULL;

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
            items.metadata, items.if_match) AS m;

        INSERT INTO ledger.idempotency_keys (client_id, key, request_sha256, status_code, response_body, transfer_id,
                                             method, path)
        SELECT p_client, v_keys[r.n], v_shas[r.n], r.status, r.body, r.transfer, l.method, l.path
        FROM unnest(v_ran_n, v_ran_status, v_ran_body, v_ran_transfer) AS r(n, status, body, transfer)
        CROSS JOIN LATERAL ledger.request_line(v_requests[r.n]) l
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
                END,
           -- When the answer was stored: now for what ran in this transaction, the stored row's time for a
           -- completed key, NULL for what a purged key made and for answers that are not stored.
           CASE WHEN x.key = ANY (v_busy) THEN NULL
                WHEN r.n IS NOT NULL AND (r.n = x.n OR x.known IS NULL AND v_shas[r.n] = x.sha) THEN now()
                WHEN x.known = x.sha THEN x.at
                END
    FROM unnest(v_keys, v_shas, v_known_sha, v_known_status, v_known_body, v_known_at)
         WITH ORDINALITY AS x(key, sha, known, status, body, at, n)
    LEFT JOIN unnest(v_ran_n, v_ran_status, v_ran_body) AS r(n, status, body) ON v_keys[r.n] = x.key
    ORDER BY x.n;
END;
$$;

CREATE FUNCTION ledger.post_hold(
    p_client text, p_key text, p_request text, p_from text, p_to text, p_amount bigint, p_currency text,
    p_metadata jsonb, p_expires_in_s integer, p_if_match bigint, p_key_wait_ms integer
) RETURNS TABLE (outcome text, status_code integer, response_body text, created_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_sha    bytea := sha256(convert_to(p_request, 'UTF8'));
    v_result record;
    v_hold   ledger.holds;
BEGIN
    RETURN QUERY SELECT * FROM ledger.begin_keyed(p_client, p_key, v_sha, p_key_wait_ms);
    IF FOUND THEN
        RETURN;
    END IF;
    SELECT * INTO v_result FROM ledger.execute_movements(p_client, false, ARRAY[p_key], ARRAY[v_sha], ARRAY[0],
        ARRAY[p_from], ARRAY[p_to], ARRAY[p_amount], ARRAY[p_currency], ARRAY[p_metadata], ARRAY[p_if_match],
        ARRAY['reserve']);
    IF v_result.problem IS NOT NULL THEN
        RETURN QUERY SELECT * FROM ledger.finish_keyed(p_client, p_key, v_sha, p_request, v_result.status_code, v_result.body, NULL);
        RETURN;
    END IF;
    INSERT INTO ledger.holds (client_id, idempotency_key, request_sha256, from_account, to_account, amount, currency,
                              metadata, expires_at)
    VALUES (p_client, p_key, v_sha, p_from, coalesce(p_to, '@world:' || p_currency), p_amount, p_currency, p_metadata,
            now() + make_interval(secs => p_expires_in_s))
    RETURNING * INTO v_hold;
    RETURN QUERY SELECT * FROM ledger.finish_keyed(p_client, p_key, v_sha, p_request, 201, ledger.hold_json(v_hold), NULL);
END;
$$;

CREATE FUNCTION ledger.post_capture(
    p_client text, p_key text, p_request text, p_hold text, p_amount bigint, p_metadata jsonb, p_key_wait_ms integer
) RETURNS TABLE (outcome text, status_code integer, response_body text, created_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_sha    bytea := sha256(convert_to(p_request, 'UTF8'));
    v_locked record;
    v_hold   ledger.holds;
    v_amount bigint;
    v_result record;
BEGIN
    RETURN QUERY SELECT * FROM ledger.begin_keyed(p_client, p_key, v_sha, p_key_wait_ms);
    IF FOUND THEN
        RETURN;
    END IF;
    SELECT * INTO v_locked FROM ledger.lock_pending_hold(p_client, p_hold);
    v_hold := v_locked.hold;
    v_amount := coalesce(p_amount, v_hold.amount);
    IF v_locked.problem IS NULL AND v_amount > v_hold.amount THEN
        v_locked.problem := ledger.hold_problem('capture-exceeds-hold', p_hold);
    END IF;
    IF v_locked.problem IS NOT NULL THEN
        RETURN QUERY SELECT * FROM ledger.finish_keyed(p_client, p_key, v_sha, p_request,
            ((v_locked.problem::jsonb) ->> 'status')::integer, v_locked.problem, NULL);
        RETURN;
    END IF;
    -- The capture is a transfer through the rules, which first release the whole hold from the payer's held.
    SELECT * INTO v_result FROM ledger.execute_movements(p_client, false, ARRAY[p_key], ARRAY[v_sha], ARRAY[0],
        ARRAY[ledger.public_or_null(v_hold.from_account)], ARRAY[ledger.public_or_null(v_hold.to_account)],
        ARRAY[v_amount], ARRAY[v_hold.currency], ARRAY[coalesce(p_metadata, v_hold.metadata)], NULL, ARRAY['move'],
        ARRAY[v_hold.amount], ARRAY[v_hold.id]);
    IF v_result.problem IS NOT NULL THEN
        RETURN QUERY SELECT * FROM ledger.finish_keyed(p_client, p_key, v_sha, p_request, v_result.status_code, v_result.body, NULL);
        RETURN;
    END IF;
    UPDATE ledger.holds h SET status = 'captured', captured_amount = v_amount, transfer_id = v_result.transfer_id,
                              finished_key = p_key, finished_sha256 = v_sha
    WHERE h.client_id = p_client AND h.id = v_hold.id
    RETURNING * INTO v_hold;
    RETURN QUERY SELECT * FROM ledger.finish_keyed(p_client, p_key, v_sha, p_request, 200, ledger.hold_json(v_hold), NULL);
END;
$$;

CREATE FUNCTION ledger.post_void(p_client text, p_key text, p_request text, p_hold text, p_key_wait_ms integer)
RETURNS TABLE (outcome text, status_code integer, response_body text, created_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_sha    bytea := sha256(convert_to(p_request, 'UTF8'));
    v_locked record;
    v_hold   ledger.holds;
BEGIN
    RETURN QUERY SELECT * FROM ledger.begin_keyed(p_client, p_key, v_sha, p_key_wait_ms);
    IF FOUND THEN
        RETURN;
    END IF;
    SELECT * INTO v_locked FROM ledger.lock_pending_hold(p_client, p_hold);
    IF v_locked.problem IS NOT NULL THEN
        RETURN QUERY SELECT * FROM ledger.finish_keyed(p_client, p_key, v_sha, p_request,
            ((v_locked.problem::jsonb) ->> 'status')::integer, v_locked.problem, NULL);
        RETURN;
    END IF;
    v_hold := v_locked.hold;
    PERFORM ledger.release_holds(p_client, ARRAY[v_hold.id]);
    UPDATE ledger.holds h SET status = 'voided', finished_key = p_key, finished_sha256 = v_sha
    WHERE h.client_id = p_client AND h.id = v_hold.id
    RETURNING * INTO v_hold;
    RETURN QUERY SELECT * FROM ledger.finish_keyed(p_client, p_key, v_sha, p_request, 200, ledger.hold_json(v_hold), NULL);
END;
$$;

CREATE FUNCTION ledger.post_reversal(
    p_client text, p_key text, p_request text, p_transfer text, p_amount bigint, p_metadata jsonb, p_key_wait_ms integer
) RETURNS TABLE (outcome text, status_code integer, response_body text, created_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_sha      bytea := sha256(convert_to(p_request, 'UTF8'));
    v_original ledger.transfers;
    v_amount   bigint;
    v_problem  text;
    v_result   record;
BEGIN
    RETURN QUERY SELECT * FROM ledger.begin_keyed(p_client, p_key, v_sha, p_key_wait_ms);
    IF FOUND THEN
        RETURN;
    END IF;
    -- The original is locked before any account (transfers, then accounts: one order for every reversal), so that
    -- concurrent reversals of one transfer run one after the other and never add up to more than it.
    SELECT * INTO v_original FROM ledger.transfers t
    WHERE t.client_id = p_client AND t.id = ledger.parse_id(p_transfer)
    FOR UPDATE;
    v_amount := coalesce(p_amount, v_original.amount - v_original.reversed_amount);
    v_problem := CASE
        WHEN v_original.id IS NULL THEN ledger.hold_problem('transfer-not-found', p_transfer)
        WHEN v_original.reverses IS NOT NULL THEN ledger.hold_problem('transfer-not-reversible', p_transfer)
        WHEN v_amount < 1 OR v_amount > v_original.amount - v_original.reversed_amount
            THEN ledger.hold_problem('reversal-exceeds-transfer', p_transfer)
    END;
    IF v_problem IS NOT NULL THEN
        RETURN QUERY SELECT * FROM ledger.finish_keyed(p_client, p_key, v_sha, p_request,
            ((v_problem::jsonb) ->> 'status')::integer, v_problem, NULL);
        RETURN;
    END IF;
    SELECT * INTO v_result FROM ledger.execute_movements(p_client, false, ARRAY[p_key], ARRAY[v_sha], ARRAY[0],
        ARRAY[ledger.public_or_null(v_original.to_account)], ARRAY[ledger.public_or_null(v_original.from_account)],
        ARRAY[v_amount], ARRAY[v_original.currency], ARRAY[coalesce(p_metadata, '{}')], NULL, NULL, NULL, NULL,
        ARRAY[v_original.id]);
    IF v_result.problem IS NULL THEN
        UPDATE ledger.transfers t SET reversed_amount = t.reversed_amount + v_amount
        WHERE t.client_id = p_client AND t.id = v_original.id;
    END IF;
    RETURN QUERY SELECT * FROM ledger.finish_keyed(p_client, p_key, v_sha, p_request, v_result.status_code, v_result.body,
                                                   v_result.transfer_id);
END;
$$;

CREATE FUNCTION ledger.post_batch(
    p_client      text,
    p_key         text,
    p_request     text,
    p_atomic      boolean,
    p_items       jsonb,
    p_key_wait_ms integer
) RETURNS TABLE (outcome text, status_code integer, response_body text, created_at timestamptz)
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
        RETURN QUERY SELECT 'in_progress', 409, NULL::text, NULL::timestamptz;
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
        RETURN QUERY SELECT 'reused', 422, NULL::text, NULL::timestamptz;
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
                PERFORM ledger.store_request_outcome(p_client, p_key, v_sha, p_request, v_row.status_code, v_body, NULL);
                RETURN QUERY SELECT 'executed', v_row.status_code, v_body, now();
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
        RETURN QUERY SELECT 'replayed', 201, v_body, NULL::timestamptz;
        RETURN;
    END IF;
    PERFORM ledger.store_request_outcome(p_client, p_key, v_sha, p_request, 201, v_body, NULL);
    RETURN QUERY SELECT 'executed', 201, v_body, now();
END;
$$;

-- GET /v1/idempotency-keys/{key}: what the key is now, as the API's JSON; no row when the key is unknown (never
-- used, or its purged outcome made nothing).
CREATE FUNCTION ledger.idempotency_key_state(p_client text, p_key text, p_retention_s integer)
RETURNS TABLE (state text, body text)
LANGUAGE plpgsql AS $$
DECLARE
    v_row      ledger.idempotency_keys;
    v_hold     ledger.holds;
    v_transfer bigint;
    v_made     boolean := false;
BEGIN
    SELECT * INTO v_row FROM ledger.idempotency_keys k WHERE k.client_id = p_client AND k.key = p_key;
    IF NOT FOUND THEN
        -- Held by a running execution: the lock ledger.lock_key takes. When the try succeeds it is released at the
        -- end of this (one-statement) transaction; read again under it, the execution may just have completed.
        IF NOT pg_try_advisory_xact_lock(ledger.key_lock_id(p_client, p_key)) THEN
            RETURN QUERY SELECT 'in_progress', ledger.idempotency_key_json(p_key, 'in_progress', NULL, NULL, NULL,
                                                                           NULL, NULL, NULL);
            RETURN;
        END IF;
        SELECT * INTO v_row FROM ledger.idempotency_keys k WHERE k.client_id = p_client AND k.key = p_key;
    END IF;
    IF v_row.key IS NOT NULL THEN
        v_transfer := coalesce(v_row.transfer_id, (SELECT h.transfer_id FROM ledger.holds h
                                                   WHERE h.client_id = p_client AND h.finished_key = p_key));
        RETURN QUERY SELECT 'completed', ledger.idempotency_key_json(p_key, 'completed', v_row.method, v_row.path,
            v_row.status_code, v_row.created_at, v_row.created_at + make_interval(secs => p_retention_s), v_transfer);
        RETURN;
    END IF;
    SELECT * INTO v_hold FROM ledger.holds h
    WHERE h.client_id = p_client AND (h.idempotency_key = p_key OR h.finished_key = p_key)
    LIMIT 1;
    IF FOUND THEN
        v_made := true;
        v_transfer := CASE WHEN v_hold.finished_key = p_key THEN v_hold.transfer_id END;
    ELSE
        SELECT true, CASE WHEN count(*) = 1 AND min(t.batch_item) = 0 THEN min(t.id) END INTO v_made, v_transfer
        FROM ledger.transfers t WHERE t.client_id = p_client AND t.idempotency_key = p_key
        HAVING count(*) > 0;
    END IF;
    IF v_made THEN
        RETURN QUERY SELECT 'consumed', ledger.idempotency_key_json(p_key, 'consumed', NULL, NULL, NULL, NULL, NULL,
                                                                    v_transfer);
    END IF;
END;
$$;

CREATE FUNCTION ledger.idempotency_key_json(
    p_key text, p_state text, p_method text, p_path text, p_status integer, p_created_at timestamptz,
    p_expires_at timestamptz, p_transfer_id bigint
) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
SELECT '{"key":' || to_json(p_key)::text
    || ',"state":' || to_json(p_state)::text
    || ',"method":' || coalesce(to_json(p_method)::text, 'null')
    || ',"path":' || coalesce(to_json(p_path)::text, 'null')
    || ',"status":' || coalesce(p_status::text, 'null')
    || ',"created_at":' || coalesce(to_json(ledger.rfc3339(p_created_at))::text, 'null')
    || ',"expires_at":' || coalesce(to_json(ledger.rfc3339(p_expires_at))::text, 'null')
    || ',"transfer_id":' || coalesce(to_json(p_transfer_id::text)::text, 'null')
    || '}'
$$;

COMMENT ON FUNCTION ledger.request_line(text) IS 'The method and path of a request fingerprint (its first line), as stored beside an outcome.';
COMMENT ON FUNCTION ledger.store_request_outcome(text, text, bytea, text, integer, text, bigint) IS 'Stores an outcome for replay with its request''s method and path; a conflict aborts the transaction (it would mean two executions of one key).';
COMMENT ON FUNCTION ledger.lock_key(text, text, integer) IS 'The transaction-scoped advisory lock of one (client, idempotency key), waited for at most p_wait_ms (>= 0; 0: only tried); taken by every lone keyed request, tried by post_transfers and idempotency_key_state.';
COMMENT ON FUNCTION ledger.stored_outcome(text, text, bytea) IS 'The replay (with the stored row''s created_at) or 422 reused of a completed idempotency key; no row when the key is not completed.';
COMMENT ON FUNCTION ledger.finish_keyed(text, text, bytea, text, integer, text, bigint) IS 'Stores an executed request''s outcome (status, body, method and path) for replay and answers it, created now.';
COMMENT ON FUNCTION ledger.purged_key_outcome(text, text, bytea) IS 'What a key whose stored answer was purged made (its transfer, or its hold placed, captured or voided): replayed (created_at NULL: no stored row) for the same request, reused for another; no row when it made nothing.';
COMMENT ON FUNCTION ledger.begin_keyed(text, text, bytea, integer) IS 'The idempotency prelude of every lone keyed request: replay or reused for a completed key, in_progress after p_key_wait_ms (0: at once), what a purged key made; no row: the caller executes under the key''s lock.';
COMMENT ON FUNCTION ledger.post_transfer(text, text, text, text, text, bigint, text, jsonb, bigint, integer) IS 'POST /v1/credits, /v1/debits, /v1/transfers alone: ledger.begin_keyed, then one item of ledger.execute_movements, then ledger.finish_keyed. created_at: when the answered outcome was stored (NULL when it is not a stored row).';
COMMENT ON FUNCTION ledger.post_transfers(text, jsonb) IS 'Independent credits, debits and transfers of one client, each under its own idempotency key, in one transaction (group commit), through ledger.execute_movements. p_items: [{"key","request","from","to","amount","currency","metadata","if_match"}]. One row per item: executed, replayed, reused (422, not stored) or busy (its key is held elsewhere: nothing done), with the stored outcome''s created_at.';
COMMENT ON FUNCTION ledger.post_batch(text, text, text, boolean, jsonb, integer) IS 'POST /v1/transfers/batch: up to 1,000 transfers under one idempotency key through ledger.execute_movements, atomic or item by item, and its stored outcome (with its created_at).';
COMMENT ON FUNCTION ledger.post_hold(text, text, text, text, text, bigint, text, jsonb, integer, bigint, integer) IS 'POST /v1/holds: reserves amount of from through ledger.execute_movements (kind reserve) and records the hold.';
COMMENT ON FUNCTION ledger.post_capture(text, text, text, text, bigint, jsonb, integer) IS 'POST /v1/holds/{id}/capture: locks the hold, checks its status and amount, then moves the captured amount through ledger.execute_movements, which releases the whole hold first.';
COMMENT ON FUNCTION ledger.post_void(text, text, text, text, integer) IS 'POST /v1/holds/{id}/void: locks the hold, checks its status, releases it through ledger.execute_movements.';
COMMENT ON FUNCTION ledger.post_reversal(text, text, text, text, bigint, jsonb, integer) IS 'POST /v1/transfers/{id}/reversals: locks the original transfer, checks reversible and what is left, then moves the amount back through ledger.execute_movements and adds it to the original''s reversed_amount.';
COMMENT ON FUNCTION ledger.idempotency_key_state(text, text, integer) IS 'GET /v1/idempotency-keys/{key}: completed (a stored outcome: its method, path, status, created_at, expires_at = created_at + retention), in_progress (its advisory lock is held by a running execution), consumed (the stored outcome was purged but the key made a transfer or a hold, capture or void: it never executes again); no row for a key never used or whose purged outcome made nothing.';
COMMENT ON FUNCTION ledger.idempotency_key_json(text, text, text, text, integer, timestamptz, timestamptz, bigint) IS 'The API''s JSON of an idempotency key''s state.';
