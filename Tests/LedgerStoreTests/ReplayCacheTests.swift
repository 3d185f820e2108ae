import LedgerCore
import LedgerTestSupport
import PostgresClient
import Testing

@testable import LedgerStore

/// Replays answered from memory say exactly what the database would, and nothing is kept that could change.
@Suite("Replay cache")
struct ReplayCacheTests {
    func makeStore(cacheBytes: Int) async throws -> LedgerStore {
        let store = try await TestDatabase.migratedStore(poolSizeMax: 4, options: .init(batchMax: 1, replayCacheBytesMax: cacheBytes))
        try await store.prepare(client: "acme", accounts: ["alice"])
        return store
    }

    func credit(_ amount: Int) throws -> TransferRequest {
        try TransferRequest.decode(kind: .credit, body: Array(#"{"account":"alice","amount":\#(amount),"currency":"USD"}"#.utf8)).get()
    }

    func debit(_ amount: Int) throws -> TransferRequest {
        try TransferRequest.decode(kind: .debit, body: Array(#"{"account":"alice","amount":\#(amount),"currency":"USD"}"#.utf8)).get()
    }

    @Test("a completed 201 is replayed, and another request under its key is reused, without the database")
    func answersFromMemory() async throws {
        let store = try await makeStore(cacheBytes: 1 << 20)
        defer { Task { await store.pool.close() } }
        let key = IdempotencyKey(unchecked: "k")
        guard case .executed(201, let body) = try await store.post(client: "acme", key: key, request: try credit(5)) else {
            Issue.record("credit did not execute")
            return
        }
        // Were the database asked, it would now answer these other bytes: the cache is what answers.
        try await store.pool.query("UPDATE ledger.idempotency_keys SET response_body = '{}'")
        #expect(try await store.post(client: "acme", key: key, request: try credit(5)) == .replayed(status: 201, body: body))
        #expect(try await store.post(client: "acme", key: key, request: try credit(6)) == .reused)
        // Keys are per client: another client's same key is not this answer.
        try await store.prepare(client: "other", accounts: ["alice"])
        guard case .executed(201, _) = try await store.post(client: "other", key: key, request: try credit(5)) else {
            Issue.record("the other client's credit did not execute")
            return
        }
        #expect(try await store.verify().isEmpty)
    }

    @Test("stored failures are not kept: after a purge their key executes afresh, as the database decides")
    func failuresNotKept() async throws {
        let store = try await makeStore(cacheBytes: 1 << 20)
        defer { Task { await store.pool.close() } }
        let key = IdempotencyKey(unchecked: "d")
        guard case .executed(422, _) = try await store.post(client: "acme", key: key, request: try debit(5)) else {
            Issue.record("the debit did not fail")
            return
        }
        _ = try await store.post(client: "acme", key: IdempotencyKey(unchecked: "c"), request: try credit(10))
        try await store.pool.query("DELETE FROM ledger.idempotency_keys WHERE key = 'd'")
        guard case .executed(201, _) = try await store.post(client: "acme", key: key, request: try debit(5)) else {
            Issue.record("the purged failure did not execute afresh")
            return
        }
        #expect(try await store.verify().isEmpty)
    }

    @Test("the cache stays within its bytes: when full it starts over")
    func bounded() {
        let cache = ReplayCache(bytesMax: 2_000)
        for index in 0..<50 {
            cache.remember(client: "c", key: "k\(index)", fingerprint: "f", outcome: .executed(status: 201, body: String(repeating: "x", count: 100)))
        }
        #expect(cache.count <= 2_000 / (100 + ReplayCache.entryOverheadBytes), "at most 2,000 bytes of ~424-byte entries")
        #expect(cache.outcome(client: "c", key: "k49", fingerprint: "f") == .replayed(status: 201, body: String(repeating: "x", count: 100)))
        cache.remember(client: "c", key: "big", fingerprint: "f", outcome: .executed(status: 201, body: String(repeating: "x", count: 2_000)))
        #expect(cache.outcome(client: "c", key: "k49", fingerprint: "g") == .reused, "another request under a kept key")
        #expect(cache.outcome(client: "c", key: "big", fingerprint: "f") == nil, "an answer larger than the cache is not kept")
        cache.remember(client: "c", key: "failed", fingerprint: "f", outcome: .executed(status: 422, body: "{}"))
        #expect(cache.outcome(client: "c", key: "failed", fingerprint: "f") == nil)
    }
}
