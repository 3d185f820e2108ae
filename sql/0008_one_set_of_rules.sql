-- 0008_one_set_of_rules.sql: one implementation of the money rules for every path, and what joins it: holds,
-- reversals, conditional writes, and the client's view of its idempotency keys.
--
-- Before this file the rules of a credit, debit or transfer stood twice, ledger.execute_transfer (0001) for a lone
-- request and ledger.execute_movements (0005) for group commit and batches, and they had drifted apart (a failing
-- request created `@world:<CUR>` only when grouped; a currency-mismatch named either account when alone). Now
-- ledger.execute_movements is THE rules, for every path:
--   item kinds: 'move' (a transfer), 'reserve' (place a hold: the payer's held grows), 'release' (a void: it
--   shrinks), 'touch' (the expiry sweep: only lock the payer); a capture is a 'move' that first releases its hold;
--   If-Match: the version the item's payer (the credited account of a credit) must have, else 412;
--   funds checked on available = balance - held, after recording the expiry of the payer's holds that are due.
-- Around it, the idempotency machinery every keyed request shares (ledger.begin_keyed, ledger.finish_keyed):
--   ledger.post_transfer     a lone credit, debit or transfer: one item;
--   ledger.post_transfers    group commit: independent keyed requests in one transaction;
--   ledger.post_batch        one key for up to 1,000 items;
--   ledger.post_hold, post_capture, post_void, post_reversal, and ledger.expire_holds (the sweep).
-- Every keyed function answers the stored row's created_at (Idempotency-TTL); stored outcomes record the request's
-- method and path (GET /v1/idempotency-keys/{key}); key locks are keyed under a secret (ledger.key_lock_id).
-- Descriptions live in COMMENT ON (\df+ in psql); see also sql/README.md.



DROP FUNCTION ledger.execute_movements(text, boolean, text[], bytea[], integer[], text[], text[], bigint[], text[], jsonb[]);

DROP FUNCTION ledger.execute_transfer(text, text, bytea, text, text, bigint, text, jsonb);

COMMENT ON SCHEMA ledger IS 'Ledger: accounts, transfers, entries and stored idempotency outcomes. Money moves only through ledger.execute_movements, the one implementation of the rules; ledger.post_transfer, post_transfers and post_batch wrap it with idempotency. `SELECT * FROM ledger.invariant_breaches` is empty on a healthy ledger.';

-- Held: the sum of the payer's holds whose status is still 'pending' (due ones included until recorded expired).
ALTER TABLE ledger.accounts
    ADD COLUMN held bigint NOT NULL DEFAULT 0 CONSTRAINT accounts_held_non_negative CHECK (held >= 0);
-- No CHECK ties balance to held: held may still count a hold past expires_at that a capture or void is deciding at
-- that moment, which no longer counts in available (the rules check available; `ledger verify` does too).

CREATE TABLE ledger.holds (
    client_id       text        NOT NULL,
    id              bigint      GENERATED ALWAYS AS IDENTITY,
    idempotency_key text        NOT NULL CONSTRAINT holds_key_length CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    request_sha256  bytea       NOT NULL,
    from_account    text        NOT NULL,
    to_account      text        NOT NULL,
    amount          bigint      NOT NULL CONSTRAINT holds_amount_range CHECK (amount > 0 AND amount <= 9007199254740991),
    currency        text        NOT NULL,
    status          text        NOT NULL DEFAULT 'pending'
                    CONSTRAINT holds_status CHECK (status IN ('pending', 'captured', 'voided', 'expired')),
    captured_amount bigint      NOT NULL DEFAULT 0,
    transfer_id     bigint,
    finished_key    text,
    finished_sha256 bytea,
    metadata        jsonb       NOT NULL DEFAULT '{}' CONSTRAINT holds_metadata_object CHECK (jsonb_typeof(metadata) = 'object'),
    expires_at      timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (client_id, id),
    CONSTRAINT holds_one_per_key UNIQUE (client_id, idempotency_key),
    CONSTRAINT holds_distinct_accounts CHECK (from_account <> to_account),
    CONSTRAINT holds_captured_range CHECK (captured_amount >= 0 AND captured_amount <= amount),
    CONSTRAINT holds_transfer_iff_captured CHECK ((status = 'captured') = (transfer_id IS NOT NULL)
                                                  AND (status = 'captured') = (captured_amount > 0)),
    CONSTRAINT holds_finished_by_key CHECK ((finished_key IS NULL) = (finished_sha256 IS NULL)),
    CONSTRAINT holds_expiry_after_creation CHECK (expires_at > created_at),
    FOREIGN KEY (client_id, from_account) REFERENCES ledger.accounts (client_id, id),
    FOREIGN KEY (client_id, to_account) REFERENCES ledger.accounts (client_id, id),
    FOREIGN KEY (client_id, transfer_id) REFERENCES ledger.transfers (client_id, id)
);
CREATE INDEX holds_pending_by_payer ON ledger.holds (client_id, from_account, expires_at) WHERE status = 'pending';
CREATE INDEX holds_by_payer ON ledger.holds (client_id, from_account, id);
CREATE INDEX holds_due ON ledger.holds (expires_at) WHERE status = 'pending';
CREATE UNIQUE INDEX holds_finished_key ON ledger.holds (client_id, finished_key) WHERE finished_key IS NOT NULL;

ALTER TABLE ledger.transfers
    ADD COLUMN hold_id bigint,
    ADD COLUMN reverses bigint,
    ADD COLUMN reversed_amount bigint NOT NULL DEFAULT 0,
    ADD CONSTRAINT transfers_reversed_range CHECK (reversed_amount >= 0 AND reversed_amount <= amount),
    ADD CONSTRAINT transfers_reversal_not_reversed CHECK (reverses IS NULL OR reversed_amount = 0),
    ADD CONSTRAINT transfers_capture_or_reversal CHECK (hold_id IS NULL OR reverses IS NULL),
    ADD CONSTRAINT transfers_hold_fk FOREIGN KEY (client_id, hold_id) REFERENCES ledger.holds (client_id, id),
    ADD CONSTRAINT transfers_reverses_fk FOREIGN KEY (client_id, reverses) REFERENCES ledger.transfers (client_id, id);
CREATE UNIQUE INDEX transfers_one_per_hold ON ledger.transfers (client_id, hold_id) WHERE hold_id IS NOT NULL;
CREATE INDEX transfers_reversals ON ledger.transfers (client_id, reverses) WHERE reverses IS NOT NULL;

-- Stored outcomes now include 200 (capture, void) and 412 (version-mismatch).
ALTER TABLE ledger.idempotency_keys DROP CONSTRAINT idempotency_keys_status;
ALTER TABLE ledger.idempotency_keys
    ADD CONSTRAINT idempotency_keys_status CHECK (status_code IN (200, 201, 404, 412, 422));

-- Rendering (string bodies: see sql/README.md).

CREATE OR REPLACE FUNCTION ledger.transfer_json(t ledger.transfers) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
SELECT '{"id":' || to_json(t.id::text)::text
    || ',"from":' || to_json(ledger.public_account_id(t.from_account))::text
    || ',"to":' || to_json(ledger.public_account_id(t.to_account))::text
    || ',"amount":' || t.amount::text
    || ',"currency":' || to_json(t.currency)::text
    || ',"metadata":' || t.metadata::text
    || ',"created_at":' || to_json(ledger.rfc3339(t.created_at))::text
    || ',"hold_id":' || coalesce(to_json(t.hold_id::text)::text, 'null')
    || ',"reverses":' || coalesce(to_json(t.reverses::text)::text, 'null')
    || ',"reversed_amount":' || t.reversed_amount::text
    || '}'
$$;

CREATE FUNCTION ledger.effective_held(p_client text, p_account text, p_held bigint) RETURNS bigint
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
SELECT p_held - coalesce((
    SELECT sum(h.amount) FROM ledger.holds h
    WHERE p_held > 0 AND h.client_id = p_client AND h.from_account = p_account AND h.status = 'pending'
      AND h.expires_at <= now()), 0)::bigint
$$;

CREATE OR REPLACE FUNCTION ledger.account_json(a ledger.accounts) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
SELECT '{"id":' || to_json(ledger.public_account_id(a.id))::text
    || ',"currency":' || to_json(a.currency)::text
    || ',"balance":' || a.balance::text
    || ',"allow_negative":' || a.allow_negative::text
    || ',"version":' || a.version::text
    || ',"created_at":' || to_json(ledger.rfc3339(a.created_at))::text
    || ',"held":' || h.held::text
    || ',"available":' || (a.balance::numeric - h.held)::text
    || '}'
FROM (SELECT ledger.effective_held(a.client_id, a.id, a.held) AS held) h
$$;

CREATE FUNCTION ledger.hold_status(h ledger.holds) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
SELECT CASE WHEN h.status = 'pending' AND h.expires_at <= now() THEN 'expired' ELSE h.status END
$$;

CREATE FUNCTION ledger.hold_json(h ledger.holds) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
SELECT '{"id":' || to_json(h.id::text)::text
    || ',"from":' || to_json(ledger.public_account_id(h.from_account))::text
    || ',"to":' || to_json(ledger.public_account_id(h.to_account))::text
    || ',"amount":' || h.amount::text
    || ',"currency":' || to_json(h.currency)::text
    || ',"status":' || to_json(ledger.hold_status(h))::text
    || ',"captured_amount":' || h.captured_amount::text
    || ',"transfer_id":' || coalesce(to_json(h.transfer_id::text)::text, 'null')
    || ',"metadata":' || h.metadata::text
    || ',"expires_at":' || to_json(ledger.rfc3339(h.expires_at))::text
    || ',"created_at":' || to_json(ledger.rfc3339(h.created_at))::text
    || '}'
$$;

CREATE OR REPLACE FUNCTION ledger.batch_item_problem(p_code text, p_account text, p_held text, p_currency text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
-- The problem of one failed item: the same status, title and detail as a single transfer failing the same way.
-- For version-mismatch, p_held carries the account's current version (the problem's extra member).
RETURN CASE p_code
    WHEN 'account-not-found' THEN ledger.problem_json(404, p_code, 'Account not found',
        'Account ' || p_account || ' does not exist.')
    WHEN 'currency-mismatch' THEN ledger.problem_json(422, p_code, 'Currency mismatch',
        'Account ' || p_account || ' holds ' || p_held || ', not ' || p_currency || '.')
    WHEN 'insufficient-funds' THEN ledger.problem_json(422, p_code, 'Insufficient funds',
        'Account ' || p_account || ' has insufficient funds.')
    WHEN 'balance-overflow' THEN ledger.problem_json(422, p_code, 'Balance overflow',
        'The transfer would take a balance outside the signed 64-bit range.')
    WHEN 'version-mismatch' THEN rtrim(ledger.problem_json(412, p_code, 'Version mismatch',
        'Account ' || p_account || ' is at version ' || p_held || ', not the version If-Match names.'), '}')
        || ',"current_version":' || p_held || '}'
END;
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
    v_made_n    integer[];     -- the items made, their transfers' ids and JSON
    v_made_id   bigint[];
    v_made_body text[];
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
    WITH wanted AS (
        SELECT DISTINCT x.id FROM unnest(v_src || v_dst) AS x(id)
    ), locked AS MATERIALIZED (
        SELECT a.id, a.balance, a.version, a.allow_negative, a.held
        FROM ledger.accounts a
        WHERE a.client_id = p_client AND a.id IN (SELECT w.id FROM wanted w)
        ORDER BY a.id COLLATE "C"
        FOR UPDATE
    )
    SELECT array_agg(w.id), array_agg(coalesce(l.balance, 0)), array_agg(coalesce(l.version, 0)),
           array_agg(coalesce(l.allow_negative, true)), array_agg(coalesce(l.held, 0))
    INTO v_ids, v_balance, v_version, v_allow, v_held
    FROM wanted w
    LEFT JOIN locked l ON l.id = w.id
    WHERE l.id IS NOT NULL OR starts_with(w.id, '@world:');

    -- 3b. Holds of these payers past expires_at are expired for every later request: record that now, under the
    -- accounts' locks, so that the stored held stays exact. A due hold another transaction has locked (a capture or
    -- void deciding it) is left pending for it, but no longer counts in available either.
    v_due := array_fill(0::bigint, ARRAY[coalesce(cardinality(v_ids), 0)]);
    IF EXISTS (SELECT 1 FROM unnest(v_held) AS h(held) WHERE h.held > 0) THEN
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
    SELECT array_agg(f.at ORDER BY i.n), array_agg(t.at ORDER BY i.n)
    INTO v_from_at, v_to_at
    FROM unnest(v_src, v_dst) WITH ORDINALITY AS i(src, dst, n)
    LEFT JOIN unnest(v_ids) WITH ORDINALITY AS f(id, at) ON f.id = i.src
    LEFT JOIN unnest(v_ids) WITH ORDINALITY AS t(id, at) ON t.id = i.dst;

    -- 4. Item after item, in memory, under the locks.
    v_problem := array_fill(NULL::text, ARRAY[v_count]);
    v_from_ver := array_fill(NULL::bigint, ARRAY[v_count]);
    v_to_ver := v_from_ver;
    v_from_bal := v_from_ver;
    v_to_bal := v_from_ver;
    FOR i IN 1 .. v_count LOOP
        v_f := v_from_at[i];
        v_t := v_to_at[i];
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

    -- 5. Write: the transfers and their entries in one statement, the accounts in another.
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
    )
    SELECT array_agg(x.n), array_agg(x.id), array_agg(x.body) INTO v_made_n, v_made_id, v_made_body FROM numbered x;

    UPDATE ledger.accounts a SET balance = u.balance, version = u.version, held = u.held + u.due
    FROM unnest(v_ids, v_balance, v_version, v_held, v_due) AS u(id, balance, version, held, due)
    WHERE a.client_id = p_client AND a.id = u.id AND (a.version <> u.version OR a.held <> u.held + u.due);

    RETURN QUERY
    SELECT x.n::integer, CASE WHEN x.problem IS NULL THEN CASE WHEN m.id IS NULL THEN 200 ELSE 201 END
                              ELSE ((x.problem::jsonb) ->> 'status')::integer END,
           m.id, x.problem, coalesce(m.body, x.problem)
    FROM unnest(v_problem) WITH ORDINALITY AS x(problem, n)
    LEFT JOIN unnest(v_made_n, v_made_id, v_made_body) AS m(n, id, body) ON m.n = x.n
    ORDER BY x.n;
END;
$$;

-- Group commit and lone requests carry If-Match.

DROP FUNCTION ledger.movement_arrays(jsonb, integer[]);
CREATE FUNCTION ledger.movement_arrays(p_items jsonb, p_take integer[])
RETURNS TABLE (from_ids text[], to_ids text[], amounts bigint[], currencies text[], metadata jsonb[], if_match bigint[])
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT array_agg(x.value ->> 'from' ORDER BY x.n), array_agg(x.value ->> 'to' ORDER BY x.n),
           array_agg((x.value ->> 'amount')::bigint ORDER BY x.n), array_agg(x.value ->> 'currency' ORDER BY x.n),
           array_agg(coalesce(x.value -> 'metadata', '{}') ORDER BY x.n),
           array_agg((x.value ->> 'if_match')::bigint ORDER BY x.n)
    FROM jsonb_array_elements(p_items) WITH ORDINALITY AS x(value, n)
    WHERE x.n = ANY (p_take);
$$;

DROP FUNCTION ledger.post_transfer(text, text, text, text, text, bigint, text, jsonb, integer);

-- Holds.

CREATE FUNCTION ledger.hold_problem(p_code text, p_hold text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
SELECT CASE p_code
    WHEN 'hold-not-found' THEN ledger.problem_json(404, p_code, 'Hold not found', 'Hold ' || p_hold || ' does not exist.')
    WHEN 'hold-captured' THEN ledger.problem_json(422, p_code, 'Hold captured', 'Hold ' || p_hold || ' was captured.')
    WHEN 'hold-voided' THEN ledger.problem_json(422, p_code, 'Hold voided', 'Hold ' || p_hold || ' was voided.')
    WHEN 'hold-expired' THEN ledger.problem_json(422, p_code, 'Hold expired', 'Hold ' || p_hold || ' has expired.')
    WHEN 'capture-exceeds-hold' THEN ledger.problem_json(422, p_code, 'Capture exceeds hold',
        'The capture is more than hold ' || p_hold || ' holds.')
    WHEN 'transfer-not-found' THEN ledger.problem_json(404, p_code, 'Transfer not found',
        'Transfer ' || p_hold || ' does not exist.')
    WHEN 'transfer-not-reversible' THEN ledger.problem_json(422, p_code, 'Transfer not reversible',
        'Transfer ' || p_hold || ' is a reversal; a reversal cannot be reversed.')
    WHEN 'reversal-exceeds-transfer' THEN ledger.problem_json(422, p_code, 'Reversal exceeds transfer',
        'The reversal is more than what is left to reverse of transfer ' || p_hold || '.')
END
$$;

-- An id as the API writes it (decimal, no leading zero, within bigint), else NULL.
CREATE FUNCTION ledger.parse_id(p_id text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
SELECT CASE WHEN p_id ~ '^[1-9][0-9]{0,18}$' AND p_id::numeric <= 9223372036854775807 THEN p_id::bigint END
$$;

-- The hold a capture or void names, locked (holds are locked before accounts, always), or its stored failure.
CREATE FUNCTION ledger.lock_pending_hold(p_client text, p_hold text, OUT hold ledger.holds, OUT problem text)
LANGUAGE plpgsql AS $$
BEGIN
    SELECT * INTO hold FROM ledger.holds h WHERE h.client_id = p_client AND h.id = ledger.parse_id(p_hold) FOR UPDATE;
    IF NOT FOUND THEN
        problem := ledger.hold_problem('hold-not-found', p_hold);
    ELSIF ledger.hold_status(hold) <> 'pending' THEN
        problem := ledger.hold_problem('hold-' || ledger.hold_status(hold), p_hold);
    END IF;
END;
$$;

CREATE FUNCTION ledger.public_or_null(p_account text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
SELECT CASE WHEN starts_with(p_account, '@world:') THEN NULL ELSE p_account END
$$;

-- Takes locked, pending holds of one client out of their payers' held, through the rules (a void). Each item names
-- its payer on both sides: nothing moves, only the payer is locked (no `@world`).
CREATE FUNCTION ledger.release_holds(p_client text, p_holds bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_failed text;
BEGIN
    SELECT min(m.problem) INTO v_failed
    FROM (SELECT array_agg('release-' || h.id ORDER BY h.id) AS keys, array_agg(h.from_account ORDER BY h.id) AS payers,
                 array_agg(h.amount ORDER BY h.id) AS amounts, array_agg(h.currency ORDER BY h.id) AS currencies,
                 count(*) AS n
          FROM ledger.holds h WHERE h.client_id = p_client AND h.id = ANY (p_holds)) x,
    LATERAL ledger.execute_movements(p_client, false, x.keys, array_fill('\x'::bytea, ARRAY[x.n::integer]),
        array_fill(0, ARRAY[x.n::integer]), x.payers, x.payers, x.amounts,
        x.currencies, array_fill('{}'::jsonb, ARRAY[x.n::integer]), NULL,
        array_fill('release'::text, ARRAY[x.n::integer])) m;
    IF v_failed IS NOT NULL THEN
        RAISE EXCEPTION 'releasing holds failed: %', v_failed USING ERRCODE = 'internal_error';
    END IF;
END;
$$;

-- The expiry sweep of `ledger serve`: for the payers of at most p_batch due holds, runs the rules with a 'touch'
-- item each, which records every due hold of theirs as expired (step 3b of ledger.execute_movements); returns how
-- many holds it recorded. Several replicas may sweep at once: a hold is recorded once (it must still be pending),
-- and holds another transaction has locked are left for later.
CREATE FUNCTION ledger.expire_holds(p_batch integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_client record;
    v_before bigint;
    v_total  integer := 0;
BEGIN
    IF p_batch < 1 OR p_batch > 10000 THEN
        RAISE EXCEPTION 'batch size % outside 1..10000', p_batch USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR v_client IN
        SELECT d.client_id, array_agg(DISTINCT d.from_account) AS payers
        FROM (SELECT h.client_id, h.from_account FROM ledger.holds h
              WHERE h.status = 'pending' AND h.expires_at <= now()
              ORDER BY h.expires_at LIMIT p_batch) d
        GROUP BY d.client_id ORDER BY d.client_id
    LOOP
        SELECT count(*) INTO v_before FROM ledger.holds h
        WHERE h.client_id = v_client.client_id AND h.from_account = ANY (v_client.payers) AND h.status = 'pending'
          AND h.expires_at <= now();
        PERFORM 1
        FROM (SELECT array_agg(a.id ORDER BY a.id) AS ids, array_agg(a.currency ORDER BY a.id) AS currencies,
                     count(*)::integer AS n
              FROM ledger.accounts a WHERE a.client_id = v_client.client_id AND a.id = ANY (v_client.payers)) x,
        LATERAL ledger.execute_movements(v_client.client_id, false,
            (SELECT array_agg('expire-' || i) FROM generate_series(1, x.n) i), array_fill('\x'::bytea, ARRAY[x.n]),
            array_fill(0, ARRAY[x.n]), x.ids, x.ids, array_fill(1::bigint, ARRAY[x.n]), x.currencies,
            array_fill('{}'::jsonb, ARRAY[x.n]), NULL, array_fill('touch'::text, ARRAY[x.n])) m;
        v_total := v_total + v_before - (SELECT count(*) FROM ledger.holds h
            WHERE h.client_id = v_client.client_id AND h.from_account = ANY (v_client.payers) AND h.status = 'pending'
              AND h.expires_at <= now());
    END LOOP;
    RETURN v_total;
END;
$$;

-- Reads.

CREATE FUNCTION ledger.holds_page(
    p_client text, p_account text, p_status text, p_before_id bigint, p_limit integer
) RETURNS TABLE (holds_json text, last_id bigint, has_more boolean)
LANGUAGE plpgsql STABLE AS $$
-- One page of the holds whose payer is the account, newest first, below p_before_id (NULL: from the newest), of
-- one status (NULL: any; 'pending' and 'expired' as the API shows them, the database's clock deciding). No row at
-- all when the account does not exist.
BEGIN
    IF NOT EXISTS (SELECT 1 FROM ledger.accounts a WHERE a.client_id = p_client AND a.id = p_account) THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH page AS (
        SELECT h.*, ledger.hold_json(h) AS body
        FROM ledger.holds h
        WHERE h.client_id = p_client AND h.from_account = p_account
          AND (p_before_id IS NULL OR h.id < p_before_id)
          AND (p_status IS NULL OR ledger.hold_status(h) = p_status)
        ORDER BY h.id DESC
        LIMIT p_limit + 1
    ), numbered AS (
        SELECT p.id, p.body, row_number() OVER (ORDER BY p.id DESC) AS n FROM page p
    )
    SELECT '[' || coalesce(string_agg(x.body, ',' ORDER BY x.n) FILTER (WHERE x.n <= p_limit), '') || ']',
           min(x.id) FILTER (WHERE x.n <= p_limit),
           count(*) > p_limit
    FROM numbered x;
END;
$$;

-- Invariants, extended.

CREATE OR REPLACE VIEW ledger.invariant_breaches AS
SELECT 'balances-sum-to-zero' AS invariant, a.client_id, a.currency AS subject,
       'balances of ' || a.currency || ' sum to ' || sum(a.balance) AS detail
FROM ledger.accounts a
GROUP BY a.client_id, a.currency
HAVING sum(a.balance) <> 0
UNION ALL
SELECT 'two-entries-per-transfer', t.client_id, t.id::text,
       'transfer ' || t.id || ' has ' || count(e.transfer_id) || ' entries summing to ' || coalesce(sum(e.amount), 0)
FROM ledger.transfers t
LEFT JOIN ledger.entries e ON e.client_id = t.client_id AND e.transfer_id = t.id
GROUP BY t.client_id, t.id
HAVING count(e.transfer_id) <> 2 OR coalesce(sum(e.amount), 0) <> 0
    OR count(*) FILTER (WHERE e.account_id = t.from_account AND e.amount = -t.amount) <> 1
    OR count(*) FILTER (WHERE e.account_id = t.to_account AND e.amount = t.amount) <> 1
UNION ALL
SELECT 'balance-equals-entries', a.client_id, a.id,
       'account ' || a.id || ' has balance ' || a.balance || ' but its ' || count(e.account_id)
       || ' entries sum to ' || coalesce(sum(e.amount), 0) || ' (version ' || a.version || ')'
FROM ledger.accounts a
LEFT JOIN ledger.entries e ON e.client_id = a.client_id AND e.account_id = a.id
GROUP BY a.client_id, a.id, a.balance, a.version
HAVING a.balance <> coalesce(sum(e.amount), 0) OR a.version <> count(e.account_id)
UNION ALL
SELECT 'no-negative-balance', a.client_id, a.id,
       'account ' || a.id || ' does not allow negative balances but has ' || a.balance
FROM ledger.accounts a
WHERE NOT a.allow_negative AND a.balance < 0
UNION ALL
SELECT 'held-equals-pending-holds', a.client_id, a.id,
       'account ' || a.id || ' holds ' || a.held || ' but its pending holds sum to ' || coalesce(sum(h.amount), 0)
FROM ledger.accounts a
LEFT JOIN ledger.holds h ON h.client_id = a.client_id AND h.from_account = a.id AND h.status = 'pending'
GROUP BY a.client_id, a.id, a.held
HAVING a.held <> coalesce(sum(h.amount), 0)
UNION ALL
SELECT 'no-negative-available', a.client_id, a.id,
       'account ' || a.id || ' does not allow negative balances but has ' || a.balance || ' with '
       || ledger.effective_held(a.client_id, a.id, a.held) || ' held'
FROM ledger.accounts a
WHERE NOT a.allow_negative AND a.balance < ledger.effective_held(a.client_id, a.id, a.held)
UNION ALL
SELECT 'capture-has-one-transfer', h.client_id, h.id::text,
       'hold ' || h.id || ' is ' || h.status || ' with captured_amount ' || h.captured_amount || ' and '
       || count(t.id) || ' transfers'
FROM ledger.holds h
LEFT JOIN ledger.transfers t ON t.client_id = h.client_id AND t.hold_id = h.id
GROUP BY h.client_id, h.id, h.status, h.captured_amount, h.amount, h.from_account, h.to_account, h.transfer_id
HAVING (h.status = 'captured') <> (count(t.id) = 1) OR count(t.id) > 1
    OR (h.status = 'captured' AND (h.captured_amount NOT BETWEEN 1 AND h.amount
        OR bool_or(t.id <> h.transfer_id OR t.amount <> h.captured_amount OR t.from_account <> h.from_account
                   OR t.to_account <> h.to_account)))
UNION ALL
SELECT 'reversals-within-transfer', o.client_id, o.id::text,
       'transfer ' || o.id || ' of ' || o.amount || ' has reversals summing to ' || coalesce(sum(r.amount), 0)
       || ' (reversed_amount ' || o.reversed_amount || ')'
FROM ledger.transfers o
LEFT JOIN ledger.transfers r ON r.client_id = o.client_id AND r.reverses = o.id
GROUP BY o.client_id, o.id, o.amount, o.reversed_amount, o.reverses
HAVING coalesce(sum(r.amount), 0) > o.amount OR coalesce(sum(r.amount), 0) <> o.reversed_amount
    OR (o.reverses IS NOT NULL AND count(r.id) > 0)
    OR bool_or(r.from_account <> o.to_account OR r.to_account <> o.from_account OR r.currency <> o.currency);

CREATE OR REPLACE VIEW ledger.idempotency_outcomes AS
SELECT k.client_id,
       k.key,
       k.status_code,
       CASE k.status_code WHEN 201 THEN 'created' WHEN 200 THEN 'done' ELSE k.response_body::jsonb ->> 'code' END AS outcome,
       k.transfer_id,
       k.created_at,
       now() - k.created_at AS age
FROM ledger.idempotency_keys k;
COMMENT ON VIEW ledger.idempotency_outcomes IS 'Stored idempotency outcomes: created (201), done (200: a capture or void) or the problem code stored for replay. Order by created_at DESC for the recent ones.';

CREATE VIEW ledger.hold_overview AS
SELECT h.client_id, h.id, ledger.public_account_id(h.from_account) AS "from", ledger.public_account_id(h.to_account) AS "to",
       h.amount, h.currency, ledger.hold_status(h) AS status, h.status AS recorded_status, h.captured_amount,
       h.transfer_id, h.expires_at, h.created_at
FROM ledger.holds h;

CREATE VIEW ledger.reversals AS
SELECT r.client_id, r.id AS reversal_id, r.reverses AS original_id, r.amount, o.amount AS original_amount,
       o.reversed_amount AS original_reversed_amount, r.currency, ledger.public_account_id(r.from_account) AS "from",
       ledger.public_account_id(r.to_account) AS "to", r.created_at
FROM ledger.transfers r
JOIN ledger.transfers o ON o.client_id = r.client_id AND o.id = r.reverses;

COMMENT ON TABLE ledger.holds IS 'Two-phase transfers: a hold reserves amount of from (held) until it is captured (a transfer of captured_amount, with hold_id), voided or expired. status is what was recorded: a pending hold past expires_at is expired for every request and read (ledger.hold_status) and is recorded so by the sweep within --hold-sweep-interval-ms.';
COMMENT ON COLUMN ledger.holds.id IS 'Hold id (a string in the API).';
COMMENT ON COLUMN ledger.holds.idempotency_key IS 'The key of the POST /v1/holds that placed it.';
COMMENT ON COLUMN ledger.holds.finished_key IS 'The key of the capture or void that ended it, so that a retry after its stored answer was purged is answered with the hold, never run twice.';
COMMENT ON COLUMN ledger.holds.finished_sha256 IS 'SHA-256 of the fingerprint of that capture or void.';
COMMENT ON COLUMN ledger.holds.status IS 'pending, captured, voided or expired, as recorded.';
COMMENT ON COLUMN ledger.holds.to_account IS 'Credited account on capture; @world:<CUR> when the hold named none.';
COMMENT ON COLUMN ledger.holds.captured_amount IS '0 until captured; then the captured amount (1 .. amount).';
COMMENT ON COLUMN ledger.holds.transfer_id IS 'The capture''s transfer.';
COMMENT ON COLUMN ledger.holds.expires_at IS 'From this instant (the database''s clock) the hold counts in no held or available.';
COMMENT ON COLUMN ledger.accounts.held IS 'Sum of the amounts of the account''s holds (as payer) recorded pending. Every write of the account first records its due holds expired; reads subtract holds already past expires_at (ledger.effective_held), so that available = balance - held counts no expired hold.';
COMMENT ON COLUMN ledger.transfers.hold_id IS 'The hold this transfer captured, else NULL.';
COMMENT ON COLUMN ledger.transfers.reverses IS 'The transfer this one reverses (a refund), else NULL.';
COMMENT ON COLUMN ledger.transfers.reversed_amount IS 'Sum of the amounts of this transfer''s reversals; never above amount (CHECK).';
COMMENT ON FUNCTION ledger.execute_movements(text, boolean, text[], bytea[], integer[], text[], text[], bigint[], text[], jsonb[], bigint[], text[], bigint[], bigint[], bigint[]) IS 'THE money rules, for every path: lone requests, group commit, batches, holds, captures, voids, expiry and reversals. Items run in order, each as if alone after the ones before it: 404 account-not-found (from first), 412 version-mismatch (If-Match against the payer''s version; the credited account of a credit), 422 currency-mismatch (from first), 422 insufficient-funds (available = balance - held, unless allow_negative), 422 balance-overflow; else the item''s effect: move (a transfer, its two entries, both balances and versions; a capture first releases its hold), reserve (held grows), release or expire (held shrinks). @world:<CUR> is created only for an item that can run. Accounts are locked in one pass in byte order of their ids; holds and transfers a caller locks come before them. Atomic: at the first failure nothing is written.';
COMMENT ON FUNCTION ledger.expire_holds(integer) IS 'The sweep of ledger serve (--hold-sweep-interval-ms): for the payers of up to p_batch due holds, runs ledger.execute_movements with a touch item each, which records their due holds expired; returns how many it recorded.';
COMMENT ON FUNCTION ledger.holds_page(text, text, text, bigint, integer) IS 'GET /v1/accounts/{id}/holds: one page, newest first, keyed by hold id.';
COMMENT ON VIEW ledger.hold_overview IS 'Holds as the API shows them (status with expiry applied) beside what is recorded.';
COMMENT ON VIEW ledger.reversals IS 'Each reversal (refund) beside the transfer it reverses.';

ALTER TABLE ledger.idempotency_keys ADD COLUMN method text, ADD COLUMN path text;
COMMENT ON COLUMN ledger.idempotency_keys.method IS 'HTTP method of the request that stored this outcome; NULL for rows stored before 0008.';
COMMENT ON COLUMN ledger.idempotency_keys.path IS 'Path of that request (ids percent-decoded); NULL for rows stored before 0008.';

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
DROP FUNCTION ledger.post_transfers(text, jsonb);
DROP FUNCTION ledger.post_batch(text, text, text, boolean, jsonb, integer);
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