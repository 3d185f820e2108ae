import Foundation
import LedgerCore
import LedgerStore
import LedgerTestSupport
import PostgresClient
import Testing

/// The ledger rules in SQL, called the way the service calls them, on a migrated database.
@Suite("LedgerStore against a real PostgreSQL")
struct LedgerStoreTests {
    func makeStore(poolSizeMax: Int = 8) async throws -> LedgerStore {
        try await TestDatabase.migratedStore(poolSizeMax: poolSizeMax)
    }

    func request(_ kind: TransferRequest.Kind, _ body: String) throws -> TransferRequest {
        try TransferRequest.decode(kind: kind, body: Array(body.utf8)).get()
    }

    @Test("concurrent executions of one key move money once and all answer the same bytes")
    func oneKeyManyCalls() async throws {
        let store = try await makeStore()
        defer { Task { await store.pool.close() } }
        try await store.prepare(client: "acme", accounts: ["alice"])
        let credit = try request(.credit, #"{"account":"alice","amount":700,"currency":"USD"}"#)
        let key = IdempotencyKey(unchecked: "storm")
        let outcomes = try await concurrently(24) { _ in try await store.post(client: "acme", key: key, request: credit) }
        var bodies = Set<String>()
        var executed = 0
        for outcome in outcomes {
            switch outcome {
            case .executed(let status, let body):
                executed += 1
                #expect(status == 201)
                bodies.insert(body)
            case .replayed(let status, let body):
                #expect(status == 201)
                bodies.insert(body)
            default:
                Issue.record("unexpected outcome \(outcome)")
            }
        }
        #expect(executed == 1)
        #expect(bodies.count == 1)
        let account = try #require(try await store.account(client: "acme", id: "alice"))
        #expect(account.contains(#""balance":700"#))
        #expect(try await store.verify().isEmpty)
    }

    @Test("a purged stored response never lets its key make a second transfer")
    func purgedKeyReplaysTransfer() async throws {
        let store = try await makeStore()
        defer { Task { await store.pool.close() } }
        try await store.prepare(client: "acme", accounts: ["alice"])
        let credit = try request(.credit, #"{"account":"alice","amount":5,"currency":"USD"}"#)
        let key = IdempotencyKey(unchecked: "k")
        guard case .executed(201, let first) = try await store.post(client: "acme", key: key, request: credit) else {
            Issue.record("credit did not execute")
            return
        }
        try await store.pool.query("DELETE FROM ledger.idempotency_keys")
        #expect(try await store.post(client: "acme", key: key, request: credit) == .replayed(status: 201, body: first))
        let other = try request(.credit, #"{"account":"alice","amount":6,"currency":"USD"}"#)
        #expect(try await store.post(client: "acme", key: key, request: other) == .reused)
        let count = try await store.pool.query("SELECT count(*) AS n FROM ledger.transfers").rows[0].decode(Int64.self, "n")
        #expect(count == 1)
    }

    @Test("verify names a corrupted balance")
    func verifyFindsCorruption() async throws {
        let store = try await makeStore()
        defer { Task { await store.pool.close() } }
        try await store.prepare(client: "acme", accounts: ["alice"])
        _ = try await store.post(
            client: "acme", key: IdempotencyKey(unchecked: "k"),
            request: try request(.credit, #"{"account":"alice","amount":5,"currency":"USD"}"#))
        #expect(try await store.verify().isEmpty)
        try await store.pool.query("UPDATE ledger.accounts SET balance = balance + 1 WHERE id = 'alice'")
        let breaches = try await store.verify()
        #expect(Set(breaches.map(\.invariant)) == ["balances-sum-to-zero", "balance-equals-entries"])
    }

    @Test("token lookup goes by SHA-256 and tokens are not stored")
    func tokens() async throws {
        let store = try await makeStore()
        defer { Task { await store.pool.close() } }
        let token = try await store.createToken(client: "acme")
        let second = try await store.createToken(client: "acme")
        #expect(token != second)
        #expect(try await store.client(forToken: token) == "acme")
        #expect(try await store.client(forToken: second) == "acme")
        #expect(try await store.client(forToken: token + "x") == nil)
        let stored = try await store.pool.query("SELECT encode(token_sha256, 'hex') AS h FROM ledger.api_tokens")
        for row in stored.rows { #expect(!token.contains(try row.decode(String.self, "h"))) }
    }

    @Test("the purge deletes only expired stored responses, in batches; a purged transfer key still replays")
    func purgeRetention() async throws {
        let store = try await makeStore()
        defer { Task { await store.pool.close() } }
        try await store.prepare(client: "acme", accounts: ["alice"])
        var bodies: [String: String] = [:]
        for index in 0..<5 {
            let credit = try request(.credit, #"{"account":"alice","amount":1,"currency":"USD"}"#)
            guard case .executed(201, let body) = try await store.post(client: "acme", key: IdempotencyKey(unchecked: "old-\(index)"), request: credit) else {
                Issue.record("credit \(index) did not execute")
                return
            }
            bodies["old-\(index)"] = body
        }
        let debit = try request(.debit, #"{"account":"alice","amount":100,"currency":"USD"}"#)
        #expect(try await store.post(client: "acme", key: IdempotencyKey(unchecked: "old-failure"), request: debit).status == 422)
        _ = try await store.post(client: "acme", key: IdempotencyKey(unchecked: "fresh"), request: try request(.credit, #"{"account":"alice","amount":1,"currency":"USD"}"#))
        try await store.pool.query("UPDATE ledger.idempotency_keys SET created_at = now() - interval '2 days' WHERE key LIKE 'old-%'")

        let deleted = try await store.purgeStoredResponses(retention: .seconds(86_400), batchSize: 2, batchesMax: 100)
        #expect(deleted == 6)
        let left = try await store.pool.query("SELECT key FROM ledger.idempotency_keys").rows.map { try $0.decode(String.self, "key") }
        #expect(left == ["fresh"])

        // A late retry of a purged key that made a transfer gets that transfer back, byte for byte, and no second one.
        let credit = try request(.credit, #"{"account":"alice","amount":1,"currency":"USD"}"#)
        #expect(try await store.post(client: "acme", key: IdempotencyKey(unchecked: "old-3"), request: credit) == .replayed(status: 201, body: bodies["old-3"]!))
        // A purged stored failure executes afresh: alice now has 6, so the debit of 100 fails again, and is stored again.
        #expect(try await store.post(client: "acme", key: IdempotencyKey(unchecked: "old-failure"), request: debit).status == 422)
        let transfers = try await store.pool.query("SELECT count(*) AS n FROM ledger.transfers").rows[0].decode(Int64.self, "n")
        #expect(transfers == 6)
        #expect(try await store.verify().isEmpty)
    }
}

extension LedgerStore.PostOutcome {
    var status: Int? {
        switch self {
        case .executed(let status, _), .replayed(let status, _): return status
        case .reused: return 422
        case .inProgress: return 409
        }
    }
}
