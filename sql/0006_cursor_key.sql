-- 0006_cursor_key.sql: the key that signs the cursors of GET /v1/accounts/{id}/entries.
--
-- A cursor names a position in one client's account. The service signs it (HMAC-SHA-256 over the client, the
-- account and the position) so that a cursor it did not issue, made up or edited or issued for another account or
-- client, is refused as `invalid-cursor` instead of being read as a position. Every replica reads the key from
-- here, so there is nothing to configure or to share between replicas by hand. It is not client data: like
-- api_tokens it has no client_id (a reference table if the ledger is sharded).

CREATE TABLE ledger.service_keys (
    name       text        PRIMARY KEY,
    key        bytea       NOT NULL CONSTRAINT service_keys_length CHECK (length(key) = 32),
    created_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE ledger.service_keys IS 'Secret keys of the service, made at migration. `cursor` signs entries-page cursors; replacing it makes the cursors issued so far invalid (restart the replicas afterwards: each reads it once).';
COMMENT ON COLUMN ledger.service_keys.name IS 'What the key is for.';
COMMENT ON COLUMN ledger.service_keys.key IS '32 random bytes.';
COMMENT ON COLUMN ledger.service_keys.created_at IS 'When the key was made.';

-- 32 bytes drawn from PostgreSQL's strong random source: gen_random_uuid() carries 122 random bits, three of them 366.
INSERT INTO ledger.service_keys (name, key)
SELECT 'cursor', sha256(convert_to(gen_random_uuid()::text || gen_random_uuid()::text || gen_random_uuid()::text, 'UTF8'));
