import Foundation
import LedgerCore
import LedgerStore
import LedgerTestSupport
import PostgresClient
import Testing

/// Group commit: many concurrent requests through a batching store, against a real PostgreSQL.
@Suite("Batched execution (group commit)")
struct TransferBatcherTests {
    func makeStore() async throws -> LedgerStore {
        try await TestDatabase.migratedStore(poolSizeMax: 4, options: .init(batchMax: 16))
    }

    func request(_ kind: TransferRequest.Kind, _ body: String) throws -> TransferRequest {
        try TransferRequest.decode(kind: kind, body: Array(body.utf8)).get()
    }

    @Test("200 concurrent requests: each key executes once, failures stay their own, the ledger balances")
    func storm() async throws {
        let store = try await makeStore()
        defer { Task { await store.pool.close() } }
        try await store.prepare(client: "acme", accounts: ["a", "b", "c"])
        _ = try await store.post(
            client: "acme", key: IdempotencyKey(unchecked: "fund"),
            request: try request(.credit, #"{"account":"a","amount":1000,"currency":"USD"}"#))
        // 100 distinct transfers of 20 from a (only 50 can succeed), each key sent twice at once.
        let outcomes = try await withThrowingTaskGroup(of: (String, LedgerStore.PostOutcome).self) { group in
            for index in 0..<200 {
                let key = "d-\(index % 100)"
                // Both sends of one key are the same request: the destination follows the key.
                let destination = (index % 100) % 2 == 0 ? "b" : "c"
                group.addTask {
                    let transfer = try request(.transfer, #"{"from":"a","to":"\#(destination)","amount":20,"currency":"USD"}"#)
                    return (key, try await store.post(client: "acme", key: IdempotencyKey(unchecked: key), request: transfer))
                }
            }
            var all: [(String, LedgerStore.PostOutcome)] = []
            for try await outcome in group { all.append(outcome) }
            return all
        }
        var byKey: [String: [LedgerStore.PostOutcome]] = [:]
        for (key, outcome) in outcomes { byKey[key, default: []].append(outcome) }
        var created = 0
        for (key, pair) in byKey {
            #expect(pair.count == 2)
            let bodies = Set(pair.compactMap { outcome -> String? in
                switch outcome {
                case .executed(_, let body), .replayed(_, let body): return body
                default: return nil
                }
            })
            #expect(bodies.count == 1, "key \(key) answered differently: \(pair)")
            let executed = pair.filter { if case .executed = $0 { return true } else { return false } }
            #expect(executed.count == 1, "key \(key) executed \(executed.count) times")
            if case .executed(201, _) = executed.first { created += 1 }
        }
        #expect(created == 50)
        let balance = try await store.pool.query("SELECT balance FROM ledger.accounts WHERE id = 'a'").rows[0]
            .decode(Int64.self, "balance")
        #expect(balance == 0)
        // Requests did share transactions: transfers of one transaction share its timestamp.
        let shared = try await store.pool.query(
            "SELECT count(*) - count(DISTINCT created_at) AS shared FROM ledger.transfers"
        ).rows[0].decode(Int64.self, "shared")
        #expect(shared > 0, "no two transfers were committed together")
        #expect(try await store.verify().isEmpty)
    }

    @Test("a batch the database refuses as a whole is run request by request, each with its own outcome")
    func refusedBatchRunsAlone() async throws {
        let store = try await makeStore()
        defer { Task { await store.pool.close() } }
        try await store.prepare(client: "acme", accounts: ["a"])
        // This database refuses every batch of two or more, as it would for a statement error in one request of it,
        // and counts the refusals in a sequence (which its rollback does not undo). A lone request runs the real
        // function (ledger.post_transfer calls it with one item).
        try await store.pool.query("CREATE SEQUENCE refusals")
        try await store.pool.query("ALTER FUNCTION ledger.post_transfers(text, jsonb) RENAME TO post_transfers_real")
        try await store.pool.query(
            """
            CREATE FUNCTION ledger.post_transfers(p_client text, p_items jsonb)
            RETURNS TABLE (item integer, outcome text, status_code integer, response_body text, created_at timestamptz)
            LANGUAGE plpgsql AS $$
            BEGIN
                IF jsonb_array_length(p_items) > 1 THEN
                    PERFORM nextval('refusals');
                    RAISE EXCEPTION 'refused' USING ERRCODE = 'data_exception';
                END IF;
                RETURN QUERY SELECT * FROM ledger.post_transfers_real(p_client, p_items);
            END;
            $$
            """)
        let outcomes = try await concurrently(40) { index in
            // Every other request is a debit the account cannot afford: a failure of its own, stored.
            let body = index % 2 == 0
                ? #"{"account":"a","amount":5,"currency":"USD"}"# : #"{"account":"a","amount":1000000,"currency":"USD"}"#
            let kind: TransferRequest.Kind = index % 2 == 0 ? .credit : .debit
            return try await store.post(client: "acme", key: IdempotencyKey(unchecked: "k\(index)"), request: try request(kind, body))
        }
        #expect(outcomes.filter { if case .executed(201, _) = $0 { return true } else { return false } }.count == 20)
        #expect(outcomes.filter { if case .executed(422, _) = $0 { return true } else { return false } }.count == 20)
        let refusals = try await store.pool.query("SELECT last_value, is_called FROM refusals").rows[0]
        #expect(try refusals.decode(Bool.self, "is_called"), "no batch was formed, so none was refused")
        let transfers = try await store.pool.query("SELECT count(*) AS n FROM ledger.transfers").rows[0]
        #expect(try transfers.decode(Int64.self, "n") == 20)
        let stored = try await store.pool.query("SELECT count(*) AS n FROM ledger.idempotency_keys").rows[0].decode(Int64.self, "n")
        #expect(stored == 40, "every request has its own stored outcome")
        #expect(try await store.verify().isEmpty)
    }

    @Test("a key held by another execution waits on its own, and the rest of the batch does not wait for it")
    func busyKey() async throws {
        let store = try await makeStore()
        defer { Task { await store.pool.close() } }
        try await store.prepare(client: "acme", accounts: ["a"], allowNegative: true)
        let holder = PostgresPool(
            configuration: PostgresConfiguration(conninfo: store.pool.configuration.conninfo, poolSizeMax: 1),
            logger: TestDatabase.logger)
        defer { Task { await holder.close() } }
        let release = try await holder.withConnection { connection -> Task<Void, any Error> in
            try await connection.query("SELECT pg_advisory_lock(ledger.key_lock_id('acme', 'held'))")
            return Task {
                try await Task.sleep(for: .milliseconds(800))
                try await connection.query("SELECT pg_advisory_unlock_all()")
            }
        }
        let started = ContinuousClock.now
        async let held = store.post(
            client: "acme", key: IdempotencyKey(unchecked: "held"),
            request: try request(.debit, #"{"account":"a","amount":1,"currency":"USD"}"#))
        var others: [Duration] = []
        for index in 0..<8 {
            _ = try await store.post(
                client: "acme", key: IdempotencyKey(unchecked: "free-\(index)"),
                request: try request(.debit, #"{"account":"a","amount":1,"currency":"USD"}"#))
            others.append(ContinuousClock.now - started)
        }
        #expect(others.allSatisfy { $0 < .milliseconds(700) }, "free keys waited for the held one: \(others)")
        guard case .executed(201, _) = try await held else {
            Issue.record("the held key did not execute after its lock was released")
            return
        }
        try await release.value
        #expect(try await store.verify().isEmpty)
    }
}
