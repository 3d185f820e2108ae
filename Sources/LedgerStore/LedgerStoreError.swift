import PostgresClient

/// The one error type of the LedgerStore layer: what a caller of the store can act on, and nothing of libpq.
///
/// The store maps every `PostgresError` into this at its boundary, so the HTTP layer decides statuses on three
/// static codes without knowing PostgreSQL. The SQLSTATE, the client library's kind and the server's message are kept
/// for logs and metrics only: `description` names the code, kind and SQLSTATE (safe to log: the server's message can
/// quote bound values), `debugDescription` adds the message for an operator at a terminal.
public struct LedgerStoreError: Error, Sendable, CustomStringConvertible, CustomDebugStringConvertible {
    /// Static codes, as in postgres-nio: new ones can be added without breaking callers' exhaustive switches.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        let name: String
        public var description: String { name }

        /// The database could not be reached, did not answer in time, is overloaded or shutting down, or a COMMIT's
        /// outcome is unknown. Nothing this call asked for was committed, or a retry with the same key replays it:
        /// retry later.
        public static let unavailable = Code(name: "unavailable")
        /// Serialization failures or deadlocks rolled the transaction back more times than `conflictRetriesMax`.
        /// Nothing was committed; a later retry may succeed.
        public static let conflictExhausted = Code(name: "conflictExhausted")
        /// Anything else: a bug, a schema that does not match, an answer the store cannot read.
        public static let `internal` = Code(name: "internal")
    }

    public var code: Code
    /// How long a caller should wait before retrying, for `.unavailable` and `.conflictExhausted`; nil otherwise.
    public var retryAfterSeconds: Int?
    /// The five-character SQLSTATE, when the server sent one. For logs and metrics only.
    public var sqlState: String?
    /// The client library's kind of failure (`connectionFailed`, `server`, ...). For logs and metrics only.
    public var databaseKind: String
    /// The server's or libpq's message. May quote data: only in `debugDescription`.
    public var message: String

    public init(
        code: Code, retryAfterSeconds: Int? = nil, sqlState: String? = nil, databaseKind: String, message: String
    ) {
        self.code = code
        self.retryAfterSeconds = retryAfterSeconds
        self.sqlState = sqlState
        self.databaseKind = databaseKind
        self.message = message
    }

    /// Classifies a client error. Unavailable: the connection failed or broke, the pool had no connection in time,
    /// a statement or lock wait timed out (57014, 55P03), or the server lacks resources (class 53). These are the
    /// failures a retry after a pause can outlive.
    init(_ error: PostgresError, retryAfterSeconds: Int) {
        let code: Code
        if error.isWorthRunningAgain {
            code = .conflictExhausted
        } else if error.isConnectionError || error.isQueryCanceled || error.isLockTimeout
            || (error.sqlState?.hasPrefix("53") ?? false)
        {
            code = .unavailable
        } else {
            code = .internal
        }
        self.init(
            code: code, retryAfterSeconds: code == .internal ? nil : retryAfterSeconds, sqlState: error.sqlState,
            databaseKind: "\(error.code)", message: error.message)
    }

    public var description: String {
        "LedgerStoreError(code: \(code), kind: \(databaseKind)" + (sqlState.map { ", sqlstate: \($0)" } ?? "") + ")"
    }

    public var debugDescription: String {
        String(description.dropLast()) + ", message: \(message))"
    }
}

extension LedgerStore {
    /// Runs one public operation, turning the client layer's errors into the store's own. Every public method that
    /// touches the database goes through here, so no `PostgresError` escapes the store.
    func mappingErrors<T: Sendable>(_ body: () async throws -> T) async throws -> T {
        do {
            return try await body()
        } catch let error as PostgresError {
            throw LedgerStoreError(error, retryAfterSeconds: options.retryAfterSeconds)
        }
    }
}
