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
        return LedgerStore(pool: pool, options: .init(conflictRetriesMax: retries, batchMax: 1), logger: TestDatabase.logger)
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

/// The store's callers see three codes, never a `PostgresError`; the SQLSTATE stays for logs.
@Suite("Store errors")
struct LedgerStoreErrorTests {
    @Test(
        "client errors map to unavailable, conflictExhausted or internal",
        arguments: [
            (PostgresError(code: .connectionFailed, message: "refused"), LedgerStoreError.Code.unavailable),
            (PostgresError(code: .commitOutcomeUnknown, message: "gone"), .unavailable),
            (PostgresError(code: .poolAcquireTimeout, message: "busy"), .unavailable),
            (PostgresError(code: .server, sqlState: "57014", message: "timeout"), .unavailable),
            (PostgresError(code: .server, sqlState: "55P03", message: "lock"), .unavailable),
            (PostgresError(code: .server, sqlState: "53300", message: "too many"), .unavailable),
            (PostgresError(code: .server, sqlState: "57P01", message: "shutdown"), .unavailable),
            (PostgresError(code: .server, sqlState: "40001", message: "could not serialize"), .conflictExhausted),
            (PostgresError(code: .server, sqlState: "40P01", message: "deadlock"), .conflictExhausted),
            (PostgresError(code: .server, sqlState: "23505", message: "duplicate"), .internal),
            (PostgresError(code: .decoding, message: "bad column"), .internal),
        ] as [(PostgresError, LedgerStoreError.Code)])
    func mapping(error: PostgresError, code: LedgerStoreError.Code) {
        let mapped = LedgerStoreError(error, retryAfterSeconds: 7)
        #expect(mapped.code == code)
        #expect(mapped.retryAfterSeconds == (code == .internal ? nil : 7))
        #expect(mapped.sqlState == error.sqlState)
        #expect(mapped.databaseKind == "\(error.code)")
        #expect(!mapped.description.contains(error.message), "the message may quote data: debugDescription only")
        #expect(mapped.debugDescription.contains(error.message))
    }

    @Test("a store whose database is unreachable throws unavailable with its retry hint")
    func unreachable() async {
        let pool = PostgresPool(
            configuration: PostgresConfiguration(conninfo: "host=127.0.0.1 port=1 dbname=none connect_timeout=2"),
            logger: TestDatabase.logger)
        let store = LedgerStore(pool: pool, options: .init(retryAfterSeconds: 3), logger: TestDatabase.logger)
        let error = await #expect(throws: LedgerStoreError.self) { try await store.ping() }
        #expect(error?.code == .unavailable)
        #expect(error?.retryAfterSeconds == 3)
        await store.close()
    }
}
