import LedgerCore
import Logging
import PostgresClient

/// Runs credits, debits and transfers on the pool: one in a transaction of its own, or several of one client in one
/// transaction. What a `LedgerStore` and its `TransferBatcher` share: the batcher is built by the store's initializer,
/// before there is a store to hand it, so both hold this instead of each other.
///
/// Errors are the client layer's `PostgresError`s: the batcher decides on them (a lost connection fails the whole
/// batch), and the store maps them into `LedgerStoreError` at its boundary.
struct TransferExecutor: Sendable {
    let pool: PostgresPool
    let keyWaitMilliseconds: Int
    let conflictRetriesMax: Int
    let logger: Logger

    /// One request in a transaction of its own, waiting at most `keyWait` ms (default `keyWaitMilliseconds`) for
    /// another execution of its key.
    func postAlone(
        client: String, key: IdempotencyKey, request: TransferRequest, keyWait: Int? = nil
    ) async throws -> LedgerStore.KeyedAnswer {
        let binds: [PostgresBind] = [
            .string(client), .string(key.value), .string(request.fingerprintText),
            request.from.map { .string($0) } ?? .null, request.to.map { .string($0) } ?? .null,
            .int64(request.amount), .string(request.currency), .json(request.metadataJSON),
            request.ifMatch.map { .int64($0) } ?? .null, .int32(Int32(clamping: keyWait ?? keyWaitMilliseconds)),
        ]
        let rows = try await retryingConflicts {
            try await pool.query(
                "SELECT outcome, status_code, response_body, \(Self.ageColumn) FROM ledger.post_transfer($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                binds)
        }
        return try Self.answer(of: rows.rows[0])!
    }

    /// Several requests of one client in one transaction; nil for a request whose key was busy (not run).
    func postTogether(
        client: String, items: [(IdempotencyKey, TransferRequest)]
    ) async throws -> [LedgerStore.KeyedAnswer?] {
        var json = "["
        for (index, (key, request)) in items.enumerated() {
            if index > 0 { json += "," }
            json += "{\"key\":\(JSONValue.quoted(key.value)),\"request\":\(JSONValue.quoted(request.fingerprintText)),"
            Self.appendMovement(of: request, to: &json)
            json += "}"
        }
        json += "]"
        let rows = try await retryingConflicts {
            try await pool.query(
                "SELECT item, outcome, status_code, response_body, \(Self.ageColumn) FROM ledger.post_transfers($1, $2)",
                [.string(client), .json(json)])
        }
        guard rows.rows.count == items.count else {
            throw PostgresError(code: .decoding, message: "ledger.post_transfers answered \(rows.rows.count) of \(items.count)")
        }
        return try rows.rows.map(Self.answer(of:))
    }

    /// `"from":...,"to":...,"amount":...,"currency":...,"metadata":...`: what the SQL functions read of a request.
    static func appendMovement(of request: TransferRequest, to json: inout String) {
        json += "\"from\":\(request.from.map(JSONValue.quoted) ?? "null"),\"to\":\(request.to.map(JSONValue.quoted) ?? "null")"
        json += ",\"amount\":\(request.amount),\"currency\":\(JSONValue.quoted(request.currency))"
        json += ",\"metadata\":\(request.metadataJSON)"
        if let version = request.ifMatch { json += ",\"if_match\":\(version)" }
    }

    /// The age of the answered stored outcome, in ms, measured by the database's clock within the same statement
    /// (NULL when the answer is not a stored row); every keyed function returns `created_at`.
    static let ageColumn = "(extract(epoch FROM now() - created_at) * 1000)::bigint AS age_ms"

    /// The answer a row names (with `age_ms`, see `ageColumn`); nil for `busy`.
    static func answer(of row: PostgresRow) throws -> LedgerStore.KeyedAnswer? {
        guard let outcome = try outcome(of: row) else { return nil }
        let storedAt = try row.decodeIfPresent(Int64.self, "age_ms").map {
            ContinuousClock.now - .milliseconds(max(0, $0))
        }
        return LedgerStore.KeyedAnswer(outcome: outcome, storedAt: storedAt)
    }

    /// The outcome a row of post_transfer, post_transfers or post_batch names; nil for `busy`.
    static func outcome(of row: PostgresRow) throws -> LedgerStore.PostOutcome? {
        let status = try row.decode(Int.self, "status_code")
        switch try row.decode(String.self, "outcome") {
        case "executed": return .executed(status: status, body: try row.decode(String.self, "response_body"))
        case "replayed": return .replayed(status: status, body: try row.decode(String.self, "response_body"))
        case "reused": return .reused
        case "in_progress": return .inProgress
        case "busy": return nil
        case let other:
            throw PostgresError(code: .decoding, message: "unknown outcome \(other) from the database")
        }
    }

    /// Runs `body` again when the database rolled it back as a serialization failure, a deadlock or a collision of
    /// random transfer ids: by definition nothing of it was committed, so running it again is safe. Bounded by
    /// `conflictRetriesMax`.
    func retryingConflicts<T: Sendable>(_ body: () async throws -> T) async throws -> T {
        var attempt = 0
        while true {
            do {
                return try await body()
            } catch let error as PostgresError where error.isWorthRunningAgain && attempt < conflictRetriesMax {
                attempt += 1
                logger.debug(
                    "retrying after a transient conflict",
                    metadata: ["db.sqlstate": "\(error.sqlState ?? "")", "retry.attempt": "\(attempt)"])
                try await Task.sleep(for: .milliseconds(5 * attempt))
            }
        }
    }
}

extension PostgresError {
    /// A new transfer drew a random id the client already has (sql/0011_transfer_ids.sql): its transaction rolled
    /// back whole, and running it again draws new ids.
    var isTransferIdCollision: Bool { sqlState == "23505" && constraint == "transfers_pkey" }

    /// Whether running the whole transaction again is safe and may succeed.
    var isWorthRunningAgain: Bool { isTransientConflict || isTransferIdCollision }
}
