import LedgerTestSupport
import PostgresClient
import Synchronization
import Testing

@testable import LedgerStore

/// Serialization failures and deadlocks are retried inside the service, a bounded number of times; nothing else is.
@Suite("Conflict retries")
struct ConflictRetryTests {
    func store(retries: Int) -> LedgerStore {
        // The pool is never used here: no connection is opened.
        let pool = PostgresPool(configuration: PostgresConfiguration(conninfo: "dbname=unused"), logger: TestDatabase.logger)
        return LedgerStore(pool: pool, options: .init(conflictRetriesMax: retries), logger: TestDatabase.logger)
    }

    @Test("40001 and 40P01 are retried until the body succeeds", arguments: ["40001", "40P01"])
    func retried(sqlState: String) async throws {
        let attempts = Atomic<Int>(0)
        let value = try await store(retries: 3).retryingConflicts { () async throws -> Int in
            if attempts.add(1, ordering: .relaxed).newValue < 3 {
                throw PostgresError(code: .server, sqlState: sqlState, message: "conflict")
            }
            return 42
        }
        #expect(value == 42)
        #expect(attempts.load(ordering: .relaxed) == 3)
    }

    @Test("the retries are bounded: after conflictRetriesMax the conflict is thrown")
    func bounded() async {
        let attempts = Atomic<Int>(0)
        let error = await #expect(throws: PostgresError.self) {
            try await store(retries: 2).retryingConflicts { () async throws -> Int in
                attempts.add(1, ordering: .relaxed)
                throw PostgresError(code: .server, sqlState: "40001", message: "conflict")
            }
        }
        #expect(error?.sqlState == "40001")
        #expect(attempts.load(ordering: .relaxed) == 3)
    }

    @Test("other errors are not retried: a unique violation or a lost connection is thrown at once")
    func notRetried() async {
        for failure in [
            PostgresError(code: .server, sqlState: "23505", message: "duplicate"),
            PostgresError(code: .connectionLost, message: "gone"),
        ] {
            let attempts = Atomic<Int>(0)
            await #expect(throws: PostgresError.self) {
                try await store(retries: 3).retryingConflicts { () async throws -> Int in
                    attempts.add(1, ordering: .relaxed)
                    throw failure
                }
            }
            #expect(attempts.load(ordering: .relaxed) == 1)
        }
    }
}
