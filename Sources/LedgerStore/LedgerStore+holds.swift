import LedgerCore
import PostgresClient

/// Holds, captures, voids and reversals: each one call of a SQL function (sql/0008) that runs the one set of money
/// rules (`ledger.execute_movements`) under the idempotency machinery of every keyed request.
extension LedgerStore {
    /// POST /v1/holds.
    public func postHoldAnswer(
        client: String, key: IdempotencyKey, request: HoldRequest, keyWait: Int? = nil
    ) async throws -> KeyedAnswer {
        try await keyed(
            "ledger.post_hold($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            [
                .string(client), .string(key.value), .string(request.fingerprintText), .string(request.from),
                request.to.map { .string($0) } ?? .null, .int64(request.amount), .string(request.currency),
                .json(request.metadataJSON), .int32(Int32(request.expiresInSeconds)),
                request.ifMatch.map { .int64($0) } ?? .null, keyWaitBind(keyWait),
            ])
    }

    /// POST /v1/holds/{id}/capture. `hold` is the id as it appeared in the path (a malformed one is not found).
    public func captureAnswer(
        client: String, key: IdempotencyKey, hold: String, request: AmendRequest, keyWait: Int? = nil
    ) async throws -> KeyedAnswer {
        try await keyed(
            "ledger.post_capture($1, $2, $3, $4, $5, $6, $7)",
            [
                .string(client), .string(key.value), .string(request.fingerprintText), .string(hold),
                request.amount.map { .int64($0) } ?? .null, request.metadataJSON.map { .json($0) } ?? .null, keyWaitBind(keyWait),
            ])
    }

    /// POST /v1/holds/{id}/void.
    public func voidAnswer(
        client: String, key: IdempotencyKey, hold: String, fingerprintText: String, keyWait: Int? = nil
    ) async throws -> KeyedAnswer {
        try await keyed(
            "ledger.post_void($1, $2, $3, $4, $5)",
            [.string(client), .string(key.value), .string(fingerprintText), .string(hold), keyWaitBind(keyWait)])
    }

    /// POST /v1/transfers/{id}/reversals.
    public func reverseAnswer(
        client: String, key: IdempotencyKey, transfer: String, request: AmendRequest, keyWait: Int? = nil
    ) async throws -> KeyedAnswer {
        try await keyed(
            "ledger.post_reversal($1, $2, $3, $4, $5, $6, $7)",
            [
                .string(client), .string(key.value), .string(request.fingerprintText), .string(transfer),
                request.amount.map { .int64($0) } ?? .null, request.metadataJSON.map { .json($0) } ?? .null, keyWaitBind(keyWait),
            ])
    }

    /// The hold's JSON, or nil when the client has no such hold (malformed ids included).
    public func hold(client: String, id: String) async throws -> String? {
        let rows = try await mappingErrors {
            try await pool.query(
            "SELECT ledger.hold_json(h) AS body FROM ledger.holds h WHERE h.client_id = $1 AND h.id = ledger.parse_id($2)",
                [.string(client), .string(id)])
        }
        return try await mappingErrors { try rows.first?.decode(String.self, "body") }
    }

    /// One page of the holds whose payer is `account`, as `{"holds":[...],"next_cursor":...}`; nil when the account
    /// does not exist. `page` was parsed for the cursor scope `holdsCursorScope(account)`.
    public func holds(client: String, account: String, status: HoldStatus?, page: EntriesPage) async throws -> String? {
        try await mappingErrors { try await holdsPage(client: client, account: account, status: status, page: page) }
    }

    private func holdsPage(client: String, account: String, status: HoldStatus?, page: EntriesPage) async throws
        -> String?
    {
        let rows = try await pool.query(
            "SELECT holds_json, last_id, has_more FROM ledger.holds_page($1, $2, $3, $4, $5)",
            [
                .string(client), .string(account), status.map { .string($0.rawValue) } ?? .null,
                page.beforeVersion.map { .int64($0) } ?? .null, .int32(Int32(page.limit)),
            ])
        guard let row = rows.first else { return nil }
        var cursor = "null"
        if try row.decode(Bool.self, "has_more"), let last = try row.decodeIfPresent(Int64.self, "last_id") {
            let key = try await cursorKey()
            cursor = JSONValue.quoted(
                key.encode(client: client, account: Self.holdsCursorScope(account), beforeVersion: last))
        }
        return "{\"holds\":\(try row.decode(String.self, "holds_json")),\"next_cursor\":\(cursor)}"
    }

    /// What a holds cursor is signed for: never an account id (no `/` in those), so that an entries cursor is no
    /// holds cursor and the other way round.
    public static func holdsCursorScope(_ account: String) -> String { "holds/\(account)" }

    /// The account's JSON and version (for its ETag), or nil.
    public func accountWithVersion(client: String, id: String) async throws -> (body: String, version: Int64)? {
        try await mappingErrors {
            let rows = try await pool.query(
                "SELECT ledger.account_json(a) AS body, a.version FROM ledger.accounts a WHERE a.client_id = $1 AND a.id = $2",
                [.string(client), .string(id)])
            guard let row = rows.first else { return nil }
            return (try row.decode(String.self, "body"), try row.decode(Int64.self, "version"))
        }
    }

    /// Records due holds as expired, at most `batchSize` per call; returns how many.
    public func expireHolds(batchSize: Int) async throws -> Int {
        precondition((1...10_000).contains(batchSize), "batchSize must be within 1...10000")
        return try await mappingErrors {
            let rows = try await retryingConflicts {
                try await pool.query("SELECT ledger.expire_holds($1) AS n", [.int32(Int32(batchSize))])
            }
            return try rows.rows[0].decode(Int.self, "n")
        }
    }

    /// p_key_wait_ms: this request's bound, else the option's.
    private func keyWaitBind(_ keyWait: Int?) -> PostgresBind {
        .int32(Int32(clamping: keyWait ?? options.keyWaitMilliseconds))
    }

    /// One keyed request's function call, retried on serialization failures and deadlocks.
    private func keyed(_ call: String, _ binds: [PostgresBind]) async throws -> KeyedAnswer {
        try await mappingErrors {
            let rows = try await retryingConflicts {
                try await pool.query(
                    "SELECT outcome, status_code, response_body, \(TransferExecutor.ageColumn) FROM \(call)", binds)
            }
            return try TransferExecutor.answer(of: rows.rows[0])!
        }
    }

    /// `GET /v1/idempotency-keys/{key}`: the key's state (completed, in_progress, consumed) and its JSON, or nil
    /// for a key this client never used or whose purged outcome made nothing.
    public func idempotencyKeyState(client: String, key: String) async throws -> (state: String, body: String)? {
        try await mappingErrors {
            let rows = try await pool.query(
                "SELECT state, body FROM ledger.idempotency_key_state($1, $2, $3)",
                [.string(client), .string(key), .int32(Int32(clamping: options.retentionSeconds))])
            guard let row = rows.first else { return nil }
            return (try row.decode(String.self, "state"), try row.decode(String.self, "body"))
        }
    }
}
