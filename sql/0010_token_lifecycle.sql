-- 0010_token_lifecycle.sql: bearer tokens that can expire and be revoked.
--
-- Both columns are nullable without a default, so adding them rewrites nothing and takes no long lock; a service of
-- the previous release ignores them (it keeps accepting every token until it is restarted: upgrade, then restart).

ALTER TABLE ledger.api_tokens
    ADD COLUMN expires_at timestamptz,
    ADD COLUMN revoked_at timestamptz;
COMMENT ON COLUMN ledger.api_tokens.expires_at IS 'When the token stops being accepted (`ledger token create --expires-in-s`); null: never.';
COMMENT ON COLUMN ledger.api_tokens.revoked_at IS 'When `ledger token revoke` revoked it; null: not revoked. A revoked token is kept so that `ledger token list` shows it.';
COMMENT ON TABLE ledger.api_tokens IS 'Bearer tokens. Only the SHA-256 of a token is stored; the token itself is printed once by `ledger token create`. A token''s public id is the first 16 hex digits of that SHA-256 (`ledger token list`, `ledger token revoke <id>`). Accepted while not revoked and not expired; a running service notices a revocation or expiry within its auth cache TTL (LEDGER_AUTH_CACHE_TTL_MS).';
