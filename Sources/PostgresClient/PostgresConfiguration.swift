/// How to reach PostgreSQL and the limits of the pool. Every limit has a unit in its name and a documented default.
public struct PostgresConfiguration: Sendable {
    /// A libpq conninfo string or URI (`postgresql://user@host:5432/db`, or `host=... dbname=...`).
    public var conninfo: String
    /// `application_name`, shown in `pg_stat_activity`. Default `ledger`.
    public var applicationName: String
    /// libpq's `connect_timeout` in seconds (libpq's minimum is 2). Default 5.
    public var connectTimeoutSeconds: Int
    /// `statement_timeout` of every connection, in milliseconds. Default 10,000.
    public var statementTimeoutMilliseconds: Int
    /// `idle_in_transaction_session_timeout`, in milliseconds: a leaked transaction cannot hold locks forever.
    /// Default 60,000.
    public var idleInTransactionTimeoutMilliseconds: Int
    /// How long one call (a statement, a BEGIN, a COMMIT) may go unanswered before the connection is given up, in
    /// milliseconds; 0 for no bound. `statement_timeout` is enforced by the server, so it cannot fire when the
    /// server (or the path to it) is what stopped answering; this bound is kept by the client. Default: the
    /// statement timeout plus 5,000 (room for a cancelled statement's answer), or 0 when there is no statement
    /// timeout.
    public var callTimeoutMilliseconds: Int
    /// Connections open at most. Default 16.
    public var poolSizeMax: Int
    /// How long `withConnection` waits for a free connection before failing with `.poolAcquireTimeout`.
    /// Default 5 s.
    public var acquireWaitMax: Duration
    /// How many tasks may wait for a connection at once; one more fails at once with `.poolWaitersExhausted`.
    /// Default 10,000.
    public var waitersMax: Int

    public init(
        conninfo: String,
        applicationName: String = "ledger",
        connectTimeoutSeconds: Int = 5,
        statementTimeoutMilliseconds: Int = 10_000,
        idleInTransactionTimeoutMilliseconds: Int = 60_000,
        callTimeoutMilliseconds: Int? = nil,
        poolSizeMax: Int = 16,
        acquireWaitMax: Duration = .seconds(5),
        waitersMax: Int = 10_000
    ) {
        precondition(poolSizeMax >= 1, "poolSizeMax must be at least 1")
        precondition(waitersMax >= 0, "waitersMax must not be negative")
        self.conninfo = conninfo
        self.applicationName = applicationName
        self.connectTimeoutSeconds = max(2, connectTimeoutSeconds)
        self.statementTimeoutMilliseconds = statementTimeoutMilliseconds
        self.idleInTransactionTimeoutMilliseconds = idleInTransactionTimeoutMilliseconds
        self.callTimeoutMilliseconds = max(
            0, callTimeoutMilliseconds ?? (statementTimeoutMilliseconds > 0 ? statementTimeoutMilliseconds + 5_000 : 0))
        self.poolSizeMax = poolSizeMax
        self.acquireWaitMax = acquireWaitMax
        self.waitersMax = waitersMax
    }
}
