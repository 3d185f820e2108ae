-- 0001_distribute.sql: distributes the migrated schema over a Citus cluster, by client.
--
-- Run by `ledger migrate --citus` on the coordinator after the migrations, in one transaction, every time: it only
-- does what is not done yet, so a rerun changes nothing and a run after new migrations distributes the tables and
-- functions they added. See docs/scaling.md for the design.
--
-- - clients, api_tokens and service_keys are reference tables (a copy on every node): every request reads them;
-- - every other table of schema ledger (all keyed by client_id first: ShardKeyTests checks it) is distributed by
--   client_id, colocated with ledger.accounts, so one client's rows of every table are on one node;
-- - every function whose first argument is the client (p_client) is distributed by it, with force_delegation: a
--   request's one call is delegated to the worker that holds the client, also inside a transaction block, and runs
--   there as one single-shard transaction (its advisory locks are that worker's, which is enough as every lock key
--   leads with the client and every execution of a key runs there); the other functions are copied to every node.
-- ledger.schema_migrations stays a local table of the coordinator, where `ledger migrate` runs.
--
-- Citus refuses to distribute a table while local tables hold foreign keys to it, and distributing drops the views
-- over it: both are taken off first and put back after, with their comments.

SET LOCAL citus.multi_shard_modify_mode TO 'sequential';

DO $distribute$
DECLARE
    v_reference constant text[] := ARRAY['clients', 'api_tokens', 'service_keys'];
    v_local constant text[] := ARRAY['schema_migrations'];
    v_pending text[];
    v_fk record;
    v_view record;
    v_table text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        RAISE EXCEPTION 'ledger migrate --citus: this database has no citus extension'
            USING HINT = 'CREATE EXTENSION citus on the coordinator and every worker, and add the workers (docs/scaling.md).';
    END IF;

    -- Tables of schema ledger that Citus does not place yet.
    SELECT array_agg(c.relname ORDER BY c.relname) INTO v_pending
    FROM pg_class c
    WHERE c.relnamespace = 'ledger'::regnamespace AND c.relkind IN ('r', 'p') AND NOT c.relispartition
      AND c.relname <> ALL (v_local)
      AND NOT EXISTS (SELECT 1 FROM pg_dist_partition p WHERE p.logicalrelid = c.oid);

    IF v_pending IS NOT NULL THEN
        -- Foreign keys and views of the schema, kept to be put back.
        CREATE TEMP TABLE citus_fks ON COMMIT DROP AS
        SELECT k.conrelid::regclass::text AS rel, k.conname, pg_get_constraintdef(k.oid) AS def
        FROM pg_constraint k WHERE k.contype = 'f' AND k.connamespace = 'ledger'::regnamespace;
        CREATE TEMP TABLE citus_views ON COMMIT DROP AS
        SELECT c.oid::regclass::text AS name, pg_get_viewdef(c.oid) AS def, obj_description(c.oid, 'pg_class') AS comment,
               row_number() OVER (ORDER BY c.oid) AS made
        FROM pg_class c WHERE c.relnamespace = 'ledger'::regnamespace AND c.relkind = 'v';
        FOR v_fk IN SELECT * FROM citus_fks LOOP
            EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', v_fk.rel, v_fk.conname);
        END LOOP;
        FOR v_view IN SELECT * FROM citus_views ORDER BY made DESC LOOP
            EXECUTE format('DROP VIEW IF EXISTS %s CASCADE', v_view.name);
        END LOOP;

        FOREACH v_table IN ARRAY v_pending LOOP
            IF v_table = ANY (v_reference) THEN
                PERFORM create_reference_table(format('ledger.%I', v_table)::regclass);
            END IF;
        END LOOP;
        -- ledger.accounts first: the others are colocated with it.
        IF 'accounts' = ANY (v_pending) THEN
            PERFORM create_distributed_table('ledger.accounts', 'client_id', shard_count => 32);
        END IF;
        FOREACH v_table IN ARRAY v_pending LOOP
            CONTINUE WHEN v_table = ANY (v_reference) OR v_table = 'accounts';
            IF NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = format('ledger.%I', v_table)::regclass
                           AND a.attname = 'client_id' AND NOT a.attisdropped) THEN
                RAISE EXCEPTION 'table ledger.% has no client_id: it can be neither distributed nor a reference table', v_table
                    USING HINT = 'Key it by client_id first, or list it as a reference table here and in ShardKeyTests.';
            END IF;
            PERFORM create_distributed_table(format('ledger.%I', v_table)::regclass, 'client_id',
                colocate_with => 'ledger.accounts');
        END LOOP;

        FOR v_fk IN SELECT * FROM citus_fks LOOP
            EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I %s', v_fk.rel, v_fk.conname, v_fk.def);
        END LOOP;
        FOR v_view IN SELECT * FROM citus_views ORDER BY made LOOP
            EXECUTE format('CREATE VIEW %s AS %s', v_view.name, v_view.def);
            IF v_view.comment IS NOT NULL THEN
                EXECUTE format('COMMENT ON VIEW %s IS %L', v_view.name, v_view.comment);
            END IF;
        END LOOP;
    END IF;
END;
$distribute$;

-- The retention purge, one client at a time: Citus refuses the single-node form's FOR UPDATE SKIP LOCKED across
-- shards. Each statement names one client, so it runs on that client's shard; the purge runs on the coordinator.
CREATE OR REPLACE FUNCTION ledger.purge_idempotency_keys(p_older_than interval, p_batch_size integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_client text;
    v_deleted integer := 0;
    v_now integer;
BEGIN
    IF p_batch_size < 1 OR p_batch_size > 100000 THEN
        RAISE EXCEPTION 'batch size % outside 1..100000', p_batch_size USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR v_client IN
        SELECT DISTINCT k.client_id FROM ledger.idempotency_keys k WHERE k.created_at < now() - p_older_than
    LOOP
        WITH old AS (
            SELECT k.client_id, k.key
            FROM ledger.idempotency_keys k
            WHERE k.client_id = v_client AND k.created_at < now() - p_older_than
            ORDER BY k.created_at
            LIMIT p_batch_size - v_deleted
            FOR UPDATE SKIP LOCKED
        )
        DELETE FROM ledger.idempotency_keys k
        USING old
        WHERE k.client_id = v_client AND k.client_id = old.client_id AND k.key = old.key;
        GET DIAGNOSTICS v_now = ROW_COUNT;
        v_deleted := v_deleted + v_now;
        EXIT WHEN v_deleted >= p_batch_size;
    END LOOP;
    RETURN v_deleted;
END;
$$;
COMMENT ON FUNCTION ledger.purge_idempotency_keys(interval, integer) IS 'Deletes one bounded batch of stored responses older than the retention time, client by client (the Citus form of sql/citus/0001_distribute.sql); `ledger purge` and the service''s background purge call it until it returns less than a batch.';

-- Citus cannot plan the parameterised queries of a LANGUAGE sql function over its tables ("parameterized queries
-- for SQL functions referencing distributed tables are not supported"): each such function is given the same body
-- as PL/pgSQL, whose queries it plans with their values. The migrations keep the sql forms for single-node
-- PostgreSQL, which can inline them. Functions also run inside queries that Citus sends to a shard (the views call
-- ledger.effective_held per account; ledger.release_holds and ledger.expire_holds run ledger.execute_movements in a
-- LATERAL join over a client's rows): Citus refuses a distributed query from there unless allowed, because a query
-- that reached other nodes would not see the outer one's writes. Run inside a shard's query, every function here
-- reads and writes only rows of the one client whose shard runs it (colocated, so on that same node, in that same
-- transaction) or of a reference table (a copy on every node): allowed for every function that names a table.
DO $plpgsql$
DECLARE
    v_function record;
    v_body text;
BEGIN
    FOR v_function IN
        SELECT p.oid, p.proretset, p.prorettype, p.provolatile, p.proparallel, p.prosrc,
               pg_get_function_identity_arguments(p.oid) AS identity
        FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
        WHERE p.pronamespace = 'ledger'::regnamespace AND p.prokind = 'f' AND l.lanname = 'sql'
          AND p.prosqlbody IS NULL AND p.prosrc ~ 'ledger\.[a-z_]+'
          AND EXISTS (SELECT 1 FROM pg_dist_partition d JOIN pg_class c ON c.oid = d.logicalrelid
                      WHERE c.relnamespace = 'ledger'::regnamespace AND p.prosrc ~ ('ledger\.' || c.relname || '\M'))
    LOOP
        v_body := rtrim(btrim(v_function.prosrc, E' \n\t'), ';');
        v_body := E'#variable_conflict use_column\nBEGIN\n'
            || CASE WHEN v_function.proretset THEN E'RETURN QUERY\n' || v_body || E';\n'
                    WHEN v_function.prorettype = 'void'::regtype THEN v_body || E';\n'
                    ELSE E'RETURN (\n' || v_body || E'\n);\n' END
            || 'END;';
        EXECUTE format('CREATE OR REPLACE FUNCTION ledger.%s(%s) RETURNS %s LANGUAGE plpgsql %s %s AS %L',
            (SELECT proname FROM pg_proc WHERE oid = v_function.oid), pg_get_function_arguments(v_function.oid),
            pg_get_function_result(v_function.oid),
            CASE v_function.provolatile WHEN 'i' THEN 'IMMUTABLE' WHEN 's' THEN 'STABLE' ELSE 'VOLATILE' END,
            CASE v_function.proparallel WHEN 's' THEN 'PARALLEL SAFE' WHEN 'r' THEN 'PARALLEL RESTRICTED' ELSE 'PARALLEL UNSAFE' END,
            v_body);
    END LOOP;
    FOR v_function IN
        SELECT p.oid::regprocedure::text AS signature FROM pg_proc p
        WHERE p.pronamespace = 'ledger'::regnamespace AND p.prokind = 'f'
          AND NOT coalesce('citus.allow_nested_distributed_execution=on' = ANY (p.proconfig), false)
          AND p.prosrc ~ 'ledger\.[a-z_]+'
          AND EXISTS (SELECT 1 FROM pg_dist_partition d JOIN pg_class c ON c.oid = d.logicalrelid
                      WHERE c.relnamespace = 'ledger'::regnamespace AND p.prosrc ~ ('ledger\.' || c.relname || '\M'))
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET citus.allow_nested_distributed_execution TO on', v_function.signature);
    END LOOP;
END;
$plpgsql$;

-- A query that Citus runs on a shard names the shard (ledger.transfers_102008), so a whole-row reference in it, such
-- as ledger.transfer_json(t) in the RETURNING of an INSERT, has the shard's row type, which no function takes. Each
-- function over a distributed table's row type gets an overload for any row, which passes its fields on to it.
-- Both are marked IMMUTABLE: Citus refuses other functions in the RETURNING of an UPDATE (ledger.hold_json(h) when
-- holds expire). They render the row they are given; the one use of the clock (a pending hold past expires_at shows
-- as expired) is read per row as the statement runs, as their argument is always a table's row, never a constant
-- the planner could fold.
DO $rows$
DECLARE
    v_function record;
BEGIN
    FOR v_function IN
        SELECT p.proname, format_type(p.prorettype, NULL) AS returns, c.oid::regclass::text AS row_type
        FROM pg_proc p
        JOIN pg_class c ON c.reltype = p.proargtypes[0] AND c.relnamespace = 'ledger'::regnamespace
        WHERE p.pronamespace = 'ledger'::regnamespace AND p.prokind = 'f' AND p.pronargs = 1 AND NOT p.proretset
          AND EXISTS (SELECT 1 FROM pg_dist_partition d WHERE d.logicalrelid = c.oid)
    LOOP
        EXECUTE format('ALTER FUNCTION ledger.%I(%s) IMMUTABLE', v_function.proname, v_function.row_type);
        EXECUTE format(
            'CREATE OR REPLACE FUNCTION ledger.%I(p_row anyelement) RETURNS %s LANGUAGE plpgsql IMMUTABLE AS %L',
            v_function.proname, v_function.returns,
            format('BEGIN RETURN ledger.%I(ROW((p_row).*)::%s); END;', v_function.proname, v_function.row_type));
        EXECUTE format('COMMENT ON FUNCTION ledger.%I(anyelement) IS %L', v_function.proname,
            format('ledger.%I of a shard''s row (Citus, sql/citus/): the same as of a row of %s.', v_function.proname, v_function.row_type));
    END LOOP;
END;
$rows$;

-- Generic plans leave the client a parameter, and Citus cannot route a query by a parameter: the functions that
-- force generic plans on single-node PostgreSQL (to save planning time) plan each statement with its values here.
DO $plans$
DECLARE
    v_function record;
BEGIN
    FOR v_function IN
        SELECT p.oid::regprocedure::text AS signature FROM pg_proc p
        WHERE p.pronamespace = 'ledger'::regnamespace AND 'plan_cache_mode=force_generic_plan' = ANY (p.proconfig)
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET plan_cache_mode TO force_custom_plan', v_function.signature);
    END LOOP;
END;
$plans$;

-- Functions: by the client where they take it first, else copied to every node. Run every time: a function that
-- a later migration replaced is distributed again.
--
-- By the client with force_delegation: Citus delegates a call of a distributed function only outside a transaction
-- block unless the function is marked so. A keyed call made inside one (BEGIN; SELECT ledger.post_hold(...); or
-- several statements in one simple query) would otherwise run on the coordinator, whose statements reach the
-- client's shards but whose advisory locks, the key locks, are the coordinator's own: it would neither see nor
-- take the lock that every delegated execution of the key takes on the worker, and both would execute. Marked,
-- the call runs on the client's worker in either shape, in the surrounding transaction there when there is one.
DO $functions$
DECLARE
    v_function record;
BEGIN
    FOR v_function IN
        SELECT p.oid::regprocedure::text AS signature,
               p.pronargs > 0 AND p.proargnames[1] = 'p_client' AND p.proargtypes[0] = 'text'::regtype AS by_client
        FROM pg_proc p
        WHERE p.pronamespace = 'ledger'::regnamespace AND p.prokind = 'f'
        ORDER BY p.oid
    LOOP
        IF v_function.by_client THEN
            PERFORM create_distributed_function(v_function.signature::regprocedure, '$1',
                colocate_with => 'ledger.accounts', force_delegation => true);
        ELSE
            PERFORM create_distributed_function(v_function.signature::regprocedure);
        END IF;
    END LOOP;
END;
$functions$;
