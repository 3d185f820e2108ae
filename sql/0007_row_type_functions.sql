-- 0007_row_type_functions.sql: the rendering functions over a table's row type, with string bodies everywhere.
--
-- 0001 first declared ledger.transfer_json, account_json and entry_json with SQL-standard bodies (RETURN ...).
-- Current PostgreSQL minor releases (15.20; 15.18 still accepted it) refuse an ALTER TABLE that adds a column with a
-- default to a table whose row type such a body uses ("cannot alter table ... because function ... uses its row
-- type"), so 0005 failed on a new install.
-- 0001 now declares them with string bodies; this file gives databases migrated before that correction the same
-- definitions, so that every database, old or new, can have its tables altered by later migrations.

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
    || '}'
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
    || '}'
$$;

CREATE OR REPLACE FUNCTION ledger.entry_json(e ledger.entries) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
SELECT '{"transfer_id":' || to_json(e.transfer_id::text)::text
    || ',"amount":' || e.amount::text
    || ',"balance_after":' || e.balance_after::text
    || ',"created_at":' || to_json(ledger.rfc3339(e.created_at))::text
    || '}'
$$;
