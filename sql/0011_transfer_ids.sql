-- 0011_transfer_ids.sql: transfer ids that say nothing about other clients.
--
-- Ids came from one identity sequence for all clients, so any client could read the platform's transfer volume by
-- watching its own ids grow. New transfers get a random id instead; the ids already given out stay as they are.
-- The primary key (client_id, id) stays; a collision (about n / 2^62 per new transfer for a client with n
-- transfers) fails the transaction on transfers_pkey, which the service runs again with new ids.
--
-- Dropping the identity rewrites nothing and takes the table's lock for a moment; a service of the previous release
-- keeps working (it never names the id when it inserts).

CREATE FUNCTION ledger.random_transfer_id() RETURNS bigint
LANGUAGE sql VOLATILE PARALLEL SAFE
AS $$
    -- 64 of a version-4 UUID's 122 random bits (octets 0-3 and 10-13), kept to 1 .. 2^62.
    SELECT (('x' || encode(substring(b FROM 1 FOR 4) || substring(b FROM 11 FOR 4), 'hex'))::bit(64)::bigint
            & 4611686018427387903) + 1
    FROM uuid_send(gen_random_uuid()) AS b
$$;

ALTER TABLE ledger.transfers ALTER COLUMN id DROP IDENTITY;
ALTER TABLE ledger.transfers ALTER COLUMN id SET DEFAULT ledger.random_transfer_id();

COMMENT ON FUNCTION ledger.random_transfer_id() IS 'A new transfer''s id: 62 bits from the strong random generator behind gen_random_uuid(), so ids reveal neither how many transfers this client made nor how many other clients made. A collision with an id the client already has fails its transaction on transfers_pkey; the service runs the transaction again with new ids (LedgerStore: isTransferIdCollision).';
COMMENT ON COLUMN ledger.transfers.id IS 'Transfer id, unique within the client (shown as a string in the API). Random since sql/0011_transfer_ids.sql (ledger.random_transfer_id()); transfers made before it keep their sequential ids. Not an order: sort by created_at, or follow the event feed.';
