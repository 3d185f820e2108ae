import Crypto
import Foundation
import LedgerCore
import Logging
import PostgresClient
import Synchronization

/// The ledger's operations, each one call of a SQL function in sql/ (one round trip, one transaction).
///
/// The rules live in SQL, tested against PostgreSQL; this type only binds parameters, reads results, and retries
/// transactions the database rolled back as a serialization failure or deadlock.
public struct LedgerStore: Sendable {
    public struct Options: Sendable {
        /// How long a request waits for another execution of the same idempotency key, in milliseconds, before
        /// answering 409 idempotency-key-in-progress. Default 5,000.
        public var keyWaitMilliseconds: Int
        /// Attempts after the first for a transaction rolled back by a serialization failure or deadlock. Default 3.
        public var conflictRetriesMax: Int
        /// Concurrent requests of one client executed together in one transaction, at most (group commit, see
        /// `TransferBatcher`). 1 runs every request in a transaction of its own. Default 16.
        public var batchMax: Int
        /// Batches of one client running at once, at most (each on a pooled connection). Few, so that requests
        /// arriving meanwhile gather into the next batches instead of each taking a connection of its own: on a small
        /// machine two busy backends committing batches of 8 to 16 move more money than many committing 1 or 2
        /// (BENCHMARKS.md). Other clients get drivers of their own, up to the pool's size. Default 2.
        public var batchConcurrencyMax: Int
        /// Memory for answers of completed requests kept to answer replays without a round trip (`ReplayCache`), in
        /// bytes. 0 turns it off. Default 8 MiB.
        public var replayCacheBytesMax: Int
        /// The retry hint, in seconds, of `LedgerStoreError.unavailable` and `.conflictExhausted` (sent as
        /// `Retry-After` by the HTTP layer). Default 1.
        public var retryAfterSeconds: Int
        /// How long stored outcomes are kept at least (`--retention-s`), in seconds: what `Idempotency-TTL` and
        /// the `expires_at` of a key count from. Default 86,400.
        public var retentionSeconds: Int
        /// The key webhook secrets are derived from (`LEDGER_WEBHOOK_KEY`, 32 bytes or more), the same on every
        /// replica; nil: the key made by the migrations and kept in the database, so that a reader of the database
        /// can derive the secrets. Default nil.
        public var webhookKey: [UInt8]?

        public init(
            keyWaitMilliseconds: Int = 5_000, conflictRetriesMax: Int = 3, batchMax: Int = 16,
            batchConcurrencyMax: Int = 2, replayCacheBytesMax: Int = 8 << 20, retryAfterSeconds: Int = 1,
            retentionSeconds: Int = 86_400, webhookKey: [UInt8]? = nil
        ) {
            precondition(webhookKey.map { $0.count >= 32 } ?? true, "a webhook key has at least 32 bytes")
            self.webhookKey = webhookKey
            precondition(retentionSeconds >= 1, "retentionSeconds must be positive")
            self.retentionSeconds = retentionSeconds
            precondition(keyWaitMilliseconds >= 1, "keyWaitMilliseconds must be positive")
            precondition(conflictRetriesMax >= 0, "conflictRetriesMax must not be negative")
            precondition((1...1_000).contains(batchMax), "batchMax must be within 1...1000")
            precondition(replayCacheBytesMax >= 0, "replayCacheBytesMax must not be negative")
            precondition(batchConcurrencyMax >= 1, "batchConcurrencyMax must be positive")
            precondition(retryAfterSeconds >= 0, "retryAfterSeconds must not be negative")
            self.retryAfterSeconds = retryAfterSeconds
            self.batchConcurrencyMax = batchConcurrencyMax
            self.replayCacheBytesMax = replayCacheBytesMax
            self.keyWaitMilliseconds = keyWaitMilliseconds
            self.conflictRetriesMax = conflictRetriesMax
            self.batchMax = batchMax
        }
    }

    /// The pool, for migrations, the command line and tests. The HTTP layer never sees it: it asks the store.
    public let pool: PostgresPool
    public let options: Options
    let logger: Logger
    /// Runs single requests and groups of them; shared with the batcher, which has no store of its own.
    let executor: TransferExecutor
    /// Group commit of concurrent requests, when `options.batchMax` > 1.
    private let batcher: TransferBatcher?
    private let replayCache: ReplayCache?
    private let cursorKeyCache = CursorKeyCache()
    let webhookKeyCache = WebhookKeyCache()

    /// A store on `pool`. It commits concurrent requests of one client together (group commit, `TransferBatcher`)
    /// whenever `options.batchMax` > 1; pass `batchMax: 1` for a transaction per request.
    public init(pool: PostgresPool, options: Options = Options(), logger: Logger) {
        self.pool = pool
        self.options = options
        self.logger = logger
        self.executor = TransferExecutor(
            pool: pool, keyWaitMilliseconds: options.keyWaitMilliseconds,
            conflictRetriesMax: options.conflictRetriesMax, logger: logger)
        // At most one batch per pooled connection: more drivers than connections would only queue in the pool.
        // Batches of one client at most `batchConcurrencyMax` at once; of all clients, one per pooled connection.
        self.batcher =
            options.batchMax > 1
            ? TransferBatcher(
                executor: executor, batchMax: options.batchMax,
                driversPerClientMax: min(pool.configuration.poolSizeMax, options.batchConcurrencyMax),
                driversMax: pool.configuration.poolSizeMax, queueMax: pool.configuration.waitersMax,
                queueWaitMax: pool.configuration.acquireWaitMax)
            : nil
        self.replayCache = options.replayCacheBytesMax > 0 ? ReplayCache(bytesMax: options.replayCacheBytesMax) : nil
    }

    // MARK: Transfers

    public enum PostOutcome: Sendable, Equatable {
        /// Executed now; the outcome (201 transfer or a 404/422 problem) is stored for replay.
        case executed(status: Int, body: String)
        /// The key completed before with this same request: its stored answer.
        case replayed(status: Int, body: String)
        /// The key completed before with another request.
        case reused
        /// Another execution of the key still holds it.
        case inProgress
    }

    /// The answer to a keyed request: its outcome and, for a stored outcome, when it was stored.
    public struct KeyedAnswer: Sendable, Equatable {
        public var outcome: PostOutcome
        /// When the database stored the answered outcome (`idempotency_keys.created_at`, measured as an age by the
        /// database's clock and placed on this process's clock); nil when the answer is no stored row (not stored,
        /// or what a key whose stored outcome was purged made).
        public var storedAt: ContinuousClock.Instant?

        public init(outcome: PostOutcome, storedAt: ContinuousClock.Instant?) {
            self.outcome = outcome
            self.storedAt = storedAt
        }

        /// `Idempotency-TTL`: how much longer a retry is sure to replay this stored outcome, in whole seconds (the
        /// retention minus the outcome's age, at least 0); nil when the answer is not a stored outcome. An answer
        /// rebuilt from what a purged key made counts as past its retention: 0.
        public func ttlSeconds(retentionSeconds: Int, now: ContinuousClock.Instant = .now) -> Int? {
            switch outcome {
            case .executed, .replayed:
                guard let storedAt else { return 0 }
                let age = now - storedAt
                let ageMilliseconds = age.components.seconds * 1_000 + age.components.attoseconds / 1_000_000_000_000_000
                return max(0, (Int64(retentionSeconds) * 1_000 - max(0, ageMilliseconds)) / 1_000).clampedToInt
            case .reused, .inProgress:
                return nil
            }
        }
    }

    /// Executes a credit, debit or transfer exactly once per (client, key).
    public func post(client: String, key: IdempotencyKey, request: TransferRequest) async throws -> PostOutcome {
        try await postAnswer(client: client, key: key, request: request).outcome
    }

    /// The same, with when its outcome was stored. `keyWait` (ms, >= 0): this request's bound on the wait for a
    /// concurrent execution of its key (`Prefer: wait`); nil: `options.keyWaitMilliseconds`. A request with a bound
    /// of its own runs alone, not in group commit: a group only tries the keys' locks, and one whose key is busy
    /// then runs alone with the default bound, which is exactly what such a request asks to change.
    public func postAnswer(
        client: String, key: IdempotencyKey, request: TransferRequest, keyWait: Int? = nil
    ) async throws -> KeyedAnswer {
        if let known = replayCache?.answer(client: client, key: key.value, fingerprint: request.fingerprintText) {
            return known
        }
        let answer = try await mappingErrors {
            if let batcher, keyWait == nil { try await batcher.submit(client: client, key: key, request: request) } else {
                try await executor.postAlone(client: client, key: key, request: request, keyWait: keyWait)
            }
        }
        replayCache?.remember(
            client: client, key: key.value, fingerprint: request.fingerprintText, outcome: answer.outcome,
            storedAt: answer.storedAt)
        return answer
    }

    /// Up to 1,000 transfers under one key, all or nothing or each on its own (`ledger.post_batch`): one round trip,
    /// one transaction, set-based statements.
    public func postBatch(client: String, key: IdempotencyKey, batch: BatchRequest) async throws -> PostOutcome {
        try await postBatchAnswer(client: client, key: key, batch: batch).outcome
    }

    public func postBatchAnswer(
        client: String, key: IdempotencyKey, batch: BatchRequest, keyWait: Int? = nil
    ) async throws -> KeyedAnswer {
        try await mappingErrors {
            var items = "["
            items.reserveCapacity(batch.transfers.count * 96)
            for (index, request) in batch.transfers.enumerated() {
                items += index > 0 ? ",{" : "{"
                TransferExecutor.appendMovement(of: request, to: &items)
                items += "}"
            }
            items += "]"
            let binds: [PostgresBind] = [
                .string(client), .string(key.value), .string(batch.fingerprintText), .bool(batch.atomic), .json(items),
                .int32(Int32(clamping: keyWait ?? options.keyWaitMilliseconds)),
            ]
            let rows = try await retryingConflicts {
                try await pool.query(
                    "SELECT outcome, status_code, response_body, \(TransferExecutor.ageColumn) FROM ledger.post_batch($1, $2, $3, $4, $5, $6)",
                    binds)
            }
            return try TransferExecutor.answer(of: rows.rows[0])!
        }
    }

    /// The transfer's JSON, or nil when the client has no such transfer.
    public func transfer(client: String, id: String) async throws -> String? {
        try await mappingErrors {
            // Ids are decimal integers as the API writes them: anything else, such as `01` for `1`, names no transfer.
            guard id.utf8.count <= 19, id.utf8.first != UInt8(ascii: "0"), id.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }),
                let number = Int64(id)
            else {
                return nil
            }
            let rows = try await pool.query(
                "SELECT ledger.transfer_json(t) AS body FROM ledger.transfers t WHERE t.client_id = $1 AND t.id = $2",
                [.string(client), .int64(number)])
            return try rows.first?.decode(String.self, "body")
        }
    }

    // MARK: Accounts

    public enum PutAccountOutcome: Sendable, Equatable {
        case created(body: String)
        case unchanged(body: String)
        case conflict
    }

    public func putAccount(client: String, id: String, request: AccountRequest) async throws -> PutAccountOutcome {
        try await mappingErrors {
            let rows = try await retryingConflicts {
                try await pool.query(
                    "SELECT status_code, response_body FROM ledger.put_account($1, $2, $3, $4)",
                    [.string(client), .string(id), .string(request.currency), .bool(request.allowNegative)])
            }
            let row = rows.rows[0]
            switch try row.decode(Int.self, "status_code") {
            case 201: return .created(body: try row.decode(String.self, "response_body"))
            case 200: return .unchanged(body: try row.decode(String.self, "response_body"))
            default: return .conflict
            }
        }
    }

    /// The account's JSON, or nil when the client has no such account.
    public func account(client: String, id: String) async throws -> String? {
        try await mappingErrors {
            let rows = try await pool.query(
                "SELECT ledger.account_json(a) AS body FROM ledger.accounts a WHERE a.client_id = $1 AND a.id = $2",
                [.string(client), .string(id)])
            return try rows.first?.decode(String.self, "body")
        }
    }

    /// One page of entries as `{"entries":[...],"next_cursor":...}`, or nil when the account does not exist.
    public func entries(client: String, account: String, page: EntriesPage) async throws -> String? {
        try await mappingErrors {
            let rows = try await pool.query(
                "SELECT entries_json, last_version, has_more FROM ledger.entries_page($1, $2, $3, $4)",
                [
                    .string(client), .string(account), page.beforeVersion.map { .int64($0) } ?? .null,
                    .int32(Int32(page.limit)),
                ])
            guard let row = rows.first else { return nil }
            let entries = try row.decode(String.self, "entries_json")
            var cursor = "null"
            if try row.decode(Bool.self, "has_more"), let last = try row.decodeIfPresent(Int64.self, "last_version") {
                let key = try await cursorKey()
                cursor = JSONValue.quoted(key.encode(client: client, account: account, beforeVersion: last))
            }
            return "{\"entries\":\(entries),\"next_cursor\":\(cursor)}"
        }
    }

    /// The key that signs entries-page cursors (`ledger.service_keys`, made by `sql/0006_cursor_key.sql`): the
    /// same for every replica of one database. Read once, then kept for the life of the process.
    public func cursorKey() async throws -> CursorKey {
        try await mappingErrors {
            if let key = cursorKeyCache.key.withLock({ $0 }) { return key }
            let rows = try await pool.query("SELECT key FROM ledger.service_keys WHERE name = 'cursor'")
            guard let row = rows.first else {
                throw PostgresError(code: .unexpected, message: "ledger.service_keys holds no cursor key: run ledger migrate")
            }
            let key = CursorKey(bytes: Array(try row.decode(Data.self, "key")))
            cursorKeyCache.key.withLock { $0 = key }
            return key
        }
    }

    // MARK: Clients and tokens

    /// The client a bearer token acts for, or nil for an unknown token. Looked up by SHA-256: the token itself is
    /// never stored nor sent to the database.
    public func client(forToken token: String) async throws -> String? {
        try await acceptedToken(token)?.client
    }

    /// What an accepted token acts for: its client and, for a token that expires, the time left until it does.
    public struct AcceptedToken: Sendable, Equatable {
        public var client: String
        public var expiresIn: Duration?
    }

    /// The client of a token that is neither revoked nor expired, or nil.
    public func acceptedToken(_ token: String) async throws -> AcceptedToken? {
        try await mappingErrors {
            let rows = try await pool.query(
                """
                SELECT client_id, (ceil(EXTRACT(EPOCH FROM expires_at - now()) * 1000))::bigint AS expires_in_ms
                FROM ledger.api_tokens
                WHERE token_sha256 = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())
                """,
                [.bytea(Self.tokenDigest(token))])
            guard let row = rows.first else { return nil }
            return AcceptedToken(
                client: try row.decode(String.self, "client_id"),
                expiresIn: try row.decodeIfPresent(Int64.self, "expires_in_ms").map { .milliseconds($0) })
        }
    }

    /// One token as `ledger token list` shows it; never the token itself.
    public struct TokenInfo: Sendable, Equatable {
        /// The first 16 hex digits of the token's SHA-256: what `ledger token revoke` takes.
        public var id: String
        public var client: String
        public var createdAt: String
        public var expiresAt: String?
        public var revokedAt: String?
        /// active, expired or revoked.
        public var state: String
    }

    /// A client's tokens, oldest first.
    public func tokens(client: String) async throws -> [TokenInfo] {
        try await mappingErrors {
            let rows = try await pool.query(
                """
                SELECT left(encode(token_sha256, 'hex'), 16) AS id, client_id,
                       ledger.rfc3339(created_at) AS created_at, ledger.rfc3339(expires_at) AS expires_at,
                       ledger.rfc3339(revoked_at) AS revoked_at,
                       CASE WHEN revoked_at IS NOT NULL THEN 'revoked'
                            WHEN expires_at <= now() THEN 'expired' ELSE 'active' END AS state
                FROM ledger.api_tokens WHERE client_id = $1 ORDER BY created_at, token_sha256
                """,
                [.string(client)])
            return try rows.rows.map { row in
                TokenInfo(
                    id: try row.decode(String.self, "id"), client: try row.decode(String.self, "client_id"),
                    createdAt: try row.decode(String.self, "created_at"),
                    expiresAt: try row.decodeIfPresent(String.self, "expires_at"),
                    revokedAt: try row.decodeIfPresent(String.self, "revoked_at"),
                    state: try row.decode(String.self, "state"))
            }
        }
    }

    public enum RevokeOutcome: Sendable, Equatable {
        case revoked(client: String)
        case alreadyRevoked(client: String)
        case notFound
    }

    /// Revokes the token of this id (`TokenInfo.id`). Idempotent: a second revocation changes nothing.
    public func revokeToken(id: String) async throws -> RevokeOutcome {
        try await mappingErrors {
            // The id is a prefix of the key: a range scan of the primary key, not a scan of the table.
            guard id.utf8.count == 16, id.allSatisfy(\.isHexDigit) else { return .notFound }
            let rows = try await pool.query(
                """
                WITH target AS (
                    SELECT token_sha256, client_id, revoked_at FROM ledger.api_tokens
                    WHERE token_sha256 >= decode($1, 'hex') AND substr(token_sha256, 1, 8) = decode($1, 'hex')
                    FOR UPDATE
                ), revoked AS (
                    UPDATE ledger.api_tokens t SET revoked_at = now()
                    FROM target WHERE t.token_sha256 = target.token_sha256 AND target.revoked_at IS NULL
                    RETURNING t.client_id
                )
                SELECT client_id, EXISTS (SELECT 1 FROM revoked) AS revoked_now FROM target
                """,
                [.string(id)])
            guard let row = rows.first else { return .notFound }
            let client = try row.decode(String.self, "client_id")
            return try row.decode(Bool.self, "revoked_now") ? .revoked(client: client) : .alreadyRevoked(client: client)
        }
    }

    /// Creates the client if new and a new token for it; returns the token, which is not stored anywhere.
    public func createToken(client: String, expiresInSeconds: Int? = nil) async throws -> String {
        try await mappingErrors {
            precondition(LedgerRules.isValidAccountID(client), "client names follow the account id pattern")
            var generator = SystemRandomNumberGenerator()
            let secret = (0..<32).map { _ in UInt8.random(in: 0...255, using: &generator) }
            let token = "ldg_" + Hex.encode(secret)
            try await pool.withTransaction { connection in
                try await connection.query(
                    "INSERT INTO ledger.clients (id) VALUES ($1) ON CONFLICT DO NOTHING", [.string(client)])
                try await connection.query(
                    """
                    INSERT INTO ledger.api_tokens (token_sha256, client_id, expires_at)
                    VALUES ($1, $2, now() + make_interval(secs => $3))
                    """,
                    [.bytea(Self.tokenDigest(token)), .string(client), expiresInSeconds.map { .int64(Int64($0)) } ?? .null])
            }
            return token
        }
    }

    /// The public id of a token: the first 16 hex digits of its SHA-256.
    public static func tokenID(_ token: String) -> String {
        String(Hex.encode(tokenDigest(token)).prefix(16))
    }

    public static func tokenDigest(_ token: String) -> Data {
        Data(SHA256.hash(data: Data(token.utf8)))
    }

    // MARK: Health and invariants

    /// `SELECT 1`: the database answers.
    public func ping() async throws {
        try await mappingErrors {
            try await pool.query("SELECT 1")
        }
    }

    /// A snapshot of the connection pool, for metrics: the store's callers need not know the pool's type.
    public struct PoolStatistics: Sendable, Equatable {
        /// Connections leased to a request or a batch now.
        public var inUse: Int
        /// Open connections waiting in the pool.
        public var idle: Int
        /// Tasks waiting for a connection.
        public var waiting: Int
    }

    public func poolStatistics() -> PoolStatistics {
        let stats = pool.stats
        return PoolStatistics(inUse: stats.inUse, idle: stats.idle, waiting: stats.waiting)
    }

    /// Applies `migrator`'s pending migrations on this store's database; returns the names applied now.
    @discardableResult
    public func migrate(_ migrator: Migrator) async throws -> [String] {
        try await mappingErrors { try await migrator.migrate(pool: pool) }
    }

    /// Distributes the migrated schema over a Citus cluster (`Migrator.distribute`).
    public func distribute(_ migrator: Migrator) async throws -> [String] {
        try await mappingErrors { try await migrator.distribute(pool: pool) }
    }

    /// Closes every connection; calls after this fail as unavailable. For graceful shutdown, after the last request.
    public func close() async {
        await pool.close()
    }

    public struct Breach: Sendable, Equatable, CustomStringConvertible {
        public var invariant: String
        public var client: String
        public var detail: String
        public var description: String { "\(invariant): client \(client): \(detail)" }
    }

    /// Every breached invariant of the contract (view `ledger.invariant_breaches`); empty on a healthy ledger.
    public func verify() async throws -> [Breach] {
        try await mappingErrors {
            let rows = try await pool.query(
                "SELECT invariant, client_id, detail FROM ledger.invariant_breaches ORDER BY invariant, client_id, subject")
            return try rows.rows.map { row in
                Breach(
                    invariant: try row.decode(String.self, "invariant"), client: try row.decode(String.self, "client_id"),
                    detail: try row.decode(String.self, "detail"))
            }
        }
    }

    // MARK: Retries

    /// Runs `body` again after a serialization failure or deadlock, at most `conflictRetriesMax` times (see
    /// `TransferExecutor.retryingConflicts`).
    func retryingConflicts<T: Sendable>(_ body: () async throws -> T) async throws -> T {
        try await executor.retryingConflicts(body)
    }
}

// MARK: - Retention

extension LedgerStore {
    /// Deletes stored responses older than `retention`, in batches of `batchSize`, until none is left or
    /// `batchesMax` batches ran. Returns how many were deleted.
    public func purgeStoredResponses(retention: Duration, batchSize: Int, batchesMax: Int) async throws -> Int {
        try await mappingErrors {
            precondition(batchSize >= 1 && batchesMax >= 1, "purge bounds must be positive")
            let milliseconds = retention.components.seconds * 1_000 + retention.components.attoseconds / 1_000_000_000_000_000
            var total = 0
            for _ in 0..<batchesMax {
                let deleted = try await pool.query(
                    "SELECT ledger.purge_idempotency_keys(make_interval(secs => $1::float8 / 1000), $2) AS deleted",
                    [.int64(milliseconds), .int32(Int32(clamping: batchSize))]
                ).rows[0].decode(Int.self, "deleted")
                total += deleted
                if deleted < batchSize { break }
            }
            return total
        }
    }
}

extension Int64 {
    var clampedToInt: Int { Int(clamping: self) }
}

/// The cursor key, once read: a class, so that every copy of a store shares what one of them read.
final class CursorKeyCache: Sendable {
    let key = Mutex<CursorKey?>(nil)
}
