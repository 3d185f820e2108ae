import Foundation
import LedgerStore
import LedgerTestSupport
import PostgresClient
import Testing

/// The shard key: every client table can be distributed by `client_id` (Citus, docs/scaling.md) only while its keys,
/// its foreign keys and the functions that serve a request keep the client first. These tests read the catalog of a
/// database with every migration applied, so a new migration that breaks the rule fails here, on plain PostgreSQL.
@Suite("Shard key: client_id leads")
struct ShardKeyTests {
    /// Tables every node needs whole (Citus reference tables): not keyed by client. Anything else in schema ledger is
    /// a client table. sql/citus/ distributes them accordingly.
    static let referenceTables = ["clients", "api_tokens", "service_keys", "schema_migrations"]

    /// Functions that work across clients on purpose: background work of `ledger serve` (the retention purge, the
    /// hold-expiry sweep, the event sequencer and the webhook delivery service), never a request. On Citus they run on
    /// the coordinator, and each needs a form whose statements name one client (docs/scaling.md). Nothing that
    /// serves a request belongs here.
    static let crossClientFunctions = [
        "expire_holds", "purge_idempotency_keys", "sequence_pending_events", "event_marks", "claim_deliveries",
        "record_deliveries",
    ]

    @Test("every client table, foreign key and request function of the migrations keeps client_id first")
    func migrationsKeepTheClientFirst() async throws {
        let pool = try await TestDatabase.pool()
        defer { Task { await pool.close() } }
        try await Migrator.load(directory: MigratorTests.repositorySQL, logger: TestDatabase.logger).migrate(pool: pool)
        #expect(try await Self.violations(pool) == [])
    }

    @Test("the check names a key, a foreign key and functions that do not lead with the client")
    func checkCatchesViolations() async throws {
        let pool = try await TestDatabase.pool()
        defer { Task { await pool.close() } }
        try await Migrator.load(directory: MigratorTests.repositorySQL, logger: TestDatabase.logger).migrate(pool: pool)
        try await pool.withConnection { connection in
            try await connection.executeScript(
                """
                CREATE TABLE ledger.bad_events (id bigint PRIMARY KEY, client_id text NOT NULL, account_id text);
                CREATE TABLE ledger.no_client (id int PRIMARY KEY);
                ALTER TABLE ledger.bad_events ADD CONSTRAINT bad_events_account
                    FOREIGN KEY (account_id, client_id) REFERENCES ledger.accounts (client_id, id);
                CREATE FUNCTION ledger.event(p_id bigint, p_client text) RETURNS bigint LANGUAGE sql
                    AS $$ SELECT id FROM ledger.bad_events WHERE client_id = p_client AND id = p_id $$;
                CREATE FUNCTION ledger.event_count() RETURNS bigint LANGUAGE sql
                    AS $$ SELECT count(*) FROM ledger.bad_events $$;
                CREATE FUNCTION ledger.event_ids() RETURNS SETOF bigint LANGUAGE sql
                    BEGIN ATOMIC SELECT id FROM ledger.bad_events; END;
                """)
        }
        #expect(
            try await Self.violations(pool) == [
                "foreign key bad_events_account of ledger.bad_events to ledger.accounts does not pair client_id with client_id",
                "function ledger.event(bigint,text) does not take the client (p_client text) first",
                "function ledger.event_count() does not take the client (p_client text) first",
                "function ledger.event_ids() does not take the client (p_client text) first",
                "table ledger.no_client has no client_id column",
                "unique key ledger.bad_events_pkey of ledger.bad_events does not lead with client_id",
                "unique key ledger.no_client_pkey of ledger.no_client does not lead with client_id",
            ])
    }

    /// One line per breach of the rule, sorted:
    /// - a client table without `client_id`, or a primary key or unique index (partial ones too) not led by it;
    /// - a foreign key to a client table that does not pair the two tables' `client_id` columns;
    /// - a function of schema ledger that names a client table in its body or has a `p_client` argument, but does not
    ///   take `p_client text` first (functions over a client table's row type already hold one client's row, and the
    ///   cross-client maintenance functions are listed above).
    static func violations(_ pool: PostgresPool) async throws -> [String] {
        func list(_ names: [String]) -> String { names.map { "('\($0)')" }.joined(separator: ", ") }
        let rows = try await pool.query(
            """
            WITH reference(name) AS (VALUES \(list(referenceTables))),
            maintenance(name) AS (VALUES \(list(crossClientFunctions))),
            client_tables AS (
                SELECT c.oid, c.relname, c.reltype, a.attnum AS client_col
                FROM pg_class c
                LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'client_id' AND NOT a.attisdropped
                WHERE c.relnamespace = 'ledger'::regnamespace AND c.relkind IN ('r', 'p')
                  AND c.relname NOT IN (SELECT name FROM reference)
            )
            SELECT 'table ledger.' || relname || ' has no client_id column' AS violation
            FROM client_tables WHERE client_col IS NULL
            UNION ALL
            SELECT 'unique key ' || i.indexrelid::regclass::text || ' of ledger.' || t.relname || ' does not lead with client_id'
            FROM client_tables t JOIN pg_index i ON i.indrelid = t.oid
            WHERE i.indisunique AND i.indkey[0] IS DISTINCT FROM t.client_col
            UNION ALL
            SELECT 'foreign key ' || k.conname || ' of ' || k.conrelid::regclass::text || ' to ' || k.confrelid::regclass::text
                || ' does not pair client_id with client_id'
            FROM pg_constraint k
            JOIN client_tables target ON target.oid = k.confrelid
            LEFT JOIN client_tables source ON source.oid = k.conrelid
            WHERE k.contype = 'f'
              AND NOT EXISTS (
                  SELECT 1 FROM generate_subscripts(k.conkey, 1) s
                  WHERE k.conkey[s] = source.client_col AND k.confkey[s] = target.client_col)
            UNION ALL
            SELECT 'function ' || p.oid::regprocedure::text || ' does not take the client (p_client text) first'
            FROM pg_proc p
            WHERE p.pronamespace = 'ledger'::regnamespace AND p.prokind IN ('f', 'p')
              AND p.proname NOT IN (SELECT name FROM maintenance)
              AND NOT (p.pronargs > 0 AND p.proargtypes[0] IN (SELECT reltype FROM client_tables))
              AND ('p_client' = ANY (p.proargnames)
                   OR (CASE WHEN p.prosqlbody IS NULL THEN p.prosrc ELSE pg_get_function_sqlbody(p.oid) END)
                      ~ ('ledger\\.(' || (SELECT string_agg(relname, '|') FROM client_tables) || ')\\M'))
              AND NOT (p.proargnames[1] IS NOT DISTINCT FROM 'p_client' AND p.proargtypes[0] = 'text'::regtype)
            ORDER BY 1
            """)
        return try rows.rows.map { try $0.decode(String.self, "violation") }
    }
}
