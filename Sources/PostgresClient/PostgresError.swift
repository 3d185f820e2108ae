/// The one error type of the PostgresClient layer.
///
/// `description` is safe to log: it names the kind of failure, the SQLSTATE and the constraint, never the server's
/// message (which can quote bound values, e.g. `invalid input syntax for type bigint: "..."`) and never a bound
/// parameter. `debugDescription` adds the server's message, detail and hint for debugging.
public struct PostgresError: Error, Sendable, CustomStringConvertible, CustomDebugStringConvertible {
    /// What kind of failure this is; static codes as in postgres-nio.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        let name: String
        public var description: String { name }

        /// The connection could not be established (server down, refused, authentication, timeout).
        public static let connectionFailed = Code(name: "connectionFailed")
        /// The connection broke while a statement ran or while idle; the statement's outcome is unknown.
        public static let connectionLost = Code(name: "connectionLost")
        /// The server answered a statement with an error; `sqlState` says which.
        public static let server = Code(name: "server")
        /// COMMIT was sent but no answer came back: the transaction may or may not have committed.
        public static let commitOutcomeUnknown = Code(name: "commitOutcomeUnknown")
        /// COMMIT answered ROLLBACK: an earlier statement had failed, so nothing was committed.
        public static let transactionRolledBack = Code(name: "transactionRolledBack")
        /// No connection became free within the pool's acquire timeout.
        public static let poolAcquireTimeout = Code(name: "poolAcquireTimeout")
        /// Too many tasks already wait for a connection; waiting too would only grow latency.
        public static let poolWaitersExhausted = Code(name: "poolWaitersExhausted")
        /// The pool is shut down.
        public static let poolClosed = Code(name: "poolClosed")
        /// A column could not be decoded as the requested Swift type, or was NULL, or does not exist.
        public static let decoding = Code(name: "decoding")
        /// libpq answered something we did not expect (out of memory, an unexpected result status).
        public static let unexpected = Code(name: "unexpected")
    }

    public var code: Code
    /// The five-character SQLSTATE, when the server sent one.
    public var sqlState: String?
    /// The server's or libpq's primary message. May quote data: only in `debugDescription`.
    public var message: String
    public var detail: String?
    public var hint: String?
    /// The constraint a violation names (PG_DIAG_CONSTRAINT_NAME), safe to log.
    public var constraint: String?

    public init(
        code: Code, sqlState: String? = nil, message: String, detail: String? = nil, hint: String? = nil,
        constraint: String? = nil
    ) {
        self.code = code
        self.sqlState = sqlState
        self.message = message
        self.detail = detail
        self.hint = hint
        self.constraint = constraint
    }

    public var description: String {
        var text = "PostgresError(code: \(code)"
        if let sqlState { text += ", sqlstate: \(sqlState)" }
        if let constraint { text += ", constraint: \(constraint)" }
        return text + ")"
    }

    public var debugDescription: String {
        var text = "PostgresError(code: \(code)"
        if let sqlState { text += ", sqlstate: \(sqlState)" }
        if let constraint { text += ", constraint: \(constraint)" }
        text += ", message: \(message)"
        if let detail { text += ", detail: \(detail)" }
        if let hint { text += ", hint: \(hint)" }
        return text + ")"
    }
}

extension PostgresError {
    /// 23505: a unique or primary key constraint refused a row.
    public var isUniqueViolation: Bool { sqlState == "23505" }
    /// 40001: the transaction could not be serialised; retrying it is safe.
    public var isSerializationFailure: Bool { sqlState == "40001" }
    /// 40P01: the server broke a deadlock by failing this transaction; retrying it is safe.
    public var isDeadlock: Bool { sqlState == "40P01" }
    /// 55P03: a lock was not granted within `lock_timeout`.
    public var isLockTimeout: Bool { sqlState == "55P03" }
    /// 57014: the statement was cancelled, usually by `statement_timeout`.
    public var isQueryCanceled: Bool { sqlState == "57014" }

    /// The database could not be reached or went away: the connection is gone, the server is shutting down
    /// (57P01..57P03) or the connection failed (class 08). Callers answer "unavailable, retry later".
    public var isConnectionError: Bool {
        switch code {
        case .connectionFailed, .connectionLost, .commitOutcomeUnknown, .poolAcquireTimeout,
            .poolWaitersExhausted, .poolClosed:
            return true
        default:
            guard let sqlState else { return false }
            return sqlState.hasPrefix("08") || sqlState == "57P01" || sqlState == "57P02" || sqlState == "57P03"
        }
    }

    /// Whether running the same work again in a new transaction is safe and may succeed: serialization failures
    /// and deadlocks by definition rolled everything back.
    public var isTransientConflict: Bool { isSerializationFailure || isDeadlock }
}
