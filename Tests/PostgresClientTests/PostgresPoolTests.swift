import Foundation
import LedgerTestSupport
import PostgresClient
import Testing

@Suite("PostgresPool against a real PostgreSQL")
struct PostgresPoolTests {
    @Test("64 concurrent tasks on a pool of 4 all complete, never more than 4 connections")
    func manyTasksFewConnections() async throws {
        let pool = try await TestDatabase.pool(poolSizeMax: 4)
        defer { Task { await pool.close() } }
        let results = try await withThrowingTaskGroup(of: Int64.self) { group in
            for index in 0..<64 {
                group.addTask {
                    try await pool.query("SELECT $1::int8 * 2 AS v, pg_sleep(0.01)", [.int64(Int64(index))])
                        .rows[0].decode(Int64.self, "v")
                }
            }
            var all: [Int64] = []
            for try await value in group { all.append(value) }
            return all
        }
        #expect(results.sorted() == (0..<64).map { Int64($0) * 2 })
        #expect(pool.stats.open <= 4)
        let backends = try await pool.query(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()"
        ).rows[0].decode(Int64.self, "n")
        #expect(backends <= 4)
    }

    @Test("with the pool exhausted, acquiring times out with a clear error")
    func acquireTimesOut() async throws {
        let pool = try await TestDatabase.pool(poolSizeMax: 1, acquireWaitMax: .milliseconds(200))
        defer { Task { await pool.close() } }
        let holder = Task { try await pool.query("SELECT pg_sleep(1.5)") }
        try await Task.sleep(for: .milliseconds(300))
        let started = ContinuousClock.now
        let error = await #expect(throws: PostgresError.self) { try await pool.query("SELECT 1") }
        let waited = ContinuousClock.now - started
        #expect(error?.code == .poolAcquireTimeout)
        #expect(error?.isConnectionError == true)
        #expect(waited >= .milliseconds(150) && waited < .seconds(1))
        _ = try await holder.value
        // Once free, the pool serves again.
        #expect(try await pool.query("SELECT 1 AS one").rows[0].decode(Int.self, "one") == 1)
    }

    @Test("a connection killed by pg_terminate_backend is replaced and the next query succeeds")
    func killedConnectionIsReplaced() async throws {
        let pool = try await TestDatabase.pool(poolSizeMax: 1)
        defer { Task { await pool.close() } }
        let victim = try await pool.withConnection { $0.backendPID }
        #expect(victim != 0)
        // A second server session kills the pooled one while it is idle.
        let killer = PostgresPool(
            configuration: PostgresConfiguration(conninfo: pool.configuration.conninfo, poolSizeMax: 1),
            logger: TestDatabase.logger)
        try await killer.query("SELECT pg_terminate_backend($1)", [.int32(victim)])
        await killer.close()
        try await Task.sleep(for: .milliseconds(100))
        let now = try await pool.withConnection { connection in
            (connection.backendPID, try await connection.query("SELECT 1 AS one").rows[0].decode(Int.self, "one"))
        }
        #expect(now.0 != victim)
        #expect(now.1 == 1)
        #expect(pool.stats.open == 1)
    }

    @Test("a connection that breaks mid-statement is discarded, never handed out again")
    func brokenMidStatementIsDiscarded() async throws {
        let pool = try await TestDatabase.pool(poolSizeMax: 1)
        defer { Task { await pool.close() } }
        let error = await #expect(throws: PostgresError.self) {
            try await pool.query("SELECT pg_terminate_backend(pg_backend_pid())")
        }
        #expect(error?.isConnectionError == true)
        #expect(try await pool.query("SELECT 1 AS one").rows[0].decode(Int.self, "one") == 1)
    }

    @Test("while 4 slow queries hold the pool, other Swift tasks still run")
    func blockingCallsDoNotStarveTheCooperativePool() async throws {
        let pool = try await TestDatabase.pool(poolSizeMax: 4)
        defer { Task { await pool.close() } }
        let started = ContinuousClock.now
        let slow = Task {
            try await withThrowingTaskGroup(of: Void.self) { group in
                for _ in 0..<4 { group.addTask { try await pool.query("SELECT pg_sleep(1)") } }
                try await group.waitForAll()
            }
        }
        try await Task.sleep(for: .milliseconds(200))
        // Plenty of small tasks on the cooperative pool (2 threads here): they finish long before the slow queries.
        let ticks = await withTaskGroup(of: Int.self) { group in
            for index in 0..<100 { group.addTask { await Task.yield(); return index } }
            var count = 0
            for await _ in group { count += 1 }
            return count
        }
        let elapsed = ContinuousClock.now - started
        #expect(ticks == 100)
        #expect(elapsed < .milliseconds(800), "other tasks waited for libpq calls: \(elapsed)")
        try await slow.value
        // And the 4 slow queries ran in parallel, each on its own thread.
        #expect(ContinuousClock.now - started < .milliseconds(1900))
    }

    @Test("a closed pool refuses new work")
    func closedPoolRefuses() async throws {
        let pool = try await TestDatabase.pool(poolSizeMax: 2)
        try await pool.query("SELECT 1")
        await pool.close()
        let error = await #expect(throws: PostgresError.self) { try await pool.query("SELECT 1") }
        #expect(error?.code == .poolClosed)
    }

    @Test("connecting to a server that is not there fails fast with connectionFailed")
    func unreachableServerFailsFast() async throws {
        let pool = PostgresPool(
            configuration: PostgresConfiguration(conninfo: "host=127.0.0.1 port=1 dbname=x", poolSizeMax: 1),
            logger: TestDatabase.logger)
        defer { Task { await pool.close() } }
        let started = ContinuousClock.now
        let error = await #expect(throws: PostgresError.self) { try await pool.query("SELECT 1") }
        #expect(error?.code == .connectionFailed)
        #expect(ContinuousClock.now - started < .seconds(3))
        // The slot was given back: a second try fails the same way instead of waiting for a slot.
        let again = await #expect(throws: PostgresError.self) { try await pool.query("SELECT 1") }
        #expect(again?.code == .connectionFailed)
    }
}
