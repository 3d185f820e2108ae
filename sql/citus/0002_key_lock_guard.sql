-- 0002_key_lock_guard.sql: a key lock is only ever taken on the node that holds the client's rows.
--
-- Run by `ledger migrate --citus` after 0001, every time (idempotent). See docs/scaling.md, "Why each request stays
-- on one node".
--
-- Key locks are advisory locks, which are node-local on Citus: they serialise the executions of a key only if every
-- execution runs on the client's worker. 0001 distributes the request functions so that Citus delegates every call
-- there, but Citus 13.2 stops delegating on a connection for good once an error was raised while it planned a
-- subquery or CTE of some statement on that connection (its recursive-planning depth is left raised: every later
-- call answers "not pushing down function calls in CTEs or Subqueries" and runs on the coordinator). A statement
-- Citus refuses, such as a FOR UPDATE SKIP LOCKED over several shards, is enough; and the service's connections are
-- pooled, so one refused statement turns a connection into one whose keyed calls take their key locks on the
-- coordinator, where no other execution of the key looks.
--
-- Every key lock id goes through ledger.key_lock_id, so it refuses to give one on a node that does not hold the
-- client's shard: it ends its own backend, the only way to clear Citus's state. The statement is rolled back and
-- writes nothing; the service sees its connection end (57P01), answers 503 with Retry-After (the same key retried
-- is safe) and leaves the connection out of its pool. Its body is kept as a migration defines it; the check is put
-- in front of it, so that a later migration that replaces key_lock_id gets it again on the next run.

CREATE OR REPLACE FUNCTION ledger.key_lock_node_check(p_lock_client text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_dist_placement p
               WHERE p.shardid = get_shard_id_for_distribution_column('ledger.accounts', p_lock_client)
                 AND p.groupid <> (SELECT g.groupid FROM pg_dist_local_group g)) THEN
        PERFORM pg_terminate_backend(pg_backend_pid());
        -- Not reached while the termination is handled at once, as it is here; if it were held back, this fails.
        RAISE EXCEPTION 'the key lock of client % would be taken on a node that does not hold the client''s rows',
            p_lock_client
            USING ERRCODE = 'serialization_failure',
                  HINT = 'The call was not delegated to the client''s worker; retry on another connection.';
    END IF;
END;
$$;
COMMENT ON FUNCTION ledger.key_lock_node_check(text) IS 'Citus (sql/citus/0002_key_lock_guard.sql): on a node that does not hold the client''s shard, ends this backend (the statement rolls back); ledger.key_lock_id calls it first, so no key lock is ever taken off the client''s node.';

DO $guard$
DECLARE
    v_function constant regprocedure := 'ledger.key_lock_id(text, text)';
    v_definition text;
BEGIN
    SELECT pg_get_functiondef(v_function) INTO v_definition;
    IF v_definition LIKE '%ledger.key_lock_node_check(%' THEN
        RETURN;
    END IF;
    IF (SELECT l.lanname FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang WHERE p.oid = v_function) <> 'plpgsql'
       OR v_definition !~* '\mBEGIN\M' THEN
        RAISE EXCEPTION 'ledger.key_lock_id is not a PL/pgSQL block: sql/citus/0002_key_lock_guard.sql cannot guard it';
    END IF;
    -- The first BEGIN opens the function's block: the check becomes its first statement.
    EXECUTE regexp_replace(v_definition, '\mBEGIN\M', E'BEGIN\n    PERFORM ledger.key_lock_node_check(p_client);', 'i');
END;
$guard$;
