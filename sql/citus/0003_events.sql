-- 0003_events.sql: the cross-client functions of the event feed and webhooks (sql/0009_events.sql), one client at a
-- time, as Citus refuses them across shards. Run by `ledger migrate --citus` after 0001, every time (idempotent).
--
-- Each runs on the coordinator (they do not take a client first, so 0001 copies them to every node): every
-- statement in them names one client and is routed to that client's shard; only the search for the clients with
-- something to do reads every shard, without locks. The single-node forms stay in the migrations.

-- The marks long-polls wait on: one router query per client, where the single-node form's correlated subqueries
-- over a list of clients are a join Citus cannot plan.
CREATE OR REPLACE FUNCTION ledger.event_marks(p_clients text[]) RETURNS TABLE (client_id text, mark bigint)
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
    v_client text;
    v_head bigint;
    v_pending bigint;
BEGIN
    FOREACH v_client IN ARRAY coalesce(p_clients, '{}'::text[]) LOOP
        SELECT h.position INTO v_head FROM ledger.event_heads h WHERE h.client_id = v_client;
        SELECT count(*) INTO v_pending FROM ledger.events e WHERE e.client_id = v_client AND e.position IS NULL;
        client_id := v_client;
        mark := coalesce(v_head, 0) + v_pending;
        RETURN NEXT;
    END LOOP;
END;
$$;
COMMENT ON FUNCTION ledger.event_marks(text[]) IS 'Per client: head position + unplaced events; grows with each event that commits. Long-polls wait for it to grow. The Citus form (sql/citus/0003_events.sql): one client at a time.';

-- Claims, client by client: FOR UPDATE SKIP LOCKED is refused across shards, and refused while Citus plans the
-- claim's CTE, which leaves the connection one that Citus delegates nothing from again (sql/citus/0002). The
-- clients with due deliveries are found first; each client's claim is the single-node statement with its client
-- named, routed whole to its shard. Clients are taken in order of their most overdue delivery.
CREATE OR REPLACE FUNCTION ledger.claim_deliveries(
    p_limit integer, p_per_webhook integer, p_busy_clients text[], p_busy_webhooks text[], p_busy_counts integer[],
    p_lease_ms integer, p_attempts_max integer
) RETURNS TABLE (client_id text, webhook_id text, event_seq bigint, claimed boolean, attempt integer, url text,
                 secret_nonce bytea, secret_key_id text, event_id bigint, event_created_at timestamptz, body text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_client text;
    v_left integer := p_limit;
    v_claimed integer;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    FOR v_client IN
        SELECT d.client_id FROM ledger.webhook_deliveries d
        WHERE NOT d.failed AND d.next_attempt_at <= now()
        GROUP BY d.client_id ORDER BY min(d.next_attempt_at)
    LOOP
        EXIT WHEN v_left <= 0;
        RETURN QUERY
        WITH due AS (
            SELECT d.client_id, d.webhook_id, d.event_seq, d.next_attempt_at
            FROM ledger.webhook_deliveries d
            JOIN ledger.events e ON e.client_id = d.client_id AND e.seq = d.event_seq
            WHERE d.client_id = v_client AND e.client_id = v_client
              AND NOT d.failed AND d.next_attempt_at <= now() AND e.position IS NOT NULL
            ORDER BY d.next_attempt_at
            LIMIT v_left * 4
            FOR UPDATE OF d SKIP LOCKED
        ), ranked AS (
            SELECT d.*, row_number() OVER (PARTITION BY d.webhook_id ORDER BY d.next_attempt_at, d.event_seq)
                        + coalesce(b.busy, 0) AS slot
            FROM due d
            LEFT JOIN unnest(p_busy_clients, p_busy_webhooks, p_busy_counts) AS b(client_id, webhook_id, busy)
              ON b.client_id = d.client_id AND b.webhook_id = d.webhook_id
        ), chosen AS (
            SELECT r.client_id, r.webhook_id, r.event_seq FROM ranked r
            WHERE r.slot <= p_per_webhook
            ORDER BY r.next_attempt_at
            LIMIT v_left
        ), claimed AS (
            UPDATE ledger.webhook_deliveries d
            SET attempts = d.attempts + CASE WHEN d.attempts < p_attempts_max THEN 1 ELSE 0 END,
                failed = d.attempts >= p_attempts_max,
                next_attempt_at = now() + make_interval(secs => p_lease_ms / 1000.0)
            FROM chosen c
            WHERE d.client_id = v_client AND d.client_id = c.client_id AND d.webhook_id = c.webhook_id
              AND d.event_seq = c.event_seq
            RETURNING d.client_id, d.webhook_id, d.event_seq, NOT d.failed AS claimed, d.attempts
        )
        SELECT c.client_id, c.webhook_id, c.event_seq, c.claimed, c.attempts, w.url, w.secret_nonce, w.secret_key_id,
               e.position, e.created_at, ledger.event_json(e.position, e.type, e.created_at, e.data)
        FROM claimed c
        JOIN ledger.webhooks w ON w.client_id = c.client_id AND w.id = c.webhook_id
        JOIN ledger.events e ON e.client_id = c.client_id AND e.seq = c.event_seq
        WHERE w.client_id = v_client AND e.client_id = v_client;
        GET DIAGNOSTICS v_claimed = ROW_COUNT;
        v_left := v_left - v_claimed;
    END LOOP;
END;
$$;
COMMENT ON FUNCTION ledger.claim_deliveries(integer, integer, text[], text[], integer[], integer, integer) IS 'Claims due webhook deliveries of placed events for one attempt each (see the table comment). The Citus form (sql/citus/0003_events.sql): client by client, in order of their most overdue delivery.';

-- Outcomes, one delivery at a time: the single-node statements join every client's deliveries to the arrays at
-- once, and Citus takes no now() beside a column in an UPDATE. A call records one claim's attempts: a few rows.
CREATE OR REPLACE FUNCTION ledger.record_deliveries(
    p_clients text[], p_webhooks text[], p_seqs bigint[], p_outcomes text[], p_next_in_ms bigint[],
    p_statuses integer[], p_errors text[]
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_client text;
    v_webhook text;
    v_seq bigint;
    v_next timestamptz;
    v_failed boolean;
    v_status integer;
    v_error text;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    FOR i IN 1 .. coalesce(cardinality(p_clients), 0) LOOP
        v_client := p_clients[i];
        v_webhook := p_webhooks[i];
        v_seq := p_seqs[i];
        IF p_outcomes[i] = 'delivered' THEN
            DELETE FROM ledger.webhook_deliveries d
            WHERE d.client_id = v_client AND d.webhook_id = v_webhook AND d.event_seq = v_seq;
            CONTINUE;
        END IF;
        v_next := now() + make_interval(secs => p_next_in_ms[i] / 1000.0);
        v_failed := p_outcomes[i] <> 'retry';
        v_status := p_statuses[i];
        v_error := left(p_errors[i], 500);
        UPDATE ledger.webhook_deliveries d
        SET failed = v_failed, next_attempt_at = coalesce(v_next, d.next_attempt_at),
            last_status = v_status, last_error = v_error
        WHERE d.client_id = v_client AND d.webhook_id = v_webhook AND d.event_seq = v_seq;
        IF p_outcomes[i] = 'gone' THEN
            UPDATE ledger.webhooks w SET enabled = false WHERE w.client_id = v_client AND w.id = v_webhook;
        END IF;
    END LOOP;
END;
$$;
COMMENT ON FUNCTION ledger.record_deliveries(text[], text[], bigint[], text[], bigint[], integer[], text[]) IS 'Records attempts: delivered (removed), retry (in next_in_ms), failed, gone (410: failed and the webhook disabled). The Citus form (sql/citus/0003_events.sql): one delivery at a time.';

-- PUT /v1/webhooks runs on the coordinator, its statements routed to the client's shard: Citus delegates its call
-- with the event types as a constant it writes out as cstring::text[], which the worker refuses ("cannot cast type
-- cstring to text[]"). It takes no key lock (the PUT is naturally idempotent), so nothing needs it on the worker.
-- 0001 distributes it by the client again on every run; this file, run after it, takes that back.
SELECT create_distributed_function('ledger.put_webhook(text, text, text, text[], boolean, bytea, text)'::regprocedure);
