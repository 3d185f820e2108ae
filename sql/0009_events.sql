-- 0009_events.sql: a gap-free feed of every change, and webhooks that push it; and the money rules with less work
-- per call (execute_movements writes in one statement; the keyed prelude reads once).
--
-- Every committed change appends its events in its own transaction (ledger.append_events, called by the rules
-- after every lock they take). Positions in a client's feed are assigned after commit, in commit order, by
-- ledger.sequence_events under the client's event_heads row lock: an event that commits late is never skipped.
-- Descriptions live in COMMENT ON (\d+ and \df+ in psql).

CREATE SEQUENCE ledger.events_seq AS bigint;

CREATE TABLE ledger.events (
    client_id  text        NOT NULL,
    seq        bigint      NOT NULL DEFAULT nextval('ledger.events_seq'),
    xid        xid8        NOT NULL DEFAULT pg_current_xact_id(),
    position   bigint      CONSTRAINT events_position_positive CHECK (position > 0),
    type       text        NOT NULL CONSTRAINT events_type CHECK (type IN ('account.created', 'transfer.created',
                           'hold.created', 'hold.captured', 'hold.voided', 'hold.expired')),
    subject    text        NOT NULL,
    data       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (client_id, seq)
);
-- Partial: an event is indexed by position once it has one, not when it is appended (one index write less per event).
CREATE UNIQUE INDEX events_one_per_position ON ledger.events (client_id, position) WHERE position IS NOT NULL;
ALTER SEQUENCE ledger.events_seq OWNED BY ledger.events.seq;
CREATE INDEX events_unsequenced ON ledger.events (client_id, seq) WHERE position IS NULL;

CREATE TABLE ledger.event_heads (
    client_id text   PRIMARY KEY REFERENCES ledger.clients (id),
    position  bigint NOT NULL DEFAULT 0 CONSTRAINT event_heads_position CHECK (position >= 0)
);

CREATE TABLE ledger.webhooks (
    client_id     text        NOT NULL REFERENCES ledger.clients (id),
    id            text        NOT NULL CONSTRAINT webhooks_id_format CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$'),
    url           text        NOT NULL CONSTRAINT webhooks_url CHECK (url ~* '^https?://' AND octet_length(url) <= 2048),
    types         text[]      NOT NULL DEFAULT '{}',
    enabled       boolean     NOT NULL DEFAULT true,
    secret_nonce  bytea       NOT NULL CONSTRAINT webhooks_nonce_length CHECK (length(secret_nonce) = 32),
    secret_key_id text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (client_id, id)
);

CREATE TABLE ledger.webhook_deliveries (
    client_id       text        NOT NULL,
    webhook_id      text        NOT NULL,
    event_seq       bigint      NOT NULL,
    attempts        integer     NOT NULL DEFAULT 0 CONSTRAINT webhook_deliveries_attempts CHECK (attempts >= 0),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    failed          boolean     NOT NULL DEFAULT false,
    last_status     integer,
    last_error      text,
    PRIMARY KEY (client_id, webhook_id, event_seq),
    FOREIGN KEY (client_id, webhook_id) REFERENCES ledger.webhooks (client_id, id) ON DELETE CASCADE,
    FOREIGN KEY (client_id, event_seq) REFERENCES ledger.events (client_id, seq)
);
CREATE INDEX webhook_deliveries_due ON ledger.webhook_deliveries (next_attempt_at) WHERE NOT failed;

-- The one way events are written: the events, then one delivery per enabled webhook that wants their type.
-- PL/pgSQL, so that its plans are kept per connection (a SQL function's are made again at every call), and the
-- fan-out runs only for a client that has an enabled webhook.
CREATE FUNCTION ledger.append_events(p_client text, p_type text, p_subjects text[], p_data text[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_seqs bigint[];
BEGIN
    IF p_subjects IS NULL THEN
        RETURN 0;
    END IF;
    WITH appended AS (
        INSERT INTO ledger.events (client_id, type, subject, data)
        SELECT p_client, p_type, x.subject, x.data
        FROM unnest(p_subjects, p_data) WITH ORDINALITY AS x(subject, data, n)
        ORDER BY x.n
        RETURNING seq
    )
    SELECT array_agg(a.seq) INTO v_seqs FROM appended a;
    IF EXISTS (SELECT 1 FROM ledger.webhooks w WHERE w.client_id = p_client AND w.enabled) THEN
        INSERT INTO ledger.webhook_deliveries (client_id, webhook_id, event_seq)
        SELECT p_client, w.id, s.seq
        FROM ledger.webhooks w CROSS JOIN unnest(v_seqs) AS s(seq)
        WHERE w.client_id = p_client AND w.enabled AND (cardinality(w.types) = 0 OR p_type = ANY (w.types));
    END IF;
    RETURN cardinality(v_seqs);
END;
$$;

-- The API's JSON for an event (the body of a webhook delivery too).
CREATE FUNCTION ledger.event_json(p_position bigint, p_type text, p_created_at timestamptz, p_data text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
SELECT '{"id":"' || p_position::text || '","type":' || to_json(p_type)::text
    || ',"created_at":' || to_json(ledger.rfc3339(p_created_at))::text || ',"data":' || p_data || '}'
$$;

-- Feed positions. Events get theirs after they commit, from the client's head, in this order: transactions by
-- their first event's seq, events within one by seq. A transaction appends its events after it has taken every
-- lock it takes, so one that waited for another's row lock appends after that one committed: the events touching
-- an account follow its versions, and a transaction's events are adjacent.
CREATE FUNCTION ledger.sequence_events(p_client text, p_wait boolean) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_head bigint;
    v_done integer;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM ledger.events e WHERE e.client_id = p_client AND e.position IS NULL) THEN
        RETURN 0;
    END IF;
    INSERT INTO ledger.event_heads (client_id) VALUES (p_client) ON CONFLICT DO NOTHING;
    IF p_wait THEN
        SELECT h.position INTO v_head FROM ledger.event_heads h WHERE h.client_id = p_client FOR UPDATE;
    ELSE
        SELECT h.position INTO v_head FROM ledger.event_heads h WHERE h.client_id = p_client FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN 0;  -- another transaction is sequencing this client right now
        END IF;
    END IF;
    -- A new statement, a new snapshot: it sees what the sequencer we may have waited for committed. Whole
    -- transactions only, at most about 10,000 events per call.
    WITH pending AS (
        SELECT e.seq, min(e.seq) OVER (PARTITION BY e.xid) AS first_seq
        FROM ledger.events e
        WHERE e.client_id = p_client AND e.position IS NULL
    ), txns AS (
        SELECT p.first_seq, sum(count(*)) OVER (ORDER BY p.first_seq) - count(*) AS before
        FROM pending p GROUP BY p.first_seq
    ), chosen AS (
        SELECT p.seq, v_head + row_number() OVER (ORDER BY p.first_seq, p.seq) AS position
        FROM pending p JOIN txns t ON t.first_seq = p.first_seq
        WHERE t.before < 10000
    ), placed AS (
        UPDATE ledger.events e SET position = c.position
        FROM chosen c WHERE e.client_id = p_client AND e.seq = c.seq
        RETURNING c.position
    )
    SELECT count(*) INTO v_done FROM placed;
    UPDATE ledger.event_heads h SET position = h.position + v_done WHERE h.client_id = p_client;
    RETURN v_done;
END;
$$;

-- The background sequencer of `ledger serve`: the clients with unsequenced events, at most p_clients of them,
-- skipping any another transaction is sequencing; returns how many events it placed.
CREATE FUNCTION ledger.sequence_pending_events(p_clients integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_client text;
    v_total  integer := 0;
BEGIN
    FOR v_client IN
        SELECT DISTINCT e.client_id FROM ledger.events e WHERE e.position IS NULL ORDER BY 1 LIMIT p_clients
    LOOP
        v_total := v_total + ledger.sequence_events(v_client, false);
    END LOOP;
    RETURN v_total;
END;
$$;

-- What a long-poll compares: it grows with every event that commits (unsequenced ones count until they are
-- placed, when the head grows by as many) and is stable otherwise.
CREATE FUNCTION ledger.event_marks(p_clients text[]) RETURNS TABLE (client_id text, mark bigint)
LANGUAGE sql STABLE AS $$
SELECT c.id,
       coalesce((SELECT h.position FROM ledger.event_heads h WHERE h.client_id = c.id), 0)
       + (SELECT count(*) FROM ledger.events e WHERE e.client_id = c.id AND e.position IS NULL)
FROM unnest(p_clients) AS c(id)
$$;

-- GET /v1/events: the mark before anything is read, then the client's events are sequenced and one page read.
-- cursor_ok is false for an `after` this client was never given.
CREATE FUNCTION ledger.events_page(p_client text, p_after bigint, p_limit integer)
RETURNS TABLE (events_json text, next_after bigint, mark bigint, cursor_ok boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_mark bigint;
    v_head bigint;
BEGIN
    IF p_limit < 1 OR p_limit > 1000 THEN
        RAISE EXCEPTION 'limit % outside 1..1000', p_limit USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT m.mark INTO v_mark FROM ledger.event_marks(ARRAY[p_client]) m;
    PERFORM ledger.sequence_events(p_client, true);
    SELECT h.position INTO v_head FROM ledger.event_heads h WHERE h.client_id = p_client;
    IF p_after IS NOT NULL AND (p_after < 1 OR p_after > coalesce(v_head, 0)) THEN
        RETURN QUERY SELECT NULL::text, NULL::bigint, v_mark, false;
        RETURN;
    END IF;
    RETURN QUERY
    WITH page AS (
        SELECT e.position, e.type, e.created_at, e.data FROM ledger.events e
        WHERE e.client_id = p_client AND e.position > coalesce(p_after, 0)
        ORDER BY e.position
        LIMIT p_limit
    )
    SELECT '[' || coalesce(string_agg(ledger.event_json(p.position, p.type, p.created_at, p.data), ','
                                      ORDER BY p.position), '') || ']',
           coalesce(max(p.position), p_after), v_mark, true
    FROM page p;
END;
$$;

-- Webhooks.

CREATE FUNCTION ledger.webhook_json(p_client text, p_id text) RETURNS text
LANGUAGE sql STABLE AS $$
SELECT '{"id":' || to_json(w.id)::text || ',"url":' || to_json(w.url)::text || ',"types":' || to_json(w.types)::text
    || ',"enabled":' || w.enabled::text || ',"created_at":' || to_json(ledger.rfc3339(w.created_at))::text
    || ',"pending":' || (SELECT count(*) FROM ledger.webhook_deliveries d
                         WHERE d.client_id = w.client_id AND d.webhook_id = w.id AND NOT d.failed)::text
    || ',"failed":' || (SELECT count(*) FROM ledger.webhook_deliveries d
                        WHERE d.client_id = w.client_id AND d.webhook_id = w.id AND d.failed)::text
    || '}'
FROM ledger.webhooks w WHERE w.client_id = p_client AND w.id = p_id
$$;

-- PUT /v1/webhooks/{id}: 201 when new (the caller adds the secret it derives from secret_nonce), else 200 with
-- url, types and enabled replaced; the secret stays.
CREATE FUNCTION ledger.put_webhook(
    p_client text, p_id text, p_url text, p_types text[], p_enabled boolean, p_nonce bytea, p_key_id text
) RETURNS TABLE (status_code integer, body text, secret_nonce bytea, secret_key_id text)
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ledger.webhooks (client_id, id, url, types, enabled, secret_nonce, secret_key_id)
    VALUES (p_client, p_id, p_url, p_types, p_enabled, p_nonce, p_key_id)
    ON CONFLICT DO NOTHING;
    IF FOUND THEN
        RETURN QUERY SELECT 201, ledger.webhook_json(p_client, p_id), p_nonce, p_key_id;
        RETURN;
    END IF;
    UPDATE ledger.webhooks w SET url = p_url, types = p_types, enabled = p_enabled
    WHERE w.client_id = p_client AND w.id = p_id;
    RETURN QUERY SELECT 200, ledger.webhook_json(p_client, p_id), NULL::bytea, NULL::text;
END;
$$;

CREATE FUNCTION ledger.webhooks_list(p_client text) RETURNS text
LANGUAGE sql STABLE AS $$
SELECT '{"webhooks":[' || coalesce(string_agg(ledger.webhook_json(w.client_id, w.id), ',' ORDER BY w.id), '') || ']}'
FROM ledger.webhooks w WHERE w.client_id = p_client
$$;

-- Due deliveries, claimed for one attempt: at most p_limit, at most p_per_webhook minus what this process has in
-- flight for a webhook (p_busy_*), the oldest due first. A claim counts the attempt and moves next_attempt_at past
-- the attempt's lease, so a process killed mid-attempt leaves it to be retried after that. A delivery that has
-- used its attempts is marked failed instead (claimed = false). Its commit does not wait for the WAL flush: a claim
-- lost to a crash of the database only means an attempt made again, which at-least-once delivery allows.
CREATE FUNCTION ledger.claim_deliveries(
    p_limit integer, p_per_webhook integer, p_busy_clients text[], p_busy_webhooks text[], p_busy_counts integer[],
    p_lease_ms integer, p_attempts_max integer
) RETURNS TABLE (client_id text, webhook_id text, event_seq bigint, claimed boolean, attempt integer, url text,
                 secret_nonce bytea, secret_key_id text, event_id bigint, event_created_at timestamptz, body text)
LANGUAGE sql AS $$
SELECT set_config('synchronous_commit', 'off', true);
WITH due AS (
    SELECT d.client_id, d.webhook_id, d.event_seq, d.next_attempt_at
    FROM ledger.webhook_deliveries d
    JOIN ledger.events e ON e.client_id = d.client_id AND e.seq = d.event_seq
    WHERE NOT d.failed AND d.next_attempt_at <= now() AND e.position IS NOT NULL
    ORDER BY d.next_attempt_at
    LIMIT p_limit * 4
    FOR UPDATE OF d SKIP LOCKED
), ranked AS (
    SELECT d.*, row_number() OVER (PARTITION BY d.client_id, d.webhook_id ORDER BY d.next_attempt_at, d.event_seq)
                + coalesce(b.busy, 0) AS slot
    FROM due d
    LEFT JOIN unnest(p_busy_clients, p_busy_webhooks, p_busy_counts) AS b(client_id, webhook_id, busy)
      ON b.client_id = d.client_id AND b.webhook_id = d.webhook_id
), chosen AS (
    SELECT r.client_id, r.webhook_id, r.event_seq FROM ranked r
    WHERE r.slot <= p_per_webhook
    ORDER BY r.next_attempt_at
    LIMIT p_limit
), claimed AS (
    UPDATE ledger.webhook_deliveries d
    SET attempts = d.attempts + CASE WHEN d.attempts < p_attempts_max THEN 1 ELSE 0 END,
        failed = d.attempts >= p_attempts_max,
        next_attempt_at = now() + make_interval(secs => p_lease_ms / 1000.0)
    FROM chosen c
    WHERE d.client_id = c.client_id AND d.webhook_id = c.webhook_id AND d.event_seq = c.event_seq
    RETURNING d.client_id, d.webhook_id, d.event_seq, NOT d.failed AS claimed, d.attempts
)
SELECT c.client_id, c.webhook_id, c.event_seq, c.claimed, c.attempts, w.url, w.secret_nonce, w.secret_key_id,
       e.position, e.created_at, ledger.event_json(e.position, e.type, e.created_at, e.data)
FROM claimed c
JOIN ledger.webhooks w ON w.client_id = c.client_id AND w.id = c.webhook_id
JOIN ledger.events e ON e.client_id = c.client_id AND e.seq = c.event_seq
$$;

-- The outcomes of attempts: 'delivered' (a 2xx: the delivery is done and removed), 'retry' (again in p_next_in_ms),
-- 'failed' (given up), 'gone' (410: given up, and the webhook disabled). Not waiting for the WAL flush either: an
-- outcome lost to a crash of the database means the attempt is made again (a duplicate the receiver removes).
CREATE FUNCTION ledger.record_deliveries(
    p_clients text[], p_webhooks text[], p_seqs bigint[], p_outcomes text[], p_next_in_ms bigint[],
    p_statuses integer[], p_errors text[]
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    DELETE FROM ledger.webhook_deliveries d
    USING unnest(p_clients, p_webhooks, p_seqs, p_outcomes) AS x(client_id, webhook_id, seq, outcome)
    WHERE x.outcome = 'delivered'
      AND d.client_id = x.client_id AND d.webhook_id = x.webhook_id AND d.event_seq = x.seq;
    UPDATE ledger.webhook_deliveries d
    SET failed = x.outcome <> 'retry',
        next_attempt_at = coalesce(now() + make_interval(secs => x.next_in_ms / 1000.0), d.next_attempt_at),
        last_status = x.status, last_error = left(x.error, 500)
    FROM unnest(p_clients, p_webhooks, p_seqs, p_outcomes, p_next_in_ms, p_statuses, p_errors)
         AS x(client_id, webhook_id, seq, outcome, next_in_ms, status, error)
    WHERE x.outcome <> 'delivered'
      AND d.client_id = x.client_id AND d.webhook_id = x.webhook_id AND d.event_seq = x.seq;
    UPDATE ledger.webhooks w SET enabled = false
    FROM (SELECT DISTINCT x.client_id, x.webhook_id
          FROM unnest(p_clients, p_webhooks, p_outcomes) AS x(client_id, webhook_id, outcome)
          WHERE x.outcome = 'gone') g
    WHERE w.client_id = g.client_id AND w.id = g.webhook_id;
END;
$$;

-- The rules, now appending their events (step 3b: hold.expired; step 5: transfer.created), with less work per call:
-- one statement writes transfers, entries and balances; a lone transfer finds its accounts without a join.

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
    v_expired_id   text[];     -- holds this call records expired, and their JSON (hold.expired events)
    v_expired_body text[];
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
            RETURNING h.id, h.from_account, h.amount, ledger.hold_json(h) AS body
        )
        SELECT array_agg(x.held - coalesce(e.amount, 0) ORDER BY x.n),
               (SELECT array_agg(e.id::text ORDER BY e.id) FROM expired e),
               (SELECT array_agg(e.body ORDER BY e.id) FROM expired e)
        INTO v_held, v_expired_id, v_expired_body
        FROM unnest(v_ids, v_held) WITH ORDINALITY AS x(id, held, n)
        LEFT JOIN (SELECT e.from_account, sum(e.amount)::bigint AS amount FROM expired e GROUP BY e.from_account) e
          ON e.from_account = x.id;
        -- Events are appended only here and in step 5, after every account is locked (ledger.append_events).
        PERFORM ledger.append_events(p_client, 'hold.expired', v_expired_id, v_expired_body);
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
    ), events AS (
        -- One transfer.created per transfer made, in item order (ledger.append_events, 0009). A volatile call in a
        -- WITH query runs once, and the join below makes sure it runs: one row, whatever was made.
        SELECT ledger.append_events(p_client, 'transfer.created', array_agg(x.id::text ORDER BY x.n),
                                    array_agg(x.body ORDER BY x.n)) AS appended
        FROM numbered x
    )
    SELECT x.n::integer, CASE WHEN x.problem IS NULL THEN CASE WHEN m.id IS NULL THEN 200 ELSE 201 END
                              ELSE ((x.problem::jsonb) ->> 'status')::integer END,
           m.id, x.problem, coalesce(m.body, x.problem)
    FROM unnest(v_problem) WITH ORDINALITY AS x(problem, n)
    CROSS JOIN events
    LEFT JOIN numbered m ON m.n = x.n
    ORDER BY x.n;
END;
$$;

-- Holds append theirs.

CREATE OR REPLACE FUNCTION ledger.post_hold(
    p_client text, p_key text, p_request text, p_from text, p_to text, p_amount bigint, p_currency text,
    p_metadata jsonb, p_expires_in_s integer, p_if_match bigint, p_key_wait_ms integer
) RETURNS TABLE (outcome text, status_code integer, response_body text, created_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_sha    bytea := sha256(convert_to(p_request, 'UTF8'));
    v_result record;
    v_hold   ledger.holds;
    v_body   text;
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
    v_locked record;
    v_hold   ledger.holds;
    v_body   text;
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
    v_locked record;
    v_hold   ledger.holds;
    v_body   text;
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
    v_body := ledger.hold_json(v_hold);
    PERFORM ledger.append_events(p_client, 'hold.' || v_hold.status, ARRAY[v_hold.id::text], ARRAY[v_body]);
    RETURN QUERY SELECT * FROM ledger.finish_keyed(p_client, p_key, v_sha, p_request, 200, v_body, NULL);
END;
$$;

-- Accounts: PUT appends account.created when it creates one (`@world` made on demand appends nothing).
CREATE OR REPLACE FUNCTION ledger.put_account(p_client text, p_id text, p_currency text, p_allow_negative boolean)
RETURNS TABLE (status_code integer, response_body text)
LANGUAGE plpgsql AS $$
DECLARE
    v_account ledger.accounts;
    v_body    text;
BEGIN
    INSERT INTO ledger.accounts (client_id, id, currency, allow_negative)
    VALUES (p_client, p_id, p_currency, p_allow_negative)
    ON CONFLICT DO NOTHING
    RETURNING * INTO v_account;
    IF FOUND THEN
        v_body := ledger.account_json(v_account);
        PERFORM ledger.append_events(p_client, 'account.created', ARRAY[p_id], ARRAY[v_body]);
        RETURN QUERY SELECT 201, v_body;
        RETURN;
    END IF;
    SELECT * INTO v_account FROM ledger.accounts a WHERE a.client_id = p_client AND a.id = p_id;
    IF v_account.currency = p_currency AND v_account.allow_negative = p_allow_negative THEN
        RETURN QUERY SELECT 200, ledger.account_json(v_account);
    ELSE
        RETURN QUERY SELECT 409, NULL::text;
    END IF;
END;
$$;

-- The history made before this migration, one event per account, transfer and hold (and one more per hold that
-- ended), placed in commit order: by time, then accounts, holds placed, transfers, holds ended, then by id.
WITH history AS (
    SELECT a.client_id, a.created_at AS at, 1 AS rank, 0::bigint AS id_order, a.id AS subject,
           'account.created' AS type,
           ledger.account_json(ROW(a.client_id, a.id, a.currency, 0, a.allow_negative, 0, a.created_at, 0)::ledger.accounts)
               AS data
    FROM ledger.accounts a WHERE NOT starts_with(a.id, '@world:')
    UNION ALL
    SELECT h.client_id, h.created_at, 2, h.id, h.id::text, 'hold.created',
           ledger.hold_json(ROW(h.client_id, h.id, h.idempotency_key, h.request_sha256, h.from_account, h.to_account,
                                h.amount, h.currency, 'pending', 0, NULL, NULL, NULL, h.metadata, h.expires_at,
                                h.created_at)::ledger.holds)
    FROM ledger.holds h
    UNION ALL
    SELECT t.client_id, t.created_at, 3, t.id, t.id::text, 'transfer.created', ledger.transfer_json(t)
    FROM ledger.transfers t
    UNION ALL
    SELECT h.client_id, coalesce(t.created_at, k.created_at, least(h.expires_at, now())), 4, h.id, h.id::text,
           'hold.' || h.status, ledger.hold_json(h)
    FROM ledger.holds h
    LEFT JOIN ledger.transfers t ON t.client_id = h.client_id AND t.id = h.transfer_id
    LEFT JOIN ledger.idempotency_keys k ON k.client_id = h.client_id AND k.key = h.finished_key
    WHERE h.status <> 'pending'
), placed AS (
    INSERT INTO ledger.events (client_id, position, type, subject, data, created_at)
    SELECT x.client_id, row_number() OVER (PARTITION BY x.client_id ORDER BY x.at, x.rank, x.id_order, x.subject),
           x.type, x.subject, x.data, x.at
    FROM history x
    ORDER BY x.client_id, x.at, x.rank, x.id_order, x.subject
    RETURNING client_id, position
)
INSERT INTO ledger.event_heads (client_id, position)
SELECT p.client_id, max(p.position) FROM placed p GROUP BY p.client_id;

-- Invariants, extended with the feed.
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
    OR bool_or(r.from_account <> o.to_account OR r.to_account <> o.from_account OR r.currency <> o.currency)
UNION ALL
SELECT 'one-created-event-per-account', a.client_id, a.id,
       'account ' || a.id || ' has ' || count(e.seq) || ' account.created events'
FROM ledger.accounts a
LEFT JOIN ledger.events e ON e.client_id = a.client_id AND e.subject = a.id AND e.type = 'account.created'
WHERE NOT starts_with(a.id, '@world:')
GROUP BY a.client_id, a.id
HAVING count(e.seq) <> 1
UNION ALL
SELECT 'one-created-event-per-transfer', t.client_id, t.id::text,
       'transfer ' || t.id || ' has ' || count(e.seq) || ' transfer.created events'
FROM ledger.transfers t
LEFT JOIN ledger.events e ON e.client_id = t.client_id AND e.subject = t.id::text AND e.type = 'transfer.created'
GROUP BY t.client_id, t.id
HAVING count(e.seq) <> 1
UNION ALL
SELECT 'one-event-per-hold-status', h.client_id, h.id::text,
       'hold ' || h.id || ' (' || h.status || ') has events ' || coalesce(string_agg(e.type, ', ' ORDER BY e.seq), 'none')
FROM ledger.holds h
LEFT JOIN ledger.events e ON e.client_id = h.client_id AND e.subject = h.id::text AND starts_with(e.type, 'hold.')
GROUP BY h.client_id, h.id, h.status
HAVING count(*) FILTER (WHERE e.type = 'hold.created') <> 1
    OR count(*) FILTER (WHERE e.type <> 'hold.created' AND e.type <> 'hold.' || h.status) > 0
    OR (h.status <> 'pending' AND count(*) FILTER (WHERE e.type = 'hold.' || h.status) <> 1)
UNION ALL
SELECT 'feed-positions-gap-free', e.client_id, e.client_id,
       'client ' || e.client_id || ' has ' || count(e.position) || ' placed events, positions up to '
       || coalesce(max(e.position), 0) || ', head ' || coalesce(min(h.position), 0)
FROM ledger.events e
LEFT JOIN ledger.event_heads h ON h.client_id = e.client_id
GROUP BY e.client_id
HAVING count(e.position) <> coalesce(max(e.position), 0) OR coalesce(max(e.position), 0) <> coalesce(min(h.position), 0);

-- The key webhook secrets are derived from when the service is given none of its own (see COMMENT ON TABLE
-- ledger.webhooks).
INSERT INTO ledger.service_keys (name, key)
SELECT 'webhook-secrets', sha256(convert_to(gen_random_uuid()::text || gen_random_uuid()::text || gen_random_uuid()::text, 'UTF8'))
ON CONFLICT DO NOTHING;

COMMENT ON TABLE ledger.events IS 'The feed: every change of a client''s ledger, appended in the transaction of the change (ledger.append_events). position is the feed id (GET /v1/events), given after commit by ledger.sequence_events; NULL until then. Never updated otherwise, never deleted.';
COMMENT ON COLUMN ledger.events.seq IS 'Order of appending (a sequence: commits may come out of this order, which is why the feed uses position).';
COMMENT ON COLUMN ledger.events.xid IS 'The appending transaction: its events are placed together.';
COMMENT ON COLUMN ledger.events.position IS 'The event''s id in the client''s feed: 1, 2, 3, ... in commit order, without gaps; NULL until placed.';
COMMENT ON COLUMN ledger.events.type IS 'account.created, transfer.created, hold.created, hold.captured, hold.voided or hold.expired.';
COMMENT ON COLUMN ledger.events.subject IS 'Id of the account, transfer or hold the event is about.';
COMMENT ON COLUMN ledger.events.data IS 'The object after the change, as the API renders it (JSON text, byte for byte what the feed and webhooks send).';
COMMENT ON TABLE ledger.event_heads IS 'Per client: the last feed position given. Its row lock serialises ledger.sequence_events per client.';
COMMENT ON TABLE ledger.webhooks IS 'Webhook subscriptions. The signing secret is not stored: it is HMAC-SHA256 over (client, id, secret_nonce) under a key of the service. With LEDGER_WEBHOOK_KEY set on every replica (secret_key_id names that key), a reader of the database alone cannot forge signatures; without it the service uses service_keys ''webhook-secrets'', and a database reader can.';
COMMENT ON COLUMN ledger.webhooks.types IS 'Event types delivered; empty: every type.';
COMMENT ON COLUMN ledger.webhooks.secret_nonce IS '32 random bytes from which, with the service key, the secret is derived.';
COMMENT ON COLUMN ledger.webhooks.secret_key_id IS 'Which service key derives the secret: ''database'' (service_keys webhook-secrets) or the first bytes of SHA-256 of LEDGER_WEBHOOK_KEY.';
COMMENT ON TABLE ledger.webhook_deliveries IS 'One row per (webhook, event) to deliver, made with the event. Removed once delivered (a 2xx); failed when given up. A row is claimed for one attempt with FOR UPDATE SKIP LOCKED in a short transaction (ledger.claim_deliveries); no transaction stays open during the HTTP call.';
COMMENT ON COLUMN ledger.webhook_deliveries.attempts IS 'Attempts made (counted when claimed, so an attempt cut by a crash counts).';
COMMENT ON COLUMN ledger.webhook_deliveries.next_attempt_at IS 'Not attempted before this: the backoff after a failure, or the lease of an attempt in flight.';
COMMENT ON FUNCTION ledger.append_events(text, text, text[], text[]) IS 'Returns how many events it appended. The one way events are written: called by ledger.execute_movements (transfer.created, hold.expired), post_hold, post_capture, post_void and put_account, after every lock their transaction takes, so that events of one transaction are adjacent and events of an account follow its versions. Fans out one webhook delivery per enabled webhook of the type.';
COMMENT ON FUNCTION ledger.sequence_events(text, boolean) IS 'Places a client''s committed events that have no position yet, under its event_heads row lock: transactions in the order of their first event, at most about 10,000 events per call. p_wait false skips a client another transaction is placing.';
COMMENT ON FUNCTION ledger.sequence_pending_events(integer) IS 'The background placing of ledger serve: up to p_clients clients with unplaced events.';
COMMENT ON FUNCTION ledger.event_marks(text[]) IS 'Per client: head position + unplaced events; grows with each event that commits. Long-polls wait for it to grow.';
COMMENT ON FUNCTION ledger.events_page(text, bigint, integer) IS 'GET /v1/events: places the client''s events, then one page after p_after (NULL: from the first), oldest first; cursor_ok false for an after never issued.';
COMMENT ON FUNCTION ledger.put_webhook(text, text, text, text[], boolean, bytea, text) IS 'PUT /v1/webhooks/{id}.';
COMMENT ON FUNCTION ledger.claim_deliveries(integer, integer, text[], text[], integer[], integer, integer) IS 'Claims due webhook deliveries of placed events for one attempt each (see the table comment).';
COMMENT ON FUNCTION ledger.record_deliveries(text[], text[], bigint[], text[], bigint[], integer[], text[]) IS 'Records attempts: delivered (removed), retry (in next_in_ms), failed, gone (410: failed and the webhook disabled).';
COMMENT ON FUNCTION ledger.put_account(text, text, text, boolean) IS 'PUT /v1/accounts/{id}: naturally idempotent account creation; a creation appends account.created.';

-- Less work per keyed call: functions planned once per connection, the idempotency prelude in fewer reads.

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




COMMENT ON FUNCTION ledger.key_lock_id(text, text) IS 'The transaction-scoped advisory lock id of one (client, idempotency key): the first 8 bytes of SHA-256 over the service''s key-lock secret, the client and the key. Every execution of the key takes it (ledger.begin_keyed, ledger.lock_key, or tried by ledger.post_transfers); the key lookup tries it to tell in_progress. PL/pgSQL, not SQL: a SQL function that reads a table is not inlined and would be planned anew on every call.';
COMMENT ON FUNCTION ledger.begin_keyed(text, text, bytea, integer) IS 'The idempotency prelude of every lone keyed request: replay or reused for a completed key, in_progress after p_key_wait_ms (0: at once), what a purged key made; no row: the caller executes under the key''s lock. The lock is tried first; only when another transaction holds it is the stored outcome read before waiting.';
