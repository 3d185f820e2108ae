import Foundation
import LedgerCore
import LedgerStore
import LedgerTestSupport
import PostgresClient
import Testing

/// `ledger.post_batch` (POST /v1/transfers/batch) against a real PostgreSQL: all or nothing, item by item, replays,
/// purged answers, and concurrent executions of one key.
@Suite("Batches against a real PostgreSQL")
struct BatchTests {
    let client = "acme"

    func makeStore() async throws -> LedgerStore {
        let store = try await TestDatabase.migratedStore(poolSizeMax: 8)
        _ = try await store.createToken(client: client)
        return store
    }

    /// `count` accounts `a0...`, each funded with `balance` from an account allowed to go negative.
    func fund(_ store: LedgerStore, count: Int, balance: Int64) async throws {
        _ = try await store.putAccount(client: client, id: "bank", request: AccountRequest(currency: "USD", allowNegative: true))
        for index in 0..<count {
            _ = try await store.putAccount(client: client, id: "a\(index)", request: AccountRequest(currency: "USD", allowNegative: false))
        }
        let items = (0..<count).map { #"{"from":"bank","to":"a\#($0)","amount":\#(balance),"currency":"USD"}"# }
        guard case .executed(201, _) = try await store.postBatch(client: client, key: IdempotencyKey(unchecked: "fund"), batch: try batch(items, atomic: true)) else {
            throw Failure("funding did not execute")
        }
    }

    func batch(_ items: [String], atomic: Bool) throws -> BatchRequest {
        try BatchRequest.decode(body: Array(#"{"atomic":\#(atomic),"transfers":[\#(items.joined(separator: ","))]}"#.utf8)).get()
    }

    func scalar(_ store: LedgerStore, _ sql: String) async throws -> Int64 {
        try await store.pool.query(sql).rows[0].decode(Int64.self, "n")
    }

    struct Failure: Error, CustomStringConvertible {
        let description: String
        init(_ description: String) { self.description = description }
    }

    /// 1,000 transfers a(i) -> a(i+1 mod 500) of 10 each, all affordable, except item 500 (index 499), which asks a499
    /// for more than it will ever hold.
    func itemFiveHundredFails() throws -> [String] {
        (0..<1_000).map { index in
            let amount = index == 499 ? 1_000_000 : 10
            return #"{"from":"a\#(index % 500)","to":"a\#((index + 1) % 500)","amount":\#(amount),"currency":"USD","metadata":{"n":\#(index)}}"#
        }
    }

    @Test("atomic: item 500 failing writes nothing and the batch answers its problem, stored for replay")
    func atomicFailureWritesNothing() async throws {
        let store = try await makeStore()
        defer { Task { await store.pool.close() } }
        try await fund(store, count: 500, balance: 100)
        let transfersBefore = try await scalar(store, "SELECT count(*) AS n FROM ledger.transfers")
        let batch = try batch(try itemFiveHundredFails(), atomic: true)
        let outcome = try await store.postBatch(client: client, key: IdempotencyKey(unchecked: "b"), batch: batch)
        guard case .executed(422, let body) = outcome else {
            Issue.record("unexpected outcome \(outcome)")
            return
        }
        #expect(body.contains(#""code":"insufficient-funds""#))
        #expect(body.contains(#""detail":"transfers[499]: Account a499 has insufficient funds.""#))
        #expect(try await scalar(store, "SELECT count(*) AS n FROM ledger.transfers") == transfersBefore)
        #expect(try await scalar(store, "SELECT sum(version)::bigint AS n FROM ledger.accounts WHERE id LIKE 'a%'") == 500)
        #expect(try await scalar(store, "SELECT sum(balance)::bigint AS n FROM ledger.accounts WHERE id LIKE 'a%'") == 50_000)
        // The failure is stored: the same batch replays it even once it could succeed.
        try await store.pool.query("UPDATE ledger.accounts SET allow_negative = true WHERE id = 'a499'")
        #expect(try await store.postBatch(client: client, key: IdempotencyKey(unchecked: "b"), batch: batch) == .replayed(status: 422, body: body))
        try await store.pool.query("UPDATE ledger.accounts SET allow_negative = false WHERE id = 'a499'")
        #expect(try await store.verify().isEmpty)
    }

    @Test("not atomic: item 500 failing is its own result and the other 999 are written")
    func nonAtomicWritesTheOthers() async throws {
        let store = try await makeStore()
        defer { Task { await store.pool.close() } }
        try await fund(store, count: 500, balance: 100)
        let transfersBefore = try await scalar(store, "SELECT count(*) AS n FROM ledger.transfers")
        let batch = try batch(try itemFiveHundredFails(), atomic: false)
        let outcome = try await store.postBatch(client: client, key: IdempotencyKey(unchecked: "b"), batch: batch)
        guard case .executed(201, let body) = outcome else {
            Issue.record("unexpected outcome \(outcome)")
            return
        }
        guard case .object = try JSONParser.parse(Array(body.utf8)), case .array(let results)? = try JSONParser.parse(Array(body.utf8))["results"] else {
            Issue.record("no results array")
            return
        }
        #expect(results.count == 1_000)
        for (index, result) in results.enumerated() {
            let status = result["status"]
            if index == 499 {
                #expect(status == .number("422"))
                #expect(result["problem"]?["code"] == .string("insufficient-funds"))
                #expect(result["transfer"] == nil)
            } else {
                #expect(status == .number("201"), "item \(index)")
                #expect(result["transfer"]?["amount"] == .number("10"), "item \(index)")
            }
        }
        #expect(try await scalar(store, "SELECT count(*) AS n FROM ledger.transfers") == transfersBefore + 999)
        // Each of a0...a499 sent 10 twice and received 10 twice, except: a499 sent once (its second send failed)
        // and a0 received once from it.
        #expect(try await scalar(store, "SELECT balance AS n FROM ledger.accounts WHERE id = 'a499'") == 110)
        #expect(try await scalar(store, "SELECT balance AS n FROM ledger.accounts WHERE id = 'a0'") == 90)
        #expect(try await scalar(store, "SELECT sum(version)::bigint AS n FROM ledger.accounts WHERE id LIKE 'a%'") == 500 + 2 * 999)
        #expect(try await store.postBatch(client: client, key: IdempotencyKey(unchecked: "b"), batch: batch) == .replayed(status: 201, body: body))
        #expect(try await store.verify().isEmpty)
    }

    @Test("a purged batch answer never makes its transfers twice; another request under its key is reused")
    func purgedBatch() async throws {
        let store = try await makeStore()
        defer { Task { await store.pool.close() } }
        try await fund(store, count: 3, balance: 100)
        let batch = try batch(
            [#"{"from":"a0","to":"a1","amount":5,"currency":"USD"}"#, #"{"from":"a1","to":"a2","amount":7,"currency":"USD"}"#],
            atomic: true)
        let key = IdempotencyKey(unchecked: "b")
        guard case .executed(201, let body) = try await store.postBatch(client: client, key: key, batch: batch) else {
            Issue.record("batch did not execute")
            return
        }
        try await store.pool.query("DELETE FROM ledger.idempotency_keys")
        #expect(try await store.postBatch(client: client, key: key, batch: batch) == .replayed(status: 201, body: body))
        #expect(try await store.post(client: client, key: key, request: try TransferRequest.decode(kind: .transfer, body: Array(#"{"from":"a0","to":"a1","amount":5,"currency":"USD"}"#.utf8)).get()) == .reused)
        let other = try self.batch([#"{"from":"a0","to":"a1","amount":6,"currency":"USD"}"#], atomic: true)
        #expect(try await store.postBatch(client: client, key: key, batch: other) == .reused)
        #expect(try await scalar(store, "SELECT count(*) AS n FROM ledger.transfers WHERE idempotency_key = 'b'") == 2)
        #expect(try await store.verify().isEmpty)
    }

    @Test("concurrent executions of one batch key move money once and answer the same bytes")
    func oneKeyManyCalls() async throws {
        let store = try await makeStore()
        defer { Task { await store.pool.close() } }
        try await fund(store, count: 10, balance: 100)
        let batch = try batch((0..<10).map { #"{"from":"a\#($0)","to":"a\#(($0 + 1) % 10)","amount":3,"currency":"USD"}"# }, atomic: true)
        let outcomes = try await concurrently(16) { _ in
            try await store.postBatch(client: client, key: IdempotencyKey(unchecked: "storm"), batch: batch)
        }
        var bodies = Set<String>()
        var executed = 0
        for outcome in outcomes {
            switch outcome {
            case .executed(201, let body): executed += 1; bodies.insert(body)
            case .replayed(201, let body): bodies.insert(body)
            default: Issue.record("unexpected outcome \(outcome)")
            }
        }
        #expect(executed == 1)
        #expect(bodies.count == 1)
        #expect(try await scalar(store, "SELECT count(*) AS n FROM ledger.transfers WHERE idempotency_key = 'storm'") == 10)
        #expect(try await store.verify().isEmpty)
    }

    @Test("batches crossing the same accounts in opposite orders, with single transfers among them, never deadlock")
    func crossingBatches() async throws {
        let store = try await makeStore()
        defer { Task { await store.pool.close() } }
        try await fund(store, count: 20, balance: 1_000)
        let forward = (0..<20).map { #"{"from":"a\#($0)","to":"a\#(($0 + 1) % 20)","amount":1,"currency":"USD"}"# }
        let backward = (0..<20).reversed().map { #"{"from":"a\#(($0 + 1) % 20)","to":"a\#($0)","amount":1,"currency":"USD"}"# }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for round in 0..<12 {
                let items = round % 2 == 0 ? forward : backward
                group.addTask {
                    let outcome = try await store.postBatch(client: client, key: IdempotencyKey(unchecked: "x\(round)"), batch: try batch(items, atomic: true))
                    guard case .executed(201, _) = outcome else { throw Failure("batch \(round): \(outcome)") }
                }
                group.addTask {
                    let single = try TransferRequest.decode(kind: .transfer, body: Array(#"{"from":"a\#(round)","to":"a\#(19 - round)","amount":1,"currency":"USD"}"#.utf8)).get()
                    let outcome = try await store.post(client: client, key: IdempotencyKey(unchecked: "s\(round)"), request: single)
                    guard case .executed(201, _) = outcome else { throw Failure("single \(round): \(outcome)") }
                }
            }
            try await group.waitForAll()
        }
        #expect(try await scalar(store, "SELECT sum(balance)::bigint AS n FROM ledger.accounts WHERE id LIKE 'a%'") == 20_000)
        #expect(try await scalar(store, "SELECT count(*) AS n FROM ledger.transfers") == 20 + 12 * 20 + 12)
        #expect(try await store.verify().isEmpty)
    }
}
