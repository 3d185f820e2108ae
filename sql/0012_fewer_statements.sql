-- 0012_fewer_statements.sql: the one-transfer call with fewer statements, the same rules.
--
-- The idempotency prelude and epilogue every lone keyed request shares (ledger.begin_keyed, ledger.finish_keyed)
-- answer one row as OUT parameters instead of a set, so their callers call them as plain expressions, which
-- PL/pgSQL evaluates without starting a statement, instead of `SELECT * FROM` a set-returning function, which
-- starts one and copies its rows through a tuplestore. finish_keyed stores the outcome itself (it called
-- ledger.store_request_outcome, one more call and statement); post_batch now stores through it too. The rules
-- themselves (ledger.execute_movements) are unchanged here. Descriptions live in COMMENT ON (\df+ in psql).

DROP FUNCTION ledger.begin_keyed(text, text, bytea, integer);
CREATE FUNCTION ledger.begin_keyed(
    p_client text, p_key text, p_sha bytea, p_key_wait_ms integer,
    OUT outcome text, OUT status_code integer, OUT response_body text, OUT created_at timestamptz
)
LANGUAGE plpgsql AS $$
DECLARE
    v_made boolean;
BEGIN
    IF NOT pg_try_advisory_xact_lock(ledger.key_lock_id(p_client, p_key)) THEN
        -- Held elsewhere: a completed key is answered without waiting, else wait for the lock (at most p_key_wait_ms).
        SELECT s.outcome, s.status_code, s.response_body, s.created_at
        INTO outcome, status_code, response_body, created_at
        FROM ledger.stored_outcome(p_client, p_key, p_sha) s;
        IF FOUND THEN
            RETURN;
        END IF;
        IF NOT ledger.lock_key(p_client, p_key, p_key_wait_ms) THEN
            outcome := 'in_progress';
            status_code := 409;
            RETURN;
        END IF;
    END IF;
    -- Under the lock, one read: the stored outcome, else whether the key made something before its stored answer
    -- was purged (two indexed probes, read only for a key without a stored answer).
    SELECT s.outcome, s.status_code, s.response_body, s.created_at,
           s.outcome IS NULL
           AND (EXISTS (SELECT 1 FROM ledger.transfers t WHERE t.client_id = p_client AND t.idempotency_key = p_key)
                OR EXISTS (SELECT 1 FROM ledger.holds h
                           WHERE h.client_id = p_client AND (h.idempotency_key = p_key OR h.finished_key = p_key)))
    INTO outcome, status_code, response_body, created_at, v_made
    FROM (SELECT) one
    LEFT JOIN ledger.stored_outcome(p_client, p_key, p_sha) s ON true;
    IF v_made THEN
        SELECT p.outcome, p.status_code, p.response_body, p.created_at
        INTO outcome, status_code, response_body, created_at
        FROM ledger.purged_key_outcome(p_client, p_key, p_sha) p;
    END IF;
END;
$$;

DROP FUNCTION ledger.finish_keyed(text, text, bytea, text, integer, text, bigint);
CREATE FUNCTION ledger.finish_keyed(
    p_client text, p_key text, p_sha bytea, p_request text, p_status integer, p_body text, p_transfer_id bigint,
    OUT outcome text, OUT status_code integer, OUT response_body text, OUT created_at timestamptz
)
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ledger.idempotency_keys (client_id, key, request_sha256, status_code, response_body, transfer_id,
                                         method, path)
    SELECT p_client, p_key, p_sha, p_status, p_body, CASE WHEN p_status = 201 THEN p_transfer_id END, l.method, l.path
    FROM ledger.request_line(p_request) l
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        -- Impossible under the key's lock: it would be a bug. Roll back with a retryable SQLSTATE.
        RAISE EXCEPTION 'idempotency key stored twice' USING ERRCODE = 'serialization_failure';
    END IF;
    outcome := 'executed';
    status_code := p_status;
    response_body := p_body;
    created_at := now();
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
    p_if_match      bigint,
    p_key_wait_ms   integer
) RETURNS TABLE (outcome text, status_code integer, response_body text, created_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_sha    bytea := sha256(convert_to(p_request, 'UTF8'));
    v_answer record;
    v_result record;
BEGIN
    v_answer := ledger.begin_keyed(p_client, p_key, v_sha, p_key_wait_ms);
    IF v_answer.outcome IS NULL THEN
        SELECT * INTO v_result FROM ledger.execute_movements(p_client, false, ARRAY[p_key], ARRAY[v_sha], ARRAY[0],
            ARRAY[p_from], ARRAY[p_to], ARRAY[p_amount], ARRAY[p_currency], ARRAY[p_metadata], ARRAY[p_if_match]);
        v_answer := ledger.finish_keyed(p_client, p_key, v_sha, p_request, v_result.status_code, v_result.body,
                                        v_result.transfer_id);
    END IF;
    outcome := v_answer.outcome;
    status_code := v_answer.status_code;
    response_body := v_answer.response_body;
    created_at := v_answer.created_at;
    RETURN NEXT;
END;
$$;
CREATE OR REPLACE FUNCTION ledger.post_hold(
    p_client text, p_key text, p_request text, p_from text, p_to text, p_amount bigint, p_currency text,
    p_metadata jsonb, p_expires_in_s integer, p_if_match bigint, p_key_wait_ms integer
) RETURNS TABLE (outcome text, status_code integer, response_body text, created_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_sha    bytea := sha256(convert_to(p_request, 'UTF8'));
    v_answer record;
    v_result record;
    v_hold   ledger.holds;
    v_body   text;
BEGIN
    v_answer := ledger.begin_keyed(p_client, p_key, v_sha, p_key_wait_ms);
    IF v_answer.outcome IS NOT NULL THEN
        RETURN QUERY SELECT v_answer.outcome, v_answer.status_code, v_answer.response_body, v_answer.created_at;
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
    v_body := ledger.hold_json(v_hold);
    PERFORM ledger.append_events(p_client, 'hold.created', ARRAY[v_hold.id::text], ARRAY[v_body]);
    RETURN QUERY SELECT * FROM ledger.finish_keyed(p_client, p_key, v_sha, p_request, 201, v_body, NULL);
END;
$$;

CREATE OR REPLACE FUNCTION ledger.post_capture(
    p_client text, p_key text, p_request text, p_hold text, p_amount bigint, p_metadata jsonb, p_key_wait_ms integer
) RETURNS TABLE (outcome text, status_code integer, response_body text, created_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_sha    bytea := sha256(convert_to(p_request, 'UTF8'));
    v_answer record;
    v_locked record;
    v_hold   ledger.holds;
    v_body   text;
    v_amount bigint;
    v_result record;
BEGIN
    v_answer := ledger.begin_keyed(p_client, p_key, v_sha, p_key_wait_ms);
    IF v_answer.outcome IS NOT NULL THEN
        RETURN QUERY SELECT v_answer.outcome, v_answer.status_code, v_answer.response_body, v_answer.created_at;
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
    v_body := ledger.hold_json(v_hold);
    PERFORM ledger.append_events(p_client, 'hold.' || v_hold.status, ARRAY[v_hold.id::text], ARRAY[v_body]);
    RETURN QUERY SELECT * FROM ledger.finish_keyed(p_client, p_key, v_sha, p_request, 200, v_body, NULL);
END;
$$;

CREATE OR REPLACE FUNCTION ledger.post_void(p_client text, p_key text, p_request text, p_hold text, p_key_wait_ms integer)
RETURNS TABLE (outcome text, status_code integer, response_body text, created_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_sha    bytea := sha256(convert_to(p_request, 'UTF8'));
    v_answer record;
    v_locked record;
    v_hold   ledger.holds;
    v_body   text;
BEGIN
    v_answer := ledger.begin_keyed(p_client, p_key, v_sha, p_key_wait_ms);
    IF v_answer.outcome IS NOT NULL THEN
        RETURN QUERY SELECT v_answer.outcome, v_answer.status_code, v_answer.response_body, v_answer.created_at;
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
    v_body := ledger.hold_json(v_hold);
    PERFORM ledger.append_events(p_client, 'hold.' || v_hold.status, ARRAY[v_hold.id::text], ARRAY[v_body]);
    RETURN QUERY SELECT * FROM ledger.finish_keyed(p_client, p_key, v_sha, p_request, 200, v_body, NULL);
END;
$$;

CREATE OR REPLACE FUNCTION ledger.post_reversal(
    p_client text, p_key text, p_request text, p_transfer text, p_amount bigint, p_metadata jsonb, p_key_wait_ms integer
) RETURNS TABLE (outcome text, status_code integer, response_body text, created_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_sha      bytea := sha256(convert_to(p_request, 'UTF8'));
    v_answer   record;
    v_original ledger.transfers;
    v_amount   bigint;
    v_problem  text;
    v_result   record;
BEGIN
    v_answer := ledger.begin_keyed(p_client, p_key, v_sha, p_key_wait_ms);
    IF v_answer.outcome IS NOT NULL THEN
        RETURN QUERY SELECT v_answer.outcome, v_answer.status_code, v_answer.response_body, v_answer.created_at;
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

CREATE OR REPLACE FUNCTION ledger.post_batch(
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
                RETURN QUERY SELECT * FROM ledger.finish_keyed(p_client, p_key, v_sha, p_request, v_row.status_code, v_body,
                                                               NULL);
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
    RETURN QUERY SELECT * FROM ledger.finish_keyed(p_client, p_key, v_sha, p_request, 201, v_body, NULL);
END;
$$;

-- finish_keyed stores every keyed outcome now; nothing calls this any more.
DROP FUNCTION ledger.store_request_outcome(text, text, bytea, text, integer, text, bigint);

COMMENT ON FUNCTION ledger.begin_keyed(text, text, bytea, integer) IS 'The idempotency prelude of every lone keyed request, one row as OUT parameters: replay or reused for a completed key, in_progress after p_key_wait_ms (0: at once), what a purged key made; outcome NULL: the caller executes under the key''s lock. The lock is tried first; only when another transaction holds it is the stored outcome read before waiting. Called as an expression (v := ledger.begin_keyed(...)), which starts no statement.';
COMMENT ON FUNCTION ledger.finish_keyed(text, text, bytea, text, integer, text, bigint) IS 'The idempotency epilogue of every keyed request: stores the executed request''s outcome (status, body, method and path; the transfer for a 201) for replay and answers it, created now, as OUT parameters. A stored row already there aborts the transaction with a retryable SQLSTATE (it would mean two executions of one key).';
COMMENT ON FUNCTION ledger.post_transfer(text, text, text, text, text, bigint, text, jsonb, bigint, integer) IS 'POST /v1/credits, /v1/debits, /v1/transfers alone: ledger.begin_keyed, then one item of ledger.execute_movements, then ledger.finish_keyed. created_at: when the answered outcome was stored (NULL when it is not a stored row).';
