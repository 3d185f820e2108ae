-- 0013_transfer_id_locality.sql: random transfer ids that are cheap to make and to index.
--
-- 0011's ids (62 random bits) cost more than they needed to, in two ways:
-- - The body read its UUID through a FROM clause, which keeps PostgreSQL from inlining a SQL function: every
--   statement that inserted transfers parsed, analysed and planned it anew (fmgr_sql), about 5 % of the
--   instructions of a one-transfer call. Written as one expression it is inlined into the INSERT's cached plan.
-- - Uniformly random keys land on random leaf pages of transfers_pkey and entries_transfer: every insert dirties a
--   page of its own, and the first change to each page after a checkpoint writes the whole page to the WAL. Batches
--   of 1,000 ran about 15 % slower than with sequential ids.
-- Now the top 16 bits are the second of the transaction modulo 2^16 (a cycle of about 18 hours) and the other 46
-- are random: what one second makes sits together in both indexes, as with a sequence, while the id still says
-- nothing of how many transfers this client or any other made (the second is in created_at anyway). Over whole
-- cycles ids spread evenly over the 62 bits, so a collision stays as rare as before (about n / 2^62 per new id for
-- a client with n transfers; within one second, k / 2^46 for the k made in it) and is handled as before.
-- Transfers made before keep their ids.

CREATE OR REPLACE FUNCTION ledger.random_transfer_id() RETURNS bigint
LANGUAGE sql VOLATILE PARALLEL SAFE
AS $$
    SELECT (((floor(extract(epoch FROM now()))::bigint & 65535) << 46)
            | (('x' || encode(substring(uuid_send(gen_random_uuid()) FROM 1 FOR 6), 'hex'))::bit(48)::bigint
               & 70368744177663)) + 1
$$;

COMMENT ON FUNCTION ledger.random_transfer_id() IS 'A new transfer''s id, 1 .. 2^62: the transaction''s second modulo 2^16 in the top 16 bits (ids of one second sit together in transfers_pkey and entries_transfer), then 46 bits from the strong random generator behind gen_random_uuid() (octets 0-5 of a version-4 UUID, all random). Ids reveal neither how many transfers this client made nor how many other clients made. One expression, so that PostgreSQL inlines it into the plans of the statements that insert transfers (a SQL function with a FROM clause is planned again at each statement). A collision with an id the client already has fails its transaction on transfers_pkey; the service runs the transaction again with new ids (LedgerStore: isTransferIdCollision).';
COMMENT ON COLUMN ledger.transfers.id IS 'Transfer id, unique within the client (shown as a string in the API). Random since sql/0011_transfer_ids.sql (ledger.random_transfer_id(); since 0013 its top 16 bits are the second of creation modulo 2^16); transfers made before 0011 keep their sequential ids. Not an order: sort by created_at, or follow the event feed.';
