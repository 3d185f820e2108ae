-- 0001_init.sql: the ledger's tables, and the one function that moves money.
--
-- Correctness lives here, not in the service: unique keys make a second execution of one idempotency key
-- impossible, CHECKs keep amounts positive and balances non-negative, foreign keys tie entries to transfers and
-- accounts. `client_id` leads every primary and unique key so a client's rows can live on one shard (a Citus
-- distribution column) and each request stays a single-shard transaction. The one exception is api_tokens, looked
-- up by hash before the client is known: it is small and would be a reference table.
--
-- Applied by `ledger migrate` inside one transaction; the schema `ledger` itself is created by the migrator.

CREATE TABLE ledger.clients (
    id         text        PRIMARY KEY
               CONSTRAINT clients_id_format CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$'),
    created_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE ledger.clients IS 'Tenants of the ledger. Every account, transfer and idempotency key belongs to one client.';
COMMENT ON COLUMN ledger.clients.id IS 'Client name, as given to `ledger token create <client>`.';
COMMENT ON COLUMN ledger.clients.created_at IS 'When the client was created.';

CREATE TABLE ledger.api_tokens (
    token_sha256 bytea       PRIMARY KEY CONSTRAINT api_tokens_sha256_length CHECK (length(token_sha256) = 32),
    client_id    text        NOT NULL REFERENCES ledger.clients (id),
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_tokens_client ON ledger.api_tokens (client_id);
COMMENT ON TABLE ledger.api_tokens IS 'Bearer tokens. Only the SHA-256 of a token is stored; the token itself is printed once by `ledger token create`.';
COMMENT ON COLUMN ledger.api_tokens.token_sha256 IS 'SHA-256 of the bearer token (32 bytes).';
COMMENT ON COLUMN ledger.api_tokens.client_id IS 'The client this token acts for.';
COMMENT ON COLUMN ledger.api_tokens.created_at IS 'When the token was created.';

CREATE TABLE ledger.accounts (
    client_id      text        NOT NULL REFERENCES ledger.clients (id),
    id             text        NOT NULL,
    currency       text        NOT NULL CONSTRAINT accounts_currency_format CHECK (currency ~ '^[A-Z]{3}$'),
    balance        bigint      NOT NULL DEFAULT 0,
    allow_negative boolean     NOT NULL DEFAULT false,
    version        bigint      NOT NULL DEFAULT 0 CONSTRAINT accounts_version_non_negative CHECK (version >= 0),
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (client_id, id),
    CONSTRAINT accounts_non_negative CHECK (allow_negative OR balance >= 0),
    CONSTRAINT accounts_id_format CHECK (
        id ~ '^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$'
        OR (id = '@world:' || currency AND allow_negative)
    )
);
COMMENT ON TABLE ledger.accounts IS 'Accounts and their balances. `@world:<CUR>` is the client''s external account for one currency: it carries the outside world, so each client''s balances per currency sum to 0.';
COMMENT ON COLUMN ledger.accounts.client_id IS 'Owning client.';
COMMENT ON COLUMN ledger.accounts.id IS 'Account id chosen by the client, or `@world:<CUR>` for the external account (shown as `@world`).';
COMMENT ON COLUMN ledger.accounts.currency IS 'ISO-4217-style code: three upper-case letters. Fixed at creation.';
COMMENT ON COLUMN ledger.accounts.balance IS 'Balance in minor units (cents). Always equals the sum of the account''s entries.';
COMMENT ON COLUMN ledger.accounts.allow_negative IS 'Whether the balance may go below 0. Fixed at creation.';
COMMENT ON COLUMN ledger.accounts.version IS 'Number of balance changes so far; the entry that made version N has account_version N.';
COMMENT ON COLUMN ledger.accounts.created_at IS 'When the account was created.';

CREATE TABLE ledger.transfers (
    client_id       text        NOT NULL,
    id              bigint      GENERATED ALWAYS AS IDENTITY,
    idempotency_key text        NOT NULL CONSTRAINT transfers_key_length CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    request_sha256  bytea       NOT NULL,
    from_account    text        NOT NULL,
    to_account      text        NOT NULL,
    amount          bigint      NOT NULL CONSTRAINT transfers_amount_range CHECK (amount > 0 AND amount <= 9007199254740991),
    currency        text        NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}' CONSTRAINT transfers_metadata_object CHECK (jsonb_typeof(metadata) = 'object'),
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (client_id, id),
    CONSTRAINT transfers_one_per_key UNIQUE (client_id, idempotency_key),
    CONSTRAINT transfers_distinct_accounts CHECK (from_account <> to_account),
    FOREIGN KEY (client_id, from_account) REFERENCES ledger.accounts (client_id, id),
    FOREIGN KEY (client_id, to_account) REFERENCES ledger.accounts (client_id, id)
);
COMMENT ON TABLE ledger.transfers IS 'Every movement of money: credits come from `@world`, debits go to `@world`. One transfer per (client, idempotency key), enforced by a unique key, even after stored responses are purged.';
COMMENT ON COLUMN ledger.transfers.client_id IS 'Owning client.';
COMMENT ON COLUMN ledger.transfers.id IS 'Transfer id (shown as a string in the API).';
COMMENT ON COLUMN ledger.transfers.idempotency_key IS 'The Idempotency-Key that created this transfer, after unquoting.';
COMMENT ON COLUMN ledger.transfers.request_sha256 IS 'SHA-256 of the request fingerprint (method, path, canonical JSON body).';
COMMENT ON COLUMN ledger.transfers.from_account IS 'Debited account.';
COMMENT ON COLUMN ledger.transfers.to_account IS 'Credited account.';
COMMENT ON COLUMN ledger.transfers.amount IS 'Amount in minor units, 1 to 2^53-1.';
COMMENT ON COLUMN ledger.transfers.currency IS 'Currency of both accounts.';
COMMENT ON COLUMN ledger.transfers.metadata IS 'Client-supplied JSON object, at most 4096 bytes as compact JSON.';
COMMENT ON COLUMN ledger.transfers.created_at IS 'Commit-transaction time of the transfer.';

CREATE TABLE ledger.entries (
    client_id       text        NOT NULL,
    account_id      text        NOT NULL,
    account_version bigint      NOT NULL CONSTRAINT entries_version_positive CHECK (account_version >= 1),
    transfer_id     bigint      NOT NULL,
    amount          bigint      NOT NULL CONSTRAINT entries_amount_non_zero CHECK (amount <> 0),
    balance_after   bigint      NOT NULL,
    created_at      timestamptz NOT NULL,
    PRIMARY KEY (client_id, account_id, account_version),
    FOREIGN KEY (client_id, account_id) REFERENCES ledger.accounts (client_id, id),
    FOREIGN KEY (client_id, transfer_id) REFERENCES ledger.transfers (client_id, id)
);
CREATE INDEX entries_transfer ON ledger.entries (client_id, transfer_id);
COMMENT ON TABLE ledger.entries IS 'Double entry: each transfer writes exactly two entries, -amount on the debited and +amount on the credited account, summing to 0.';
COMMENT ON COLUMN ledger.entries.client_id IS 'Owning client.';
COMMENT ON COLUMN ledger.entries.account_id IS 'Account whose balance changed.';
COMMENT ON COLUMN ledger.entries.account_version IS 'The account version this change produced (1, 2, ...): a gap-free sequence per account, and the paging position of GET /v1/accounts/{id}/entries.';
COMMENT ON COLUMN ledger.entries.transfer_id IS 'The transfer this entry belongs to.';
COMMENT ON COLUMN ledger.entries.amount IS 'Signed change in minor units: + credit, - debit.';
COMMENT ON COLUMN ledger.entries.balance_after IS 'The account balance right after this entry.';
COMMENT ON COLUMN ledger.entries.created_at IS 'Same as the transfer''s created_at.';

CREATE TABLE ledger.idempotency_keys (
    client_id      text        NOT NULL REFERENCES ledger.clients (id),
    key            text        NOT NULL CONSTRAINT idempotency_keys_key_length CHECK (length(key) BETWEEN 1 AND 255),
    request_sha256 bytea       NOT NULL,
    status_code    integer     NOT NULL CONSTRAINT idempotency_keys_status CHECK (status_code IN (201, 404, 422)),
    response_body  text        NOT NULL,
    transfer_id    bigint,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (client_id, key),
    FOREIGN KEY (client_id, transfer_id) REFERENCES ledger.transfers (client_id, id),
    CONSTRAINT idempotency_keys_transfer_iff_created CHECK ((status_code = 201) = (transfer_id IS NOT NULL))
);
CREATE INDEX idempotency_keys_created ON ledger.idempotency_keys (created_at);
COMMENT ON TABLE ledger.idempotency_keys IS 'Stored outcomes of POST /v1/credits, /v1/debits and /v1/transfers, replayed byte for byte to a retry with the same key and request. Committed in the same transaction as the transfer.';
COMMENT ON COLUMN ledger.idempotency_keys.client_id IS 'Owning client: keys are scoped per client.';
COMMENT ON COLUMN ledger.idempotency_keys.key IS 'The Idempotency-Key after unquoting; case-sensitive.';
COMMENT ON COLUMN ledger.idempotency_keys.request_sha256 IS 'SHA-256 of the request fingerprint; another request with this key gets 422 idempotency-key-reused.';
COMMENT ON COLUMN ledger.idempotency_keys.status_code IS 'Stored HTTP status: 201, 404 (account-not-found) or 422 (insufficient-funds, currency-mismatch, balance-overflow).';
COMMENT ON COLUMN ledger.idempotency_keys.response_body IS 'The exact response body sent the first time.';
COMMENT ON COLUMN ledger.idempotency_keys.transfer_id IS 'The transfer made, for status 201.';
COMMENT ON COLUMN ledger.idempotency_keys.created_at IS 'When the outcome was stored; the retention purge deletes by this.';

-- Rendering. JSON bodies are built here so that the first answer and every replay are the same bytes.
-- Functions over a table's row type keep string bodies (AS $$ ... $$): a SQL-standard body (RETURN, BEGIN ATOMIC)
-- makes later ALTER TABLEs of that table fail on current PostgreSQL (see sql/README.md).

CREATE FUNCTION ledger.rfc3339(ts timestamptz) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"');
COMMENT ON FUNCTION ledger.rfc3339(timestamptz) IS 'RFC 3339 UTC text of a timestamp, microsecond precision.';

CREATE FUNCTION ledger.public_account_id(id text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN starts_with(id, '@world:') THEN '@world' ELSE id END;
COMMENT ON FUNCTION ledger.public_account_id(text) IS 'Account id as the API shows it: `@world:USD` is shown as `@world`.';

CREATE FUNCTION ledger.transfer_json(t ledger.transfers) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
SELECT '{"id":' || to_json(t.id::text)::text
    || ',"from":' || to_json(ledger.public_account_id(t.from_account))::text
    || ',"to":' || to_json(ledger.public_account_id(t.to_account))::text
    || ',"amount":' || t.amount::text
    || ',"currency":' || to_json(t.currency)::text
    || ',"metadata":' || t.metadata::text
    || ',"created_at":' || to_json(ledger.rfc3339(t.created_at))::text
    || '}'
$$;
COMMENT ON FUNCTION ledger.transfer_json(ledger.transfers) IS 'The API''s JSON for a transfer.';

CREATE FUNCTION ledger.account_json(a ledger.accounts) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
SELECT '{"id":' || to_json(ledger.public_account_id(a.id))::text
    || ',"currency":' || to_json(a.currency)::text
    || ',"balance":' || a.balance::text
    || ',"allow_negative":' || a.allow_negative::text
    || ',"version":' || a.version::text
    || ',"created_at":' || to_json(ledger.rfc3339(a.created_at))::text
    || '}'
$$;
COMMENT ON FUNCTION ledger.account_json(ledger.accounts) IS 'The API''s JSON for an account.';

CREATE FUNCTION ledger.entry_json(e ledger.entries) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
SELECT '{"transfer_id":' || to_json(e.transfer_id::text)::text
    || ',"amount":' || e.amount::text
    || ',"balance_after":' || e.balance_after::text
    || ',"created_at":' || to_json(ledger.rfc3339(e.created_at))::text
    || '}'
$$;
COMMENT ON FUNCTION ledger.entry_json(ledger.entries) IS 'The API''s JSON for an entry.';

CREATE FUNCTION ledger.problem_json(status integer, code text, title text, detail text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN '{"type":' || to_json('urn:ledger:problem:' || code)::text
    || ',"title":' || to_json(title)::text
    || ',"status":' || status::text
    || ',"detail":' || to_json(detail)::text
    || ',"code":' || to_json(code)::text
    || '}';
COMMENT ON FUNCTION ledger.problem_json(integer, text, text, text) IS 'RFC 9457 problem+json body, the same shape the service renders for problems that are not stored.';

-- Idempotent execution.

CREATE FUNCTION ledger.store_outcome(
    p_client text, p_key text, p_request_sha256 bytea, p_status integer, p_body text, p_transfer_id bigint
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ledger.idempotency_keys (client_id, key, request_sha256, status_code, response_body, transfer_id)
    VALUES (p_client, p_key, p_request_sha256, p_status, p_body, p_transfer_id)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        -- Impossible while we hold the key's advisory lock: it would be a bug. Fail the whole transaction with a
        -- retryable SQLSTATE; the service retries, and the retry replays what the other execution stored.
        RAISE EXCEPTION 'idempotency key stored twice' USING ERRCODE = 'serialization_failure';
    END IF;
END;
$$;
COMMENT ON FUNCTION ledger.store_outcome(text, text, bytea, integer, text, bigint) IS 'Stores an outcome for replay; a conflict aborts the transaction (it would mean two executions of one key).';

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

CREATE FUNCTION ledger.post_transfer(
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
COMMENT ON FUNCTION ledger.post_transfer(text, text, text, text, text, bigint, text, jsonb, integer) IS 'Executes a credit, debit or transfer exactly once per (client, idempotency key) and stores its outcome.';

CREATE FUNCTION ledger.put_account(p_client text, p_id text, p_currency text, p_allow_negative boolean)
RETURNS TABLE (status_code integer, response_body text)
LANGUAGE plpgsql AS $$
-- Creates an account (201), or finds it identical (200), or reports other settings (409, body NULL).
DECLARE
    v_account ledger.accounts;
BEGIN
    INSERT INTO ledger.accounts (client_id, id, currency, allow_negative)
    VALUES (p_client, p_id, p_currency, p_allow_negative)
    ON CONFLICT DO NOTHING
    RETURNING * INTO v_account;
    IF FOUND THEN
        RETURN QUERY SELECT 201, ledger.account_json(v_account);
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
COMMENT ON FUNCTION ledger.put_account(text, text, text, boolean) IS 'PUT /v1/accounts/{id}: naturally idempotent account creation.';

CREATE FUNCTION ledger.entries_page(p_client text, p_account text, p_before_version bigint, p_limit integer)
RETURNS TABLE (entries_json text, last_version bigint, has_more boolean)
LANGUAGE plpgsql STABLE AS $$
-- One page of an account's entries, newest first, below p_before_version (NULL: from the newest).
-- No row at all when the account does not exist.
BEGIN
    IF NOT EXISTS (SELECT 1 FROM ledger.accounts a WHERE a.client_id = p_client AND a.id = p_account) THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH page AS (
        SELECT e.*
        FROM ledger.entries e
        WHERE e.client_id = p_client AND e.account_id = p_account
          AND (p_before_version IS NULL OR e.account_version < p_before_version)
        ORDER BY e.account_version DESC
        LIMIT p_limit + 1
    ), numbered AS (
        SELECT p.*, row_number() OVER (ORDER BY p.account_version DESC) AS n FROM page p
    )
    SELECT '[' || coalesce(string_agg(ledger.entry_json(ROW(x.client_id, x.account_id, x.account_version,
                x.transfer_id, x.amount, x.balance_after, x.created_at)::ledger.entries), ',' ORDER BY x.n)
                FILTER (WHERE x.n <= p_limit), '') || ']',
           min(x.account_version) FILTER (WHERE x.n <= p_limit),
           count(*) > p_limit
    FROM numbered x;
END;
$$;
COMMENT ON FUNCTION ledger.entries_page(text, text, bigint, integer) IS 'GET /v1/accounts/{id}/entries: one page, newest first, keyed by account_version.';

-- Invariants, readable in psql: `SELECT * FROM ledger.invariant_breaches;` is empty on a healthy ledger.
CREATE VIEW ledger.invariant_breaches AS
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
WHERE NOT a.allow_negative AND a.balance < 0;
COMMENT ON VIEW ledger.invariant_breaches IS 'One row per breached ledger invariant; empty on a healthy ledger. `ledger verify` prints these.';
