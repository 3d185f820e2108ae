-- 0010_faster_rules.sql: the same rules and guarantees as 0008, with less work per call. Nothing here changes what
-- a request answers or which rows it leaves; descriptions are in COMMENT ON (see sql/README.md).

-- A LANGUAGE sql function that cannot be inlined is parsed and planned again for every statement that calls it (the
-- plan lives as long as the calling expression: one transaction in PL/pgSQL). key_lock_id reads a table, so it is
-- never inlined: in PL/pgSQL its statement is planned once per session.
CREATE OR REPLACE FUNCTION ledger.key_lock_id(p_client text, p_key text) RETURNS bigint
LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $$
BEGIN
    RETURN (SELECT ('x' || encode(substr(sha256(k.key || convert_to(p_client, 'UTF8') || '\x00'::bytea
                                                || convert_to(p_key, 'UTF8')), 1, 8), 'hex'))::bit(64)::bigint
            FROM ledger.service_keys k WHERE k.name = 'key-lock');
END;
$$;

-- request_line returned one record, which is never inlined either; as a set-returning SQL function of one row it is
-- inlined into the statements that read it.
DROP FUNCTION ledger.request_line(text);
CREATE FUNCTION ledger.request_line(p_request text) RETURNS TABLE (method text, path text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
SELECT nullif(split_part(split_part(p_request, E'\n', 1), ' ', 1), ''),
       nullif(split_part(split_part(p_request, E'\n', 1), ' ', 2), '')
$$;
COMMENT ON FUNCTION ledger.request_line(text) IS 'The method and path of a request fingerprint (its first line), as stored beside an outcome: one row. A set-returning SQL function so that it is inlined where it is read.';

-- The idempotency prelude of every lone keyed request. Most keys are new and nobody executes them: their lock is
-- taken at once and one read follows, where 0008 read the key, took the lock, and read it again.
CREATE OR REPLACE FUNCTION ledger.begin_keyed(p_client text, p_key text, p_sha bytea, p_key_wait_ms integer)
RETURNS TABLE (outcome text, status_code integer, response_body text, created_at timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock(ledger.key_lock_id(p_client, p_key)) THEN
        -- Held elsewhere: a completed key is answered without waiting, else wait for the lock (at most p_key_wait_ms).
        RETURN QUERY SELECT * FROM ledger.stored_outcome(p_client, p_key, p_sha);
        IF FOUND THEN
            RETURN;
        END IF;
        IF NOT ledger.lock_key(p_client, p_key, p_key_wait_ms) THEN
            RETURN QUERY SELECT 'in_progress', 409, NULL::text, NULL::timestamptz;
            RETURN;
        END IF;
    END IF;
    RETURN QUERY SELECT * FROM ledger.stored_outcome(p_client, p_key, p_sha);
    IF FOUND THEN
        RETURN;
    END IF;
    -- Only a key whose stored answer was purged can have made something: two indexed probes tell, and only then is
    -- what it made read and rendered.
    IF EXISTS (SELECT 1 FROM ledger.transfers t WHERE t.client_id = p_client AND t.idempotency_key = p_key)
       OR EXISTS (SELECT 1 FROM ledger.holds h
                  WHERE h.client_id = p_client AND (h.idempotency_key = p_key OR h.finished_key = p_key)) THEN
        RETURN QUERY SELECT * FROM ledger.purged_key_outcome(p_client, p_key, p_sha);
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION ledger.execute_movements(
    p_client   text,
    p_atomic   boolean,
    p_keys     text[],
    p_shas     bytea[],
    p_items    integer[],
    p_from     text[],
    p_to       text[],
    p_amount   bigint[],
    p_currency text[],
    p_metadata jsonb[],
    p_if_match bigint[] DEFAULT NULL,
    p_kind     text[] DEFAULT NULL,
    p_release  bigint[] DEFAULT NULL,
    p_hold_id  bigint[] DEFAULT NULL,
    p_reverses bigint[] DEFAULT NULL
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
    v_missing   text[];        -- per item: its account-not-found, currency-mismatch, then any failure
    v_mismatch  text[];
    v_problem   text[];
    v_ids       text[];        -- the accounts, locked, in lock order; then their state as items run
    v_balance   bigint[];
    v_version   bigint[];
    v_allow     boolean[];
    v_held      bigint[];      -- held by pending holds not yet due: what available subtracts
    v_due       bigint[];      -- held by due holds another transaction has locked (still pending in the column)
    v_from_ver  bigint[];      -- per item: the versions and balances its two entries produce (NULL: no transfer)
    v_to_ver    bigint[];
    v_from_bal  bigint[];
    v_to_bal    bigint[];
    v_f         integer;
    v_t         integer;
    v_kind      text;
    v_amount    bigint;
    v_free      bigint;
BEGIN
    IF v_count = 0 THEN
        RETURN;
    END IF;
    -- 1. What fails whatever the balances, read before anything is written or locked (an account's existence and
    -- currency never change): an unknown account (`from` first), another currency (`from` first). `@world` always
    -- holds the item's currency.
    SELECT array_agg(i.src ORDER BY i.n), array_agg(i.dst ORDER BY i.n),
           array_agg(CASE
               WHEN i.f IS NOT NULL AND f.id IS NULL THEN ledger.batch_item_problem('account-not-found', i.src, NULL, NULL)
               WHEN i.t IS NOT NULL AND t.id IS NULL THEN ledger.batch_item_problem('account-not-found', i.dst, NULL, NULL)
           END ORDER BY i.n),
           array_agg(CASE
               WHEN f.currency <> i.currency THEN ledger.batch_item_problem('currency-mismatch', i.src, f.currency, i.currency)
               WHEN t.currency <> i.currency THEN ledger.batch_item_problem('currency-mismatch', i.dst, t.currency, i.currency)
           END ORDER BY i.n)
    INTO v_src, v_dst, v_missing, v_mismatch
    FROM (SELECT x.f, x.t, coalesce(x.f, '@world:' || x.currency) AS src, coalesce(x.t, '@world:' || x.currency) AS dst,
                 x.currency, x.n
          FROM unnest(p_from, p_to, p_currency) WITH ORDINALITY AS x(f, t, currency, n)) i
    LEFT JOIN ledger.accounts f ON i.f IS NOT NULL AND f.client_id = p_client AND f.id = i.f
    LEFT JOIN ledger.accounts t ON i.t IS NOT NULL AND t.client_id = p_client AND t.id = i.t;

    -- 2. `@world` of a currency is created on first use by an item that can run: never by a request that fails
    -- whatever the balances, so a request leaves the same rows alone or grouped. An atomic batch with such an item
    -- writes nothing at all.
    IF (array_position(p_from, NULL) IS NOT NULL OR array_position(p_to, NULL) IS NOT NULL)
       AND NOT (p_atomic AND cardinality(array_remove(v_missing, NULL) || array_remove(v_mismatch, NULL)) > 0) THEN
        INSERT INTO ledger.accounts (client_id, id, currency, allow_negative)
        SELECT DISTINCT p_client, '@world:' || x.c, x.c, true
        FROM unnest(p_from, p_to, p_currency, v_missing, v_mismatch) AS x(f, t, c, m, w)
        WHERE (x.f IS NULL OR x.t IS NULL) AND x.m IS NULL AND x.w IS NULL
        ON CONFLICT DO NOTHING;
    END IF;

    -- 3. Lock every account in one pass, in one fixed order (byte order of the id), and read them. A `@world` not
    -- created in step 2 serves only items that fail or batches that write nothing: it reads as a new one.
    SELECT array_agg(l.id), array_agg(l.balance), array_agg(l.version), array_agg(l.allow_negative), array_agg(l.held)
    INTO v_ids, v_balance, v_version, v_allow, v_held
    FROM (SELECT a.id, a.balance, a.version, a.allow_negative, a.held
          FROM ledger.accounts a
          WHERE a.client_id = p_client AND a.id = ANY (v_src || v_dst)
          ORDER BY a.id COLLATE "C"
          FOR UPDATE) l;
    IF array_position(p_from, NULL) IS NOT NULL OR array_position(p_to, NULL) IS NOT NULL THEN
        SELECT v_ids || array_agg(w.id), v_balance || array_agg(0::bigint), v_version || array_agg(0::bigint),
               v_allow || array_agg(true), v_held || array_agg(0::bigint)
        INTO v_ids, v_balance, v_version, v_allow, v_held
        FROM (SELECT DISTINCT x.id FROM unnest(v_src || v_dst) AS x(id) WHERE starts_with(x.id, '@world:')) w
        WHERE NOT (w.id = ANY (coalesce(v_ids, '{}')));
    END IF;

    -- 3b. Holds of these payers past expires_at are expired for every later request: record that now, under the
    -- accounts' locks, so that the stored held stays exact. A due hold another transaction has locked (a capture or
    -- void deciding it) is left pending for it, but no longer counts in available either.
    v_due := array_fill(0::bigint, ARRAY[coalesce(cardinality(v_ids), 0)]);
    IF 0 < ANY (v_held) THEN
        WITH due AS (
            SELECT h.id FROM ledger.holds h
            WHERE h.client_id = p_client AND h.from_account = ANY (v_ids) AND h.status = 'pending'
              AND h.expires_at <= now()
            FOR UPDATE SKIP LOCKED
        ), expired AS (
            UPDATE ledger.holds h SET status = 'expired'
            FROM due WHERE h.client_id = p_client AND h.id = due.id
            RETURNING h.from_account, h.amount
        )
        SELECT array_agg(x.held - coalesce(e.amount, 0) ORDER BY x.n) INTO v_held
        FROM unnest(v_ids, v_held) WITH ORDINALITY AS x(id, held, n)
        LEFT JOIN (SELECT e.from_account, sum(e.amount)::bigint AS amount FROM expired e GROUP BY e.from_account) e
          ON e.from_account = x.id;
        SELECT array_agg(x.held - coalesce(d.amount, 0) ORDER BY x.n), array_agg(coalesce(d.amount, 0) ORDER BY x.n)
        INTO v_held, v_due
        FROM unnest(v_ids, v_held) WITH ORDINALITY AS x(id, held, n)
        LEFT JOIN (SELECT h.from_account, sum(h.amount)::bigint AS amount FROM ledger.holds h
                   WHERE h.client_id = p_client AND h.from_account = ANY (v_ids) AND h.status = 'pending'
                     AND h.expires_at <= now()
                   GROUP BY h.from_account) d ON d.from_account = x.id;
    END IF;
    -- Each item's accounts as positions in v_ids: looked up in the loop for a few items (array_position), joined
    -- once for many.
    IF v_count > 32 THEN
        SELECT array_agg(f.at ORDER BY i.n), array_agg(t.at ORDER BY i.n)
        INTO v_from_at, v_to_at
        FROM unnest(v_src, v_dst) WITH ORDINALITY AS i(src, dst, n)
        LEFT JOIN unnest(v_ids) WITH ORDINALITY AS f(id, at) ON f.id = i.src
        LEFT JOIN unnest(v_ids) WITH ORDINALITY AS t(id, at) ON t.id = i.dst;
    END IF;

    -- 4. Item after item, in memory, under the locks.
    v_problem := array_fill(NULL::text, ARRAY[v_count]);
    v_from_ver := array_fill(NULL::bigint, ARRAY[v_count]);
    v_to_ver := v_from_ver;
    v_from_bal := v_from_ver;
    v_to_bal := v_from_ver;
    FOR i IN 1 .. v_count LOOP
        v_f := coalesce(v_from_at[i], array_position(v_ids, v_src[i]));
        v_t := coalesce(v_to_at[i], array_position(v_ids, v_dst[i]));
        v_kind := coalesce(p_kind[i], 'move');
        v_amount := p_amount[i];
        IF v_missing[i] IS NOT NULL THEN
            v_problem[i] := v_missing[i];
        ELSIF p_if_match[i] IS NOT NULL
              AND v_version[CASE WHEN p_from[i] IS NULL THEN v_t ELSE v_f END] <> p_if_match[i] THEN
            v_problem[i] := ledger.batch_item_problem('version-mismatch',
                CASE WHEN p_from[i] IS NULL THEN v_dst[i] ELSE v_src[i] END,
                v_version[CASE WHEN p_from[i] IS NULL THEN v_t ELSE v_f END]::text, NULL);
        ELSIF v_mismatch[i] IS NOT NULL THEN
            v_problem[i] := v_mismatch[i];
        ELSIF v_kind = 'release' THEN
            v_held[v_f] := v_held[v_f] - v_amount;
        ELSIF v_kind = 'touch' THEN
            NULL;
        ELSE
            -- What the payer may spend: balance - held, after a capture released its own hold.
            v_held[v_f] := v_held[v_f] - coalesce(p_release[i], 0);
            v_free := CASE WHEN v_allow[v_f] THEN NULL ELSE v_balance[v_f] - v_held[v_f] END;
            IF v_free < v_amount THEN
                v_problem[i] := ledger.batch_item_problem('insufficient-funds', v_src[i], NULL, NULL);
            ELSIF v_kind = 'reserve' THEN
                IF v_held[v_f] > 9223372036854775807 - v_amount THEN
                    v_problem[i] := ledger.batch_item_problem('balance-overflow', NULL, NULL, NULL);
                ELSE
                    v_held[v_f] := v_held[v_f] + v_amount;
                END IF;
            ELSIF v_balance[v_t] > 9223372036854775807 - v_amount
                  OR v_balance[v_f] < -9223372036854775808 + v_amount THEN
                v_problem[i] := ledger.batch_item_problem('balance-overflow', NULL, NULL, NULL);
            ELSE
                v_balance[v_f] := v_balance[v_f] - v_amount;
                v_version[v_f] := v_version[v_f] + 1;
                v_balance[v_t] := v_balance[v_t] + v_amount;
                v_version[v_t] := v_version[v_t] + 1;
                v_from_bal[i] := v_balance[v_f];
                v_from_ver[i] := v_version[v_f];
                v_to_bal[i] := v_balance[v_t];
                v_to_ver[i] := v_version[v_t];
            END IF;
            IF v_problem[i] IS NOT NULL THEN
                v_held[v_f] := v_held[v_f] + coalesce(p_release[i], 0);
            END IF;
        END IF;
        IF p_atomic AND v_problem[i] IS NOT NULL THEN
            RETURN QUERY SELECT i, ((v_problem[i]::jsonb) ->> 'status')::integer, NULL::bigint, v_problem[i], v_problem[i];
            RETURN;
        END IF;
    END LOOP;

    -- 5. Write, and answer, in one statement: the transfers, their entries, the accounts' new state, then one row
    -- per item in order. (Data-modifying WITH queries always run to completion, read or not.)
    RETURN QUERY
    WITH made AS (
        INSERT INTO ledger.transfers AS t
            (client_id, idempotency_key, request_sha256, from_account, to_account, amount, currency, metadata, batch_item,
             hold_id, reverses)
        SELECT p_client, i.key, i.sha, i.src, i.dst, i.amount, i.currency, i.metadata, i.item, p_hold_id[i.n],
               p_reverses[i.n]
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
    ), accounts AS (
        UPDATE ledger.accounts a SET balance = u.balance, version = u.version, held = u.held + u.due
        FROM unnest(v_ids, v_balance, v_version, v_held, v_due) AS u(id, balance, version, held, due)
        WHERE a.client_id = p_client AND a.id = u.id AND (a.version <> u.version OR a.held <> u.held + u.due)
    )
    -- Events of the transfers made (one per row of `numbered`) are written here, as one more WITH query.
    SELECT x.n::integer, CASE WHEN x.problem IS NULL THEN CASE WHEN m.id IS NULL THEN 200 ELSE 201 END
                              ELSE ((x.problem::jsonb) ->> 'status')::integer END,
           m.id, x.problem, coalesce(m.body, x.problem)
    FROM unnest(v_problem) WITH ORDINALITY AS x(problem, n)
    LEFT JOIN numbered m ON m.n = x.n
    ORDER BY x.n;
END;
$$;


COMMENT ON FUNCTION ledger.key_lock_id(text, text) IS 'The transaction-scoped advisory lock id of one (client, idempotency key): the first 8 bytes of SHA-256 over the service''s key-lock secret, the client and the key. Every execution of the key takes it (ledger.begin_keyed, ledger.lock_key, or tried by ledger.post_transfers); the key lookup tries it to tell in_progress. PL/pgSQL, not SQL: a SQL function that reads a table is not inlined and would be planned anew on every call.';
COMMENT ON FUNCTION ledger.begin_keyed(text, text, bytea, integer) IS 'The idempotency prelude of every lone keyed request: replay or reused for a completed key, in_progress after p_key_wait_ms (0: at once), what a purged key made; no row: the caller executes under the key''s lock. The lock is tried first; only when another transaction holds it is the stored outcome read before waiting.';
