import Foundation
import LedgerTestSupport
import PostgresClient
import Testing

@Suite("PostgresConnection against a real PostgreSQL")
struct PostgresConnectionTests {
    @Test("every bound type round-trips unchanged")
    func roundTripBinds() async throws {
        let pool = try await TestDatabase.pool()
        defer { Task { await pool.close() } }
        let megabyte = String(repeating: "x", count: 1 << 20)
        let bytes = Data([0, 1, 2, 0, 255, 0])
        let row = try await pool.query(
            "SELECT $1::int8 AS min, $2::int8 AS max, $3::text AS empty, $4::text AS big, $5::text AS unicode, "
                + "$6::bytea AS bytes, $7::bool AS yes, $8::int4 AS small, $9::text AS missing, $10::jsonb AS doc",
            [
                .int64(.min), .int64(.max), .string(""), .string(megabyte), .string("Grüße, 世界 🚀"),
                .bytea(bytes), .bool(true), .int32(-7), .null, .json("{\"b\": [1, 2], \"a\": null}"),
            ]
        ).rows[0]
        #expect(try row.decode(Int64.self, "min") == .min)
        #expect(try row.decode(Int64.self, "max") == .max)
        #expect(try row.decode(String.self, "empty") == "")
        #expect(try row.decode(String.self, "big") == megabyte)
        #expect(try row.decode(String.self, "unicode") == "Grüße, 世界 🚀")
        #expect(try row.decode(Data.self, "bytes") == bytes)
        #expect(try row.decode(Bool.self, "yes") == true)
        #expect(try row.decode(Int32.self, "small") == -7)
        #expect(try row.decodeIfPresent(String.self, "missing") == nil)
        #expect(try row.decode(String.self, "doc") == "{\"a\": null, \"b\": [1, 2]}")
    }

    @Test("a lone statement runs under the configured bounds and UTC, set for its own transaction only")
    func loneStatementIsBoundedLocally() async throws {
        let pool = try await TestDatabase.pool(poolSizeMax: 1, statementTimeoutMilliseconds: 300)
        defer { Task { await pool.close() } }
        // setting: what the statement runs under; reset_val: the session's own value, which stays the server's.
        let row = try await pool.query(
            "SELECT current_setting('statement_timeout') AS bound, current_setting('TimeZone') AS zone, "
                + "(SELECT reset_val FROM pg_settings WHERE name = 'statement_timeout') AS session"
        ).rows[0]
        #expect(try row.decode(String.self, "bound") == "300ms")
        #expect(try row.decode(String.self, "zone") == "UTC")
        #expect(try row.decode(String.self, "session") == "0")
        let started = ContinuousClock.now
        let error = await #expect(throws: PostgresError.self) { try await pool.query("SELECT pg_sleep(5)") }
        #expect(error?.sqlState == "57014")
        #expect(ContinuousClock.now - started < .seconds(3))
        // A failed statement leaves the connection usable, outside any transaction.
        #expect(try await pool.query("SELECT 1 AS one").rows[0].decode(Int.self, "one") == 1)
    }

    @Test("a transaction runs under the configured bounds, set with its BEGIN for it only")
    func transactionIsBoundedLocally() async throws {
        let pool = try await TestDatabase.pool(poolSizeMax: 1, statementTimeoutMilliseconds: 300)
        defer { Task { await pool.close() } }
        let bounds = try await pool.withTransaction { connection in
            let row = try await connection.query(
                "SELECT current_setting('statement_timeout') AS bound, "
                    + "current_setting('idle_in_transaction_session_timeout') AS idle").rows[0]
            return (try row.decode(String.self, "bound"), try row.decode(String.self, "idle"))
        }
        #expect(bounds.0 == "300ms")
        #expect(bounds.1 == "1min")
        let error = await #expect(throws: PostgresError.self) {
            try await pool.withTransaction { connection in try await connection.query("SELECT pg_sleep(5)") }
        }
        #expect(error?.sqlState == "57014")
    }

    @Test("an injection string stays data")
    func injectionStaysData() async throws {
        let pool = try await TestDatabase.pool()
        defer { Task { await pool.close() } }
        try await pool.query("CREATE TABLE t (v text)")
        let evil = "'); DROP TABLE t; --"
        try await pool.query("INSERT INTO t (v) VALUES ($1)", [.string(evil)])
        let rows = try await pool.query("SELECT v FROM t")
        #expect(rows.rows.count == 1)
        #expect(try rows.rows[0].decode(String.self, "v") == evil)
    }

    @Test("decoding a NULL, a wrong type or an unknown column fails clearly")
    func decodingErrors() async throws {
        let pool = try await TestDatabase.pool()
        defer { Task { await pool.close() } }
        let row = try await pool.query("SELECT NULL::int8 AS n, 'abc'::text AS s, 5::int8 AS i").rows[0]
        #expect { try row.decode(Int64.self, "n") } throws: { ($0 as? PostgresError)?.code == .decoding }
        #expect { try row.decode(Int64.self, "s") } throws: { ($0 as? PostgresError)?.code == .decoding }
        #expect { try row.decode(Bool.self, "i") } throws: { ($0 as? PostgresError)?.code == .decoding }
        #expect { try row.decode(Int64.self, "nope") } throws: { ($0 as? PostgresError)?.code == .decoding }
    }

    @Test("a syntax error surfaces SQLSTATE 42601 and a duplicate key is a unique violation")
    func serverErrors() async throws {
        let pool = try await TestDatabase.pool()
        defer { Task { await pool.close() } }
        let syntax = await #expect(throws: PostgresError.self) { try await pool.query("SELEC 1") }
        #expect(syntax?.sqlState == "42601")
        #expect(syntax?.code == .server)

        try await pool.query("CREATE TABLE u (id int PRIMARY KEY)")
        try await pool.query("INSERT INTO u VALUES (1)")
        let duplicate = await #expect(throws: PostgresError.self) { try await pool.query("INSERT INTO u VALUES (1)") }
        #expect(duplicate?.isUniqueViolation == true)
        #expect(duplicate?.constraint == "u_pkey")
    }

    @Test("description never prints bound values; debugDescription has the server's message")
    func errorDescriptionIsSafe() async throws {
        let pool = try await TestDatabase.pool()
        defer { Task { await pool.close() } }
        let secret = "s3cr3t-value"
        let error = await #expect(throws: PostgresError.self) {
            try await pool.query("SELECT $1::int8", [.string(secret)])
        }
        #expect(error?.sqlState == "22P02")
        #expect(error.map { "\($0)" }?.contains(secret) == false)
        #expect(error?.debugDescription.contains("invalid input syntax") == true)
    }

    @Test("withTransaction rolls back when the body throws")
    func transactionRollsBack() async throws {
        let pool = try await TestDatabase.pool()
        defer { Task { await pool.close() } }
        try await pool.query("CREATE TABLE r (v int)")
        struct Boom: Error {}
        await #expect(throws: Boom.self) {
            try await pool.withTransaction { connection in
                try await connection.query("INSERT INTO r VALUES (1)")
                throw Boom()
            }
        }
        let count = try await pool.query("SELECT count(*) AS n FROM r").rows[0].decode(Int64.self, "n")
        #expect(count == 0)
    }

    @Test("a COMMIT that fails (deferred constraint) throws and commits nothing")
    func failedCommitThrows() async throws {
        let pool = try await TestDatabase.pool()
        defer { Task { await pool.close() } }
        try await pool.query(
            "CREATE TABLE d (id int, CONSTRAINT d_unique UNIQUE (id) DEFERRABLE INITIALLY DEFERRED)")
        let error = await #expect(throws: PostgresError.self) {
            try await pool.withTransaction { connection in
                try await connection.query("INSERT INTO d VALUES (1)")
                try await connection.query("INSERT INTO d VALUES (1)")
            }
        }
        #expect(error?.isUniqueViolation == true)
        let count = try await pool.query("SELECT count(*) AS n FROM d").rows[0].decode(Int64.self, "n")
        #expect(count == 0)
    }

    @Test("a COMMIT that answers ROLLBACK after a swallowed failure is an error, not a success")
    func commitAfterFailedStatementThrows() async throws {
        let pool = try await TestDatabase.pool()
        defer { Task { await pool.close() } }
        try await pool.query("CREATE TABLE s (v int)")
        let error = await #expect(throws: PostgresError.self) {
            try await pool.withTransaction { connection in
                try await connection.query("INSERT INTO s VALUES (1)")
                _ = try? await connection.query("SELECT 1/0")
            }
        }
        #expect(error?.code == .transactionRolledBack)
        let count = try await pool.query("SELECT count(*) AS n FROM s").rows[0].decode(Int64.self, "n")
        #expect(count == 0)
    }

    @Test("cancelling the task cancels its statement on the server, and closing the pool cancels leased ones")
    func cancellationReachesTheServer() async throws {
        let pool = try await TestDatabase.pool(statementTimeoutMilliseconds: 60_000)
        defer { Task { await pool.close() } }
        let started = ContinuousClock.now
        let sleeper = Task { try await pool.query("SELECT pg_sleep(30)") }
        try await Task.sleep(for: .milliseconds(300))
        sleeper.cancel()
        let error = await #expect(throws: PostgresError.self) { try await sleeper.value }
        #expect(error?.isQueryCanceled == true, "the server cancelled it (57014): \(String(describing: error))")
        #expect(ContinuousClock.now - started < .seconds(5), "the statement ran on after its task was cancelled")

        let closing = Task { try await pool.query("SELECT pg_sleep(30)") }
        try await Task.sleep(for: .milliseconds(300))
        let closedAt = ContinuousClock.now
        await pool.close()
        await #expect(throws: PostgresError.self) { try await closing.value }
        #expect(ContinuousClock.now - closedAt < .seconds(5), "closing the pool waited for a leased statement")
    }
}
