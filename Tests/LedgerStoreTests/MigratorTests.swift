import Foundation
import LedgerStore
import LedgerTestSupport
import PostgresClient
import Testing

@Suite("Migrations against a real PostgreSQL")
struct MigratorTests {
    static let repositorySQL = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("sql")

    /// A private copy of sql/ that a test may change.
    func copyOfSQL() throws -> URL {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("sql-\(UUID().uuidString)")
        try FileManager.default.copyItem(at: Self.repositorySQL, to: directory)
        return directory
    }

    @Test("the first run applies every file, a re-run applies nothing")
    func rerunAppliesNothing() async throws {
        let pool = try await TestDatabase.pool()
        defer { Task { await pool.close() } }
        let migrator = try Migrator.load(directory: Self.repositorySQL, logger: TestDatabase.logger)
        #expect(!migrator.migrations.isEmpty)
        let first = try await migrator.migrate(pool: pool)
        #expect(first == migrator.migrations.map(\.name))
        let second = try await migrator.migrate(pool: pool)
        #expect(second.isEmpty)
        let recorded = try await pool.query("SELECT name, sha256 FROM ledger.schema_migrations ORDER BY version")
        #expect(try recorded.rows.map { try $0.decode(String.self, "name") } == migrator.migrations.map(\.name))
        #expect(try recorded.rows.map { try $0.decode(String.self, "sha256") } == migrator.migrations.map(\.sha256))
    }

    @Test("an applied file that changed is refused, and nothing else is applied")
    func changedFileRefused() async throws {
        let pool = try await TestDatabase.pool()
        defer { Task { await pool.close() } }
        let directory = try copyOfSQL()
        defer { try? FileManager.default.removeItem(at: directory) }
        try await Migrator.load(directory: directory, logger: TestDatabase.logger).migrate(pool: pool)

        let first = directory.appendingPathComponent("0001_init.sql")
        try (try String(contentsOf: first, encoding: .utf8) + "\n-- edited\n").write(to: first, atomically: true, encoding: .utf8)
        try "CREATE TABLE ledger.should_not_exist (id int);".write(
            to: directory.appendingPathComponent("9999_later.sql"), atomically: true, encoding: .utf8)
        let changed = try Migrator.load(directory: directory, logger: TestDatabase.logger)
        await #expect(throws: Migrator.Failure.self) { try await changed.migrate(pool: pool) }
        let exists = try await pool.query("SELECT to_regclass('ledger.should_not_exist') IS NOT NULL AS present")
            .rows[0].decode(Bool.self, "present")
        #expect(exists == false)
    }

    @Test("a failing migration rolls back whole and is not recorded")
    func failingMigrationRollsBack() async throws {
        let pool = try await TestDatabase.pool()
        defer { Task { await pool.close() } }
        let directory = try copyOfSQL()
        defer { try? FileManager.default.removeItem(at: directory) }
        try "CREATE TABLE ledger.half (id int); SELECT 1/0;".write(
            to: directory.appendingPathComponent("9998_broken.sql"), atomically: true, encoding: .utf8)
        let migrator = try Migrator.load(directory: directory, logger: TestDatabase.logger)
        await #expect(throws: PostgresError.self) { try await migrator.migrate(pool: pool) }
        let row = try await pool.query(
            "SELECT to_regclass('ledger.half') IS NOT NULL AS half, "
                + "(SELECT count(*) FROM ledger.schema_migrations WHERE version = '9998') AS recorded"
        ).rows[0]
        #expect(try row.decode(Bool.self, "half") == false)
        #expect(try row.decode(Int64.self, "recorded") == 0)
    }

    @Test("two concurrent `ledger migrate` processes apply each file exactly once")
    func concurrentProcesses() async throws {
        guard let binary = ProcessInfo.processInfo.environment["LEDGER_BIN"] else {
            throw TestDatabase.SetupError(message: "LEDGER_BIN is not set: run the tests with scripts/test")
        }
        let conninfo = try await TestDatabase.create()
        let processes = try (0..<3).map { _ -> Process in
            let process = Process()
            process.executableURL = URL(fileURLWithPath: binary)
            process.arguments = ["migrate", "--database-url", conninfo, "--sql-dir", Self.repositorySQL.path]
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
            return process
        }
        for process in processes {
            process.waitUntilExit()
            #expect(process.terminationStatus == 0)
        }
        let pool = PostgresPool(configuration: PostgresConfiguration(conninfo: conninfo, poolSizeMax: 1), logger: TestDatabase.logger)
        defer { Task { await pool.close() } }
        let count = try await pool.query("SELECT count(*) AS n, count(DISTINCT version) AS d FROM ledger.schema_migrations").rows[0]
        let files = try Migrator.load(directory: Self.repositorySQL, logger: TestDatabase.logger).migrations.count
        #expect(try count.decode(Int64.self, "n") == Int64(files))
        #expect(try count.decode(Int64.self, "d") == Int64(files))
    }

    /// What 0001 made before its correction: the rendering functions over row types with SQL-standard bodies.
    static let standardBodiesOf2026_11_23 = [
        "CREATE OR REPLACE FUNCTION ledger.transfer_json(t ledger.transfers) RETURNS text LANGUAGE sql STABLE PARALLEL SAFE "
            + "RETURN '{\"id\":' || to_json(t.id::text)::text || '}'",
        "CREATE OR REPLACE FUNCTION ledger.account_json(a ledger.accounts) RETURNS text LANGUAGE sql STABLE PARALLEL SAFE "
            + "RETURN '{\"id\":' || to_json(a.id)::text || '}'",
        "CREATE OR REPLACE FUNCTION ledger.entry_json(e ledger.entries) RETURNS text LANGUAGE sql STABLE PARALLEL SAFE "
            + "RETURN '{\"transfer_id\":' || to_json(e.transfer_id::text)::text || '}'",
    ]

    @Test("a database migrated before the 0001 correction is accepted, and later migrations can alter its tables")
    func databaseOfBeforeTheCorrection() async throws {
        let pool = try await TestDatabase.pool()
        defer { Task { await pool.close() } }
        let migrator = try Migrator.load(directory: Self.repositorySQL, logger: TestDatabase.logger)
        let upToCorrection = Migrator(
            migrations: migrator.migrations.filter { $0.version < "0007" }, logger: TestDatabase.logger)
        try await upToCorrection.migrate(pool: pool)
        // Make it what a database migrated on PostgreSQL 15.18 before the correction is: the old checksum of 0001
        // and its SQL-standard bodies.
        let old = try #require(Migrator.supersededChecksums["0001"]?.first)
        try await pool.query("UPDATE ledger.schema_migrations SET sha256 = $1 WHERE version = '0001'", [.string(old)])
        for statement in Self.standardBodiesOf2026_11_23 { try await pool.query(statement) }

        let applied = try await migrator.migrate(pool: pool)
        #expect(applied.contains("0007_row_type_functions.sql"))
        #expect(try await Self.standardBodiesOverRowTypes(pool).isEmpty)
        // What a later migration will do: add a column with a default to each table the functions read.
        try await pool.withConnection { connection in
            try await connection.query("BEGIN")
            for table in ["transfers", "accounts", "entries"] {
                try await connection.query("ALTER TABLE ledger.\(table) ADD COLUMN probe integer NOT NULL DEFAULT 0")
            }
            try await connection.query("ROLLBACK")
        }
        // Another old checksum is still refused.
        try await pool.query("UPDATE ledger.schema_migrations SET sha256 = 'feed' WHERE version = '0001'")
        await #expect(throws: Migrator.Failure.self) { try await migrator.migrate(pool: pool) }
    }

    @Test("a database that applied the old 0001 and failed at 0005 on a current minor release finishes migrating")
    func databaseStoppedAtTheTrap() async throws {
        let pool = try await TestDatabase.pool()
        defer { Task { await pool.close() } }
        let migrator = try Migrator.load(directory: Self.repositorySQL, logger: TestDatabase.logger)
        let upToTheTrap = Migrator(
            migrations: migrator.migrations.filter { $0.version < "0005" }, logger: TestDatabase.logger)
        try await upToTheTrap.migrate(pool: pool)
        let old = try #require(Migrator.supersededChecksums["0001"]?.first)
        try await pool.query("UPDATE ledger.schema_migrations SET sha256 = $1 WHERE version = '0001'", [.string(old)])
        for statement in Self.standardBodiesOf2026_11_23 { try await pool.query(statement) }

        let applied = try await migrator.migrate(pool: pool)
        #expect(applied.first == "0007_row_type_functions.sql", "the repair runs before 0005")
        #expect(Set(applied) == Set(migrator.migrations.filter { $0.version >= "0005" }.map(\.name)))
        #expect(try await Self.standardBodiesOverRowTypes(pool).isEmpty)
        #expect(try await migrator.migrate(pool: pool).isEmpty)
    }

    @Test("no function over a table's row type has a SQL-standard body (later ALTER TABLEs would fail)")
    func noStandardBodyOverARowType() async throws {
        let pool = try await TestDatabase.pool()
        defer { Task { await pool.close() } }
        try await Migrator.load(directory: Self.repositorySQL, logger: TestDatabase.logger).migrate(pool: pool)
        #expect(try await Self.standardBodiesOverRowTypes(pool) == [])
    }

    /// Functions of schema ledger with a SQL-standard body (RETURN, BEGIN ATOMIC) that take or return a row type of
    /// one of its tables.
    static func standardBodiesOverRowTypes(_ pool: PostgresPool) async throws -> [String] {
        let rows = try await pool.query(
            """
            SELECT p.oid::regprocedure::text AS name
            FROM pg_proc p
            JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname = 'ledger' AND p.prosqlbody IS NOT NULL
              AND EXISTS (
                SELECT 1 FROM pg_class c
                WHERE c.relnamespace = n.oid AND c.relkind IN ('r', 'p', 'v')
                  AND (c.reltype = ANY (p.proargtypes::oid[]) OR c.reltype = p.prorettype))
            ORDER BY 1
            """)
        return try rows.rows.map { try $0.decode(String.self, "name") }
    }
}
